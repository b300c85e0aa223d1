"""Small helpers for rewriting ONNX graphs in place: who produces and who consumes a value."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .host_runs import host_session


class Graph:
    """Indexes over a GraphProto; rebuild (`Graph(g)`) after structural edits."""

    def __init__(self, graph: onnx.GraphProto):
        self.g = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {out: n for n in graph.node for out in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)
        self.outputs = {o.name for o in graph.output}

    def array(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def set_array(self, name: str, value: np.ndarray) -> None:
        """Replace (or add) an initializer's data, keeping its name."""
        # not np.ascontiguousarray: it makes a 0-d scalar 1-d (a Gather index then changes rank)
        new = numpy_helper.from_array(np.asarray(value, order="C"), name)
        if name in self.inits:
            self.inits[name].CopyFrom(new)
        else:
            self.g.initializer.append(new)
            self.inits[name] = self.g.initializer[-1]

    def only_consumer(self, name: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def unique_name(self, base: str) -> str:
        taken = set(self.inits) | set(self.producer) | {i.name for i in self.g.input}
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        return name


def attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def operand(node, inputs, index: int, name: str, default=None):
    """An op's parameter however the exporter wrote it: input `index` (newer opsets; a tensor,
    scalar or 1-element tensor, None when omitted) or attribute `name` (older opsets).
    `inputs` holds the node's input values (initializer arrays, or tensors while running)."""
    if len(inputs) > index and inputs[index] is not None:
        return inputs[index]
    value = attr(node, name)
    return default if value is None else value


QDQ_RENAMED = "_QuantizeLinear_Input"   # onnxruntime's QDQ renames a graph output's producer


def float_name(qdq_tensor: str, float_names) -> str | None:
    """The float model's name of a QDQ model's tensor, or None when it has no twin."""
    for name in (qdq_tensor, qdq_tensor.removesuffix(QDQ_RENAMED)):
        if name in float_names:
            return name
    return None


def probe_session(model: onnx.ModelProto, tensors, optimize: bool = True,
                  dtype: int = onnx.TensorProto.FLOAT):
    """An onnxruntime session whose outputs are `tensors` (intermediate values included): the
    one way passes read activations. `optimize=False` keeps QDQ pairs unfused, so a quantized
    model's intermediate values are what its int8 kernels compute, in float."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, dtype, None)
                              for t in dict.fromkeys(tensors))
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return host_session(probe.SerializeToString(), options)


def remove_nodes(graph: onnx.GraphProto, dead: list) -> None:
    ids = {id(n) for n in dead}
    keep = [n for n in graph.node if id(n) not in ids]
    del graph.node[:]
    graph.node.extend(keep)


def rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every consumer of `old` reads `new` instead (graph outputs are left alone)."""
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new


def drop_unused_initializers(graph: onnx.GraphProto) -> int:
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    for n in graph.node:   # values read inside subgraphs (If/Loop bodies) count as used
        for a in n.attribute:
            for g in [a.g] if a.HasField("g") else list(a.graphs):
                used |= {name for sub in g.node for name in sub.input}
    dead = {t.name for t in graph.initializer if t.name not in used}
    keep = [t for t in graph.initializer if t.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [i for i in graph.input if i.name not in dead]
    del graph.input[:]
    graph.input.extend(inputs)
    return len(dead)


def with_input_dims(model: onnx.ModelProto, shapes: dict | None,
                    keep_batch: bool = False) -> onnx.ModelProto:
    """A copy whose inputs take concrete dims from `shapes` ({input name: dims}), so shape
    inference yields concrete sizes. An input `shapes` does not name keeps its dims, but for a
    dynamic batch (axis 0), which takes 1. `keep_batch`: a dynamic batch stays dynamic (named
    `batch` when unnamed), as a quantizer's calibration feeds batches of any size."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        given = (shapes or {}).get(vi.name)
        for i, dim in enumerate(vi.type.tensor_type.shape.dim):
            dynamic = not (dim.HasField("dim_value") and dim.dim_value > 0)
            if i == 0 and dynamic and keep_batch:
                dim.dim_param = dim.dim_param or "batch"
                continue
            value = given[i] if given is not None and i < len(given) else \
                1 if i == 0 and dynamic else None
            if value is not None:
                dim.Clear()
                dim.dim_value = value
    return out


def static_shapes(model: onnx.ModelProto, data_prop: bool = True) -> dict[str, list[int]]:
    """Fully known shapes of every value (from onnx shape inference on the model as is;
    `data_prop` also through Shape ops); {} when inference fails (shapes are best effort)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=data_prop)
    except Exception:
        return {}
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + \
            list(inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.HasField("shape") and all(d is not None for d in dims):
            shapes[vi.name] = dims
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


UNBOUNDED = (float(np.finfo(np.float32).min), float(np.finfo(np.float32).max))


def clip_bounds(graph: Graph, node) -> tuple[float, float] | None:
    """A Clip's (min, max), however the exporter wrote them: attributes before opset 11, inputs
    after (scalars or 1-element tensors, or omitted = unbounded). None when a bound is computed
    at run time, so no rewrite can rely on it."""
    names = list(node.input[1:3])
    values = [None] + [graph.array(n) if n else None for n in names]
    if any(n and v is None for n, v in zip(names, values[1:])):
        return None
    bounds = [np.asarray(operand(node, values, i, key, default))
              for i, key, default in ((1, "min", UNBOUNDED[0]), (2, "max", UNBOUNDED[1]))]
    if any(b.size != 1 for b in bounds):
        return None
    return float(bounds[0].reshape(-1)[0]), float(bounds[1].reshape(-1)[0])
