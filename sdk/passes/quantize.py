"""Post-training quantization on top of `onnxruntime.quantization`.

We use ORT's pieces where they are the right tool: `quant_pre_process` (symbolic shape inference
and basic optimisation), its calibrators (MinMax / percentile / entropy, with periodic merging so
memory stays bounded: `CalibMaxIntermediateOutputs`) and its QDQ / QOperator quantizers. Calibration
runs once per (model, method) and is cached (`calibration_cache_path`), so trying many recipes or
layer exclusions costs one calibration. Memory stays bounded: ORT's strided calibration
(`CalibStridedMinMax`, stride 1) collects and merges one batch at a time, for MinMax ranges and
for the percentile/entropy histograms alike (ORT's own default keeps every batch's activations,
and `CalibMaxIntermediateOutputs` in onnxruntime 1.32 drops data instead of merging it). What we add: fixing dynamic input dimensions first (ORT's
symbolic shape inference gives up on them and users then get a slow model), typed recipes,
dynamic quantization only for MatMul/Gemm, and fp16 for GPU targets.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import onnx

from ..errors import EdgesmithError
from ..host_runs import bound_quantizer_calibration
from ..onnx_utils import static_shapes, with_input_dims
from . import PassReport, register
from .ranges import RangeConfig, refine_ranges

# a recipe's calibration -> onnxruntime's method collecting its ranges (robust-minmax: ranges.py
# then replaces min/max ranges by robust per-sample extremes)
ORT_CALIBRATION = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy",
                   "robust-minmax": "MinMax"}
CALIB_METHODS = tuple(ORT_CALIBRATION)
QUANT_OPS = ("Conv", "Gemm", "MatMul")
COMPUTE_OPS = (*QUANT_OPS, "ConvTranspose")     # where int8 saves time
DYNAMIC_OPS = ("MatMul", "Gemm", "LSTM")        # weights-only int8: onnxruntime's kernels


def output_tail(model: onnx.ModelProto) -> list[str]:
    """The nodes after the last compute op on every path to the outputs (a feature
    extractor's GlobalAveragePool + Flatten, a detector's decode, a Softmax). Quantizing them
    saves no time, and their quantizers clip what calibration did not see: pooled ResNet-50
    features on held-out photos reached 3x the calibrated range, and that one output quantizer
    cost 6.9 dB against 23.1 dB with the tail in float."""
    nodes = list(model.graph.node)      # ONNX keeps them topologically sorted
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    feeds_compute = [False] * len(nodes)
    for i in reversed(range(len(nodes))):
        feeds_compute[i] = any(nodes[c].op_type in COMPUTE_OPS or feeds_compute[c]
                               for out in nodes[i].output for c in consumers.get(out, []))
    return [n.name for n, feeds in zip(nodes, feeds_compute)
            if n.op_type not in COMPUTE_OPS and not feeds]


@dataclass(frozen=True)
class QuantRecipe:
    """One way to quantize; `name` is what reports and CLI use."""

    name: str
    format: str = "QDQ"                  # "QDQ" | "QOperator"
    activations: str = "U8"              # "U8" | "S8"
    weights: str = "S8"
    per_channel: bool = True
    reduce_range: bool = False           # 7-bit weights: no int16 overflow in AVX2 u8s8 kernels
    symmetric_activations: bool = False
    calibration: str = "minmax"
    percentile: float = 99.999
    exclude: tuple[str, ...] = ()        # node names kept in float (mixed precision)
    dynamic: bool = False                # weights-only int8 for MatMul/Gemm; activations at run time
    fp16: bool = False
    equalize: bool = False               # cross-layer equalization before calibration
    bias_correction: bool = False
    refine_ranges: bool = False          # MSE-optimal activation ranges after calibration
    reconstruct: int = 0                 # block reconstruction's steps per block (0: off)
    qat: int = 0                         # epochs of quantization-aware training (0: off)

    def __post_init__(self):
        checks = {"format": (self.format, ("QDQ", "QOperator")),
                  "activations": (self.activations, ("U8", "S8")),
                  "weights": (self.weights, ("U8", "S8")),
                  "calibration": (self.calibration, CALIB_METHODS)}
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"QuantRecipe.{name} is {value!r}; use one of {allowed}")
        if not 90.0 <= self.percentile <= 100.0:
            raise ValueError(f"QuantRecipe.percentile must be in [90, 100], got {self.percentile}")
        if self.dynamic and self.fp16:
            raise ValueError("QuantRecipe: dynamic and fp16 exclude each other")

    @property
    def weight_range(self) -> tuple[int, int]:
        """The integer grid onnxruntime quantizes this recipe's weights to."""
        if self.weights == "S8":
            return (-64, 64) if self.reduce_range else (-127, 127)
        return (0, 127) if self.reduce_range else (0, 255)

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "int8"

    def with_exclusions(self, nodes: Iterable[str]) -> "QuantRecipe":
        return replace(self, exclude=tuple(sorted(set(self.exclude) | set(nodes))))


