"""Reconstruction-based rounding of int8 weights (AdaRound, Nagel et al. 2020).

Rounding each weight to the nearest grid point is optimal per weight, not per layer: the
errors add up in the layer's output. AdaRound learns, per weight, whether to round down or up
so that the layer's output on calibration inputs matches the float layer's. Here each
Conv/Gemm/MatMul of a QDQ model is taken in graph order; its input comes from the quantized
model as rewritten so far (so later layers also absorb earlier layers' errors, as AIMET does),
its target from the float model. The learned integers are written back into the very same
weight initializers, so the QDQ placement onnxruntime fuses, and hence the speed, is unchanged.

The rounding variable V of every weight gives h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)
in the weight w~ = s (clip(floor(w / s) + h(V) + zp, qmin, qmax) - zp); the loss is the output
MSE plus lambda * sum(1 - |2h - 1|^beta), beta annealed from 20 to 2, which drives every h to
0 or 1. Needs torch (the `train` extra). Memory is bounded: one layer's inputs at a time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import EdgesmithError
from . import PassReport, register
from .graph import Graph, attr, float_name, probe_session

ZETA, GAMMA = 1.1, -0.1
LAYER_BYTES = 256 * 2 ** 20      # one layer's cached inputs and targets stay under this


@dataclass(frozen=True, eq=False)
class ReconstructConfig:
    float_model: onnx.ModelProto = None   # the graph the QDQ model was quantized from
    batches: list = None                  # calibration feeds (unlabelled)
    weight_range: tuple[int, int] = (-127, 127)   # integer grid of the weights (recipe's)
    iters: int = 200                      # optimisation steps per layer
    samples: int = 64                     # calibration samples used (fewer if a layer is big)
    batch_size: int = 8
    lr: float = 1e-2
    reg_weight: float = 0.01
    warmup: float = 0.2                   # share of steps without the rounding regulariser
    seed: int = 0

    def __post_init__(self):
        if self.float_model is None or not self.batches:
            raise ValueError("ReconstructConfig needs the float model and calibration batches")
        if self.iters < 1 or self.samples < 1 or self.batch_size < 1:
            raise ValueError("ReconstructConfig.iters, .samples and .batch_size must be >= 1")


@dataclass
class _Layer:
    node: onnx.NodeProto
    float_output: str      # the float twin's output (QDQ may rename a graph output's producer)
    weight_q: str          # the int8/uint8 initializer the DequantizeLinear reads
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    w_float: np.ndarray
    bias: np.ndarray | None


def _layers(qdq: onnx.ModelProto, float_model: onnx.ModelProto) -> tuple[list[_Layer], list]:
    """The reconstructable layers in graph order, and (name, reason) for those skipped."""
    graph, fgraph = Graph(qdq.graph), Graph(float_model.graph)
    # twins by output tensor (QDQ keeps it, or renames it: graph.float_name)
    fnodes = {o: n for n in float_model.graph.node for o in n.output[:1]}
    layers, skipped = [], []
    for node in qdq.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        dq = graph.producer.get(node.input[1])
        fnode = fnodes.get(float_name(node.output[0], fnodes))
        if fnode is not None and fnode.op_type != node.op_type:   # activation folded into Q
            fnode = fnodes.get(fnode.input[0]) if fnode.input else None
        if fnode is not None and (fnode.op_type != node.op_type or len(fnode.input) < 2):
            fnode = None
        if dq is None or dq.op_type != "DequantizeLinear" or graph.array(dq.input[0]) is None:
            continue        # kept in float (mixed precision) or weights computed at run time
        if fnode is None or fgraph.array(fnode.input[1]) is None:
            skipped.append((node.name, "no float twin with the same output"))
            continue
        if attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            skipped.append((node.name, "auto_pad SAME"))
            continue
        if node.op_type == "Gemm" and (attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1
                                       or attr(node, "beta", 1.0) != 1):
            skipped.append((node.name, "Gemm with transA/alpha/beta"))
            continue
        q = graph.array(dq.input[0])
        zp = graph.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros(1)
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = fgraph.array(fnode.input[2]) if len(fnode.input) > 2 else None
            if bias is None:
                skipped.append((node.name, "bias computed at run time"))
                continue
        layers.append(_Layer(node, fnode.output[0], dq.input[0],
                             graph.array(dq.input[1]).astype(np.float32),
                             zp.astype(np.float32), attr(dq, "axis", 1) % max(q.ndim, 1),
                             fgraph.array(fnode.input[1]).astype(np.float32),
                             None if bias is None else bias.astype(np.float32)))
    return layers, skipped


def _outputs(model: onnx.ModelProto, names: list[str], feeds: list[dict]) -> list[np.ndarray]:
    """Intermediate tensors over the calibration feeds (QDQ left unfused: what the int8 kernels
    compute, in float)."""
    session = probe_session(model, names, optimize=False)
    runs = [session.run(names, feed) for feed in feeds]
    return [np.concatenate([r[i] for r in runs]) for i in range(len(names))]


def _layer_inputs(model: onnx.ModelProto, name: str, batches: list[dict], samples: int
                  ) -> tuple[np.ndarray, list[dict]]:
    """A layer's input over the first feeds, up to `samples` and to half of LAYER_BYTES (its
    output takes about as much): the values and the feeds they came from."""
    session = probe_session(model, [name], optimize=False)
    parts, used, n, size = [], [], 0, 0
    for feed in batches:
        if n >= samples or size >= LAYER_BYTES // 2:
            break
        value = session.run([name], feed)[0]
        parts.append(value)
        used.append(feed)
        n, size = n + len(value), size + value.nbytes
    return np.concatenate(parts), used


def _apply(layer: _Layer, x, w, torch):
    F = torch.nn.functional
    b = None if layer.bias is None else torch.from_numpy(layer.bias)
    if layer.node.op_type == "Conv":
        rank = w.dim() - 2
        pads = attr(layer.node, "pads", [0] * 2 * rank)
        if pads[:rank] != pads[rank:]:
            x = F.pad(x, [p for d in reversed(range(rank)) for p in (pads[d], pads[d + rank])])
            pads = [0] * 2 * rank
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
        return conv(x, w, b, attr(layer.node, "strides", [1] * rank), pads[:rank],
                    attr(layer.node, "dilations", [1] * rank), attr(layer.node, "group", 1))
    if layer.node.op_type == "Gemm" and attr(layer.node, "transB", 0):
        w = w.t()
    y = x @ w
    return y if b is None else y + b


def _learn(layer: _Layer, x: np.ndarray, y: np.ndarray, cfg: ReconstructConfig, torch
           ) -> tuple[np.ndarray | None, float, float]:
    """(learned integer weights, output MSE with nearest rounding, with learned rounding);
    None for the weights when learning did not beat rounding to nearest."""
    qmin, qmax = cfg.weight_range
    shape = [1] * layer.w_float.ndim
    shape[layer.axis] = -1
    s = torch.from_numpy(layer.scale.reshape(shape if layer.scale.size > 1 else [1]))
    zp = torch.from_numpy(layer.zero_point.reshape(shape if layer.zero_point.size > 1 else [1]))
    w = torch.from_numpy(layer.w_float)
    floor = torch.floor(w / s)
    rest = (w / s - floor).clamp(1e-4, 1 - 1e-4)
    v = torch.nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))   # h(v) = rest
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)

    def weight(h):
        return s * (torch.clamp(floor + h + zp, qmin, qmax) - zp)

    def h_of(v):
        return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def mse(h, idx=None):
        with torch.no_grad() if idx is None else torch.enable_grad():
            xi, yi = (xs, ys) if idx is None else (xs[idx], ys[idx])
            return ((_apply(layer, xi, weight(h), torch) - yi) ** 2).mean()

    nearest = float(mse(torch.round(rest)))
    opt = torch.optim.Adam([v], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    warm = int(cfg.iters * cfg.warmup)
    for step in range(cfg.iters):
        idx = torch.randint(0, len(xs), (min(cfg.batch_size, len(xs)),), generator=gen)
        h = h_of(v)
        loss = mse(h, idx)
        if step >= warm:
            beta = 20 + (2 - 20) * (step - warm) / max(1, cfg.iters - warm)
            loss = loss + cfg.reg_weight * (1 - (2 * h - 1).abs() ** beta).sum() / h.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    hard = (h_of(v) >= 0.5).float()
    learned = float(mse(hard))
    q = torch.clamp(floor + hard + zp, qmin, qmax)
    if learned >= nearest:        # never worse than rounding to nearest on these inputs
        return None, nearest, nearest
    return q.detach().numpy(), nearest, learned


@register("reconstruct")
def reconstruct(qdq: onnx.ModelProto, cfg: ReconstructConfig
                ) -> tuple[onnx.ModelProto, PassReport]:
    """Learn the rounding of every int8 weight of `qdq` against `cfg.float_model`'s outputs."""
    try:
        import torch
    except ImportError:
        raise EdgesmithError("reconstruction (adaround) needs torch: pip install "
                             "'edgesmith[train]' (CPU build: pip install torch==2.13.0)") from None
    t0 = time.time()
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    layers, skipped = _layers(out, cfg.float_model)
    report = PassReport("reconstruct")
    report.details.extend(f"{name}: skipped ({why})" for name, why in skipped)
    torch.manual_seed(cfg.seed)
    improved, gains = 0, []
    for layer in layers:
        x, feeds = _layer_inputs(out, layer.node.input[0], cfg.batches, cfg.samples)
        y, = _outputs(cfg.float_model, [layer.float_output], feeds)
        q, nearest, learned = _learn(layer, x.astype(np.float32), y.astype(np.float32), cfg,
                                     torch)
        gains.append(10 * np.log10(max(nearest, 1e-30) / max(learned, 1e-30)))
        if q is None:
            continue
        graph = Graph(out.graph)
        dtype = graph.array(layer.weight_q).dtype
        graph.set_array(layer.weight_q, q.astype(dtype))
        improved += 1
    report.changed = improved
    report.metrics.update(layers=len(layers), improved=improved, skipped=len(skipped),
                          seconds=time.time() - t0, iters=cfg.iters,
                          mean_layer_gain_db=float(np.mean(gains)) if gains else 0.0)
    report.details.append(
        f"learned the rounding of {improved} of {len(layers)} layer(s) ({cfg.iters} steps "
        f"each): layer output error {np.mean(gains) if gains else 0:.1f} dB lower on average "
        f"than rounding to nearest, in {time.time() - t0:.0f} s")
    return out, report
