"""Rewrite subgraphs to edgesmith's own kernels (kernels/edgesmith_ops.c, domain "edgesmith").

`fuse_inverted_residual` finds MobileNetV2 blocks, 1x1 Conv -> act -> 3x3 depthwise Conv -> act
-> 1x1 Conv [-> Add of the block input], with both activations the same ReLU or Clip, and makes
each one `edgesmith.InvertedResidual`, whose kernel keeps the expanded tensor in cache. The
network's stem, a 3x3 Conv (stride 1 or 2) -> act followed by a block without an expand
(depthwise -> act -> 1x1 Conv), is the same pattern with a 3x3 expand, and is fused too. The
result runs only where the library is registered (the bundle ships it, the runtime loads it);
whether it is faster is for measurement to say, per device (the `edgesmith_kernels` knob).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from . import PassReport, register
from ..onnx_utils import Graph, attr, clip_bounds, drop_unused_initializers, remove_nodes

DOMAIN = "edgesmith"
RELU_BOUNDS = (0.0, float("inf"))


def square_conv(node, kernel: int, stride: int | None = None) -> bool:
    """A plain 2-D Conv of this square kernel: no dilation, pads of 'same' for 3x3."""
    if node is None or node.op_type != "Conv" or attr(node, "auto_pad", b"NOTSET") not in (
            b"NOTSET", "NOTSET"):
        return False
    pads = list(attr(node, "pads", [0, 0, 0, 0]))
    want = [kernel // 2] * 4
    return (list(attr(node, "dilations", [1, 1])) == [1, 1] and pads == want
            and (stride is None or list(attr(node, "strides", [1, 1])) == [stride, stride]))


def _activation(graph: Graph, node) -> tuple[float, float] | None:
    if node is None:
        return None
    if node.op_type == "Relu":
        return RELU_BOUNDS
    if node.op_type == "Clip":
        return clip_bounds(graph, node)
    return None


def _weights(graph: Graph, conv, shape_ok) -> tuple[np.ndarray, np.ndarray] | None:
    w = graph.array(conv.input[1])
    if w is None or w.dtype != np.float32 or not shape_ok(w.shape):
        return None
    b = graph.array(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else \
        np.zeros(w.shape[0], np.float32)
    return (w, b) if b is not None and b.dtype == np.float32 else None


def _match(graph: Graph, expand) -> dict | None:
    """The block starting at `expand`, or None; every inner value has one consumer."""
    if attr(expand, "group", 1) != 1 or not (square_conv(expand, 1, 1) or square_conv(expand, 3, 1)
                                              or square_conv(expand, 3, 2)):
        return None
    kernel, expand_stride = (1, 1) if square_conv(expand, 1) else (3, attr(expand, "strides", [1])[0])
    act1 = graph.only_consumer(expand.output[0])
    bounds = _activation(graph, act1)
    dw = graph.only_consumer(act1.output[0]) if bounds else None
    if not square_conv(dw, 3) or (stride := list(attr(dw, "strides", [1, 1])))[0] != stride[1] \
            or stride[0] not in (1, 2):
        return None
    act2 = graph.only_consumer(dw.output[0])
    project = graph.only_consumer(act2.output[0]) if _activation(graph, act2) == bounds else None
    if not square_conv(project, 1, 1) or attr(project, "group", 1) != 1:
        return None
    we = _weights(graph, expand, lambda s: len(s) == 4 and s[2:] == (kernel, kernel))
    if we is None:
        return None
    e, c = we[0].shape[:2]
    wd = _weights(graph, dw, lambda s: s == (e, 1, 3, 3))
    wp = _weights(graph, project, lambda s: len(s) == 4 and s[1:] == (e, 1, 1))
    if wd is None or wp is None or attr(dw, "group", 1) != e:
        return None
    add = graph.only_consumer(project.output[0])
    residual = (add is not None and add.op_type == "Add" and stride[0] == 1 and kernel == 1
                and wp[0].shape[0] == c and expand.input[0] in add.input
                and project.output[0] in add.input)
    return {"nodes": [expand, act1, dw, act2, project] + ([add] if residual else []),
            "weights": (we, wd, wp), "stride": stride[0], "expand_stride": expand_stride,
            "bounds": bounds,
            "residual": residual, "output": (add if residual else project).output[0]}


def block_sides(block: dict, side: int) -> tuple[int, int]:
    """An input side through the block: (the expanded tensor's side, the output's); a stem's
    3x3 expand has a stride of its own, then the depthwise's."""
    expanded = (side - 1) // block.get("expand_stride", 1) + 1
    return expanded, (expanded - 1) // block["stride"] + 1


