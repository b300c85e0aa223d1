"""Block reconstruction of an int8 QDQ model (BRECQ, AdaRound, LSQ and QDrop), in place.

Rounding each weight to the nearest grid point and each activation range to its calibrated
value is optimal per tensor, not per block: the errors add up in the block's output. Here the
graph is cut into blocks (a residual block, an inverted-residual block, a transformer layer's
halves: the stretches between tensors that are the only live value of the data flow), and per
block, in graph order, on unlabelled calibration inputs taken from the quantized model as
rewritten so far (so later blocks absorb earlier errors) with the float model's values of the
block output as the target, it learns

- per weight, whether to round down or up (AdaRound, Nagel et al. 2020): h(V) =
  clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1) in w~ = s (clip(floor(w / s) + h(V) + zp) - zp),
  with the regulariser lambda * sum(1 - |2h - 1|^beta), beta annealed from 20 to 2;
- per activation quantizer, its step size (LSQ, Esser et al. 2020; straight-through rounding),
  tensors onnxruntime ties together (MaxPool, Reshape, Concat in and out) sharing one;
- with QDrop (Wei et al. 2022): each activation's rounding is skipped at random while learning,
  so the weights do not overfit to one pattern of activation noise. The clip is always kept: it
  stands for the ReLU/ReLU6 onnxruntime folded into the quantizer.

The learned integers, step sizes and the int32 biases that follow them are written back into the
very same initializers, so the QDQ placement onnxruntime fuses, and hence the speed, is
unchanged. A block keeps what it learned only if its output error on the calibration inputs
drops. Memory is bounded: one block's inputs and targets at a time, in files beyond
`memory_bytes`. Needs torch (the `train` extra).
"""
from __future__ import annotations

import itertools
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..errors import EdgesmithError
from . import PassReport, register
from .distill import host_device
from ..onnx_utils import Graph, attr, float_name, probe_session
from .ranges import requantize_biases

ZETA, GAMMA = 1.1, -0.1
WEIGHTED = ("Conv", "Gemm", "MatMul")
# ops onnxruntime drops QDQ pairs around only when input and output share scale and zero point
TIED = {"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Split",
        "Slice", "Gather", "Resize", "Identity", "GlobalMaxPool"}
_FILES = itertools.count()


@dataclass(frozen=True, eq=False)
class ReconstructConfig:
    float_model: onnx.ModelProto = None   # the graph the QDQ model was quantized from
    batches: list = None                  # calibration feeds (unlabelled)
    weight_range: tuple[int, int] = (-127, 127)   # integer grid of the weights (recipe's)
    iters: int = 200                      # optimisation steps per block
    samples: int = 128                    # calibration samples used (224 did no better than
                                          # 56 on held-out photos; keeps balanced in 10 min)
    batch_size: int = 8
    lr: float = 1e-2                      # of the rounding variables
    scale_lr: float = 2e-3                # of the activations' log step sizes; 0: keep ranges
    drop: float = 0.5                     # QDrop: chance an activation skips rounding in training
    reg_weight: float = 0.01
    warmup: float = 0.2                   # share of steps without the rounding regulariser
    block_layers: int = 3                 # a block closes after this many weighted layers
    host_device: str = "auto"             # where torch learns: auto (CUDA when seen) | cpu | cuda
    memory_bytes: int = 256 * 2 ** 20     # a block's cached inputs + targets beyond this: on disk
    seed: int = 0
    deadline: float = math.inf            # time.monotonic(): later blocks stay as calibrated

    def __post_init__(self):
        if self.float_model is None or not self.batches:
            raise ValueError("ReconstructConfig needs the float model and calibration batches")
        if self.iters < 1 or self.samples < 1 or self.batch_size < 1 or self.block_layers < 1:
            raise ValueError("ReconstructConfig.iters, .samples, .batch_size and .block_layers "
                             "must be >= 1")
        if not 0 <= self.drop < 1:
            raise ValueError("ReconstructConfig.drop must be in [0, 1)")


