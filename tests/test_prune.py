"""Pruning: graph surgery checked by ORT and by MAC counts computed independently; distillation
recovers the accuracy of a 50 %-pruned digits CNN (real digits, fixed seed)."""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT, run_cli
from edgesmith.model import from_proto, load
from edgesmith.passes.prune import (PruneConfig, UnstructuredConfig, prune_channels,
                                    prune_unstructured)

RNG = np.random.default_rng(0)
F32 = np.float32


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def init(name, *shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(F32), name)


def zoo_model() -> onnx.ModelProto:
    """stem conv -> [residual: conv+BN-free relu -> conv, Add] -> depthwise -> Concat(two convs)
    -> GAP -> Flatten -> Gemm -> Relu -> Gemm: every coupling the pruner must honour."""
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["s"], pads=[1] * 4),
        helper.make_node("Relu", ["s"], ["s_r"]),
        helper.make_node("Conv", ["s_r", "w1", "b1"], ["r1"], pads=[1] * 4),
        helper.make_node("Relu", ["r1"], ["r1_r"]),
        helper.make_node("Conv", ["r1_r", "w2", "b2"], ["r2"], pads=[1] * 4),
        helper.make_node("Add", ["r2", "s_r"], ["res"]),
        helper.make_node("Mul", ["res", "chan_scale"], ["scaled"]),
        helper.make_node("Conv", ["scaled", "wd", "bd"], ["dw"], pads=[1] * 4, group=16),
        helper.make_node("Clip", ["dw", "lo", "hi"], ["dw_r"]),
        helper.make_node("Conv", ["dw_r", "wa"], ["ca"]),
        helper.make_node("Conv", ["dw_r", "wb"], ["cb"]),
        helper.make_node("Concat", ["ca", "cb"], ["cat"], axis=1),
        helper.make_node("GlobalAveragePool", ["cat"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "g1", "gb1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["h_r"]),
        helper.make_node("Gemm", ["h_r", "g2", "gb2"], ["y"], transB=1),
    ]
    inits = [init("w0", 16, 3, 3, 3), init("b0", 16), init("w1", 16, 16, 3, 3), init("b1", 16),
             init("w2", 16, 16, 3, 3), init("b2", 16), init("chan_scale", 16, 1, 1),
             init("wd", 16, 1, 3, 3), init("bd", 16), init("wa", 24, 16, 1, 1),
             init("wb", 8, 16, 1, 1), init("g1", 32, 32), init("gb1", 32), init("g2", 5, 32),
             init("gb2", 5), numpy_helper.from_array(np.array(0, F32), "lo"),
             numpy_helper.from_array(np.array(6, F32), "hi")]
    return helper.make_model(helper.make_graph(
        nodes, "zoo", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits),
        opset_imports=[helper.make_opsetid("", 17)])


def macs(model: onnx.ModelProto) -> int:
    """MACs recomputed from the weights alone (10x10 maps, batch 1): independent of sdk.model."""
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    total = 0
    for n in model.graph.node:
        if n.op_type == "Conv":
            total += 100 * int(np.prod(w[n.input[1]].shape))
        elif n.op_type == "Gemm":
            total += int(np.prod(w[n.input[1]].shape))
    return total


def test_ratio_zero_leaves_outputs_identical():
    model = zoo_model()
    x = RNG.standard_normal((2, 3, 10, 10)).astype(F32)
    pruned, report = prune_channels(model, PruneConfig(ratio=0.0))
    assert report.changed == 0
    np.testing.assert_array_equal(run(pruned, x), run(model, x))


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_structured_surgery_keeps_every_coupling_consistent(ratio):
    model = zoo_model()
    pruned, report = prune_channels(model, PruneConfig(ratio=ratio, round_to=1))
    onnx.checker.check_model(pruned, full_check=True)
    x = RNG.standard_normal((2, 3, 10, 10)).astype(F32)
    assert run(pruned, x).shape == (2, 5)
    w = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    kept = w["w0"].shape[0]                                  # residual group: stem + conv2
    assert kept == w["w2"].shape[0] == w["wd"].shape[0] == w["wa"].shape[1] < 16
    assert w["chan_scale"].shape[0] == kept                  # per-channel constant sliced
    assert [a.i for a in pruned.graph.node[7].attribute if a.name == "group"] == [kept]
    assert w["g1"].shape[1] == w["wa"].shape[0] + w["wb"].shape[0]   # Concat -> Flatten -> Gemm
    assert w["g2"].shape == (5, w["g1"].shape[0]) and w["g1"].shape[0] < 32   # hidden layer
    assert "graph input/output" in report.metrics["skipped"].values()
    before, after = macs(model), macs(pruned)
    facts_before = from_proto(model, _like(model)).facts.macs
    facts_after = from_proto(pruned, _like(model)).facts.macs
    assert (facts_before, facts_after) == (before, after)      # reported == recomputed
    assert after < (1 - ratio / 2) * before


def _like(model):
    from edgesmith.model import InputSpec, Model, ModelFacts
    return Model(None, "onnx", [InputSpec("x", [None, 3, 10, 10], [1, 3, 10, 10], "float32")],
                 ["y"], ModelFacts("onnx", 0, 0, 0, {}), proto=model)


@pytest.mark.parametrize("example", ["digits_cnn", "digits_mnv2", "digits_resnet"])
def test_examples_prune_and_run(models, example):
    m = load(models / f"{example}.onnx")
    pruned, report = prune_channels(m.proto, PruneConfig(ratio=0.5))
    onnx.checker.check_model(pruned, full_check=True)
    after = from_proto(pruned, m)
    assert after.facts.macs < 0.4 * m.facts.macs and after.facts.params < 0.4 * m.facts.params
    x = np.load(models / f"{example}_eval.npz")["input"][:2]
    out = ort.InferenceSession(pruned.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert out.shape == (2, 10)


def test_unstructured_global_and_n_m():
    model = zoo_model()
    sparse, report = prune_unstructured(model, UnstructuredConfig(0.5))
    w = np.concatenate([numpy_helper.to_array(t).ravel() for t in sparse.graph.initializer
                        if t.name in ("w0", "w1", "w2", "wa", "wb", "g1", "g2", "wd")])
    assert abs(np.mean(w == 0) - 0.5) < 0.02
    assert report.metrics["gzip_bytes_after"] < report.metrics["gzip_bytes_before"]
    assert "no speedup" in report.details[-1]
    nm, _ = prune_unstructured(model, UnstructuredConfig(0.0, n_m=(2, 4)))
    g1 = numpy_helper.to_array(next(t for t in nm.graph.initializer if t.name == "g1"))
    assert np.all((g1.reshape(32, 8, 4) != 0).sum(-1) == 2)      # 2 of every 4 inputs kept


def test_distillation_recovers_a_half_pruned_digits_cnn(models, tmp_path):
    pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "examples"))
    import digits
    x_train, y_train, _, _ = digits.load(8)
    train = tmp_path / "train.npz"
    np.savez(train, input=x_train, labels=y_train)
    student = tmp_path / "student.onnx"
    proc = run_cli("prune", models / "digits_cnn.onnx", "--ratio", "0.5", "-o", student)
    assert proc.returncode == 0, proc.stderr
    out, js = tmp_path / "distilled.onnx", tmp_path / "d.json"
    proc = run_cli("distill", "--teacher", models / "digits_cnn.onnx", "--student", student,
                   "--data", train, "--eval", models / "digits_cnn_eval.npz", "--epochs", "15",
                   "--seed", "0", "-o", out, "--json", js, timeout=600)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(js.read_text())["metrics"]
    assert m["student_top1_before"] < 0.9                     # pruning really hurt
    assert m["teacher_top1"] - m["student_top1_after"] <= 0.01
    onnx.checker.check_model(onnx.load(out))