def output_side(block: dict, shape) -> float:
    """The smaller side of the block's output, from its input's static shape (inf: unknown)."""
    if not shape or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        return float("inf")
    return min(block_sides(block, side)[1] for side in shape[2:])


@dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """Which blocks become the fused kernel, and its band height."""

    tile_rows: int = 0          # output rows per kernel step; 0: the kernel's default
    min_side: float = 0         # only blocks whose output is at least this many pixels a side,
    shapes: dict = field(default_factory=dict)   # by these static shapes (value name -> dims;
    #                             a block of unknown shape counts as large)

    def __post_init__(self):
        if self.tile_rows < 0 or self.min_side < 0:
            raise ValueError("KernelConfig.tile_rows and min_side must be >= 0")


@register("fuse_inverted_residual")
def fuse_inverted_residual(model: onnx.ModelProto, cfg: KernelConfig | None = None
                           ) -> tuple[onnx.ModelProto, PassReport]:
    """Each matching MobileNetV2 inverted-residual block (and the stem) becomes one
    edgesmith.InvertedResidual node."""
    cfg = cfg or KernelConfig()
    tile_rows, min_side, shapes = int(cfg.tile_rows), cfg.min_side, cfg.shapes
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g, report = out.graph, PassReport("fuse_inverted_residual")
    graph = Graph(g)
    dead: list = []
    taken: set[int] = set()
    for node in list(g.node):
        if id(node) in taken or (block := _match(graph, node)) is None \
                or output_side(block, shapes.get(node.input[0])) < min_side:
            continue
        names = []
        for role, (w, b) in zip(("expand", "depthwise", "project"), block["weights"]):
            for kind, array in (("w", w), ("b", b)):
                name = graph.unique_name(f"{node.name or node.output[0]}_{role}_{kind}")
                graph.set_array(name, array)
                names.append(name)
        lo, hi = block["bounds"]
        fused = helper.make_node(
            "InvertedResidual", [node.input[0], *names], [block["output"]], domain=DOMAIN,
            name=graph.unique_name(f"{node.name or node.output[0]}_inverted_residual"),
            stride=block["stride"], expand_stride=block["expand_stride"],
            residual=int(block["residual"]), act_min=lo,
            act_max=min(hi, float(np.finfo(np.float32).max)), tile_rows=tile_rows)
        g.node.insert(list(g.node).index(node), fused)
        dead += block["nodes"]
        taken.update(id(n) for n in block["nodes"])
        e, c = block["weights"][0][0].shape[:2]
        report.metrics.setdefault("blocks", []).append({     # what a profile maps back to
            "node": fused.name, "input": node.input[0], "stride": block["stride"],
            "expand_stride": block["expand_stride"],
            "channels": [int(c), int(e), int(block["weights"][2][0].shape[0])],
            "replaces": [n.name for n in block["nodes"]] + [n.output[0] for n in block["nodes"]]})
        report.add(f"{node.name or node.output[0]}: {c}->{e}->{block['weights'][2][0].shape[0]} "
                   f"stride {block['stride']}{' +residual' if block['residual'] else ''}"
                   f"{' (3x3 expand: the stem)' if block['weights'][0][0].shape[2] == 3 else ''}")
    if report.changed:
        remove_nodes(g, dead)
        drop_unused_initializers(g)
        if not any(o.domain == DOMAIN for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return out, report
