"""ONNX -> TFLite (LiteRT), fp32 or int8, checked against onnxruntime on the host.

Route: the project's ONNX->torch interpreter (`edgesmith.torch_interp`), exported by Google's
`litert-torch` through the TensorFlow-free `litert-converter` (the `tflite-convert` extra). The
usual route, onnx2tf, pins TensorFlow 2.19, numpy 1.26 and onnxruntime 1.23; this one fits beside
our stack, and the interpreter already computes every export of the real-model corpus exactly.

int8 is not a second quantizer: our QDQ model's own scales and zero points become PT2E
quantize/dequantize ops, which the converter folds into TFLite's int8 kernels, so the .tflite
computes on the grid the device's recipe search chose (uint8 activations become int8 with the
zero point moved by 128: the same values). The model keeps its ONNX interface: NCHW tensors and
the ONNX input and output names as its signature keys (inputs made identifiers: `input.1` is
`input_1`, and the runtime takes either). A fully int8 model takes and returns int8 tensors; the
device runtime quantizes float feeds and dequantizes outputs with the model's own scales. Shapes
are fixed at conversion (batch 1 where the ONNX batch is dynamic): run batches as a loop, as
LiteRT users do.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from device_runtime.backends.tflite import identifier

from ..errors import EdgesmithError
from ..host_runs import host_session
from ..onnx_utils import attr

if TYPE_CHECKING:
    from ..model import Model

INSTALL = "pip install torch==2.13.0 'edgesmith[tflite-convert]'"
MAX_FP32_ERROR = 1e-3       # relative to the output's range: kernels' rounding is ~1e-6
QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class ConvertReport:
    """What the conversion made, and how close it computes to the ONNX model on the sample."""

    int8: bool
    ops: dict[str, int]                    # TFLite op name -> count
    delegation: dict | None                # XNNPACK's share on this host (the runtime's figure)
    fidelity: dict                         # vs onnxruntime on the sample: n, sqnr_db, ...
    max_rel_err: float                     # max |tflite - onnx| / max |onnx|, over outputs
    seconds: float
    notes: list[str] = field(default_factory=list)


def unconvertible(model, data=None) -> str | None:
    """Why `model` cannot be converted here: conversion traces one feed of per-sample inputs,
    so a stream's state, constants and scalar inputs have no place in it."""
    if model.state or (data is not None and data.consts) or any(
            not s.shape for s in model.inputs):
        return ("TFLite conversion takes per-sample inputs only, and this model streams (its "
                "state carried between calls) or takes constants or scalars; use onnxruntime")
    return None


def available() -> str | None:
    """Why conversion cannot run on this host, or None when it can."""
    try:
        with _quiet():          # its imports print TensorFlow, torchao and absl chatter
            import litert_torch  # noqa: F401
    except ImportError:
        return f"converting to TFLite needs litert-torch on the host: {INSTALL}"
    except Exception as exc:        # a broken install (e.g. a torch it was not built for)
        return f"litert-torch does not import ({type(exc).__name__}: {exc}); {INSTALL}"
    return None


def to_tflite(model: onnx.ModelProto, sample: dict[str, np.ndarray]) -> tuple[bytes, ConvertReport]:
    """Convert `model` at the shapes of `sample` (one batch of its inputs, by ONNX name; see
    `conversion_sample`); the result is checked against onnxruntime on that sample, and an fp32
    conversion that computes something else is refused. Every failure is one EdgesmithError."""
    why = available()
    if why:
        raise EdgesmithError(why)
    started = time.monotonic()
    try:
        data = _convert(model, sample)
        report = check(model, data, sample)
    except EdgesmithError:
        raise
    except Exception as exc:    # the converter's and runtimes' own errors: long, many-lined
        raise EdgesmithError(f"cannot convert to TFLite: {_first_line(exc)}; the ONNX model "
                             "still runs under onnxruntime") from None
    if not report.int8 and report.max_rel_err > MAX_FP32_ERROR:
        raise EdgesmithError(f"the converted model computes something else (max relative error "
                             f"{report.max_rel_err:.1e} against onnxruntime); not used: please "
                             "report this model")
    report.seconds = time.monotonic() - started
    return data, report