@dataclass
class QuantWeight:
    name: str              # the integer initializer its DequantizeLinear reads
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    w_float: np.ndarray
    bias: np.ndarray | None   # the float twin's bias, if the layer has one


@dataclass
class Block:
    nodes: list = field(default_factory=list)   # data-flow nodes, graph order
    input: str = ""                             # the one live tensor entering the block
    outputs: list = field(default_factory=list)  # QDQ names; their float twins are the targets
    layers: int = 0


def float_twins(qdq: onnx.ModelProto, float_model: onnx.ModelProto) -> tuple[dict, list]:
    """{weight DequantizeLinear output: QuantWeight} for every int8 layer with a float twin, and
    (name, reason) for the layers skipped."""
    graph, fgraph = Graph(qdq.graph), Graph(float_model.graph)
    # twins by output tensor (QDQ keeps it, or renames it: graph.float_name)
    fnodes = {o: n for n in float_model.graph.node for o in n.output[:1]}
    found, skipped = {}, []
    for node in qdq.graph.node:
        if node.op_type not in WEIGHTED or len(node.input) < 2:
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
        q = graph.array(dq.input[0])
        zp = graph.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros(1)
        bias = fgraph.array(fnode.input[2]) if len(fnode.input) > 2 and fnode.input[2] else None
        if len(node.input) > 2 and node.input[2] and bias is None:
            skipped.append((node.name, "bias computed at run time"))
            continue
        found[node.input[1]] = QuantWeight(
            dq.input[0], graph.array(dq.input[1]).astype(np.float32), zp.astype(np.float32),
            attr(dq, "axis", 1) % max(q.ndim, 1), fgraph.array(fnode.input[1]).astype(np.float32),
            None if bias is None else bias.astype(np.float32))
        if bias is not None:
            found[node.input[2]] = bias.astype(np.float32)      # read as the float bias
    return found, skipped


def constants(graph: onnx.GraphProto) -> set[str]:
    """Tensors computed from initializers alone (weight and bias DequantizeLinear outputs)."""
    const = {t.name for t in graph.initializer}
    for n in graph.node:
        if all(not i or i in const for i in n.input):
            const.update(o for o in n.output if o)
    return const


def blocks(qdq: onnx.ModelProto, float_names: set, weights: dict, min_layers: int
            ) -> list[Block]:
    """The data flow cut where one float tensor with a float twin is all that is live and is
    quantized next; stretches are joined until a block holds `min_layers` weighted layers or a
    branch (a residual) closes it."""
    graph = Graph(qdq.graph)
    const = constants(qdq.graph)
    flow = [n for n in qdq.graph.node if not all(not i or i in const for i in n.input)]
    last_use = {}
    for i, n in enumerate(flow):
        for t in n.input:
            if t and t not in const:
                last_use[t] = i
    for o in qdq.graph.output:
        last_use[o.name] = len(flow)
    live = {i.name for i in qdq.graph.input if i.name not in const}
    found, current, widest = [], Block(input=next(iter(live)) if len(live) == 1 else ""), 1
    for i, n in enumerate(flow):
        current.nodes.append(n)
        current.layers += n.op_type in WEIGHTED and n.input[1] in weights
        live -= {t for t in n.input if last_use.get(t) == i}
        live |= {o for o in n.output if o in last_use}
        widest = max(widest, len(live))
        if len(live) != 1 or i == len(flow) - 1:
            continue
        t = next(iter(live))
        quantized_next = any(c.op_type == "QuantizeLinear" for c in graph.consumers.get(t, []))
        if not quantized_next or float_name(t, float_names) is None:
            continue
        if current.layers >= min_layers or (widest > 1 and current.layers):
            current.outputs = [t]
            found.append(current)
            current, widest = Block(input=t), 1
    current.outputs = [o.name for o in qdq.graph.output]
    found.append(current)
    return [b for b in found if b.input and b.layers]


