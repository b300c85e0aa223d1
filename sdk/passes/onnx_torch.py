"""Run an ONNX graph as a trainable torch module, then write the trained weights back.

Why not onnx2torch: it drags torchvision (which does not import beside torch 2.13 here) and a
converter per op we would have to trust on export. Our students are our own graphs (pruned
teachers), so a small interpreter for the ops we produce is enough, and training never changes
the graph: weights go back into the same ONNX model, which is then checked against ORT.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import EdgesmithError
from .graph import attr

SUPPORTED = {"Conv", "Gemm", "MatMul", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh",
             "BatchNormalization", "Add", "Sub", "Mul", "Div", "Flatten", "Reshape",
             "GlobalAveragePool", "MaxPool", "AveragePool", "Concat", "Identity", "Dropout",
             "Squeeze", "Unsqueeze", "HardSigmoid", "HardSwish", "Softmax", "Constant"}
TRAINABLE = {"Conv": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "BatchNormalization": (1, 2)}


def _key(name: str) -> str:
    return re.sub(r"\W", "_", name)


def to_torch(model: onnx.ModelProto):
    """A torch.nn.Module computing the graph; weights of Conv/Gemm/MatMul/BN are Parameters."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    unsupported = sorted({n.op_type for n in model.graph.node} - SUPPORTED)
    if unsupported:
        raise EdgesmithError(f"distillation supports the ops edgesmith's passes produce; this "
                             f"student has {unsupported}")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    trainable = {n.input[i] for n in model.graph.node for i in TRAINABLE.get(n.op_type, ())
                 if i < len(n.input) and n.input[i] in inits}

    class OnnxModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.params = nn.ParameterDict({_key(k): nn.Parameter(torch.tensor(v.copy()))
                                            for k, v in inits.items() if k in trainable})
            self.consts = {k: torch.tensor(v.copy()) for k, v in inits.items()
                           if k not in trainable}
            self.names = {k: _key(k) for k in trainable}
            self.inputs = [i.name for i in model.graph.input if i.name not in inits]
            self.outputs = [o.name for o in model.graph.output]

        def value(self, env, name):
            if name in self.names:
                return self.params[self.names[name]]
            return env[name] if name in env else self.consts[name]

        def forward(self, *args):
            env = dict(zip(self.inputs, args))
            for n in model.graph.node:
                x = [self.value(env, i) if i else None for i in n.input]
                env[n.output[0]] = _run(n, x, F, torch)
            out = [env[o] for o in self.outputs]
            return out[0] if len(out) == 1 else tuple(out)

    return OnnxModule()


def _pads(node):
    pads = attr(node, "pads")
    if attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise EdgesmithError(f"{node.op_type} {node.name}: auto_pad is not supported; run "
                             "`edgesmith fuse` or re-export with explicit pads")
    if not pads:
        return 0, None
    half = len(pads) // 2
    if list(pads[:half]) == list(pads[half:]):
        return tuple(pads[:half]), None
    return 0, [p for pair in zip(reversed(pads[:half]), reversed(pads[half:])) for p in pair]


def _run(n, x, F, torch):
    op = n.op_type
    if op == "Constant":
        value = attr(n, "value")
        if value is None:
            raise EdgesmithError(f"Constant {n.name}: only tensor `value` is supported")
        return torch.tensor(numpy_helper.to_array(value).copy())
    if op == "Conv":
        pad, explicit = _pads(n)
        inp = F.pad(x[0], explicit) if explicit else x[0]
        return F.conv2d(inp, x[1], x[2] if len(x) > 2 else None, tuple(attr(n, "strides", [1, 1])),
                        pad, tuple(attr(n, "dilations", [1, 1])), attr(n, "group", 1))
    if op == "Gemm":
        a = x[0].t() if attr(n, "transA", 0) else x[0]
        b = x[1].t() if attr(n, "transB", 0) else x[1]
        y = attr(n, "alpha", 1.0) * (a @ b)
        return y + attr(n, "beta", 1.0) * x[2] if len(x) > 2 and x[2] is not None else y
    if op == "MatMul":
        return x[0] @ x[1]
    if op == "Relu":
        return F.relu(x[0])
    if op == "Clip":
        lo = x[1] if len(x) > 1 and x[1] is not None else attr(n, "min")
        hi = x[2] if len(x) > 2 and x[2] is not None else attr(n, "max")
        return torch.clamp(x[0], None if lo is None else float(lo),
                           None if hi is None else float(hi))
    if op == "LeakyRelu":
        return F.leaky_relu(x[0], attr(n, "alpha", 0.01))
    if op == "Sigmoid":
        return torch.sigmoid(x[0])
    if op == "Tanh":
        return torch.tanh(x[0])
    if op == "HardSigmoid":
        return torch.clamp(attr(n, "alpha", 0.2) * x[0] + attr(n, "beta", 0.5), 0, 1)
    if op == "HardSwish":
        return F.hardswish(x[0])
    if op == "Softmax":
        return torch.softmax(x[0], attr(n, "axis", -1))
    if op == "BatchNormalization":   # inference statistics; scale and shift train
        return F.batch_norm(x[0], x[3], x[4], x[1], x[2], False, 0.0, attr(n, "epsilon", 1e-5))
    if op in ("Add", "Sub", "Mul", "Div"):
        return {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[op](
            x[0], x[1])
    if op == "Flatten":
        axis = attr(n, "axis", 1)
        return x[0].reshape(int(np.prod(x[0].shape[:axis])) if axis else 1, -1)
    if op == "Reshape":
        shape = [int(s) for s in x[1].tolist()]
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x[0].reshape(shape)
    if op == "GlobalAveragePool":
        return x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)
    if op in ("MaxPool", "AveragePool"):
        pad, explicit = _pads(n)
        inp = F.pad(x[0], explicit) if explicit else x[0]
        k, s = tuple(attr(n, "kernel_shape")), tuple(attr(n, "strides", [1, 1]))
        if op == "MaxPool":
            return F.max_pool2d(inp, k, s, pad, ceil_mode=bool(attr(n, "ceil_mode", 0)))
        return F.avg_pool2d(inp, k, s, pad, ceil_mode=bool(attr(n, "ceil_mode", 0)),
                            count_include_pad=bool(attr(n, "count_include_pad", 0)))
    if op == "Concat":
        return torch.cat(x, attr(n, "axis"))
    if op in ("Identity", "Dropout"):
        return x[0]
    if op in ("Squeeze", "Unsqueeze"):
        axes = [int(a) for a in (x[1].tolist() if len(x) > 1 and x[1] is not None
                                 else attr(n, "axes"))]
        y = x[0]
        if op == "Squeeze":
            for a in sorted((a % y.dim() for a in axes), reverse=True):
                y = y.squeeze(a)
        else:
            for a in sorted(axes):
                y = y.unsqueeze(a)
        return y
    raise EdgesmithError(f"op {op} is not supported by the ONNX->torch builder")


def write_back(model: onnx.ModelProto, module) -> onnx.ModelProto:
    """The same graph with the module's trained parameters as its initializers."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    trained = {name: module.params[key].detach().cpu().numpy() for name, key in
               module.names.items()}
    for t in out.graph.initializer:
        if t.name in trained:
            t.CopyFrom(numpy_helper.from_array(trained[t.name].astype(np.float32), t.name))
    return out