@contextlib.contextmanager
def _working_dir(path: str):
    """ORT's symbolic shape inference saves `sym_shape_infer_temp.onnx` (and external data
    files) into the current directory when it gives up: keep that out of the user's."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """The concrete input shapes ({input name: dims}) shape inference runs on; a dynamic batch
    stays dynamic."""

    input_shapes: dict


@register("preprocess")
def preprocess(model: onnx.ModelProto, cfg: PreprocessConfig
               ) -> tuple[onnx.ModelProto, PassReport]:
    """ORT's quantization pre-processing, after fixing dims (and opset >= 13 for per-channel).

    ORT's symbolic shape inference gives up on some real models (detectors with dynamic H/W);
    then the pre-processing runs again on ONNX's own shape inference over the fixed shapes, and
    the report says so. ORT's API reads and writes files: a private temp dir, nothing kept."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .fuse import OpsetConfig, upgrade_opset

    report = PassReport("preprocess")
    model, _ = upgrade_opset(with_input_dims(model, cfg.input_shapes, keep_batch=True),
                             OpsetConfig(opset=13))
    with tempfile.TemporaryDirectory() as tmp, _working_dir(tmp):
        out, src = Path(tmp) / "pre.onnx", Path(tmp) / "float.onnx"
        src.write_bytes(model.SerializeToString())
        try:
            quant_pre_process(str(src), str(out), skip_optimization=False)
        except Exception as exc:   # ORT's symbolic inference has many exits
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            try:
                quant_pre_process(str(src), str(out), skip_optimization=False,
                                  skip_symbolic_shape=True)
            except Exception as exc2:
                why2 = str(exc2).splitlines()[0] if str(exc2) else type(exc2).__name__
                raise EdgesmithError(f"quantization pre-processing failed: {why}; without "
                                     f"symbolic shapes: {why2}") from None
            report.add(f"onnxruntime's symbolic shape inference failed ({why}); used ONNX "
                       "shape inference on the fixed input shapes instead")
        return name_nodes(onnx.load(str(out)), report), report


def name_nodes(model: onnx.ModelProto, report: PassReport) -> onnx.ModelProto:
    """Every node named, uniquely: onnxruntime's quantizer leaves out nodes by name, so one
    unnamed node in the exclusions (an output tail's Add in a graph without names) left out
    every unnamed node, and the "int8" model was the float one."""
    taken = {n.name for n in model.graph.node}
    unnamed = [n for n in model.graph.node if not n.name]
    for i, node in enumerate(unnamed):
        name = f"{node.op_type}_{i}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)
    if unnamed:
        report.add(f"named {len(unnamed)} unnamed nodes (quantization leaves nodes out by name)")
    return model


