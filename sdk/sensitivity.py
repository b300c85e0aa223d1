"""Which layers cost int8 accuracy: float vs quantized activations compared layer by layer.

The mixed-precision repair keeps the worst layers in float; this table says which those are.
"""
from __future__ import annotations

import numpy as np
import onnx

from .passes.graph import probe_session


def _upstream(graph_nodes: list, producer: dict, tensor: str, quantized: set) -> set[str]:
    """Outputs of the nearest Conv/Gemm/MatMul nodes feeding `tensor` (through any other op)."""
    found, todo, seen = set(), [tensor], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        node = producer.get(t)
        if node is None:
            continue
        if node.name in quantized and t != node.input[0]:
            found.add(t)
        else:
            todo.extend(i for i in node.input if i)
    return found


def layer_sensitivity(float_proto: onnx.ModelProto, quant_proto: onnx.ModelProto,
                      batches: list[dict]) -> list[dict]:
    """How much each Conv/Gemm/MatMul degrades the signal, float vs quantized, compared layer
    by layer like ORT's qdq_loss_debug: the noise-to-signal ratio of its output minus that of
    the nearest quantized layers upstream (worst first). Only compute-node outputs are compared: ORT's QDQ rewrite keeps
    their names, while activations in between are folded into quantization ranges."""
    nodes = [n for n in float_proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
             and n.name]
    names = {n.name for n in nodes}
    producer = {o: n for n in float_proto.graph.node for o in n.output}
    users: dict[str, list] = {}
    for n in float_proto.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    quant_outputs = {o for n in quant_proto.graph.node for o in n.output}

    def observed(n) -> str:
        """The layer's value as its consumers see it: after a fused ReLU/ReLU6, if any."""
        after = users.get(n.output[0], [])
        if len(after) == 1 and after[0].op_type in ("Relu", "Clip"):
            return after[0].output[0]
        return n.output[0]

    def in_quant(t: str) -> str | None:   # ORT names what consumers read <t>_DequantizeLinear_Output
        for name in (f"{t}_DequantizeLinear_Output", t):
            if name in quant_outputs:
                return name
        return None

    layer_out = {n.name: observed(n) for n in nodes}
    producer.update({layer_out[n.name]: n for n in nodes})
    tensors = sorted(set(layer_out.values()))

    common = [t for t in tensors if in_quant(t)]
    qnames = [in_quant(t) for t in common]
    fs, qs = (probe_session(float_proto, common, optimize=False),
              probe_session(quant_proto, qnames, optimize=False))
    signal = dict.fromkeys(common, 0.0)
    noise = dict.fromkeys(common, 0.0)
    for feed in batches[:4]:
        for t, a, b in zip(common, fs.run(common, feed), qs.run(qnames, feed)):
            a, b = a.astype(np.float64), b.astype(np.float64)
            signal[t] += float(np.sum(a * a))
            noise[t] += float(np.sum((a - b) ** 2))

    def sqnr(t: str) -> float:
        if t not in signal:
            return 200.0
        return float(min(200.0, 10 * np.log10(max(signal[t], 1e-30) / max(noise[t], 1e-30))))

    rows = []
    for n in nodes:
        ups = _upstream(nodes, producer, n.input[0], names)
        inp = min((sqnr(t) for t in ups), default=200.0)
        out = sqnr(layer_out[n.name])
        # rank by the noise power the layer adds (linear): a dB drop from an exact input
        # (200 dB -> 45 dB) is huge in dB and negligible in noise
        added = 10 ** (-out / 10) - 10 ** (-inp / 10)
        rows.append({"node": n.name, "op": n.op_type, "input_sqnr_db": inp,
                     "output_sqnr_db": out, "drop_db": inp - out, "added_nsr": added})
    return sorted(rows, key=lambda r: -r["added_nsr"])
