"""Pruning that makes the model smaller: channels are removed from the ONNX graph itself.

Structured pruning builds a union-find over single channels `(tensor, index)` (NCHW axis 1, or
features of [N, F]): elementwise ops, BatchNorm, depthwise convs, residual Adds, Concat (by
offset) and Flatten/Reshape into a Gemm (one channel = H*W features) tie channels together;
Conv/Gemm/MatMul produce and consume them. Each connected component is one removable channel
everywhere it appears; components touching a graph input/output or an op we do not understand
are frozen and reported. Unstructured pruning zeroes weights (global, per layer, or N:M).
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import PassReport, register
from ..onnx_utils import Graph, attr, operand, static_shapes, with_input_dims

PASSTHROUGH = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
               "Elu", "Selu", "Softplus", "Identity", "Dropout", "MaxPool", "AveragePool",
               "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization", "Resize", "Upsample",
               "Neg", "Abs", "Sqrt", "Exp", "Erf", "Gelu", "Cast"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min"}
IMPORTANCE = ("l1", "l2", "bn_gamma", "activation")


@dataclass(frozen=True)
class PruneConfig:
    ratio: float = 0.5                                  # fraction of channels removed per group
    layer_ratios: dict = field(default_factory=dict)    # producer node name -> ratio
    importance: str = "l1"                              # l1 | l2 | bn_gamma | activation
    global_ranking: bool = False    # one ranking over all groups (normalized), not per group
    round_to: int = 8               # keep channel counts multiples of this (SIMD-friendly)
    min_channels: int = 1
    activation_means: dict | None = field(default=None, compare=False)   # importance=activation
    input_shapes: dict | None = field(default=None, compare=False)   # concrete sizes for dynamic
    # dims (the analysis needs channel counts); the pruned model keeps its dynamic dims

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"PruneConfig.ratio must be in [0, 1), got {self.ratio}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"PruneConfig.importance must be one of {IMPORTANCE}")
        if self.importance == "activation" and not self.activation_means:
            raise ValueError("PruneConfig.importance 'activation' needs activation_means "
                             "(per-channel means from calibration data)")
        for name, r in self.layer_ratios.items():
            if not 0.0 <= r < 1.0:
                raise ValueError(f"PruneConfig.layer_ratios[{name!r}] must be in [0, 1)")


class _Channels:
    """Union-find over (tensor, channel) with a frozen flag and reasons."""

    def __init__(self):
        self.parent: dict = {}
        self.frozen: dict = {}        # root -> reason

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb
            if ra in self.frozen:
                self.frozen.setdefault(rb, self.frozen.pop(ra))

    def freeze(self, x, reason: str):
        self.frozen.setdefault(self.find(x), reason)


def _channel_count(shapes: dict, tensor: str) -> int | None:
    shape = shapes.get(tensor)
    return shape[1] if shape and len(shape) >= 2 else None


def _analyse(model: onnx.ModelProto, graph: Graph, shapes: dict):
    """Couple channels; return (union-find, producers, consumers, per-tensor channel counts)."""
    uf = _Channels()
    producers: list[tuple] = []      # (node, tensor) whose output channels it creates
    consumers: list[tuple] = []      # (node, tensor) whose input channels it reads
    counts = {t: _channel_count(shapes, t) for t in shapes}

    def chans(t):
        return range(counts.get(t) or 0)

    def freeze_all(t, reason):
        for c in chans(t):
            uf.freeze((t, c), reason)

    def couple(a, b):
        if counts.get(a) != counts.get(b) or not counts.get(a):
            freeze_all(a, "channel counts differ")
            freeze_all(b, "channel counts differ")
            return
        for c in chans(a):
            uf.union((a, c), (b, c))

    for vi in list(model.graph.input) + list(model.graph.output):
        freeze_all(vi.name, "graph input/output")
    for node in model.graph.node:
        op, ins, outs = node.op_type, [i for i in node.input if i], list(node.output)
        data_ins = [i for i in ins if i not in graph.inits]
        if op == "Conv":
            w = graph.array(node.input[1])
            groups = attr(node, "group", 1)
            if w is None:
                for t in data_ins + outs:
                    freeze_all(t, "Conv with non-constant weights")
            elif groups == 1:
                consumers.append((node, node.input[0]))
                producers.append((node, outs[0]))
            elif groups == counts.get(node.input[0]) == counts.get(outs[0]) and w.shape[1] == 1:
                couple(node.input[0], outs[0])          # depthwise: channel i stays channel i
                producers.append((node, outs[0]))
            else:
                freeze_all(node.input[0], "grouped conv")
                freeze_all(outs[0], "grouped conv")
        elif op in ("Gemm", "MatMul"):
            w = graph.array(node.input[1])
            a_shape = shapes.get(node.input[0])
            if w is None or w.ndim != 2 or attr(node, "transA", 0) or not a_shape or \
                    len(a_shape) != 2:
                for t in data_ins + outs:
                    freeze_all(t, f"{op} that is not activation x constant 2-D weight")
            else:
                consumers.append((node, node.input[0]))
                producers.append((node, outs[0]))
        elif op in PASSTHROUGH:
            couple(node.input[0], outs[0])
            for extra in outs[1:]:
                freeze_all(extra, f"{op} extra output")
        elif op in BINARY:
            for i in data_ins:
                if counts.get(i) == counts.get(outs[0]):
                    couple(i, outs[0])
                elif counts.get(i) not in (None, 1):
                    freeze_all(i, f"{op} broadcast across channels")
                    freeze_all(outs[0], f"{op} broadcast across channels")
        elif op == "Concat" and shapes.get(outs[0]) and \
                attr(node, "axis") % len(shapes[outs[0]]) == 1:
            offset = 0
            for i in ins:
                for c in chans(i):
                    uf.union((i, c), (outs[0], offset + c))
                offset += counts.get(i) or 0
        elif op == "Split" and shapes.get(node.input[0]) and \
                attr(node, "axis", 0) % len(shapes[node.input[0]]) == 1 and \
                _split_sizes(node, graph) is not None:
            offset = 0          # the inverse of Concat: output k holds a slice of the input
            for o in outs:
                for c in chans(o):
                    uf.union((node.input[0], offset + c), (o, c))
                offset += counts.get(o) or 0
        elif op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze") and _is_channel_flatten(
                shapes.get(node.input[0]), shapes.get(outs[0]), node, graph):
            block = int(np.prod(shapes[node.input[0]][2:])) if len(shapes[node.input[0]]) > 2 \
                else 1
            for c in chans(node.input[0]):
                for j in range(block):
                    uf.union((node.input[0], c), (outs[0], c * block + j))
        else:
            for t in data_ins + outs:
                freeze_all(t, f"unsupported op {op}")
    return uf, producers, consumers, counts


def _split_sizes(node, graph: Graph) -> list[int] | None:
    """Explicit split sizes (input since opset 13, attribute before); None for an even split
    by count, which pruning could not keep even."""
    values = [None] + [graph.array(n) if n else None for n in node.input[1:2]]
    sizes = operand(node, values, 1, "split")
    return None if sizes is None or not len(sizes) else [int(v) for v in sizes]


def _reason_counts(uf: _Channels) -> dict[str, int]:
    """Why channel groups could not be pruned, most common first (said when nothing was)."""
    counts: dict[str, int] = {}
    for root, reason in uf.frozen.items():
        if uf.find(root) == root:
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _is_channel_flatten(src, dst, node, graph) -> bool:
    """[N, C, ...] -> [N, C*prod(...)] keeping N: channel c becomes a block of features."""
    if not src or not dst or len(dst) != 2 or src[0] != dst[0]:
        return False
    if node.op_type == "Flatten" and attr(node, "axis", 1) != 1:
        return False
    return int(np.prod(src[1:])) == dst[1]


def _filter_norms(node, graph: Graph, importance: str) -> np.ndarray:
    w = graph.array(node.input[1]).astype(np.float64)
    if node.op_type == "Conv":
        per = w.reshape(w.shape[0], -1)
    elif node.op_type == "Gemm" and attr(node, "transB", 0):
        per = w
    else:
        per = w.T
    return np.abs(per).sum(1) if importance != "l2" else np.sqrt((per ** 2).sum(1))


def _importance(producers, graph, cfg: PruneConfig, activation_means: dict | None) -> dict:
    """(tensor, channel) -> score, normalised per producer so layers compare."""
    scores = {}
    for node, tensor in producers:
        if cfg.importance == "activation" and activation_means and tensor in activation_means:
            s = np.abs(activation_means[tensor])
        elif cfg.importance == "bn_gamma" and (bn := next(
                (n for n in graph.consumers.get(tensor, [])
                 if n.op_type == "BatchNormalization"), None)) is not None:
            s = np.abs(graph.array(bn.input[1]).astype(np.float64))
        else:
            s = _filter_norms(node, graph, cfg.importance)
        s = s / (s.mean() + 1e-12)
        for c, v in enumerate(s):
            scores[(tensor, c)] = scores.get((tensor, c), 0.0) + float(v)
    return scores


def _delete(arr: np.ndarray, idx: list[int], axis: int) -> np.ndarray:
    return np.delete(arr, idx, axis=axis) if idx else arr


def _own_initializer(graph: Graph, node, i: int) -> str:
    """Give `node` its own copy of input `i` before slicing it (shared weights stay intact)."""
    name = node.input[i]
    if sum(name in n.input for n in graph.g.node) > 1:
        new = graph.unique_name(f"{name}_{node.name or node.output[0]}")
        graph.set_array(new, graph.array(name))
        node.input[i] = new
        return new
    return name


def _surgery(model: onnx.ModelProto, graph: Graph, removed: dict[str, list[int]],
             shapes: dict) -> None:
    for node in model.graph.node:
        op = node.op_type
        r_in = removed.get(node.input[0], []) if node.input else []
        r_out = removed.get(node.output[0], [])
        if not r_in and not r_out and op not in BINARY | {"Reshape"}:
            continue
        if op == "Conv":
            w_name = _own_initializer(graph, node, 1)
            w = graph.array(w_name)
            depthwise = attr(node, "group", 1) > 1
            w = _delete(w, r_out, 0)
            if not depthwise:
                w = _delete(w, r_in, 1)
            graph.set_array(w_name, w)
            if depthwise:
                for a in node.attribute:
                    if a.name == "group":
                        a.i = w.shape[0]
            if len(node.input) > 2 and node.input[2]:
                b_name = _own_initializer(graph, node, 2)
                graph.set_array(b_name, _delete(graph.array(b_name), r_out, 0))
        elif op in ("Gemm", "MatMul"):
            w_name = _own_initializer(graph, node, 1)
            w = graph.array(w_name)
            trans_b = op == "Gemm" and attr(node, "transB", 0)
            w = _delete(_delete(w, r_out, 0 if trans_b else 1), r_in, 1 if trans_b else 0)
            graph.set_array(w_name, w)
            if op == "Gemm" and len(node.input) > 2 and node.input[2]:
                b = graph.array(node.input[2])
                if b is not None and b.ndim >= 1 and b.shape[-1] == w.shape[0 if trans_b else 1] \
                        + len(r_out):
                    b_name = _own_initializer(graph, node, 2)
                    graph.set_array(b_name, _delete(b, r_out, b.ndim - 1))
        elif op == "BatchNormalization":
            for i in range(1, 5):
                name = _own_initializer(graph, node, i)
                graph.set_array(name, _delete(graph.array(name), r_in, 0))
        elif op in BINARY:
            for i, name in enumerate(node.input):
                const = graph.array(name)
                full = shapes.get(node.output[0])
                if const is None or not r_out or not full or const.ndim == 0:
                    continue
                axis = const.ndim - (len(full) - 1)   # channel axis after right-aligned broadcast
                if 0 <= axis < const.ndim and const.shape[axis] == full[1]:
                    own = _own_initializer(graph, node, i)
                    graph.set_array(own, _delete(const, r_out, axis))
        elif op == "Split":
            sizes = _split_sizes(node, graph)
            new = [s - len(removed.get(o, [])) for s, o in zip(sizes, node.output)]
            if new != sizes:
                if len(node.input) > 1 and node.input[1]:
                    graph.set_array(_own_initializer(graph, node, 1), np.array(new, np.int64))
                else:
                    for a in node.attribute:
                        if a.name == "split":
                            a.ClearField("ints")
                            a.ints.extend(new)
        elif op == "Reshape" and r_in:
            target = graph.array(node.input[1])
            if target is not None and target.size == 2 and target[1] > 0:
                own = _own_initializer(graph, node, 1)
                graph.set_array(own, np.array([target[0], target[1] - len(
                    removed.get(node.output[0], []))], np.int64))


@register("prune_channels")
def prune_channels(model: onnx.ModelProto, cfg: PruneConfig | None = None
                   ) -> tuple[onnx.ModelProto, PassReport]:
    """Remove the least important channels of every prunable group; shapes stay consistent."""
    cfg = cfg or PruneConfig()
    activation_means = cfg.activation_means
    out, graph, shapes, uf, producers, counts, members, groups, skipped = _grouped(model, cfg)
    report = PassReport("prune_channels")
    producer_of = {t: n.name or t for n, t in producers}
    produced = set(producer_of)
    scores = _importance(producers, graph, cfg, activation_means)
    removed_roots = []
    ranking = []
    for owners, roots in groups.items():
        ratio = max((cfg.layer_ratios.get(o, cfg.ratio) for o in owners), default=cfg.ratio)
        n = len(roots)
        keep = max(cfg.min_channels, int(round(n * (1 - ratio))))
        if cfg.round_to > 1 and n >= 2 * cfg.round_to:
            keep = max(cfg.round_to, int(round(keep / cfg.round_to)) * cfg.round_to)
        score = {r: sum(scores.get(m, 0.0) for m in members[r]) / max(1, sum(
            m in scores for m in members[r])) for r in roots}
        order = sorted(roots, key=lambda r: score[r])
        if cfg.global_ranking:
            ranking += [(score[r], r, owners) for r in order]
        else:
            removed_roots += order[:n - keep]
        report.details.append(f"{' + '.join(owners)}: {n} -> {keep if not cfg.global_ranking else '?'}"
                              " channels")
    if cfg.global_ranking and ranking:
        ranking.sort(key=lambda x: x[0])
        per_group = {o: len(r) for o, r in groups.items()}
        for _, root, owners in ranking[:int(len(ranking) * cfg.ratio)]:
            if per_group[owners] > cfg.min_channels:
                removed_roots.append(root)
                per_group[owners] -= 1
    removed: dict[str, list[int]] = {}
    for root in removed_roots:
        for t, c in members[root]:
            removed.setdefault(t, []).append(c)
    removed = {t: sorted(v) for t, v in removed.items()}
    _surgery(out, graph, removed, shapes)
    del out.graph.value_info[:]
    out = onnx.shape_inference.infer_shapes(out)
    onnx.checker.check_model(out)
    report.changed = len(removed_roots)
    prunable = sum(len(r) for r in groups.values())
    report.details.insert(0, f"removed {len(removed_roots)} of {prunable} channels in prunable "
                             f"groups ({len(removed_roots) / max(1, prunable):.0%}; asked "
                             f"{cfg.ratio:.0%}: counts round to multiples of {cfg.round_to} "
                             f"in layers of {2 * cfg.round_to} or more)")
    report.metrics.update(
        removed_channels=len(removed_roots), groups=len(groups),
        skipped={k: v for k, v in sorted(skipped.items())},
        frozen_reasons=_reason_counts(uf),
        per_layer={producer_of[t]: {"before": counts[t], "after": counts[t] - len(removed.get(t, []))}
                   for t in sorted(produced) if counts.get(t)})
    return out, report


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Channels that are removed together: the nodes producing them (named as in
    `PruneConfig.layer_ratios`), how many there are, and every tensor they run through."""
    owners: tuple[str, ...]
    channels: int
    tensors: dict          # tensor -> its channels per group channel (Flatten: H*W features)
    key: str | None = None  # an owner no other group has: `layer_ratios` narrows this group
    #                         alone through it (None: any ratio would narrow others too)

    def removed(self, width: int) -> dict[str, int]:
        """Channels each tensor loses when the group narrows to `width`."""
        return {t: (self.channels - width) * per for t, per in self.tensors.items()}