def test_distillation_trains_every_output_and_keeps_the_best_epoch(models):
    """A student with a feature-map output beside its logits (as detector and OCR heads are not
    class scores): both outputs are trained, fidelity is judged on held-out samples, and the
    weights of the best epoch are kept."""
    pytest.importorskip("torch")
    from device_runtime.evaluate import EvalData
    from edgesmith.passes.distill import DistillConfig, distill

    sys.path.insert(0, str(ROOT / "examples"))
    import digits
    x_train, y_train, x_test, y_test = digits.load(8)
    teacher = onnx.load(models / "digits_cnn.onnx")
    feature = "/features/features.1/features.1.2/Clip_output_0"
    teacher.graph.output.append(helper.make_tensor_value_info(
        feature, TensorProto.FLOAT, ["batch", None, None, None]))
    student, _ = prune_channels(teacher, PruneConfig(ratio=0.5, input_shapes={
        "input": [1, 1, 8, 8]}))
    train = EvalData({"input": x_train}, y_train.astype(np.int64), {}, len(x_train))
    held_out = EvalData({"input": x_test}, y_test.astype(np.int64), {}, len(x_test))
    trained, report = distill(student, DistillConfig(teacher, train, held_out, epochs=10))
    m = report.metrics
    assert m["sqnr_db_after"] > m["sqnr_db_before"] + 3 and m["best_epoch"] > 0
    assert m["student_top1_after"] > m["student_top1_before"]
    session = ort.InferenceSession(trained.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, fmap = session.run(None, {"input": x_test[:4]})
    assert logits.shape == (4, 10) and fmap.ndim == 4
    # a student already equal to its teacher cannot be improved: it keeps its own weights
    same, report = distill(teacher, DistillConfig(teacher, train, held_out, epochs=1))
    assert report.metrics["best_epoch"] == 0 and "kept its own weights" in report.details[-1]
    assert [t.raw_data for t in same.graph.initializer] == \
        [t.raw_data for t in teacher.graph.initializer]


@pytest.mark.parametrize("batch, n, batch_size, squeeze", [(1, 4, 64, False), ("N", 5, 4, False),
                                                          (1, 4, 64, True), (2, 4, 64, False)])
def test_distillation_of_fixed_batch_and_odd_sized_exports(batch, n, batch_size, squeeze):
    """Batch-1 exports (trained by accumulation, one sample a step), a last batch of one, and
    a batch-1 export that squeezed its logits to [classes]: a teacher different from its
    student trains, and a held-out set that is not a whole number of batches still judges."""
    pytest.importorskip("torch")
    from device_runtime.evaluate import EvalData
    from edgesmith.passes.distill import DistillConfig, distill

    rng = np.random.default_rng(0)

    def gemm(seed):
        w = np.random.default_rng(seed).standard_normal((4, 3)).astype(F32)
        nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y" if not squeeze else "z"])]
        if squeeze:
            nodes.append(helper.make_node("Squeeze", ["z", "ax"], ["y"]))
        return helper.make_model(helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                           [3] if squeeze else [batch, 3])],
            [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(3, F32), "B"),
             numpy_helper.from_array(np.array([0], np.int64), "ax")]),
            opset_imports=[helper.make_opsetid("", 17)])

    def data(k):
        return EvalData({"x": rng.standard_normal((k, 4)).astype(F32)}, None, {}, k)

    trained, report = distill(gemm(1), DistillConfig(gemm(0), data(n), data(3), epochs=3,
                                                     batch_size=batch_size, lr=0.05))
    judged = 2 if batch == 2 else 3
    assert f"best on the {judged} held-out samples" in report.details[-1]
    assert np.isfinite(report.metrics["final_loss"]) and report.metrics["final_loss"] > 0
    onnx.checker.check_model(trained)