def _tie_groups(graph: Graph, block: Block) -> dict[str, str | None]:
    """{the block's activation QuantizeLinear outputs: group key}: quantizers onnxruntime needs
    equal (in and out of TIED ops) share one key; None for a group reaching outside the block
    (its step size stays: learning one side would break the tie, and the fusion with it)."""
    quant = {n.output[0]: n for n in graph.g.node if n.op_type == "QuantizeLinear"
             and n.input[0] not in graph.inits and len(n.input) >= 3}
    parent = {q: q for q in quant}

    def root(q):
        while parent[q] != q:
            q = parent[q]
        return q

    for n in graph.g.node:
        if n.op_type not in TIED:
            continue
        ins = [graph.producer.get(i) for i in n.input[:1]]
        qs = [d.input[0] for d in ins if d is not None and d.op_type == "DequantizeLinear"
              and d.input[0] in quant]
        qs += [c.output[0] for c in graph.consumers.get(n.output[0], [])
               if c.output[0] in quant]
        for a, b in zip(qs, qs[1:]):
            parent[root(a)] = root(b)
    inside = {n.output[0] for n in block.nodes} & set(quant)
    outside = {root(q) for q in set(quant) - inside}
    return {q: None if root(q) in outside else root(q) for q in inside}


def _cache(session, name: str, feeds: list[dict], tmp: Path, limit: int) -> np.ndarray:
    """One tensor over the feeds, in memory up to `limit` bytes, else in a file."""
    first = session.run([name], feeds[0])[0]
    total = first.nbytes * len(feeds)
    if total <= limit:
        return np.concatenate([first] + [session.run([name], f)[0] for f in feeds[1:]])
    shape = (sum(len(next(iter(f.values()))) for f in feeds), *first.shape[1:])
    out = np.lib.format.open_memmap(tmp / f"{next(_FILES)}.npy", "w+", first.dtype, shape)
    at = 0
    for f in feeds:
        value = first if at == 0 else session.run([name], f)[0]
        out[at:at + len(value)] = value
        at += len(value)
    return out