def channel_groups(model: onnx.ModelProto, input_shapes: dict | None = None
                   ) -> list[ChannelGroup]:
    """The prunable channel groups of `model`: what a width search may shrink, one at a time.
    Groups whose channels run through different tensors (the halves of a Split) are left
    out: narrowing them by a count would not say which tensor loses what."""
    from collections import Counter

    *_, members, groups, _ = _grouped(model, PruneConfig(input_shapes=input_shapes))
    shared = Counter(o for owners in groups for o in owners)
    out = []
    for owners, roots in groups.items():
        shapes = {frozenset(Counter(t for t, _ in members[r]).items()) for r in roots}
        if len(shapes) == 1:     # every channel runs through the same tensors (not a Split's)
            key = next((o for o in owners if shared[o] == 1), None)
            out.append(ChannelGroup(owners, len(roots), dict(next(iter(shapes))), key))
    return out


def _grouped(model: onnx.ModelProto, cfg: PruneConfig):
    """The analysis both pruning and width searches use: channels coupled into groups keyed
    by their producers; frozen groups are named with their reason in `skipped`."""
    from .fuse import constant_folding, initializers_as_constants

    # weights must be initializers to be sliced: exporters also write them as Constant nodes
    # (folded here) or, in IR 3 files, as graph inputs with declared shapes (made constants)
    out, _ = constant_folding(initializers_as_constants(model)[0])
    graph = Graph(out.graph)
    shapes = static_shapes(with_input_dims(out, cfg.input_shapes))
    uf, producers, consumers, counts = _analyse(out, graph, shapes)
    members: dict = {}
    for t, n in counts.items():
        for c in range(n or 0):
            members.setdefault(uf.find((t, c)), []).append((t, c))
    produced = {t for _, t in producers}
    producer_of = {t: n.name or t for n, t in producers}
    groups: dict[tuple, list] = {}
    skipped: dict[str, str] = {}
    for root, chans in members.items():
        owners = tuple(sorted({producer_of[t] for t, _ in chans if t in produced}))
        if not owners:
            continue
        if root in uf.frozen:
            for o in owners:
                skipped.setdefault(o, uf.frozen[root])
            continue
        groups.setdefault(owners, []).append(root)
    return out, graph, shapes, uf, producers, counts, members, groups, skipped


