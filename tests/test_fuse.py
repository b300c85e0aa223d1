"""Fusion passes: tiny models built with onnx.helper, ORT outputs compared before and after
with ORT's own graph optimisations disabled (so the comparison sees our rewrite only)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgesmith.passes import get
from edgesmith.passes.fuse import OpsetConfig, fuse

RNG = np.random.default_rng(0)


def run(model: onnx.ModelProto, feed: dict) -> list:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"]).run(None, feed)


def const_node(name: str, value: np.ndarray):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def messy_model() -> onnx.ModelProto:
    """Constant-node weights, Conv+BN+Relu, Identity, Dropout, no-op Reshape, Transpose pair,
    a ConstantOfShape-built tensor, and a MatMul+Add head: what real exports look like."""
    f32 = np.float32
    nodes = [
        const_node("w1", RNG.standard_normal((8, 3, 3, 3)).astype(f32)),
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn1"], epsilon=1e-3),
        helper.make_node("Relu", ["bn1"], ["r1"]),
        helper.make_node("Identity", ["r1"], ["id1"]),
        helper.make_node("Dropout", ["id1"], ["d1"]),
        helper.make_node("Transpose", ["d1"], ["t1"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 3, 1, 2]),
        helper.make_node("Reshape", ["t2", "same_shape"], ["rs"]),
        helper.make_node("GlobalAveragePool", ["rs"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("ConstantOfShape", ["shape_8x4"], ["ones"],
                         value=numpy_helper.from_array(np.array([0.5], f32))),
        helper.make_node("MatMul", ["flat", "ones"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["y"]),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("g", RNG.uniform(0.5, 2, 8).astype(f32)), ("b", RNG.standard_normal(8).astype(f32)),
        ("m", RNG.standard_normal(8).astype(f32)), ("v", RNG.uniform(0.5, 2, 8).astype(f32)),
        ("same_shape", np.array([1, 8, 6, 6], np.int64)),
        ("shape_8x4", np.array([8, 4], np.int64)), ("bias", RNG.standard_normal(4).astype(f32))]]
    graph = helper.make_graph(nodes, "messy",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_portable_pipeline_keeps_outputs_and_removes_the_mess():
    model = messy_model()
    feed = {"x": RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    fused, reports = fuse(model)
    np.testing.assert_allclose(run(fused, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)
    ops = [n.op_type for n in fused.graph.node]
    assert ops == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"], ops
    changed = {r.name: r.changed for r in reports}
    assert changed["constant_folding"] == 2 and changed["fold_batchnorm"] == 1
    assert changed["remove_identity"] == 2 and changed["cancel_transposes"] == 1
    assert changed["remove_noop_reshape"] == 1 and changed["matmul_add_to_gemm"] == 1


@pytest.mark.parametrize("example", ["digits_cnn.onnx", "digits_mnv2.onnx", "digits_resnet.onnx"])
def test_pipeline_on_the_examples_is_exact(models, example):
    model = onnx.load(models / example)
    x = np.load(models / example.replace(".onnx", "_eval.npz"))["input"][:4]
    fused, _ = fuse(model)
    np.testing.assert_allclose(run(fused, {"input": x})[0], run(model, {"input": x})[0],
                               rtol=1e-4, atol=1e-4)


def test_activation_fusion_for_onnxruntime():
    f32 = np.float32
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["y1"]),
             helper.make_node("Conv", ["y1", "w2"], ["c2"]),
             helper.make_node("LeakyRelu", ["c2"], ["y"], alpha=0.2)]
    inits = [numpy_helper.from_array(RNG.standard_normal((4, 2, 3, 3)).astype(f32), "w"),
             numpy_helper.from_array(RNG.standard_normal((4, 4, 1, 1)).astype(f32), "w2"),
             numpy_helper.from_array(np.array(0, f32), "lo"),
             numpy_helper.from_array(np.array(6, f32), "hi")]
    model = helper.make_model(helper.make_graph(
        nodes, "acts", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])], inits),
        opset_imports=[helper.make_opsetid("", 17)])
    fused, report = get("fuse_activations")(model, None)
    assert report.changed == 2 and [n.op_type for n in fused.graph.node] == ["FusedConv"] * 2
    feed = {"x": (RNG.standard_normal((1, 2, 5, 5)) * 4).astype(f32)}
    np.testing.assert_allclose(run(fused, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_opset_upgrade_keeps_outputs():
    model = messy_model()
    model.opset_import[0].version = 13
    feed = {"x": RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    upgraded, report = get("upgrade_opset")(model, OpsetConfig(opset=17))
    assert "opset 13 -> 17" in report.details and upgraded.opset_import[0].version == 17
    np.testing.assert_allclose(run(upgraded, feed)[0], run(model, feed)[0], rtol=1e-6)


def test_opset_conversion_down_for_an_older_runtime_stamps_the_ir_it_needs(models):
    """A model saved by the newest onnx (newest opset and IR) converted down for an older
    onnxruntime: outputs unchanged, IR version the oldest the target opset allows."""
    cnn = onnx.load(models / "digits_cnn.onnx")
    newest, _ = get("convert_opset")(cnn, OpsetConfig(opset=onnx.defs.onnx_opset_version()))
    assert newest.ir_version == onnx.IR_VERSION
    down, report = get("convert_opset")(newest, OpsetConfig(opset=17))
    assert down.opset_import[0].version == 17 and down.ir_version == 8   # IR 8 brought opset 17
    assert f"IR version {onnx.IR_VERSION} -> 8" in report.details
    feed = {"input": RNG.standard_normal((1, 1, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(down, feed)[0], run(cnn, feed)[0], rtol=1e-6)


def test_fuse_cli_opset_out_of_range_is_one_line(models, tmp_path):
    from conftest import run_cli

    out = tmp_path / "x.onnx"
    for opset, why in [("99", "outside what this onnx converts"), ("13", "No Adapter")]:
        proc = run_cli("fuse", models / "digits_cnn.onnx", "--opset", opset, "-o", out)
        assert proc.returncode == 1 and not out.exists()
        assert f"opset {opset}" in proc.stderr and why in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_graph_output_is_never_bypassed():
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]),
        opset_imports=[helper.make_opsetid("", 17)])
    fused, reports = fuse(model)
    assert [o.name for o in fused.graph.output] == ["y"]
    assert run(fused, {"x": np.array([-1, 2], np.float32)})[0].tolist() == [0, 2]


@pytest.mark.parametrize("style", ["inputs", "one_element", "attributes", "no_max"])
def test_clip_bounds_however_the_exporter_wrote_them(style):
    """ReLU6 arrives as Clip with scalar inputs, 1-element tensors (torch's TorchScript
    exporter), attributes (opset < 11) or a missing max: fusion and CLE read all of them."""
    from edgesmith.passes.equalize import EqualizeConfig, equalize
    from edgesmith.passes.fuse import fuse_activations

    rng = np.random.default_rng(1)
    f32 = np.float32
    shape = [] if style == "inputs" else [1]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(f32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(f32), "w2"),
             numpy_helper.from_array(np.zeros(shape, f32), "lo"),
             numpy_helper.from_array(np.full(shape, 6, f32), "hi")]
    if style == "attributes":
        clip, opset = helper.make_node("Clip", ["c"], ["a"], min=0.0, max=6.0), 10
    else:
        clip = helper.make_node("Clip", ["c", "lo", "hi" if style != "no_max" else ""], ["a"])
        opset = 13
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1] * 4), clip,
         helper.make_node("Conv", ["a", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    x = rng.standard_normal((1, 3, 8, 8)).astype(f32)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    fused, report = fuse_activations(model)
    assert report.changed == 1
    np.testing.assert_allclose(ort.InferenceSession(fused.SerializeToString()).run(
        None, {"x": x})[0], ref, rtol=1e-4, atol=1e-4)
    batches = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(f32)} for _ in range(4)]
    eq, report = equalize(model, EqualizeConfig(batches))
    assert report.metrics["pairs"] == 1
    np.testing.assert_allclose(ort.InferenceSession(eq.SerializeToString()).run(
        None, {"x": x})[0], ref, rtol=1e-3, atol=1e-3)


def test_folding_keeps_scalars_scalar():
    """A 0-d Constant (a Gather index in a shape computation) must stay 0-d when it becomes an
    initializer: made 1-d, Gather returns a vector and a later Concat fails to load."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Constant", [], ["i"], value=numpy_helper.from_array(
                 np.array(0, np.int64))),
             helper.make_node("Gather", ["s", "i"], ["n"], axis=0),
             helper.make_node("Constant", [], ["ax"], value=numpy_helper.from_array(
                 np.array([0], np.int64))),
             helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
             helper.make_node("Constant", [], ["minus1"], value=numpy_helper.from_array(
                 np.array([-1], np.int64))),
             helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]),
        opset_imports=[helper.make_opsetid("", 13)])
    folded, _ = get("constant_folding")(model, None)
    x = np.ones((2, 3, 4), np.float32)
    y = ort.InferenceSession(folded.SerializeToString()).run(None, {"x": x})[0]
    assert y.shape == (2, 12)