class BlockModule:
    """A block of the QDQ graph as a differentiable torch function of its input."""

    def __init__(self, graph: Graph, block: Block, weights: dict, cfg: ReconstructConfig,
                 opset: int, torch, device: str):
        from ..torch_interp.ops import OPS, Env

        self.torch, self.block, self.cfg, self.graph = torch, block, cfg, graph
        self.device = device
        self.env = Env(torch, torch.nn.functional, opset)
        self.ops = OPS
        missing = sorted({n.op_type for n in block.nodes if n.op_type not in OPS
                          and n.op_type not in ("QuantizeLinear", "DequantizeLinear")})
        if missing:
            raise EdgesmithError(f"the ONNX->torch interpreter lacks {missing}")
        needed = {i for n in block.nodes for i in n.input if i}
        const = constants(graph.g)
        self.rounding = {}                        # weight DQ output -> (V, floor, s, zp, ...)
        self.const = {}
        for name in needed:
            w = weights.get(name)
            if isinstance(w, QuantWeight):
                self.rounding[name] = self._init_rounding(w)
            elif isinstance(w, np.ndarray):
                self.const[name] = self.tensor(w)
            elif name in const:
                self.const[name] = self._constant(name)
        self.groups = _tie_groups(graph, block)
        self.log_scale = {g: torch.zeros((), device=self.device, requires_grad=True)
                          for g in set(self.groups.values()) if g is not None}
        self.codes = {}
        for q, g in self.groups.items():
            self.codes[q] = (g, *quantizer(graph, graph.producer[q]))

    def tensor(self, array) -> object:
        return self.torch.from_numpy(np.array(array, np.float32 if np.asarray(array).dtype
                                              == np.float64 else None)).to(self.device)

    def _init_rounding(self, w: QuantWeight):
        torch = self.torch
        shape = [1] * w.w_float.ndim
        shape[w.axis] = -1
        s = self.tensor(w.scale.reshape(shape if w.scale.size > 1 else [1]))
        zp = self.tensor(w.zero_point.reshape(shape if w.zero_point.size > 1 else [1]))
        ratio = self.tensor(w.w_float) / s
        floor = torch.floor(ratio)
        rest = (ratio - floor).clamp(1e-4, 1 - 1e-4)
        v = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)       # h(v) = rest
        return {"v": v.requires_grad_(True), "nearest": torch.round(rest), "floor": floor,
                "s": s, "zp": zp, "weight": w}

    def _constant(self, name: str):
        """A value computed from initializers alone, e.g. a DequantizeLinear of weights that
        have no float twin (their value as quantized)."""
        if name in self.graph.inits:
            return self.tensor(self.graph.array(name))
        node = self.graph.producer[name]
        if node.op_type == "DequantizeLinear":
            return self._dequantized(node)
        y = self.ops[node.op_type](node, [self._constant(i) if i else None for i in node.input],
                                   self.env)
        return dict(zip(node.output, y if isinstance(y, tuple) else (y,)))[name]

    def _dequantized(self, node):
        q = self.graph.array(node.input[0]).astype(np.float32)
        s = self.graph.array(node.input[1]).astype(np.float32)
        zp = (self.graph.array(node.input[2]).astype(np.float32) if len(node.input) > 2
              and node.input[2] else np.zeros_like(s))
        if s.size > 1:
            shape = [1] * q.ndim
            shape[attr(node, "axis", 1) % q.ndim] = -1
            s, zp = s.reshape(shape), zp.reshape(shape)
        return self.tensor((q - zp) * s)

    def parameters(self) -> tuple[list, list]:
        return [r["v"] for r in self.rounding.values()], list(self.log_scale.values())

    def h(self, r, mode: str):
        if mode == "nearest":
            return r["nearest"]
        soft = self.torch.clamp(self.torch.sigmoid(r["v"]) * (ZETA - GAMMA) + GAMMA, 0, 1)
        return soft if mode == "soft" else (r["v"] >= 0).float()

    def weight(self, r, mode: str):
        qmin, qmax = self.cfg.weight_range
        q = self.torch.clamp(r["floor"] + self.h(r, mode) + r["zp"], qmin, qmax)
        return r["s"] * (q - r["zp"])

    def __call__(self, x, mode: str = "hard", gen=None):
        """mode: soft (training, QDrop), hard (as learned) or nearest (as calibrated)."""
        learned = mode != "nearest"
        torch = self.torch
        env = {self.block.input: x}
        for n in self.block.nodes:
            if n.op_type == "QuantizeLinear" and n.output[0] in self.codes:
                g, s0, zp, qmin, qmax = self.codes[n.output[0]]
                s = s0 * torch.exp(self.log_scale[g]) if learned and g is not None else s0
                c = env[n.input[0]] / s + zp
                rounded = c + (torch.round(c) - c).detach()
                if mode == "soft" and self.cfg.drop:
                    keep = torch.rand(c.shape, generator=gen, device=c.device) < self.cfg.drop
                    rounded = torch.where(keep, c, rounded)
                env[n.output[0]] = (torch.clamp(rounded, qmin, qmax) - zp) * s
                continue
            if n.op_type == "DequantizeLinear" and n.input[0] in self.codes:
                env[n.output[0]] = env[n.input[0]]       # the Q above already dequantized
                continue
            inputs = []
            for i in n.input:
                if not i:
                    inputs.append(None)
                elif i in env:
                    inputs.append(env[i])
                elif i in self.rounding:
                    inputs.append(self.weight(self.rounding[i], mode))
                else:
                    inputs.append(self.const[i])
            y = self.ops[n.op_type](n, inputs, self.env)
            for name, value in zip(n.output, y if isinstance(y, tuple) else (y,)):
                if name:
                    env[name] = value
        return [env[o] for o in self.block.outputs]

    def regulariser(self, beta: float):
        total, count = 0.0, 0
        for r in self.rounding.values():
            h = self.h(r, "soft")
            total = total + (1 - (2 * h - 1).abs() ** beta).sum()
            count += h.numel()
        return total / max(count, 1)


