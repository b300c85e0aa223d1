"""ONNX -> TFLite on real models: fp32 equal to onnxruntime on every corpus kind, int8 on the grid
our own int8 ONNX model computes on, XNNPACK's share reported by the device runtime, and
TFLite candidates measured beside onnxruntime's inside `optimize`."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import device_runtime
from conftest import require, run_cli
from edgesmith.model import load
from edgesmith.search.int8 import quant_data, quantize_with
from edgesmith.convert.tflite import as_model, available, check, to_tflite

torch = pytest.importorskip("torch", reason="conversion runs the ONNX->torch interpreter")
import corpus  # noqa: E402

# one export per kind; TorchScript's opset-13 exports compute shapes at run time (Shape ->
# Gather -> Reshape), the hardest case for a converter that needs static graphs
KINDS = [(k.name, "ts13") for k in corpus.KINDS]
CONVNETS = {"resnet", "mobilenetv2", "mobilenetv3", "yolo", "dbnet"}


@pytest.fixture(scope="module", autouse=True)
def converter():
    require(available() is None, f"{available()} (.ci/run installs it)")


@pytest.fixture(scope="module")
def built():
    return corpus.build()


def first_input(model: onnx.ModelProto) -> str:
    inits = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


@pytest.mark.parametrize("kind, export", KINDS)
def test_fp32_conversion_computes_what_onnxruntime_computes(built, kind, export):
    path = built[(kind, export)]
    model = load(path, data=corpus.data_path(kind))
    x = np.load(corpus.data_path(kind))["input"][:1]
    data, report = to_tflite(model.proto, {first_input(model.proto): x})
    assert not report.int8 and report.max_rel_err <= 1e-4, report
    d = report.delegation
    assert d["delegated"] + sum(d["fallback"].values()) == d["ops"] == sum(report.ops.values())
    if kind in CONVNETS:       # upsampling and hard-sigmoid are written as ops XNNPACK runs
        assert d["fallback"] == {} and d["delegated"] == d["ops"], d
    converted = as_model(data, model)            # the ONNX interface: names and dtypes
    assert [s.name for s in converted.inputs] == [s.name for s in model.inputs]
    assert converted.outputs == model.outputs


def digits_int8(models):
    m = load(models / "digits_cnn.onnx", data=models / "digits_cnn_eval.npz")
    data = quant_data(m, models / "digits_cnn_train.npz", models / "digits_cnn_eval.npz")
    proto, _ = quantize_with(m, "qdq-u8s8", data.batches)
    return m, proto, data


def test_int8_conversion_computes_on_our_int8_grid(models, tmp_path):
    m, proto, data = digits_int8(models)
    sample = {"input": data.eval.inputs["input"][:1]}
    tfl, report = to_tflite(proto, sample)
    assert report.int8 and report.ops.get("QUANTIZE", 0) + report.ops.get("DEQUANTIZE", 0) == 0
    held_out = check(proto, tfl, data.eval.inputs)       # 359 digits never calibrated on
    assert held_out.fidelity["agreement"] >= 0.98 and held_out.fidelity["sqnr_db"] >= 30
    assert len(tfl) < 0.4 * m.facts.size_bytes           # int8 weights, not float ones
    # a fully int8 model takes int8; the runtime quantizes float feeds with its scale
    path = tmp_path / "digits_int8.tflite"
    path.write_bytes(tfl)
    backend = device_runtime.backends.get("tflite")(str(path), {"threads": 1})
    assert backend.inputs["input"]["dtype"] == np.int8
    x = data.eval.inputs["input"][:1]
    logits = backend.run({"input": x})[0]
    assert logits.dtype == np.float32 and logits.argmax() == data.eval.refs["logits"][0].argmax()


def test_convert_command_end_to_end(models, tmp_path):
    out = tmp_path / "digits_int8.tflite"
    proc = run_cli("convert", models / "digits_cnn.onnx", "--to", "tflite", "--int8",
                   "--calib", models / "digits_cnn_train.npz", "--eval",
                   models / "digits_cnn_eval.npz", "-o", out, "--json", tmp_path / "c.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "XNNPACK took 9 of 9 ops" in proc.stdout and "top-1 agreement" in proc.stdout
    report = json.loads((tmp_path / "c.json").read_text())["report"]
    assert report["int8"] and report["fidelity"]["n"] == 359
    # the written .tflite profiles on the float eval set it was made for
    prof = tmp_path / "p.json"
    proc = run_cli("profile", out, "--eval", models / "digits_cnn_eval.npz", "--runs", "5",
                   "--json", prof)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(prof.read_text())          # one device: one Result
    assert row["backend"] == "tflite" and row["accuracy"]["top1"] > 0.97
    assert row["delegation"] == {"delegate": "XNNPACK", "ops": 9, "delegated": 9,
                                 "fallback": {}, "applied": True}


def test_convert_refuses_in_one_line_and_writes_nothing(models, tmp_path):
    out = tmp_path / "x.tflite"
    cases = [
        (["--int8"], "--int8 needs --calib"),
        ([], None),     # a .tflite given as the model
    ]
    for extra, message in cases:
        source = models / ("digits_cnn.onnx" if extra else "digits_mlp.tflite")
        proc = run_cli("convert", source, "--to", "tflite", *extra, "-o", out)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert message is None or message in proc.stderr
        assert not out.exists()
    # onnxruntime's QOperator format has no TFLite mapping here: said by op name
    m = load(models / "digits_cnn.onnx")
    calib = quant_data(m, models / "digits_cnn_train.npz").batches
    qop, _ = quantize_with(m, "qoperator-u8s8-rr", calib)
    onnx.save(qop, tmp_path / "qop.onnx")
    proc = run_cli("convert", tmp_path / "qop.onnx", "--to", "tflite", "-o", out)
    assert proc.returncode == 1 and "QLinearConv" in proc.stderr and not out.exists()


def dotted_cnn() -> onnx.ModelProto:
    """What TorchScript exports look like to a converter: the input is `input.1` (not an
    identifier), a constant Mul and Add between convs (quantized with their own zero points),
    and a Flatten computed from Shape -> Gather -> Concat -> Reshape on a dynamic batch."""
    rng = np.random.default_rng(0)

    def const(name, value):
        return numpy_helper.from_array(np.asarray(value, np.float32 if np.asarray(value).dtype
                                                  .kind == "f" else np.int64), name)

    inits = [const("w1", rng.standard_normal((8, 3, 3, 3)) * 0.3),
             const("scale", 0.7), const("shift", rng.standard_normal((1, 8, 1, 1)) * 0.1),
             const("w2", rng.standard_normal((4, 8, 3, 3)) * 0.2),
             const("w3", rng.standard_normal((10, 256)) * 0.1), const("zero", [0]),
             const("rest", [-1])]
    nodes = [helper.make_node("Conv", ["input.1", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Mul", ["r1", "scale"], ["m1"]),
             helper.make_node("Add", ["m1", "shift"], ["a1"]),
             helper.make_node("Conv", ["a1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["c2"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Concat", ["n", "rest"], ["shape"], axis=0),
             helper.make_node("Reshape", ["c2", "shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w3"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "dotted", [helper.make_tensor_value_info(
        "input.1", TensorProto.FLOAT, ["N", 3, 8, 8])], [helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("recipe", ["qdq-u8s8", "qdq-s8s8", "ort-default"])
def test_every_int8_recipe_converts_onto_its_own_grid(recipe, tmp_path):
    """Per-channel and per-tensor weights, uint8 and int8 activations, constant operands with
    non-zero zero points, a dotted input name, a batch of 2: the .tflite computes what our
    int8 ONNX model computes."""
    path = tmp_path / "dotted.onnx"
    onnx.save(dotted_cnn(), path)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((72, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", **{"input.1": x[:64]})
    m = load(path, data=tmp_path / "calib.npz")
    proto, _ = quantize_with(m, recipe, [{"input.1": x[i:i + 16]} for i in range(0, 64, 16)])
    tfl, report = to_tflite(proto, {"input.1": x[64:66]})         # converted at batch 2
    assert report.int8
    held_out = check(proto, tfl, {"input.1": x[64:]})
    assert held_out.fidelity["sqnr_db"] >= 30 and held_out.fidelity["agreement"] == 1.0, \
        held_out.fidelity
    converted = as_model(tfl, m)
    assert [(s.name, s.dims[0]) for s in converted.inputs] == [("input.1", 2)]


def softplus_cnn() -> onnx.ModelProto:
    """Conv -> Softplus (Mish-style activations, as in YOLOv4): TFLite writes Softplus with
    GREATER and SELECT, which XNNPACK has no kernels for."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Softplus", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "softplus", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3, 16, 16])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 8, 16, 16])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_ops_xnnpack_leaves_to_tflite_are_named(tmp_path):
    model = softplus_cnn()
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    data, report = to_tflite(model, {"x": x})
    assert report.max_rel_err <= 1e-4
    assert report.delegation["fallback"] == {"GREATER": 1, "SELECT": 1}, report.delegation
    onnx.save(model, tmp_path / "softplus.onnx")
    proc = run_cli("convert", tmp_path / "softplus.onnx", "--to", "tflite", "-o",
                   tmp_path / "s.tflite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GREATER x1" in proc.stdout and "SELECT x1" in proc.stdout


def optimize_digits(models, out, *extra) -> tuple[dict, str]:
    proc = run_cli("optimize", models / "digits_cnn.onnx", "--eval",
                   models / "digits_cnn_eval.npz", "-o", out, "--tune-budget", "0", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), proc.stdout


def test_optimize_measures_tflite_beside_onnxruntime(models, tmp_path):
    report, stdout = optimize_digits(models, tmp_path / "out")
    rows = {c["id"]: c for c in report["candidates"]}
    tfl = [c for c in rows.values() if c["backend"] == "tflite"]
    assert {c["id"] for c in tfl} >= {"tflite:fp32"}
    assert any(i.startswith("tflite:int8:") for i in rows), (rows, report["skipped"])
    for c in tfl:        # judged on the same held-out set as every other candidate
        assert c["error"] is None and c["accuracy"]["n"] == rows["fp32"]["accuracy"]["n"]
        assert c["accuracy_drop"] <= 0.01 and c["id"] in stdout
    chosen = rows[report["chosen"]]
    shipped = device_runtime.load(tmp_path / "out" / "bundle")
    assert shipped.manifest.backend == chosen["backend"]
    written = "model.tflite" if chosen["backend"] == "tflite" else "model.onnx"
    assert [p.name for p in (tmp_path / "out").glob("model.*")] == [written]
    # an application that embeds onnxruntime asks for it, and gets no .tflite
    report, _ = optimize_digits(models, tmp_path / "ort", "--backends", "onnxruntime")
    assert all(c["backend"] == "onnxruntime" for c in report["candidates"])
    assert any(s["id"] == "tflite:*" for s in report["skipped"])
    assert [p.name for p in (tmp_path / "ort").glob("model.*")] == ["model.onnx"]
    # a TFLite-only answer that cannot be made is refused before anything is measured
    proc = run_cli("optimize", models / "digits_cnn.onnx", "-o", tmp_path / "none",
                   "--backends", "tflite", "--target", "jetson-orin-nano")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "does not list the tflite backend" in proc.stderr and \
        not (tmp_path / "none").exists()
