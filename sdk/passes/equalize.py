"""Data-free quantization aids (Nagel et al. 2019): cross-layer equalization and bias correction.

CLE rescales each output channel i of a Conv and the matching input channel of the next Conv by
s_i = sqrt(r1_i / r2_i) (r = the channels' weight ranges), through a ReLU, so both layers' per-
channel ranges become sqrt(r1_i * r2_i): depthwise layers with a few huge channels stop wasting
the int8 grid. ReLU is scale-equivariant, ReLU6 is not. AIMET swaps ReLU6 for ReLU, which changes
the float model (on ImageNet MobileNetV2 that alone caps SQNR near 21 dB). With calibration data
we keep ReLU6 and stay exact instead: scaling a channel by 1/s moves its clip from 6 to 6*s, which
changes nothing while the channel's pre-activation maximum m stays below the clip, so s is kept
>= m/6 for channels that never saturate and s = 1 for channels that do. Without data we fall
back to AIMET's swap (the report counts the swaps).

Bias correction (empirical variant) removes the mean shift that weight rounding causes:
E[(W_q - W) x] = (W_q - W) E[x], with E[x] per input channel from the calibration data, and the
weight quantization mirrored from onnxruntime's (symmetric, per channel, optional 7-bit).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from . import PassReport, register
from ..onnx_utils import UNBOUNDED, Graph, attr, clip_bounds, probe_session

SWEEPS = 8


def _pairs(graph: Graph) -> list[tuple]:
    """(conv1, activation or None, conv2) chains that can be equalized."""
    pairs = []
    for conv1 in graph.g.node:
        if conv1.op_type != "Conv" or graph.array(conv1.input[1]) is None:
            continue
        if len(conv1.input) > 2 and conv1.input[2] and graph.array(conv1.input[2]) is None:
            continue          # a bias computed at run time (a Constant node) cannot be rescaled
        act = graph.only_consumer(conv1.output[0])
        nxt = act
        if act is not None and act.op_type in ("Relu", "Clip"):
            if act.op_type == "Clip":
                bounds = clip_bounds(graph, act)
                if bounds is None or bounds[0] != 0.0:
                    continue
            nxt = graph.only_consumer(act.output[0])
        else:
            act = None
        if nxt is None or nxt.op_type != "Conv" or graph.array(nxt.input[1]) is None:
            continue
        w2 = graph.array(nxt.input[1])
        groups = attr(nxt, "group", 1)
        channels = graph.array(conv1.input[1]).shape[0]
        if groups not in (1, channels) or (groups == channels and w2.shape[1] != 1):
            continue
        pairs.append((conv1, act, nxt))
    return pairs


def _clip_max(graph: Graph, act) -> float | None:
    if act is None or act.op_type != "Clip":
        return None
    bounds = clip_bounds(graph, act)
    return None if bounds is None or bounds[1] >= UNBOUNDED[1] else bounds[1]


@dataclass(frozen=True, eq=False)
class EqualizeConfig:
    batches: list = field(default_factory=list)   # calibration feeds: exact through ReLU6


@dataclass(frozen=True, eq=False)
class BiasCorrectConfig:
    recipe: object                                # QuantRecipe: how weights will be rounded
    batches: list = field(default_factory=list)   # calibration feeds for E[x]

    def __post_init__(self):
        if not self.batches:
            raise ValueError("BiasCorrectConfig.batches must hold calibration data")


@register("equalize")
def equalize(model: onnx.ModelProto, cfg: EqualizeConfig | None = None
             ) -> tuple[onnx.ModelProto, PassReport]:
    """Cross-layer equalization over every Conv -> (ReLU | ReLU6) -> Conv pair; exact through
    ReLU6 when calibration batches are given (else ReLU6 becomes ReLU, like AIMET)."""
    batches = (cfg or EqualizeConfig()).batches or None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = Graph(out.graph)
    report = PassReport("equalize")
    pairs = _pairs(graph)
    relu6 = 0
    # per pair: the smallest scale each channel may take, inf where it must stay 1 (saturates)
    floors: dict[str, np.ndarray] = {}
    clipped = [(c1, act) for c1, act, _ in pairs if _clip_max(graph, act) is not None]
    if clipped and batches:
        maxima = channel_stats(out, [c1.output[0] for c1, _ in clipped], batches)["max"]
        for c1, act in clipped:
            limit = _clip_max(graph, act)
            m = maxima[c1.output[0]]
            floors[c1.output[0]] = np.where(m < limit, m / limit, np.inf)
    else:
        for _, act in clipped:
            act.op_type = "Relu"
            del act.input[1:]
            del act.attribute[:]          # opset < 11 writes the bounds as attributes
            relu6 += 1
    spreads = []
    for sweep in range(SWEEPS):
        biggest = 0.0
        for conv1, _, conv2 in pairs:
            w1, w2 = graph.array(conv1.input[1]), graph.array(conv2.input[1])
            depthwise = attr(conv2, "group", 1) > 1
            r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
            r2 = (np.abs(w2).reshape(w2.shape[0], -1).max(axis=1) if depthwise
                  else np.abs(w2).transpose(1, 0, *range(2, w2.ndim)).reshape(w2.shape[1], -1)
                  .max(axis=1))
            valid = (r1 > 1e-12) & (r2 > 1e-12)
            s = np.ones_like(r1)
            s[valid] = np.sqrt(r1[valid] / r2[valid])
            floor = floors.get(conv1.output[0])
            if floor is not None:   # keep each ReLU6 clip where it was on the data
                s = np.where(np.isinf(floor), 1.0, np.maximum(s, floor))
                floors[conv1.output[0]] = np.where(np.isinf(floor), floor, floor / s)
            biggest = max(biggest, float(np.max(np.abs(np.log(s)))))
            shape1 = (-1,) + (1,) * (w1.ndim - 1)
            graph.set_array(conv1.input[1], (w1 / s.reshape(shape1)).astype(w1.dtype))
            if len(conv1.input) > 2 and conv1.input[2]:
                b1 = graph.array(conv1.input[2])
                graph.set_array(conv1.input[2], (b1 / s).astype(b1.dtype))
            scale2 = s.reshape((-1,) + (1,) * (w2.ndim - 1)) if depthwise else \
                s.reshape((1, -1) + (1,) * (w2.ndim - 2))
            graph.set_array(conv2.input[1], (w2 * scale2).astype(w2.dtype))
        spreads.append(biggest)
        if biggest < 1e-3:
            break
    report.metrics.update(pairs=len(pairs), relu6_to_relu=relu6, sweeps=len(spreads),
                          relu6_kept_exact=len(clipped) if batches else 0)
    if pairs:
        report.add(f"equalized {len(pairs)} conv pair(s) in {len(spreads)} sweep(s); "
                   f"{relu6} ReLU6 replaced by ReLU")
    return out, report


def _fake_quant_weights(w: np.ndarray, axis: int | None, reduce_range: bool) -> np.ndarray:
    """Symmetric int8 quantize-dequantize, as onnxruntime quantizes weights."""
    from onnxruntime.quantization.quant_utils import QuantType, get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(QuantType.QInt8.tensor_type, reduce_range,
                                         symmetric=True)
    qmin, qmax = float(qmin), float(qmax)
    moved = np.moveaxis(w, axis, 0) if axis is not None else w.reshape(1, -1)
    flat = moved.reshape(moved.shape[0], -1).astype(np.float64)
    absmax = np.maximum(np.abs(flat).max(axis=1, keepdims=True), 1e-12)
    scale = 2 * absmax / (qmax - qmin)
    deq = np.clip(np.round(flat / scale), qmin, qmax) * scale
    deq = deq.reshape(moved.shape)
    return (np.moveaxis(deq, 0, axis) if axis is not None else deq.reshape(w.shape)).astype(
        w.dtype)


def channel_stats(model: onnx.ModelProto, tensors: list[str], batches: list[dict]
                  ) -> dict[str, dict[str, np.ndarray]]:
    """Per-channel (axis 1) mean and max of `tensors` over the batches, one batch at a time."""
    session = probe_session(model, tensors)
    sums: dict[str, np.ndarray] = {}
    maxima: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for feed in batches:
        for name, value in zip(tensors, session.run(tensors, feed)):
            v = np.asarray(value, np.float64)
            axes = tuple(i for i in range(v.ndim) if i != 1)
            sums[name] = sums.get(name, 0) + v.sum(axis=axes)
            maxima[name] = np.maximum(maxima.get(name, -np.inf), v.max(axis=axes))
            counts[name] = counts.get(name, 0) + int(np.prod([v.shape[i] for i in axes]))
    return {"mean": {t: sums[t] / counts[t] for t in sums}, "max": maxima}


@register("bias_correct")
def bias_correct(model: onnx.ModelProto, cfg: BiasCorrectConfig
                 ) -> tuple[onnx.ModelProto, PassReport]:
    """Subtract (W_q - W) E[x] from the bias of every Conv and Gemm with constant weights that
    the recipe quantizes: a layer kept in float has no rounding error to correct, and shifting
    its bias anyway made mixed precision less faithful than all-int8."""
    recipe, batches = cfg.recipe, cfg.batches
    kept_float = set(recipe.exclude)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = Graph(out.graph)
    report = PassReport("bias_correct")
    targets = [n for n in out.graph.node if n.op_type in ("Conv", "Gemm")
               and graph.array(n.input[1]) is not None and len(n.input) > 2 and n.input[2]
               and graph.array(n.input[2]) is not None
               and not (n.op_type == "Gemm" and attr(n, "transA", 0))
               and n.name not in kept_float]
    if not targets:                   # every biased layer is kept in float
        report.metrics.update(corrected=0, max_shift=0.0)
        return out, report
    means = channel_stats(out, sorted({n.input[0] for n in targets}), batches)["mean"]
    shifts = []
    for node in targets:
        w, b = graph.array(node.input[1]), graph.array(node.input[2])
        mean = means.get(node.input[0])
        if mean is None:
            continue
        if node.op_type == "Conv":
            axis = 0 if recipe.per_channel else None
            dw = _fake_quant_weights(w, axis, recipe.reduce_range).astype(np.float64) - w
            groups = attr(node, "group", 1)
            per_group_in = w.shape[1]
            out_per_group = w.shape[0] // groups
            dws = dw.sum(axis=tuple(range(2, w.ndim)))          # [O, I/groups]
            delta = np.array([dws[o] @ mean[(o // out_per_group) * per_group_in:
                                             (o // out_per_group + 1) * per_group_in]
                              for o in range(w.shape[0])])
        else:
            trans_b = attr(node, "transB", 0)
            axis = (0 if trans_b else 1) if recipe.per_channel else None
            dw = _fake_quant_weights(w, axis, recipe.reduce_range).astype(np.float64) - w
            delta = dw @ mean if trans_b else mean @ dw
        if delta.shape != b.shape:
            continue
        graph.set_array(node.input[2], (b - delta).astype(b.dtype))
        shifts.append(float(np.max(np.abs(delta))))
        report.add(f"{node.name or node.output[0]}: bias shifted by up to {shifts[-1]:.2e}")
    report.metrics.update(corrected=len(shifts), max_shift=max(shifts, default=0.0))
    return out, report
