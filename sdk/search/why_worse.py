"""Why int8 is worse, block by block: each block's share of the output error beside the time
int8 saves there on the device.

A block (the stretches block reconstruction works on: a residual or inverted-residual block, a
transformer layer's half) is quantized alone, everything else left in float, and the output's
noise against the float model is measured; the shares say which blocks cost the accuracy. With
the per-node profiles of both models on the device, each block also gets its float and int8
milliseconds, so mixed precision keeps in float the blocks that cost the most accuracy per
millisecond they save.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import helper

from ..onnx_utils import UNBOUNDED, Graph, clip_bounds, float_name, probe_session
from ..passes.reconstruct import QuantWeight, blocks, float_twins

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# onnxruntime's names for the kernels it made of a node: QDQ fusion's `<node>_token_<n>`,
# the NCHWc layout's `<output tensor>_nchwc`, a fused Gemm's `fused <node>`
KERNEL_NAME = re.compile(r"^fused |_token_\d+$|_nchwc$")


def folded_activations(float_proto: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """The float model's ReLU and Clip outputs with their bounds. onnxruntime's quantizer folds
    such an activation into the quantizer after it (the producer then writes the activation's
    output name), so undoing that quantizer must put the activation back."""
    graph = Graph(float_proto.graph)
    bounds = {}
    for n in float_proto.graph.node:
        if n.op_type == "Relu":
            bounds[n.output[0]] = (0.0, UNBOUNDED[1])
        elif n.op_type == "Clip" and (b := clip_bounds(graph, n)) is not None:
            bounds[n.output[0]] = b
    return bounds


def _only(qdq: onnx.ModelProto, block, weights: dict, folded: dict) -> onnx.ModelProto:
    """`qdq` with quantization undone outside `block`: activation quantizers become identities,
    or the ReLU/Clip that was folded into them (`folded_activations`); weights their float
    twins, biases too (bias correction shifted them for the int8 weights). Not the quantizer's
    own clip: on inputs unlike the calibration data, that clip is most of the error, and kept
    in every row it would hide which block's range is too narrow."""
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    graph = Graph(out.graph)
    inside = {n.output[0] for n in block.nodes}
    quant = {n.output[0]: n for n in out.graph.node if n.op_type == "QuantizeLinear"
             and n.output[0] not in inside and n.input[0] not in graph.inits}
    nodes = []
    for n in out.graph.node:
        if n.output[0] in quant:
            continue
        if n.op_type == "DequantizeLinear" and n.input[0] in quant:
            q = quant[n.input[0]]
            producer = graph.producer.get(q.input[0])
            bounds = folded.get(float_name(q.input[0], folded) or "")
            if bounds is None or producer is None or producer.op_type in ("Relu", "Clip"):
                nodes.append(helper.make_node("Identity", [q.input[0]], [n.output[0]], n.name))
                continue
            lo, hi = graph.unique_name(n.output[0] + "_lo"), graph.unique_name(n.output[0] + "_hi")
            graph.set_array(lo, np.array(bounds[0], np.float32))
            graph.set_array(hi, np.array(bounds[1], np.float32))
            nodes.append(helper.make_node("Clip", [q.input[0], lo, hi], [n.output[0]], n.name))
            continue
        w = weights.get(n.output[0])
        users = graph.consumers.get(n.output[0], [])
        if w is not None and not any(u.output[0] in inside for u in users):
            name = graph.unique_name(n.output[0] + "_float")   # a weight's or a bias's twin
            graph.set_array(name, w.w_float if isinstance(w, QuantWeight) else w)
            nodes.append(helper.make_node("Identity", [name], [n.output[0]], n.name))
            continue
        nodes.append(n)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def block_sensitivity(float_proto: onnx.ModelProto, qdq: onnx.ModelProto, batches: list[dict]
                      ) -> list[dict]:
    """Per block, worst first: its layers, the output SQNR with only it quantized, its share of
    the summed noise and the nodes it holds (to join with profiles and to keep in float)."""
    weights, _ = float_twins(qdq, float_proto)
    names = {o for n in float_proto.graph.node for o in n.output} | \
        {i.name for i in float_proto.graph.input}
    outputs = [o.name for o in float_proto.graph.output]
    feeds = batches[:4]
    ref = [probe_session(float_proto, outputs).run(outputs, f) for f in feeds]
    signal = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for run in ref for r in run)
    rows = []
    folded = folded_activations(float_proto)
    for block in blocks(qdq, names, weights, 3):
        session = probe_session(_only(qdq, block, weights, folded), outputs)
        noise = sum(float(np.sum((np.asarray(a, np.float64) - b) ** 2))
                    for f, run in zip(feeds, ref) for a, b in zip(session.run(outputs, f), run))
        ops = [n for n in block.nodes if n.op_type not in QDQ_OPS]
        rows.append({"block": block.input, "nodes": [n.name for n in ops if n.name],
                     "outputs": [o for n in ops for o in n.output if o], "layers": block.layers,
                     "sqnr_db": float(min(200.0, 10 * np.log10(max(signal, 1e-30) /
                                                               max(noise, 1e-30)))),
                     "noise": noise})
    total = sum(r["noise"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r.pop("noise") / total
    return sorted(rows, key=lambda r: -r["share"])


def add_times(rows: list[dict], fp32_ms: dict, int8_ms: dict) -> list[dict]:
    """Each block's milliseconds per run on the device, float and int8, from the per-node
    profiles of both models; `cost` is its error share per millisecond int8 saves there
    (None where it saves none: those come first), highest first."""
    def per_node(profile: dict) -> dict:
        out: dict[str, float] = {}
        for name, ms in profile.items():
            key = KERNEL_NAME.sub("", name)
            out[key] = out.get(key, 0.0) + ms
        return out

    fp32, int8 = per_node(fp32_ms), per_node(int8_ms)
    for r in rows:
        keys = set(r["nodes"]) | set(r["outputs"])   # kernels are named after either
        r["fp32_ms"] = sum(ms for k, ms in fp32.items() if k in keys)
        r["int8_ms"] = sum(ms for k, ms in int8.items() if k in keys)
        saved = r["fp32_ms"] - r["int8_ms"]
        r["cost"] = r["share"] / saved if saved > 0 else None
    return sorted(rows, key=lambda r: (r["cost"] is not None, -(r["cost"] or 0.0)))