def _weights(model: onnx.ModelProto, graph: Graph) -> list[tuple]:
    """(node, initializer name) of every Conv/Gemm/MatMul weight."""
    return [(n, n.input[1]) for n in model.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and graph.array(n.input[1]) is not None]


def gzip_size(model: onnx.ModelProto) -> int:
    return len(gzip.compress(model.SerializeToString(), compresslevel=6))


@dataclass(frozen=True)
class UnstructuredConfig:
    sparsity: float = 0.5                   # fraction of weights zeroed
    scope: str = "global"                   # "global" threshold or "layer" by layer
    n_m: tuple[int, int] | None = None      # N:M sparsity (e.g. (2, 4)) along the inputs

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"UnstructuredConfig.sparsity must be in [0, 1), got {self.sparsity}")
        if self.scope not in ("global", "layer"):
            raise ValueError(f"UnstructuredConfig.scope is {self.scope!r}; use global or layer")
        if self.n_m is not None and not (len(self.n_m) == 2 and 0 < self.n_m[0] < self.n_m[1]):
            raise ValueError(f"UnstructuredConfig.n_m is {self.n_m}; write (N, M) with 0 < N < M")


@register("prune_unstructured")
def prune_unstructured(model: onnx.ModelProto, cfg: UnstructuredConfig | None = None
                       ) -> tuple[onnx.ModelProto, PassReport]:
    """Zero the smallest weights: global or per-layer magnitude, or N:M (e.g. 2:4) along inputs.

    Dense runtimes (onnxruntime on CPU) run zeros as fast as any other number: this shrinks
    the compressed download, not the latency. Structured pruning is what makes models faster.
    """
    cfg = cfg or UnstructuredConfig()
    sparsity, scope, n_m = cfg.sparsity, cfg.scope, cfg.n_m
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = Graph(out.graph)
    report = PassReport("prune_unstructured")
    before = gzip_size(model)
    weights = _weights(out, graph)
    threshold = None
    if scope == "global" and not n_m and weights:
        allw = np.concatenate([np.abs(graph.array(w)).ravel() for _, w in weights])
        threshold = np.quantile(allw, sparsity) if sparsity > 0 else -1.0
    per_layer = {}
    for node, name in weights:
        w = graph.array(name)
        if n_m:
            n, m = n_m
            moved = np.moveaxis(w, 1 if node.op_type == "Conv" or (
                node.op_type == "Gemm" and attr(node, "transB", 0)) else 0, -1)
            if moved.shape[-1] % m:
                report.details.append(f"{node.name}: {moved.shape[-1]} inputs not divisible "
                                      f"by {m}; skipped")
                continue
            groups = moved.reshape(-1, m)
            order = np.argsort(np.abs(groups), axis=1)
            mask = np.ones_like(groups, bool)
            np.put_along_axis(mask, order[:, :m - n], False, axis=1)
            pruned = np.moveaxis((groups * mask).reshape(moved.shape), -1,
                                 1 if node.op_type == "Conv" or (
                                     node.op_type == "Gemm" and attr(node, "transB", 0)) else 0)
        else:
            cut = threshold if threshold is not None else (
                np.quantile(np.abs(w), sparsity) if sparsity > 0 else -1.0)
            pruned = np.where(np.abs(w) <= cut, 0, w)
        graph.set_array(name, pruned.astype(w.dtype))
        per_layer[node.name or name] = float(np.mean(pruned == 0))
    after = gzip_size(out)
    report.changed = len(per_layer)
    report.metrics.update(sparsity_per_layer=per_layer, gzip_bytes_before=before,
                          gzip_bytes_after=after)
    report.details.append(f"zeroed weights in {len(per_layer)} layer(s); gzip size "
                          f"{before / 1e6:.2f} -> {after / 1e6:.2f} MB. Note: dense runtimes "
                          "(onnxruntime CPU) get no speedup from unstructured sparsity")
    return out, report


def activation_means(model: onnx.ModelProto, batches: list[dict]) -> dict:
    """Per-channel mean output of every Conv/Gemm over calibration feeds: the input that
    `PruneConfig(importance="activation")` ranks channels by."""
    from .equalize import channel_stats

    tensors = [n.output[0] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    return channel_stats(model, tensors, batches)["mean"]