def conversion_sample(model: Model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One batch to convert at: the model's fixed batch, else 1 (what LiteRT apps run)."""
    return {s.name: np.ascontiguousarray(inputs[s.name][:s.dims[0] if s.dims and s.dims[0]
                                                       else 1]) for s in model.inputs}


def random_inputs(model: Model, batch: int = 8) -> dict[str, np.ndarray]:
    """Random values at the model's shapes (`batch` samples where the batch is dynamic): what
    a conversion is checked on when no real samples are given."""
    rng = np.random.default_rng(0)
    return {s.name: rng.standard_normal([s.dims[0] or batch] + s.shape[1:]).astype(s.dtype)
            for s in model.inputs}


def _convert(model: onnx.ModelProto, sample: dict) -> bytes:
    import litert_torch
    import torch

    from ..torch_interp.interpreter import to_torch

    int8 = _is_int8(model)
    graph = _at_fixed_shapes(model, sample)
    graph = _qdq_as_pt2e(graph) if int8 else graph
    try:
        module = _named(to_torch(graph, ops=_ops(torch)), graph).eval()
    except EdgesmithError as exc:
        raise EdgesmithError(f"cannot convert to TFLite: {exc}") from None
    keys = {n: identifier(n) for n in module.input_names}
    if sorted(sample) != sorted(keys) or len(set(keys.values())) < len(keys):
        raise EdgesmithError(f"cannot convert to TFLite: the sample has {sorted(sample)}, the "
                             f"model's inputs are {sorted(keys)} (signature keys "
                             f"{sorted(keys.values())} must differ)")
    kwargs = {"quant_config": _static_int8_config()} if int8 else {}
    with torch.no_grad(), _quiet():
        converted = litert_torch.convert(
            module, sample_kwargs={keys[n]: torch.from_numpy(np.ascontiguousarray(sample[n]))
                                   for n in keys}, **kwargs)
        return bytes(converted.model_content())


def _is_int8(model: onnx.ModelProto) -> bool:
    return any(n.op_type in QDQ for n in model.graph.node)


def _first_line(exc: Exception) -> str:
    """The line that names the problem (MLIR and torch.export errors end in advice lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {(lines or [''])[0][:300]}"


def as_model(data: bytes, source: Model) -> Model:
    """The converted model as a `Model`: its own input shapes (fixed at conversion) under the
    source's names and dtypes, the source's parameter and MAC counts (the same computation),
    its own size."""
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    from ..model import load

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tflite"
        path.write_bytes(data)
        model = load(path)
    model.path = None
    model.facts = replace(source.facts, format="tflite", size_bytes=len(data), notes=[])
    # the ONNX names (the runtime maps `input.1` to its key `input_1`) and dtypes (a fully
    # int8 model's int8 I/O is quantized by the runtime)
    mine = {spec.name: spec for spec in model.inputs}
    model.inputs = [replace(mine[identifier(s.name)] if s.name not in mine else mine[s.name],
                            name=s.name, dtype=s.dtype) for s in source.inputs]
    return model


def check(model: onnx.ModelProto, data: bytes, sample: dict[str, np.ndarray],
          labels: np.ndarray | None = None) -> ConvertReport:
    """Run the .tflite (the device runtime's backend, XNNPACK on) and onnxruntime on `sample`
    (and top-1 against `labels` when given)."""
    import tempfile

    from device_runtime.backends.tflite import Backend
    from device_runtime.evaluate import EvalData, metrics

    with tempfile.NamedTemporaryFile(suffix=".tflite") as fh, _quiet():
        fh.write(data)
        fh.flush()
        backend = Backend(fh.name, {"threads": 1})
    session = host_session(model.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    batch = [int(d["shape"][0]) for d in backend.inputs.values()][0] or 1
    n = len(next(iter(sample.values())))
    used = n - n % batch
    got: dict[str, list] = {}
    refs: dict[str, list] = {}
    for start in range(0, used, batch):       # both in chunks of the batch it was converted at
        feed = {k: np.ascontiguousarray(v[start:start + batch]) for k, v in sample.items()}
        for name, value in zip(backend.output_names, backend.run(feed)):
            got.setdefault(name, []).append(value)
        for name, value in zip(names, session.run(None, feed)):
            refs.setdefault(name, []).append(value)
    got = {k: np.concatenate(v) for k, v in got.items()}
    refs = {k: np.concatenate(v) for k, v in refs.items()}
    missing = sorted(set(refs) - set(got))
    if missing:
        raise EdgesmithError(f"the converted model lacks outputs {missing} (it has "
                             f"{sorted(got)}); please report this model")
    rel = max(float(np.max(np.abs(got[k].astype(np.float64) - r))
                    / max(float(np.max(np.abs(r))), 1e-12)) for k, r in refs.items())
    fidelity = metrics({k: got[k] for k in refs}, EvalData(
        {}, None if labels is None else labels[:used], refs, used))
    ops = Counter(op["op_name"] for op in backend.interp._get_ops_details()
                  if op["op_name"] != "DELEGATE")
    return ConvertReport(_is_int8(model), dict(ops), backend.delegation(), fidelity, rel, 0.0)


def _named(module, graph: onnx.ModelProto):
    """The interpreter module with the ONNX names on its interface: inputs as keyword
    arguments (made identifiers: `input.1` is `input_1`, which the runtime accepts for it),
    outputs as a dict (litert-torch names the TFLite signature's keys after them)."""
    import torch

    class Named(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module
            self.input_names, self.output_names = module.inputs, module.outputs

        def forward(self, **inputs):
            return dict(zip(self.output_names, self.inner(*[inputs[identifier(n)] for n in
                                                            self.input_names])))

    return Named()


def _at_fixed_shapes(model: onnx.ModelProto, sample: dict) -> onnx.ModelProto:
    """Shape arithmetic (Shape -> Gather -> Concat -> Reshape, as TorchScript exports write it)
    becomes constants at the conversion's shapes: torch.export cannot trace sizes read out of
    tensors, and a .tflite has fixed shapes anyway. The sizes are read by running the sample
    (shape inference gives up on some real exports), then constants are folded."""
    from ..passes.fuse import constant_folding
    from ..onnx_utils import probe_session

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for vi in g.input:
        if vi.name in sample:
            for dim, size in zip(vi.type.tensor_type.shape.dim, sample[vi.name].shape):
                dim.Clear()
                dim.dim_value = int(size)
    sizes = [n for n in g.node if n.op_type in ("Shape", "Size")]
    if sizes:
        values = probe_session(model, [n.output[0] for n in sizes],
                               dtype=onnx.TensorProto.INT64).run(None, sample)
        for n, value in zip(sizes, values):
            g.node.remove(n)
            g.initializer.append(numpy_helper.from_array(np.asarray(value, np.int64),
                                                         n.output[0]))
    return constant_folding(out)[0]


def _static_int8_config():
    """litert-torch folds quantize/dequantize pairs into int8 kernels only in its PT2E static
    mode; the quantizer itself is never run (our graph is already quantized)."""
    from litert_torch.quantize import pt2e_quantizer as pq
    from litert_torch.quantize.quant_config import QuantConfig

    return QuantConfig(pt2e_quantizer=pq.PT2EQuantizer().set_global(
        pq.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)))


def _ops(torch) -> dict:
    """The interpreter's ops plus the three PT2E ops a QDQ graph is rewritten to."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the ops)

    from ..torch_interp.ops import OPS

    qd = torch.ops.quantized_decomposed

    def quantize(n, x, e):
        return qd.quantize_per_tensor(x[0], attr(n, "scale"), attr(n, "zero_point"),
                                      attr(n, "qmin"), attr(n, "qmax"), torch.int8)

    def dequantize(n, x, e):
        return qd.dequantize_per_tensor(x[0], attr(n, "scale"), attr(n, "zero_point"),
                                        attr(n, "qmin"), attr(n, "qmax"), torch.int8)

    def per_channel(n, x, e):       # scales and zero points must be constants (placeholders)
        axis, lo, hi = attr(n, "axis"), attr(n, "qmin"), attr(n, "qmax")
        q = qd.quantize_per_channel(x[0], x[1], x[2], axis, lo, hi, torch.int8)
        return qd.dequantize_per_channel(q, x[1], x[2], axis, lo, hi, torch.int8)

    def hard_sigmoid(n, x, e):      # as ReLU6: TFLite's RELU_0_TO_1 has no XNNPACK kernel
        alpha, beta = attr(n, "alpha", 0.2), attr(n, "beta", 0.5)
        return torch.nn.functional.relu6(x[0] * (6 * alpha) + 6 * beta) * (1 / 6)

    def resize(n, x, e):
        """Nearest upsampling by whole factors as concatenations: TFLite's
        RESIZE_NEAREST_NEIGHBOR has no XNNPACK kernel (detectors' and OCR necks' upsampling)."""
        y = OPS[n.op_type](n, x, e)            # checks the mode, and gives the output size
        mode = attr(n, "mode", b"nearest")
        src, (h, w) = x[0], y.shape[-2:]
        fh, fw = h // src.shape[-2], w // src.shape[-1]
        if src.dim() != 4 or mode not in (b"nearest", "nearest") or \
                (fh * src.shape[-2], fw * src.shape[-1]) != (h, w):
            return y
        n_, c, sh, sw = src.shape
        wide = torch.stack([src] * fw, dim=-1).reshape(n_, c, sh, w)
        return torch.stack([wide] * fh, dim=-2).reshape(n_, c, h, w)

    return {**OPS, "HardSigmoid": hard_sigmoid, "Resize": resize, "Upsample": resize, "EsQuantize": quantize,
            "EsDequantize": dequantize, "EsFakeQuantChannel": per_channel}


def _qdq_as_pt2e(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite onnxruntime's QDQ nodes into the PT2E form litert-torch lowers: activations'
    QuantizeLinear/DequantizeLinear keep their scale and zero point as attributes (int8 grid;
    uint8 moves by 128: the same values); a constant's DequantizeLinear (weights per channel or
    per tensor, Add/Mul operands with their zero points) becomes a fake-quant of its float
    values, which gives exactly its integers back; int32 biases become float (the converter
    requantizes them with s_x * s_w, which is how onnxruntime made them)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    added: dict[str, np.ndarray] = {}
    nodes = []
    for n in g.node:
        if n.op_type not in QDQ:
            nodes.append(n)
            continue
        if n.input[1] not in inits or (len(n.input) > 2 and n.input[2]
                                        and n.input[2] not in inits):
            raise EdgesmithError(f"cannot convert to TFLite: {n.op_type} {n.name!r} has a scale "
                                 "computed at run time (only constant scales map to int8 TFLite)")
        scale = inits[n.input[1]].astype(np.float32)
        zero = inits[n.input[2]] if len(n.input) > 2 and n.input[2] else np.zeros((), np.uint8)
        src, axis = n.input[0], attr(n, "axis", 1)
        if n.op_type == "DequantizeLinear" and src in inits:   # weight, bias or constant operand
            q = inits[src]
            shape = [1] * q.ndim
            if scale.size > 1:
                shape[axis] = -1
            real = ((q.astype(np.float64) - zero.astype(np.float64).reshape(shape))
                    * scale.reshape(shape)).astype(np.float32)
            if q.dtype == np.int32:
                added[n.output[0]] = real
                continue
            if q.dtype not in (np.int8, np.uint8):
                raise EdgesmithError(f"cannot convert to TFLite: constant {src!r} is {q.dtype} "
                                     "(TFLite's int8 kernels take 8-bit constants)")
            shift = 128 if q.dtype == np.uint8 else 0       # the same values on the int8 grid
            zeros = zero.astype(np.int64).reshape(-1) - shift
            symmetric = not zeros.any() and int(q.astype(np.int32).min()) - shift >= -127
            lo, hi = (-127, 127) if symmetric else (-128, 127)
            added[src + ".f32"] = real
            if scale.size > 1:
                channels = q.shape[axis]
                added[src + ".scale"] = np.broadcast_to(scale.reshape(-1), (channels,)).copy()
                added[src + ".zero"] = np.broadcast_to(zeros, (channels,)).copy()
                nodes.append(helper.make_node(
                    "EsFakeQuantChannel", [src + ".f32", src + ".scale", src + ".zero"],
                    list(n.output), axis=axis % q.ndim, qmin=lo, qmax=hi))
                continue
            grid = {"scale": scale.reshape(()).item(), "zero_point": int(zeros[0]), "qmin": lo,
                    "qmax": hi}
            nodes.append(helper.make_node("EsQuantize", [src + ".f32"], [src + ".q"], **grid))
            nodes.append(helper.make_node("EsDequantize", [src + ".q"], list(n.output), **grid))
            continue
        if scale.size != 1:
            raise EdgesmithError(f"cannot convert to TFLite: {n.op_type} {n.name!r} quantizes "
                                 "an activation per channel (TFLite takes per-tensor "
                                 "activations)")
        shift = 128 if zero.dtype == np.uint8 else 0
        if zero.dtype not in (np.uint8, np.int8):
            raise EdgesmithError(f"cannot convert to TFLite: {n.op_type} {n.name!r} uses "
                                 f"{zero.dtype} (TFLite's int8 path takes 8-bit activations)")
        nodes.append(helper.make_node(
            "EsQuantize" if n.op_type == "QuantizeLinear" else "EsDequantize", [src],
            list(n.output), scale=scale.reshape(()).item(),
            zero_point=int(zero.reshape(()).item()) - shift, qmin=-128, qmax=127))
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in nodes for i in n.input} | {o.name for o in g.output}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept + [numpy_helper.from_array(v, k) for k, v in added.items()])
    return out


class _quiet:
    """litert-torch prints progress and MLIR chatter to stdout/stderr (from C++ too): silence
    file descriptors 1 and 2 during conversion; errors still arrive as exceptions."""

    def __enter__(self):
        import os
        import sys
        import tempfile

        sys.stdout.flush()
        sys.stderr.flush()
        self.log = tempfile.TemporaryFile()
        self.saved = [os.dup(1), os.dup(2)]
        for fd in (1, 2):
            os.dup2(self.log.fileno(), fd)
        return self

    def __exit__(self, *exc):
        import os
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        self.log.close()
        return False
