"""Rewrite a QDQ model's MobileNetV2 blocks to edgesmith's int8 kernel (kernels/int8_block.c).

`fuse_int8_inverted_residual` finds, in the QDQ graph onnxruntime's quantizer writes,

    DQ(x) -> Conv 1x1 (or the stem's 3x3) -> Q -> DQ -> Conv 3x3 depthwise -> Q -> DQ
          -> Conv 1x1 -> Q [-> DQ -> Add(DQ(x), .) -> Q]

with uint8 activations and int8 per-channel weights without zero points: exactly what
onnxruntime runs as QLinearConv (and QLinearAdd). Each becomes one `edgesmith.QInvertedResidual`
on the same grid: the same int8 weights, int32 biases, scales and zero points, so the model's
accuracy is the QDQ model's. The kernel works in NHWC, so a run of blocks passes its tensors on
directly, with one Transpose before it (none when it starts at the stem, which reads NCHW) and
one after. Blocks the kernel cannot take stay on
onnxruntime's kernels, each with its reason in the report.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from . import PassReport, register
from .kernels import DOMAIN, KernelConfig, output_side, square_conv
from ..onnx_utils import Graph, attr, drop_unused_initializers, remove_nodes

TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def _grid(graph: Graph, node, dtype=np.uint8) -> tuple[float, int] | None:
    """A Q or DQ node's per-tensor (scale, zero point) of this type, or None."""
    if node is None or node.op_type not in ("QuantizeLinear", "DequantizeLinear") \
            or len(node.input) < 3:
        return None
    scale, zero = graph.array(node.input[1]), graph.array(node.input[2])
    if scale is None or zero is None or scale.size != 1 or zero.size != 1 or zero.dtype != dtype \
            or scale.dtype != np.float32 or not float(scale.reshape(-1)[0]) > 0:
        return None
    return float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0])


def _grid_or_why(graph: Graph, node, what: str) -> tuple[float, int] | str:
    """`_grid`, or why the tensor is not on a grid the kernel takes."""
    grid = _grid(graph, node)
    if grid is not None:
        return grid
    zero = graph.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero is not None and zero.dtype == np.int8:
        return f"{what} is int8 (the kernel takes uint8 activations: the u8s8 recipes)"
    return f"{what} is not uint8 with one constant scale and zero point"


def _weights(graph: Graph, conv) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """The conv's int8 weights, int32 bias and per-channel scales (float32 [out]), or why not."""
    wdq = graph.producer.get(conv.input[1])
    has_bias = len(conv.input) > 2 and bool(conv.input[2])
    bdq = graph.producer.get(conv.input[2]) if has_bias else None
    if wdq is None or wdq.op_type != "DequantizeLinear":
        return "weights are not int8 (no DequantizeLinear)"
    w, scale = graph.array(wdq.input[0]), graph.array(wdq.input[1])
    zero = graph.array(wdq.input[2]) if len(wdq.input) > 2 and wdq.input[2] else np.zeros(1)
    if w is None or w.dtype != np.int8 or w.ndim != 4 or scale is None \
            or scale.dtype != np.float32:
        return "weights are not constant int8"
    if np.any(zero != 0):
        return "weights have a zero point"
    if scale.size not in (1, w.shape[0]) or (scale.size > 1 and attr(wdq, "axis", 1) != 0):
        return "weight scales are neither per tensor nor per output channel"
    if not has_bias:
        bias = np.zeros(w.shape[0], np.int32)
    elif bdq is None or bdq.op_type != "DequantizeLinear" \
            or (b := graph.array(bdq.input[0])) is None or b.dtype != np.int32 \
            or b.shape != (w.shape[0],):
        return "bias is not quantized to int32"     # a float bias: onnxruntime runs it in float
    else:
        bias = b
    return w, bias, np.broadcast_to(scale.reshape(-1), (w.shape[0],)).astype(np.float32)


