"""Activation ranges that minimise the quantization error, not the ones that cover every value.

Min/max calibration spends the 256 int8 levels on the rare extremes of the whole calibration
set. Two estimators set them better, in place on a calibrated QDQ model:
- `mse` (TensorRT's and NNCF's "MSE" range estimator): per tensor, the range is shrunk by the
  factor in ALPHAS with the lowest mean squared quantization error on calibration samples of
  the float model's values; it clips a few outliers and resolves everything else finer;
- `robust-minmax`: each calibration sample's own min and max, and the range spans the most
  extreme of them that is not an outlier among the samples (Tukey's far fence: beyond the
  quartiles by 3x their spread). One unusual sample does not set the range for all (min/max's
  failure: one ResNet-50 crop set layer4's ranges 4x wider than every other crop needs), and
  ordinary samples do not clip. NNCF's mean of per-sample extremes, which this replaced, clips
  about half the samples by construction: on held-out data it gave 15.7-17.0 dB on the digits
  models against 29-42 dB, and 19.4 against 27.3 dB on ResNet-50's natural photos (equal on
  MobileNetV2's).
Tensors onnxruntime ties to the same parameters (MaxPool, Reshape, Concat in and out: equal
scale and zero point, or the QDQ pair is not fused away) are refined as one group, and the
int32 biases that depend on an input's scale are requantized, so the graph and its speed are
unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from . import PassReport, register
from ..onnx_utils import Graph, float_name, probe_session

ALPHAS = np.linspace(0.3, 1.0, 36)
SAMPLES_PER_TENSOR = 200_000
TENSORS_PER_RUN = 24
ESTIMATORS = ("mse", "robust-minmax")
FENCE = 3.0      # Tukey's "far out": quartile + 3 x interquartile range


@dataclass(frozen=True, eq=False)
class RangeConfig:
    float_model: onnx.ModelProto = None   # the graph the QDQ model was calibrated on
    batches: list = None                  # calibration feeds
    seed: int = 0
    estimator: str = "mse"                # ESTIMATORS

    def __post_init__(self):
        if self.float_model is None or not self.batches:
            raise ValueError("RangeConfig needs the float model and calibration batches")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"RangeConfig.estimator is {self.estimator!r}; use one of "
                             f"{ESTIMATORS}")


def _activation_params(graph: Graph) -> dict[tuple, list]:
    """Groups of activation QuantizeLinear nodes sharing (scale, zero point, type) values."""
    groups: dict[tuple, list] = {}
    for node in graph.g.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in graph.inits or len(node.input) < 3:
            continue
        scale, zp = graph.array(node.input[1]), graph.array(node.input[2])
        if scale is None or zp is None or scale.size != 1:
            continue
        key = (float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0]), str(zp.dtype))
        groups.setdefault(key, []).append(node)
    return groups


def _samples(model: onnx.ModelProto, names: list[str], batches: list, seed: int) -> dict:
    """A bounded uniform random sample of each tensor's values (extremes are not added: they
    would weigh each batch's outliers far above their share)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(names), TENSORS_PER_RUN):
        chunk = names[start:start + TENSORS_PER_RUN]
        session = probe_session(model, chunk)
        parts: dict[str, list] = {n: [] for n in chunk}
        for feed in batches:
            for n, value in zip(chunk, session.run(chunk, feed)):
                flat = value.reshape(-1)
                keep = min(flat.size, SAMPLES_PER_TENSOR // len(batches) + 1)
                parts[n].append(rng.choice(flat, keep, replace=False))
        out.update({n: np.concatenate(v).astype(np.float32) for n, v in parts.items()})
    return out


def _fenced_max(values: np.ndarray) -> float:
    """The largest value that is not an outlier above the others (Tukey's far fence)."""
    q1, q3 = np.percentile(values, [25, 75])
    return float(values[values <= q3 + FENCE * (q3 - q1)].max())


def _sample_extremes(model: onnx.ModelProto, names: list[str], batches: list) -> dict:
    """Each tensor's (robust min, robust max) over its samples' own extremes; axis 0 is
    samples."""
    out: dict[str, tuple[float, float]] = {}
    for start in range(0, len(names), TENSORS_PER_RUN):
        chunk = names[start:start + TENSORS_PER_RUN]
        session = probe_session(model, chunk)
        lows: dict[str, list] = {n: [] for n in chunk}
        highs: dict[str, list] = {n: [] for n in chunk}
        for feed in batches:
            for n, value in zip(chunk, session.run(chunk, feed)):
                value = np.asarray(value, np.float32)
                flat = value.reshape(len(value), -1) if value.ndim else value.reshape(1, 1)
                lows[n].append(flat.min(axis=1))
                highs[n].append(flat.max(axis=1))
        out.update({n: (-_fenced_max(-np.concatenate(lows[n])),
                        _fenced_max(np.concatenate(highs[n]))) for n in chunk})
    return out


def _minmax_range(lo: float, hi: float, symmetric: bool, qmin: int, qmax: int
                  ) -> tuple[float, int]:
    """(scale, zero point) covering [lo, hi] and zero."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        return max(abs(lo), abs(hi), 1e-8) / qmax, 0
    s = max(hi - lo, 1e-8) / (qmax - qmin)
    return s, int(np.clip(np.round(qmin - lo / s), qmin, qmax))


def _best_range(x: np.ndarray, scale: float, zp: int, qmin: int, qmax: int
                ) -> tuple[float, int, float, float]:
    """(scale, zero point, error now, error after) for the shrink factor of least MSE."""
    lo, hi = (qmin - zp) * scale, (qmax - zp) * scale

    def error(s: float, z: int) -> float:
        q = np.clip(np.round(x / s) + z, qmin, qmax)
        return float(np.mean(((q - z) * s - x) ** 2))

    now = error(scale, zp)
    best = (scale, zp, now)
    for a in ALPHAS:
        s = (hi - lo) * a / (qmax - qmin)
        if s <= 0:
            continue
        z = int(np.clip(np.round(qmin - lo * a / s), qmin, qmax))
        e = error(s, z)
        if e < best[2]:
            best = (s, z, e)
    return best[0], best[1], now, best[2]


def requantize_biases(graph: Graph, tensor_scales: dict[str, float]) -> int:
    """int32 biases are quantized with scale(input) * scale(weight): follow the new input scale."""
    changed = 0
    for node in graph.g.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        x_dq, w_dq, b_dq = (graph.producer.get(n) for n in node.input[:3])
        if not all(d is not None and d.op_type == "DequantizeLinear" for d in (x_dq, w_dq, b_dq)):
            continue
        new_x = tensor_scales.get(x_dq.input[1])
        bias_q, bias_scale = graph.array(b_dq.input[0]), graph.array(b_dq.input[1])
        w_scale = graph.array(w_dq.input[1])
        if new_x is None or bias_q is None or bias_scale is None or w_scale is None:
            continue
        bias = bias_q.astype(np.float64) * bias_scale
        scale = (new_x * w_scale.astype(np.float64)).astype(bias_scale.dtype)
        graph.set_array(b_dq.input[0], np.clip(np.round(bias / scale), -2 ** 31,
                                                2 ** 31 - 1).astype(bias_q.dtype))
        graph.set_array(b_dq.input[1], scale.reshape(bias_scale.shape))
        changed += 1
    return changed


@register("refine_ranges")
def refine_ranges(qdq: onnx.ModelProto, cfg: RangeConfig) -> tuple[onnx.ModelProto, PassReport]:
    """Activation ranges by `cfg.estimator` for a calibrated QDQ model (same graph, same
    speed)."""
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    graph = Graph(out.graph)
    report = PassReport("refine_ranges")
    float_names = {o for n in cfg.float_model.graph.node for o in n.output} | \
        {i.name for i in cfg.float_model.graph.input}
    groups = _activation_params(graph)
    wanted = sorted({f for nodes in groups.values() for n in nodes
                     if (f := float_name(n.input[0], float_names))})
    if cfg.estimator == "mse":
        values = _samples(cfg.float_model, wanted, cfg.batches, cfg.seed)
    else:
        extremes = _sample_extremes(cfg.float_model, wanted, cfg.batches)
    new_scales: dict[str, float] = {}
    gains = []
    for (scale, zp, dtype), nodes in groups.items():
        tensors = [f for n in nodes if (f := float_name(n.input[0], float_names))]
        if not tensors:
            continue
        info = np.iinfo(np.dtype(dtype))
        if cfg.estimator == "mse":
            s, z, now, after = _best_range(np.concatenate([values[f] for f in tensors]), scale,
                                           zp, int(info.min), int(info.max))
            if after >= 0.99 * now:
                continue
            gains.append(10 * np.log10(now / max(after, 1e-30)))
        else:
            s, z = _minmax_range(min(extremes[f][0] for f in tensors),
                                 max(extremes[f][1] for f in tensors),
                                 dtype == "int8" and zp == 0, int(info.min), int(info.max))
        for node in nodes:       # the Q node and the DQ nodes reading it, if not shared
            dqs = [d for d in graph.consumers.get(node.output[0], [])
                   if d.op_type == "DequantizeLinear" and len(d.input) >= 3]
            for scale_name, zp_name in {(n.input[1], n.input[2]) for n in [node, *dqs]}:
                old_zp = graph.array(zp_name)
                graph.set_array(scale_name, np.array(s, np.float32).reshape(
                    graph.array(scale_name).shape))
                graph.set_array(zp_name, np.array(z, old_zp.dtype).reshape(old_zp.shape))
                new_scales[scale_name] = s
            report.changed += 1
    biases = requantize_biases(Graph(out.graph), new_scales)
    report.metrics.update(tensors=report.changed, groups=len(groups), biases=biases,
                          mean_gain_db=float(np.mean(gains)) if gains else 0.0)
    gain = (f" (quantization error {np.mean(gains) if gains else 0:.1f} dB lower on average)"
            if cfg.estimator == "mse" else "")
    report.details.append(f"{cfg.estimator} ranges for {report.changed} activation tensor(s)"
                          f"{gain}; {biases} bias(es) requantized")
    return out, report