class _Reader:
    """ORT's CalibrationDataReader over input batches, with the `set_range` that ORT's strided
    calibration uses to collect (and merge) one batch at a time."""

    def __init__(self, batches: Iterable[dict]):
        self.batches = list(batches)      # inputs only; the activations are what must not pile up
        self.count = 0
        self._pos, self._end = 0, len(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pos, self._end = start_index, min(end_index, len(self.batches))

    def get_next(self):
        if self._pos >= self._end:
            return None
        self._pos += 1
        self.count += 1
        return self.batches[self._pos - 1]


CALIBRATION_RUN_BYTES = 256 << 20    # the activations of one calibration run


def calibration_feeds(model: onnx.ModelProto, batches: list[dict]) -> list[dict]:
    """The batches split so that one calibration run's activations stay under
    CALIBRATION_RUN_BYTES: onnxruntime's calibrator runs a graph where every tensor also feeds
    a reduction, so a run holds all its activations at once (a MiniLM-size encoder at 16
    sentences of 128 tokens peaked at 2.9 GB on the host). Min/max ranges are the same over
    any split; a model with a fixed batch keeps its batches."""
    first = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
    if not batches or not first or (first[0].HasField("dim_value") and first[0].dim_value > 0):
        return batches
    if len({v.shape[:1] for v in batches[0].values()}) != 1:
        return batches     # a stream's calls (a scalar, a state batched on axis 1): as they are
    one = with_input_dims(model, {k: [1, *v.shape[1:]] for k, v in batches[0].items()})
    weights = {t.name for t in model.graph.initializer}
    per_sample = sum(4 * math.prod(dims) for name, dims in static_shapes(one).items()
                     if name not in weights)
    step = max(1, CALIBRATION_RUN_BYTES // max(1, per_sample))
    return [{k: v[i:i + step] for k, v in b.items()} for b in batches
            for i in range(0, len(next(iter(b.values()))), step)]


def _extra_options(recipe: QuantRecipe) -> dict:
    options = {"ActivationSymmetric": recipe.symmetric_activations, "WeightSymmetric": True,
               "CalibStridedMinMax": 1}
    if recipe.calibration == "percentile":
        options["CalibPercentile"] = recipe.percentile
    return options


@dataclass(frozen=True, eq=False)
class QuantizeConfig:
    """Static quantization: the recipe, calibration feeds, and where the caller keeps ORT's
    calibration ranges (trying many recipes on one model then calibrates once)."""

    recipe: QuantRecipe
    batches: list | None = None            # [{input: array}]; only read when the cache is new
    calibration_cache: Path | None = None  # caller-owned; None: calibrate every time


WARNED = "onnxruntime's quantizer warned"


@contextlib.contextmanager
def quantizer_voice(report: PassReport):
    """onnxruntime's quantizer prints progress to stdout and warns through the root logger (a
    transformer's LayerNorm gave ten raw "Axis 1 is out-of-range" lines): both are kept from
    the terminal; each kind of warning goes to the report's metrics["warnings"] once."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler, root = Keep(logging.WARNING), logging.getLogger()
    root.addHandler(handler)        # with a handler there, logging's last resort stays quiet
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeHandler(handler)
        report.metrics["warnings"] = report.metrics.get("warnings", []) + _grouped(records)


def _grouped(messages: list[str]) -> list[str]:
    """One line per kind of warning: the quoted names it repeats for are listed, not repeated
    (a 6-layer encoder's per-LayerNorm warning is one line, not 13)."""
    kinds: dict[str, list[str]] = {}
    for text in messages:
        names = re.findall(r"'([^']*)'", text)
        kinds.setdefault(re.sub(r"'[^']*'", "'…'", text), []).extend(names or [""])
    lines = []
    for text, names in kinds.items():
        names = list(dict.fromkeys(n for n in names if n))
        if len(names) > 1:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            text = f"{text} ({len(names)}: {shown})"
        elif names:
            text = text.replace("'…'", f"'{names[0]}'", 1)
        lines.append(f"{WARNED}: {text}")
    return lines


@register("quantize")
def quantize_static(model: onnx.ModelProto, cfg: QuantizeConfig
                    ) -> tuple[onnx.ModelProto, PassReport]:
    """Static int8 through onnxruntime's quantizer (it reads and writes files: a private temp
    dir holds them; the calibration cache is the caller's)."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static as ort_quantize_static)

    bound_quantizer_calibration()
    recipe = cfg.recipe
    qtypes = {"U8": QuantType.QUInt8, "S8": QuantType.QInt8}
    report = PassReport(f"quantize:{recipe.name}")
    tail = [n for n in output_tail(model) if n and n not in recipe.exclude]
    with tempfile.TemporaryDirectory() as tmp:
        calib_cache = cfg.calibration_cache or Path(tmp) / "calibration.json"
        reader = None
        if not Path(calib_cache).is_file():
            if cfg.batches is None:
                raise EdgesmithError("calibration data is needed (--calib .npz or image folder)")
            reader = _Reader(calibration_feeds(model, cfg.batches))
            if not len(reader):
                raise EdgesmithError("calibration data is empty")
        out, src = Path(tmp) / "q.onnx", Path(tmp) / "float.onnx"
        src.write_bytes(model.SerializeToString())   # a path: ORT mutates ModelProtos it is given
        try:
            with quantizer_voice(report):
                ort_quantize_static(
                    str(src), str(out), reader,
                    quant_format=QuantFormat.QDQ if recipe.format == "QDQ" else QuantFormat.QOperator,
                    per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
                    activation_type=qtypes[recipe.activations], weight_type=qtypes[recipe.weights],
                    nodes_to_exclude=[*recipe.exclude, *tail],
                    calibrate_method=getattr(CalibrationMethod,
                                             ORT_CALIBRATION[recipe.calibration]),
                    extra_options=_extra_options(recipe), calibration_cache_path=str(calib_cache))
        except StopIteration:
            raise EdgesmithError("calibration data is empty") from None
        except ValueError as exc:
            if "bins" not in str(exc) or recipe.calibration == "minmax":
                raise
            # numpy cannot bin a tensor whose values are (nearly) all equal, e.g. a detector's
            # constant grid computed at run time; onnxruntime's histogram calibrators give up
            raise EdgesmithError(
                f"{recipe.calibration} calibration failed: onnxruntime's histogram cannot bin a "
                "tensor of this model whose values are all (nearly) equal; use a min/max "
                "recipe (e.g. qdq-u8s8-mse)") from None
        quantized = onnx.load(str(out))
    if reader is not None and reader.count == 0:
        raise EdgesmithError("calibration data is empty")
    if recipe.calibration == "robust-minmax":
        if not cfg.batches:
            raise EdgesmithError("robust-minmax calibration needs the calibration data")
        quantized, ranges = refine_ranges(quantized, RangeConfig(model, cfg.batches,
                                                                 estimator="robust-minmax"))
        report.details.extend(ranges.details)
    kinds = [n.op_type for n in quantized.graph.node]
    report.metrics.update(
        quantize_linear=kinds.count("QuantizeLinear"), dequantize_linear=kinds.count(
            "DequantizeLinear"), qlinear_ops=sum(k.startswith("QLinear") for k in kinds),
        excluded=list(recipe.exclude), float_tail=tail,
        calibration_batches=reader.count if reader else "cached")
    report.add(f"{recipe.name}: {recipe.format} act {recipe.activations} weights {recipe.weights}"
               f"{' per-channel' if recipe.per_channel else ''}"
               f"{' reduce_range' if recipe.reduce_range else ''}, {recipe.calibration}"
               f" calibration, {len(recipe.exclude)} node(s) kept in float")
    if tail:
        report.add(f"the output tail stays float ({len(tail)} node(s) after the last "
                   "Conv/Gemm/MatMul: no int8 speed to gain there, and no range to clip)")
    return quantized, report


@register("quantize_dynamic")
def quantize_dynamic(model: onnx.ModelProto, recipe: QuantRecipe | None = None
                     ) -> tuple[onnx.ModelProto, PassReport]:
    """Weights-only int8 for MatMul/Gemm and LSTM (transformers, recurrent streams: onnxruntime
    has a DynamicQuantizeLSTM kernel). Convs stay float on purpose: ConvInteger is several
    times slower than float convs in onnxruntime on x86."""
    from onnxruntime.quantization import QuantType, quantize_dynamic as ort_quantize_dynamic

    recipe = recipe or QuantRecipe("dynamic", dynamic=True)
    report = PassReport("quantize_dynamic")
    with tempfile.TemporaryDirectory() as tmp:
        out, src = Path(tmp) / "q.onnx", Path(tmp) / "float.onnx"
        src.write_bytes(model.SerializeToString())
        with quantizer_voice(report):
            ort_quantize_dynamic(str(src), str(out), op_types_to_quantize=list(DYNAMIC_OPS),
                                 per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
                                 weight_type=QuantType.QInt8 if recipe.weights == "S8"
                                 else QuantType.QUInt8, nodes_to_exclude=list(recipe.exclude))
        quantized = onnx.load(str(out))
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    report.add(f"MatMul/Gemm/LSTM weights int8; {convs} Conv node(s) kept in float (onnxruntime's "
               "ConvInteger is slower than float convs)")
    return quantized, report


RECURRENT = {"GRU", "LSTM", "RNN"}


@register("to_fp16")
def to_fp16(model: onnx.ModelProto, recipe: QuantRecipe | None = None
            ) -> tuple[onnx.ModelProto, PassReport]:
    """Weights and activations in fp16 with fp32 inputs/outputs: for GPU targets (Jetson).
    Beside a recurrent layer the Transposes stay fp32: onnxruntime 1.32's layout optimizer
    segfaults loading a CRNN's fp16 Transpose -> GRU (found by the corpus pass test)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    report = PassReport("to_fp16")
    ops = {n.op_type for n in model.graph.node}
    kept = sorted({"Transpose"} & ops) if ops & RECURRENT else []
    converted = convert_float_to_float16(model, keep_io_types=True,
                                         op_block_list=DEFAULT_OP_BLOCK_LIST + kept)
    report.add("weights and activations converted to fp16 (inputs/outputs stay fp32)"
               + (f"; {kept} kept in fp32 beside the recurrent layer" if kept else ""))
    return converted, report