def quantizer(graph: Graph, node) -> tuple[float, float, int, int]:
    """A per-tensor QuantizeLinear's (scale, zero point, integer min, integer max)."""
    zp = graph.array(node.input[2])
    info = np.iinfo(zp.dtype)
    return (float(graph.array(node.input[1]).reshape(-1)[0]), float(zp.reshape(-1)[0]),
            int(info.min), int(info.max))


def _next_range(graph: Graph, tensor: str) -> tuple[float, float] | None:
    """What the quantizer reading `tensor` can represent: differences outside it are clipped
    away (a ReLU folded into that quantizer makes the float twin's value the clipped one)."""
    for q in graph.consumers.get(tensor, []):
        if q.op_type == "QuantizeLinear" and len(q.input) >= 3:
            s, z, qmin, qmax = quantizer(graph, q)
            return (qmin - z) * s, (qmax - z) * s
    return None


def _loss(outs, ys, idx, ranges, torch, reduce: str):
    total = 0.0
    for o, y, r in zip(outs, ys, ranges):
        target = torch.from_numpy(np.asarray(y[idx])).to(outs[0].device)
        if r is not None:
            o, target = o.clamp(*r), target.clamp(*r)
        diff = (o - target) ** 2
        total = total + (diff.mean() if reduce == "mean" else diff.sum())
    return total


def _error(module: BlockModule, xs, ys, ranges, batch: int, **kw) -> float:
    torch = module.torch
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(xs), batch):
            idx = slice(i, i + batch)
            outs = module(module.tensor(xs[idx]), **kw)
            total += float(_loss(outs, ys, idx, ranges, torch, "sum"))
            n += len(outs[0])
    return total / max(n, 1)