def _out_channels(graph: Graph, conv) -> int | None:
    """A conv's output channels, from its (dequantized) weights."""
    w = graph.producer.get(conv.input[1])
    array = graph.array(w.input[0] if w is not None and w.op_type == "DequantizeLinear"
                        else conv.input[1])
    return int(array.shape[0]) if array is not None and array.ndim == 4 else None


def _requantized(graph: Graph, conv) -> tuple[object, object] | None:
    """conv -> QuantizeLinear -> DequantizeLinear, each the only consumer: (Q, DQ)."""
    q = graph.only_consumer(conv.output[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    dq = graph.only_consumer(q.output[0])
    return (q, dq) if dq is not None and dq.op_type == "DequantizeLinear" else None


def _match(graph: Graph, expand) -> dict | str | None:
    """The int8 block starting at `expand`: a dict, a reason it cannot be taken, or None when
    this is not the start of a block at all (the pattern's shape is not there)."""
    dqx = graph.producer.get(expand.input[0]) if expand.op_type == "Conv" else None
    if dqx is None or dqx.op_type != "DequantizeLinear" or attr(expand, "group", 1) != 1:
        return None
    first = _requantized(graph, expand)
    dw = graph.only_consumer(first[1].output[0]) if first else None
    if dw is None or dw.op_type != "Conv" or attr(dw, "group", 1) != _out_channels(graph, expand):
        return None                                 # not a depthwise conv of the expansion
    second = _requantized(graph, dw)
    project = graph.only_consumer(second[1].output[0]) if second else None
    if project is None or project.op_type != "Conv" or attr(project, "group", 1) != 1:
        return None
    name = expand.name or expand.output[0]      # from here on, every refusal says why
    weights = [_weights(graph, conv) for conv in (expand, dw, project)]
    for role, w in zip(("expand", "depthwise", "project"), weights):
        if isinstance(w, str):
            return f"{name}: the {role} conv's {w}"
    (we, _, _), (wd, bd, _), (wp, _, _) = weights
    (e, c, kernel, k2), stride = we.shape, list(attr(dw, "strides", [1, 1]))
    expand_stride = list(attr(expand, "strides", [1, 1]))
    if kernel != k2 or not (kernel == 1 and square_conv(expand, 1, 1) or kernel == 3 and (
            square_conv(expand, 3, 1) or square_conv(expand, 3, 2))):
        return f"{name}: the expand conv is neither a 1x1 nor a 3x3 with pads of 1 (a stem)"
    if not square_conv(dw, 3) or stride[0] != stride[1] or stride[0] not in (1, 2) \
            or attr(dw, "group", 1) != e or wd.shape != (e, 1, 3, 3):
        return f"{name}: the depthwise conv is not a 3x3 of stride 1 or 2 with pads of 1"
    if not square_conv(project, 1, 1) or wp.shape[1:] != (e, 1, 1):
        return f"{name}: the project conv is not a 1x1 over the expanded channels"
    grids = []
    for node, what in ((dqx, "the block's input"), (first[0], "the expanded tensor"),
                       (second[0], "the depthwise output")):
        grid = _grid_or_why(graph, node, what)
        if isinstance(grid, str):
            return f"{name}: {grid}"
        grids.append(grid)
    if _grid(graph, first[1]) != grids[1] or _grid(graph, second[1]) != grids[2]:
        return f"{name}: a QuantizeLinear and its DequantizeLinear differ in grid"
    q3 = graph.only_consumer(project.output[0])
    if q3 is None or q3.op_type != "QuantizeLinear":
        return (f"{name}: the project conv's output is read unquantized (by several nodes, "
                "or as a graph output)")
    p_grid = _grid_or_why(graph, q3, "the project conv's output")
    if isinstance(p_grid, str):
        return f"{name}: {p_grid}"
    if np.abs(bd.astype(np.int64)).max(initial=0) > (1 << 24) - 9 * 255 * 128:
        return f"{name}: a depthwise bias is beyond the kernel's exact range"
    for (w, b, _), zero in ((weights[0], grids[0][1]), (weights[2], grids[2][1])):
        sums = w.reshape(len(w), -1).astype(np.int64).sum(1)
        depth = w[0].size * 255 * 128 + np.maximum(     # the kernel folds zero (x86) or
            np.abs(b - zero * sums), np.abs(b - (zero - 128) * sums))  # zero - 128 (ARM)
        if depth.max(initial=0) > np.iinfo(np.int32).max:
            return f"{name}: a reduction too deep for int32 accumulators"
    nodes = [expand, first[0], first[1], dw, second[0], second[1], project, q3]
    out, y_grid, first_is_x = q3.output[0], None, 0
    dq3 = graph.only_consumer(q3.output[0])
    add = graph.only_consumer(dq3.output[0]) if dq3 is not None \
        and dq3.op_type == "DequantizeLinear" and _grid(graph, dq3) == p_grid else None
    if add is not None and add.op_type == "Add" and stride[0] == 1 and kernel == 1 \
            and wp.shape[0] == c:
        other = add.input[0] if add.input[1] == dq3.output[0] else add.input[1]
        dq_other = graph.producer.get(other)
        q_add = graph.only_consumer(add.output[0])
        y_grid = _grid(graph, q_add)
        if dq_other is not None and dq_other.op_type == "DequantizeLinear" \
                and dq_other.input[0] == dqx.input[0] and _grid(graph, dq_other) == grids[0] \
                and y_grid is not None:
            nodes += [dq3, add, q_add]
            out, first_is_x = q_add.output[0], int(add.input[0] == other)
        else:
            y_grid = None
    return {"nodes": nodes, "x": dqx.input[0], "output": out, "dq_x": dqx, "weights": weights,
            "grids": (*grids, p_grid, y_grid), "stride": stride[0],
            "expand_stride": expand_stride[0] if kernel == 3 else 1,
            "residual_first": first_is_x, "name": name, "channels": (int(c), int(e),
                                                                      int(wp.shape[0]))}


@register("fuse_int8_inverted_residual")
def fuse_int8_inverted_residual(model: onnx.ModelProto, cfg: KernelConfig | None = None
                                ) -> tuple[onnx.ModelProto, PassReport]:
    """Each int8 MobileNetV2 block of a QDQ model (and its stem) becomes one
    edgesmith.QInvertedResidual node in NHWC, with Transposes only where a run of blocks
    meets onnxruntime's nodes; `cfg` as for the float kernel (band rows, smallest side)."""
    cfg = cfg or KernelConfig()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g, report = out.graph, PassReport("fuse_int8_inverted_residual")
    graph = Graph(g)
    blocks, taken = [], set()
    for node in list(g.node):
        if id(node) in taken:
            continue
        found = _match(graph, node)
        if isinstance(found, str):
            report.details.append(f"not taken: {found}")
        elif found is not None and output_side(found, cfg.shapes.get(found["x"])) < cfg.min_side:
            report.details.append(f"not taken: {found['name']}: its output is smaller than "
                                  f"{cfg.min_side:g} pixels a side")
        elif found is not None:
            blocks.append(found)
            taken.update(id(n) for n in found["nodes"])
    if not blocks:
        return out, report
    made: set[str] = set()

    def fresh(base: str) -> str:
        """A name neither the graph nor this rewrite has used yet."""
        name = graph.unique_name(base)
        while name in made:
            name = graph.unique_name(f"{base}_{len(made)}")
        made.add(name)
        return name

    produced = {b["output"]: b for b in blocks}     # a block's output another block reads
    nhwc = {b["output"]: fresh(f"{b['output']}_nhwc") for b in blocks}
    to_nhwc: dict[str, str] = {}                    # one Transpose per tensor blocks read
    stem = {id(b) for b in blocks if b["weights"][0][0].shape[2] == 3}   # reads NCHW
    fused_inputs = {b["x"] for b in blocks if id(b) not in stem}
    dead, new_nodes = [], []
    for block in blocks:
        x = block["x"]
        if id(block) in stem:
            x_nhwc = x                  # a 3x3 expand reads the image's planes (NCHW) itself
        elif x in produced:
            x_nhwc = nhwc[x]
        elif x in to_nhwc:
            x_nhwc = to_nhwc[x]
        else:
            x_nhwc = to_nhwc[x] = fresh(f"{x}_nhwc")
            new_nodes.append(helper.make_node("Transpose", [x], [x_nhwc], perm=TO_NHWC,
                                              name=fresh(f"{block['name']}_to_nhwc")))
        names = []
        for role, (w, b, s) in zip(("expand", "depthwise", "project"), block["weights"]):
            for kind, array in (("w", w), ("b", b), ("scale", s)):
                name = fresh(f"{block['name']}_q{role}_{kind}")
                graph.set_array(name, np.ascontiguousarray(array))
                names.append(name)
        (xs, xz), (es, ez), (ds, dz), (ps, pz), y = block["grids"]
        grids = dict(x_scale=xs, x_zero=xz, e_scale=es, e_zero=ez, d_scale=ds, d_zero=dz,
                     p_scale=ps, p_zero=pz)
        if y is not None:
            grids.update(y_scale=y[0], y_zero=y[1])
        fused = helper.make_node(
            "QInvertedResidual", [x_nhwc, *names], [nhwc[block["output"]]], domain=DOMAIN,
            name=fresh(f"{block['name']}_int8_inverted_residual"),
            stride=block["stride"], expand_stride=block["expand_stride"],
            residual=int(y is not None), residual_first=block["residual_first"],
            band_rows=int(cfg.tile_rows), **grids)
        new_nodes.append(fused)
        if _read_outside(graph, block["output"], taken) or block["output"] in graph.outputs \
                or block["output"] not in fused_inputs:
            new_nodes.append(helper.make_node(
                "Transpose", [nhwc[block["output"]]], [block["output"]], perm=TO_NCHW,
                name=fresh(f"{block['name']}_to_nchw")))
        dead += block["nodes"]
        c, e, o = block["channels"]
        report.add(f"{block['name']}: int8 {c}->{e}->{o} stride {block['stride']}"
                   f"{' +residual' if y is not None else ''}"
                   f"{' (3x3 expand: the stem)' if block['weights'][0][0].shape[2] == 3 else ''}")
        report.metrics.setdefault("blocks", []).append({
            "node": fused.name, "input": block["x"], "stride": block["stride"],
            "expand_stride": block["expand_stride"], "channels": [c, e, o],
            "output": block["output"], "output_nhwc": nhwc[block["output"]],
            "replaces": [n.name for n in block["nodes"]] + [n.output[0] for n in block["nodes"]]})
    remove_nodes(g, dead)
    g.node.extend(new_nodes)
    _drop_dead_dequantize(g)
    _sort_topologically(g)
    drop_unused_initializers(g)
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return out, report


def _read_outside(graph: Graph, name: str, taken: set) -> bool:
    """Whether a node that stays reads `name`: not one the blocks replace, nor a
    DequantizeLinear only they read (a block's input's DQ goes with the blocks)."""
    for user in graph.consumers.get(name, []):
        if id(user) in taken:
            continue
        if user.op_type == "DequantizeLinear" and user.output[0] not in graph.outputs and all(
                id(n) in taken for n in graph.consumers.get(user.output[0], [])):
            continue
        return True
    return False


def _sort_topologically(g: onnx.GraphProto) -> None:
    """The nodes in an order where each comes after what it reads (onnx requires it)."""
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    ordered, pending = [], list(g.node)
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ValueError("fuse_int8_inverted_residual: the rewritten graph has a cycle")
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
        ordered += ready
        known.update(o for n in ready for o in n.output)
    del g.node[:]
    g.node.extend(ordered)


def _drop_dead_dequantize(g: onnx.GraphProto) -> None:
    """DequantizeLinear nodes whose outputs nothing reads any more (the blocks' weights and
    their inputs' DQ)."""
    while True:
        used = {name for n in g.node for name in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if n.op_type == "DequantizeLinear"
                and not any(o in used for o in n.output)]
        if not dead:
            return
        remove_nodes(g, dead)
