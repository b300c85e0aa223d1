"""Graph fusion and clean-up passes; outputs stay equal to the original within float rounding.

`fuse(model)` runs the portable pipeline (constant folding, BatchNorm folding, MatMul+Add ->
Gemm, Identity/Dropout removal, no-op Reshape and Transpose-pair removal). `fuse_activations`
writes onnxruntime's com.microsoft.FusedConv, so it is opt-in: the result only runs in ORT
(ORT makes the same fusion itself at load time with ORT_ENABLE_EXTENDED).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..model import default_opset
from . import PassReport, register
from ..onnx_utils import (Graph, attr, clip_bounds, drop_unused_initializers, remove_nodes,
                    rename_input, static_shapes)

FOLD_LIMIT_BYTES = 64 << 20        # never materialise a constant bigger than this
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                    "Multinomial", "Bernoulli"}
PORTABLE_PIPELINE = ["initializers_as_constants", "constant_folding", "fold_batchnorm", "matmul_add_to_gemm",
                     "remove_identity", "remove_noop_reshape", "cancel_transposes"]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _begin(model: onnx.ModelProto, name: str):
    """Every rewrite works on a copy: (model copy, its graph, report, index)."""
    model = _copy(model)
    return model, model.graph, PassReport(name), Graph(model.graph)


def _end(model: onnx.ModelProto, dead: list, report: PassReport):
    remove_nodes(model.graph, dead)
    drop_unused_initializers(model.graph)
    return model, report


@register("initializers_as_constants")
def initializers_as_constants(model: onnx.ModelProto, cfg=None
                              ) -> tuple[onnx.ModelProto, PassReport]:
    """Old exporters (IR 3, the model zoo's era) list every initializer as a graph input too,
    which makes weights overridable inputs: nothing may fold them, and any rewrite that adds
    or drops a weight breaks IR 3's rule that all initializers are inputs. Users never feed
    weights, so they become constants and the IR version 4 that allows it (what
    onnxruntime's own remove_initializer_from_input tool does)."""
    model, g, report, _ = _begin(model, "initializers_as_constants")
    weights = {t.name for t in g.initializer}
    kept = [i for i in g.input if i.name not in weights]
    if len(kept) != len(g.input):
        report.add(f"{len(g.input) - len(kept)} initializer(s) were also graph inputs "
                   f"(IR {model.ir_version}); now constants")
        del g.input[:]
        g.input.extend(kept)
        model.ir_version = max(model.ir_version, 4)
    return model, report


@register("constant_folding")
def constant_folding(model: onnx.ModelProto, cfg=None) -> tuple[onnx.ModelProto, PassReport]:
    """Constant nodes become initializers; nodes whose inputs are all constant are evaluated."""
    from onnx.reference import ReferenceEvaluator

    model = _copy(model)
    g = model.graph
    report = PassReport("constant_folding")
    opset = default_opset(model) or 17
    graph = Graph(g)
    folded = []
    for node in list(g.node):
        if node.domain not in ("", "ai.onnx") or node.op_type in NONDETERMINISTIC \
                or any(a.HasField("g") or a.graphs for a in node.attribute):
            continue
        inputs = [i for i in node.input if i]
        if not all(i in graph.inits for i in inputs) or not node.output:
            continue
        try:
            sub = helper.make_model(
                helper.make_graph([node], "fold", [], [helper.make_tensor_value_info(
                    o, onnx.TensorProto.UNDEFINED, None) for o in node.output],
                    [graph.inits[i] for i in set(inputs)]),
                opset_imports=[helper.make_opsetid("", opset)])
            values = ReferenceEvaluator(sub).run(None, {})
        except Exception as exc:  # an op the reference evaluator lacks: leave it to the runtime
            report.details.append(f"kept {node.op_type} {node.name or node.output[0]}: {exc}")
            continue
        if sum(np.asarray(v).nbytes for v in values) > FOLD_LIMIT_BYTES:
            report.details.append(f"kept {node.op_type} {node.output[0]}: result too large")
            continue
        for name, value in zip(node.output, values):
            graph.set_array(name, np.asarray(value))
        folded.append(node)
        report.add(f"folded {node.op_type} -> {', '.join(node.output)}")
    return _end(model, folded, report)


@register("fold_batchnorm")
def fold_batchnorm(model: onnx.ModelProto, cfg=None) -> tuple[onnx.ModelProto, PassReport]:
    """Conv -> BatchNormalization becomes one Conv with scaled weights and a new bias."""
    model, g, report, graph = _begin(model, "fold_batchnorm")
    dead = []
    for conv in list(g.node):
        if conv.op_type != "Conv":
            continue
        bn = graph.only_consumer(conv.output[0])
        if bn is None or bn.op_type != "BatchNormalization" or len(bn.output) > 1 and \
                any(bn.output[1:]):
            continue
        w = graph.array(conv.input[1])
        params = [graph.array(n) for n in bn.input[1:5]]
        if w is None or any(p is None for p in params) or len(graph.consumers[conv.input[1]]) > 1:
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + attr(bn, "epsilon", 1e-5))
        bias = graph.array(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else \
            np.zeros(w.shape[0])
        graph.set_array(conv.input[1], (w * scale.reshape(-1, *[1] * (w.ndim - 1))).astype(w.dtype))
        new_bias = ((bias - mean) * scale + beta).astype(w.dtype)
        bias_name = graph.unique_name(f"{conv.name or conv.output[0]}_bias")
        graph.set_array(bias_name, new_bias)
        del conv.input[2:]
        conv.input.append(bias_name)
        conv.output[0] = bn.output[0]
        dead.append(bn)
        report.add(f"folded {bn.name or bn.output[0]} into {conv.name or conv.input[1]}")
    return _end(model, dead, report)


@register("matmul_add_to_gemm")
def matmul_add_to_gemm(model: onnx.ModelProto, cfg=None) -> tuple[onnx.ModelProto, PassReport]:
    """MatMul(2-D activation, constant weight) -> Add(constant bias) becomes one Gemm."""
    model, g, report, graph = _begin(model, "matmul_add_to_gemm")
    shapes = static_shapes(model)
    dead = []
    for mm in list(g.node):
        if mm.op_type != "MatMul" or len(shapes.get(mm.input[0], [])) != 2:
            continue
        w = graph.array(mm.input[1])
        add = graph.only_consumer(mm.output[0])
        if w is None or w.ndim != 2 or add is None or add.op_type != "Add":
            continue
        other = add.input[1] if add.input[0] == mm.output[0] else add.input[0]
        bias = graph.array(other)
        if bias is None or bias.size != w.shape[1] or bias.ndim > 2:
            continue
        bias_name = graph.unique_name(f"{other}_gemm")
        graph.set_array(bias_name, bias.reshape(-1))
        g.node.insert(list(g.node).index(mm), helper.make_node(
            "Gemm", [mm.input[0], mm.input[1], bias_name], [add.output[0]],
            name=(mm.name or mm.output[0]) + "_gemm"))
        dead += [mm, add]
        report.add(f"MatMul {mm.name or mm.output[0]} + Add -> Gemm")
    return _end(model, dead, report)


def _bypass(g: onnx.GraphProto, graph: Graph, node, keep_input: str) -> bool:
    """Remove `node`, its consumers reading `keep_input`; refuse when it feeds a graph output."""
    if node.output[0] in graph.outputs:
        return False
    rename_input(g, node.output[0], keep_input)
    return True


@register("remove_identity")
def remove_identity(model: onnx.ModelProto, cfg=None) -> tuple[onnx.ModelProto, PassReport]:
    """Identity, and Dropout at inference (its mask unused), are removed."""
    model, g, report, graph = _begin(model, "remove_identity")
    dead = []
    for node in list(g.node):
        is_dropout = node.op_type == "Dropout" and (len(node.output) < 2 or not node.output[1]
                                                    or not graph.consumers.get(node.output[1]))
        if (node.op_type == "Identity" or is_dropout) and _bypass(g, graph, node, node.input[0]):
            dead.append(node)
            report.add(f"removed {node.op_type} {node.name or node.output[0]}")
    remove_nodes(g, dead)
    return model, report


@register("remove_noop_reshape")
def remove_noop_reshape(model: onnx.ModelProto, cfg=None) -> tuple[onnx.ModelProto, PassReport]:
    """Reshape/Flatten/Squeeze/Unsqueeze whose output shape equals its input shape are removed."""
    model, g, report, graph = _begin(model, "remove_noop_reshape")
    shapes = static_shapes(model)
    dead = []
    for node in list(g.node):
        if node.op_type not in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            continue
        src, dst = shapes.get(node.input[0]), shapes.get(node.output[0])
        if src is not None and src == dst and _bypass(g, graph, node, node.input[0]):
            dead.append(node)
            report.add(f"removed no-op {node.op_type} {node.name or node.output[0]} {src}")
    return _end(model, dead, report)


@register("cancel_transposes")
def cancel_transposes(model: onnx.ModelProto, cfg=None) -> tuple[onnx.ModelProto, PassReport]:
    """Transpose -> Transpose becomes one Transpose, or nothing when the two cancel."""
    model, g, report, graph = _begin(model, "cancel_transposes")
    dead = []
    for first in list(g.node):
        second = graph.only_consumer(first.output[0]) if first.op_type == "Transpose" else None
        if second is None or second.op_type != "Transpose" or first in dead:
            continue
        p1, p2 = attr(first, "perm"), attr(second, "perm")
        if p1 is None or p2 is None:
            continue
        combined = [p1[i] for i in p2]
        if combined == sorted(combined):
            if _bypass(g, graph, second, first.input[0]):
                dead += [first, second]
                report.add(f"cancelled Transpose pair {p1} then {p2}")
        else:
            second.input[0] = first.input[0]
            for a in second.attribute:
                if a.name == "perm":
                    a.CopyFrom(helper.make_attribute("perm", combined))
            dead.append(first)
            report.add(f"merged Transpose pair into perm {combined}")
    remove_nodes(g, dead)
    return model, report


@dataclass(frozen=True, kw_only=True)
class OpsetConfig:
    """The default-domain opset a conversion aims at (7 up to what this onnx converts)."""

    opset: int = 17

    def __post_init__(self):
        newest = onnx.defs.onnx_opset_version()
        if not 7 <= self.opset <= newest:
            raise ValueError(f"OpsetConfig.opset: opset {self.opset} is outside what this onnx "
                             f"converts (7..{newest})")


@register("upgrade_opset")
def upgrade_opset(model: onnx.ModelProto, cfg: OpsetConfig | None = None
                  ) -> tuple[onnx.ModelProto, PassReport]:
    """Raise the default-domain opset to at least `cfg.opset` (per-channel QDQ needs 13+;
    default 17)."""
    cfg, current = cfg or OpsetConfig(), default_opset(model)
    if current is None or current >= cfg.opset:
        return _copy(model), PassReport("upgrade_opset")
    return convert_opset(model, cfg)


@register("convert_opset")
def convert_opset(model: onnx.ModelProto, cfg: OpsetConfig) -> tuple[onnx.ModelProto, PassReport]:
    """Convert to `cfg.opset`, up or down, and stamp the IR version that opset needs (the
    oldest).

    Down-conversion is how a model saved by a new onnx runs on a device whose onnxruntime is
    older (the device reports the opset and IR version it reads).
    """
    from onnx import version_converter

    report = PassReport("convert_opset")
    target, current = cfg.opset, default_opset(model)
    converted = _copy(model) if current == target else \
        version_converter.convert_version(model, target)
    if current != target:
        report.add(f"opset {current} -> {target}")
    ir = helper.find_min_ir_version_for(list(converted.opset_import))
    if converted.ir_version != ir:
        report.add(f"IR version {converted.ir_version} -> {ir}")
        converted.ir_version = ir
    return converted, report


def newest_opset_for_ir(ir_version: int) -> int:
    """The newest opset whose models an onnxruntime reading IR <= `ir_version` can load."""
    return max((opset for _, ir, opset, *_ in helper.VERSION_TABLE if ir <= ir_version),
               default=7)


FUSED_ACTIVATIONS = {"Relu": {}, "Sigmoid": {}, "Tanh": {}, "LeakyRelu": {"alpha": 0.01},
                     "HardSigmoid": {"alpha": 0.2, "beta": 0.5}, "Clip": {}}


@register("fuse_activations")
def fuse_activations(model: onnx.ModelProto, cfg=None) -> tuple[onnx.ModelProto, PassReport]:
    """Conv -> Relu/Clip/... becomes com.microsoft.FusedConv (onnxruntime only, opt-in)."""
    model, g, report, graph = _begin(model, "fuse_activations")
    dead = []
    for conv in list(g.node):
        act = graph.only_consumer(conv.output[0]) if conv.op_type == "Conv" else None
        if act is None or act.op_type not in FUSED_ACTIVATIONS:
            continue
        if act.op_type == "Clip":
            bounds = clip_bounds(graph, act)
            if bounds is None:
                continue
            params = list(bounds)
        else:
            params = [float(attr(act, a, d)) for a, d in FUSED_ACTIVATIONS[act.op_type].items()]
        fused = helper.make_node("FusedConv", list(conv.input), [act.output[0]],
                                 name=(conv.name or conv.output[0]) + "_fused",
                                 domain="com.microsoft", activation=act.op_type,
                                 **({"activation_params": params} if params else {}))
        fused.attribute.extend(a for a in conv.attribute)
        g.node.insert(list(g.node).index(conv), fused)
        dead += [conv, act]
        report.add(f"Conv {conv.name or conv.output[0]} + {act.op_type} -> FusedConv")
    remove_nodes(g, dead)
    if report.changed and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model, report


def fuse(model: onnx.ModelProto, passes: list[str] | None = None
         ) -> tuple[onnx.ModelProto, list[PassReport]]:
    """Run the portable pipeline (or `passes`), in order; one report per pass."""
    from . import PASSES

    reports = []
    for name in passes or PORTABLE_PIPELINE:
        model, report = PASSES[name](model, None)
        reports.append(report)
    onnx.checker.check_model(model)
    return model, reports
