"""Run an ONNX graph as a trainable torch module, then write the trained weights back.

Why not onnx2torch: it drags torchvision (which does not import beside torch 2.13 here) and a
converter per op we would have to trust on export. Our students are the user's own graphs
(pruned, or as given), so an interpreter for the ops real exports contain (`ops.OPS`) is
enough, and training never changes the graph: weights go back into the same ONNX model, which
is then checked against ORT.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import EdgesmithError
from .ops import OPS, Env

TRAINABLE = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,),
             "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "GRU": (1, 2, 3)}


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def to_torch(model: onnx.ModelProto, ops: dict = OPS):
    """A torch.nn.Module computing the graph (a tuple of its outputs); weights of the ops in
    TRAINABLE are Parameters. `ops` is the op registry (conversion adds its own)."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    unsupported = sorted({n.op_type for n in model.graph.node if n.op_type not in ops
                          or n.domain not in ("", "ai.onnx")})
    if unsupported:
        raise EdgesmithError(f"the ONNX->torch interpreter supports {len(ops)} ONNX ops; this "
                             f"model also has {unsupported}")
    env_ops = Env(torch, F, _opset(model))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    trainable = {n.input[i] for n in model.graph.node for i in TRAINABLE.get(n.op_type, ())
                 if i < len(n.input) and n.input[i] in inits
                 and inits[n.input[i]].dtype == np.float32}

    class OnnxModule(nn.Module):
        def __init__(self):
            super().__init__()
            # keys by position: `fc.w` and `fc_w` are two weights, not one
            self.names = {k: f"p{i}" for i, k in enumerate(sorted(trainable))}
            self.params = nn.ParameterDict({self.names[k]: nn.Parameter(torch.tensor(v.copy()))
                                            for k, v in inits.items() if k in trainable})
            self.consts = {k: torch.tensor(v.copy()) for k, v in inits.items()
                           if k not in trainable}
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
                y = ops[n.op_type](n, x, env_ops)
                for name, value in zip(n.output, y if isinstance(y, tuple) else (y,)):
                    if name:
                        env[name] = value
            return tuple(env[o] for o in self.outputs)   # one per graph output, always

    return OnnxModule()


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