def test_kept_channels_follow_the_targets_vector_width(tmp_path):
    """AVX-512 blocks conv channels by 16, AVX2 by 8: a pruned count off the block costs
    onnxruntime reorders (measured in benchmarks/real_models.py), so the target decides."""
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1] * 4),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [init("w1", 64, 3, 3, 3), init("w2", 8, 64, 1, 1)]),
        opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    kept = {}
    for target in ("x86-avx2", "x86-avx512-vnni"):     # 64 * 0.6 = 38 channels before rounding
        out = tmp_path / f"{target}.onnx"
        proc = run_cli("prune", path, "--ratio", "0.4", "--target", target, "-o", out)
        assert proc.returncode == 0, proc.stderr
        conv = onnx.load(out).graph.node[0]
        kept[target] = next(numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer
                            if t.name == conv.input[1]).shape[0]
    assert kept == {"x86-avx2": 40, "x86-avx512-vnni": 32}


def test_cli_prune_reports_and_unstructured(models, tmp_path):
    out = tmp_path / "p.onnx"
    proc = run_cli("prune", models / "digits_mnv2.onnx", "--ratio", "0.3", "-o", out,
                   "--json", tmp_path / "p.json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "p.json").read_text())["summary"]
    assert summary["macs"][1] < summary["macs"][0]
    proc = run_cli("prune", models / "digits_cnn.onnx", "--unstructured", "--n-m", "2:4",
                   "-o", out)
    assert proc.returncode == 0 and "no speedup" in proc.stdout
    proc = run_cli("prune", models / "digits_cnn.onnx", "--ratio", "1.5", "-o", out)
    assert proc.returncode == 2


def bn_model() -> onnx.ModelProto:
    gamma = np.concatenate([np.full(8, 1e-3), np.ones(8)]).astype(F32)   # 8 channels idle
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"], pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("Conv", ["r", "w1"], ["y"])]
    inits = [init("w0", 16, 3, 3, 3), numpy_helper.from_array(gamma, "g"),
             numpy_helper.from_array(np.zeros(16, F32), "b"),
             numpy_helper.from_array(np.zeros(16, F32), "m"),
             numpy_helper.from_array(np.ones(16, F32), "v"), init("w1", 4, 16, 1, 1)]
    return helper.make_model(helper.make_graph(
        nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 10, 10])], inits),
        opset_imports=[helper.make_opsetid("", 17)])


def test_bn_gamma_importance_removes_the_idle_channels():
    model = bn_model()
    pruned, _ = prune_channels(model, PruneConfig(ratio=0.5, importance="bn_gamma", round_to=1))
    w = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    w0 = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_array_equal(w["w0"], w0[8:])           # the 8 near-zero-gamma channels
    assert w["g"].tolist() == [1.0] * 8 and w["w1"].shape == (4, 8, 1, 1)
    x = RNG.standard_normal((1, 3, 10, 10)).astype(F32)
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=0.1)   # idle: nearly exact


def test_activation_importance_and_global_ranking(models, tmp_path):
    out = tmp_path / "p.onnx"
    proc = run_cli("prune", models / "digits_cnn.onnx", "--ratio", "0.4", "--importance",
                   "activation", "--calib", models / "digits_cnn_eval.npz", "-o", out)
    assert proc.returncode == 0, proc.stderr
    m = load(models / "digits_cnn.onnx")
    pruned, report = prune_channels(m.proto, PruneConfig(ratio=0.4, global_ranking=True))
    after = from_proto(pruned, m)
    per_layer = report.metrics["per_layer"]
    assert after.facts.macs < m.facts.macs
    assert len({v["after"] / v["before"] for v in per_layer.values()}) > 1   # not uniform
