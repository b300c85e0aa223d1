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

from .passes.graph import Graph, probe_session
from .passes.reconstruct import _Weight, blocks, float_twins, quantizer

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# onnxruntime's names for the kernels it made of a node: QDQ fusion's `<node>_token_<n>`,
# the NCHWc layout's `<output tensor>_nchwc`, a fused Gemm's `fused <node>`
KERNEL_NAME = re.compile(r"^fused |_token_\d+$|_nchwc$")


def _only(qdq: onnx.ModelProto, block, weights: dict) -> onnx.ModelProto:
    """`qdq` with quantization undone outside `block`: activation quantizers become the clip
    they stand for (a folded ReLU stays), weights their float twins."""
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
            s, z, qmin, qmax = quantizer(graph, q)
            lo, hi = graph.unique_name(n.output[0] + "_lo"), graph.unique_name(n.output[0] + "_hi")
            graph.set_array(lo, np.array((qmin - z) * s, np.float32))
            graph.set_array(hi, np.array((qmax - z) * s, np.float32))
            nodes.append(helper.make_node("Clip", [q.input[0], lo, hi], [n.output[0]], n.name))
            continue
        w = weights.get(n.output[0])
        users = graph.consumers.get(n.output[0], [])
        if isinstance(w, _Weight) and not any(u.output[0] in inside for u in users):
            name = graph.unique_name(n.output[0] + "_float")
            graph.set_array(name, w.w_float)
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
    for block in blocks(qdq, names, weights, 3):
        session = probe_session(_only(qdq, block, weights), outputs)
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