def _learn(module: BlockModule, xs, ys, ranges, cfg: ReconstructConfig
           ) -> tuple[float, float]:
    """(output error as calibrated, as learned) on the cached inputs, compared within what the
    next quantizers represent (`ranges`)."""
    torch = module.torch
    before = _error(module, xs, ys, ranges, cfg.batch_size, mode="nearest")
    rounding, scales = module.parameters()
    groups = [{"params": rounding, "lr": cfg.lr}]
    if scales and cfg.scale_lr:
        groups.append({"params": scales, "lr": cfg.scale_lr})
    opt = torch.optim.Adam(groups)
    gen = torch.Generator(device=module.device).manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    warm = int(cfg.iters * cfg.warmup)
    for step in range(cfg.iters):
        idx = np.sort(rng.choice(len(xs), min(cfg.batch_size, len(xs)), replace=False))
        outs = module(module.tensor(xs[idx]), mode="soft", gen=gen)
        loss = _loss(outs, ys, idx, ranges, torch, "mean")
        if step >= warm and rounding:
            beta = 20 + (2 - 20) * (step - warm) / max(1, cfg.iters - warm)
            loss = loss + cfg.reg_weight * module.regulariser(beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, _error(module, xs, ys, ranges, cfg.batch_size, mode="hard")


def _write_back(graph: Graph, module: BlockModule) -> dict[str, float]:
    """Learned integers and step sizes into the model's initializers; {scale name: new}."""
    qmin, qmax = module.cfg.weight_range
    for r in module.rounding.values():
        q = module.torch.clamp(r["floor"] + module.h(r, "hard") + r["zp"], qmin, qmax)
        dtype = graph.array(r["weight"].name).dtype
        graph.set_array(r["weight"].name, q.detach().cpu().numpy().astype(dtype))
    return write_scales(graph, module)


def write_scales(graph: Graph, module: BlockModule) -> dict[str, float]:
    """The learned activation step sizes into the model's initializers; {scale name: new}."""
    new_scales = {}
    for q, (g, s0, *_rest) in module.codes.items():
        if g is None:
            continue
        s = float(s0 * np.exp(module.log_scale[g].item()))
        node = graph.producer[q]
        dqs = [d for d in graph.consumers.get(q, []) if d.op_type == "DequantizeLinear"]
        for name in {n.input[1] for n in [node, *dqs]}:
            graph.set_array(name, np.array(s, np.float32).reshape(graph.array(name).shape))
            new_scales[name] = s
    return new_scales


@register("reconstruct")
def reconstruct(qdq: onnx.ModelProto, cfg: ReconstructConfig
                ) -> tuple[onnx.ModelProto, PassReport]:
    """Learn the rounding of every int8 weight and the step size of every activation of `qdq`,
    block by block, against `cfg.float_model`'s outputs."""
    try:
        import torch
    except ImportError:
        raise EdgesmithError("reconstruction needs torch: pip install 'edgesmith[train]' "
                             "(CPU build: pip install torch==2.13.0)") from None
    t0 = time.time()
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    weights, skipped = float_twins(out, cfg.float_model)
    float_names = {o for n in cfg.float_model.graph.node for o in n.output} | \
        {i.name for i in cfg.float_model.graph.input}
    parts = blocks(out, float_names, weights, cfg.block_layers)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 13)
    report = PassReport("reconstruct")
    report.details.extend(f"{name}: skipped ({why})" for name, why in skipped)
    torch.manual_seed(cfg.seed)
    device = host_device(cfg.host_device, torch)
    improved, gains = 0, []
    feeds = cfg.batches[:max(1, -(-cfg.samples // len(next(iter(cfg.batches[0].values())))))]
    with tempfile.TemporaryDirectory(prefix="edgesmith-reconstruct-") as tmp:
        for number, block in enumerate(parts):
            if time.monotonic() > cfg.deadline:
                report.details.append(f"stopped at the time limit: blocks {number}.."
                                      f"{len(parts) - 1} stay as calibrated")
                break
            graph = Graph(out.graph)
            targets = [float_name(o, float_names) for o in block.outputs]
            try:
                if None in targets:
                    raise EdgesmithError("an output without a float twin")
                module = BlockModule(graph, block, weights, cfg, opset, torch, device)
                xs = _cache(probe_session(out, [block.input], optimize=False), block.input,
                            feeds, Path(tmp), cfg.memory_bytes // 2)
                fsession = probe_session(cfg.float_model, targets, optimize=False)
                ys = [_cache(fsession, t, feeds, Path(tmp),
                             cfg.memory_bytes // (2 * len(targets))) for t in targets]
                ranges = [_next_range(graph, o) for o in block.outputs]
                before, after = _learn(module, xs, ys, ranges, cfg)
            except (EdgesmithError, KeyError, RuntimeError) as e:   # that block stays as it is
                text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                report.details.append(f"block {number} ({block.input}): skipped ({text})")
                continue
            gains.append(10 * np.log10(max(before, 1e-30) / max(after, 1e-30)))
            if after < before:
                new_scales = _write_back(graph, module)
                requantize_biases(Graph(out.graph), new_scales)
                improved += 1
            del xs, ys
    report.changed = improved
    report.metrics.update(blocks=len(parts), improved=improved, skipped=len(skipped),
                          seconds=time.time() - t0, iters=cfg.iters,
                          mean_block_gain_db=float(np.mean(gains)) if gains else 0.0)
    report.details.append(
        f"reconstructed {improved} of {len(parts)} block(s) ({cfg.iters} steps each): block "
        f"output error {np.mean(gains) if gains else 0:.1f} dB lower on average than as "
        f"calibrated, in {time.time() - t0:.0f} s")
    return out, report
