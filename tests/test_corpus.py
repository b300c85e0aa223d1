"""Every command on every model kind of the real-model corpus (tests/corpus.py): each works,
or refuses with one line naming why. Outputs are checked: fused models compute what the
original computes; pruned and quantized models load and run."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import run_cli
from rendered import check_plot, plot_boxes

torch = pytest.importorskip("torch", reason="the corpus is built from torch definitions")
import corpus  # noqa: E402

VARIANTS = corpus.variants()
ONE_PER_KIND = [(k.name, "ts17") for k in corpus.KINDS]


@pytest.fixture(scope="module")
def built():
    return corpus.build()


def model_and_data(built, kind, export):
    if (kind, export) not in built:
        failed_path = corpus.cache_root() / "failed.json"
        failed = json.loads(failed_path.read_text()) if failed_path.is_file() else {}
        pytest.fail(f"{kind}-{export} was not built: {failed.get(f'{kind}-{export}')}")
    return built[(kind, export)], corpus.data_path(kind)


def outputs(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def runnable(built, kind, export):
    """(model, one input, onnxruntime's outputs), or outputs None for an export no runtime
    loads (test_fuse_profile_prune checks that every command refuses it in one line)."""
    model, data = model_and_data(built, kind, export)
    x = np.load(data)["input"][:1]
    try:
        return model, x, outputs(model, x)
    except Exception:   # noqa: BLE001 - the exporter wrote a model no runtime loads
        return model, x, None


def refusal_is_one_line(proc) -> bool:
    lines = proc.stderr.strip().splitlines()
    return proc.returncode == 1 and "Traceback" not in proc.stderr and \
        lines[-1].startswith("error: ")


@pytest.mark.parametrize("kind, export", VARIANTS)
def test_fuse_profile_prune(built, kind, export, tmp_path):
    model, data = model_and_data(built, kind, export)
    x = np.load(data)["input"][:1]
    try:
        outputs(model, x)
    except Exception as exc:   # noqa: BLE001 - the exporter wrote a model no runtime loads
        for argv in (["fuse", model, "-o", tmp_path / "f.onnx"], ["profile", model]):
            proc = run_cli(*argv)
            assert refusal_is_one_line(proc), (exc, proc.stderr)
        return
    fused = tmp_path / "fused.onnx"
    proc = run_cli("fuse", model, "-o", fused)          # dynamic shapes: no --input-shape
    assert proc.returncode == 0, proc.stderr
    for a, b in zip(outputs(model, x), outputs(fused, x)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(a).max()))
    proc = run_cli("profile", model, "--eval", data, "--runs", "5", "--warmup", "1")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    pruned = tmp_path / "pruned.onnx"
    proc = run_cli("prune", model, "--ratio", "0.3", "--calib", data, "-o", pruned)
    if proc.returncode == 0:
        assert [o.shape for o in outputs(pruned, x)] == [o.shape for o in outputs(model, x)]
    else:
        assert refusal_is_one_line(proc), proc.stderr
        assert "frozen" in proc.stdout and not pruned.exists()


@pytest.mark.parametrize("kind, export", ONE_PER_KIND)
def test_quantize_tune_optimize(built, kind, export, tmp_path):
    model, data = model_and_data(built, kind, export)
    x = np.load(data)["input"]
    q, user_dir = tmp_path / "q.onnx", tmp_path / "cwd"
    user_dir.mkdir()
    # the recipe search (and its why-worse table) for the kinds whose int8 goes wrong; the
    # others' recipe search runs inside optimize below
    task = next(k.task for k in corpus.KINDS if k.name == kind)
    search = [] if task in ("detect", "ocr-det") else ["--recipe", "qdq-u8s8"]
    proc = run_cli("quantize", model, "--calib", data, "-o", q, "--json", tmp_path / "q.json",
                   *search, cwd=user_dir)
    assert not list(user_dir.iterdir()), "quantize left files in the working directory"
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "q.json").read_text())
    if search:
        assert report["recipe"] == "qdq-u8s8" and report["accuracy"], report
    else:
        assert report["baseline"]["error"] is None
        assert all(c["error"] is None or c["error"].strip() for c in report["candidates"])
    assert [o.shape for o in outputs(q, x[:1])] == [o.shape for o in outputs(model, x[:1])]
    shape = "x".join(map(str, (1, *x.shape[1:])))
    proc = run_cli("tune", model, "--max-trials", "2", "--input-shape", f"input={shape}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    proc = run_cli("optimize", model, "--calib", data, "-o", out, "--tune-budget", "0",
                   "--budget", "60s", "--backends", "onnxruntime")   # TFLite: test_tflite.py
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["candidates"] and (out / "model.onnx").is_file()
    check_plot(plot_boxes(out / "report.html", tmp_path), report)   # the judged metric's axis
    if proc.returncode == 1:
        assert report["chosen"] is None and "no candidate met the budget" in proc.stdout


@pytest.mark.parametrize("kind, export", VARIANTS)
def test_training_interpreter_computes_what_onnxruntime_computes(built, kind, export):
    """Distillation (and every trained variant) runs the graph as a torch module: it must
    compute what onnxruntime computes on every export of every kind, or refuse by op name."""
    from edgesmith.errors import EdgesmithError
    from edgesmith.torch_interp.interpreter import to_torch

    model, x, expected = runnable(built, kind, export)
    if expected is None:
        return
    try:
        module = to_torch(onnx.load(model))
    except EdgesmithError as exc:
        pytest.fail(f"{kind}-{export}: {exc}")
    with torch.no_grad():
        got = module(torch.from_numpy(x))
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b.numpy(), a, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(a).max()))


@pytest.mark.parametrize("kind, export", ONE_PER_KIND)
def test_prune_then_distill(built, kind, export, tmp_path):
    """The pruned student of every kind trains against its teacher on all its outputs, and the
    written model is the trained module (checked inside distill against onnxruntime)."""
    model, data = model_and_data(built, kind, export)
    student = tmp_path / "pruned.onnx"
    proc = run_cli("prune", model, "--ratio", "0.3", "--calib", data, "-o", student)
    if proc.returncode != 0:          # nothing prunable (the transformer): distil the original
        student = model
    out, js = tmp_path / "student.onnx", tmp_path / "d.json"
    proc = run_cli("distill", "--teacher", model, "--student", student, "--data", data,
                   "--epochs", "2", "-o", out, "--json", js)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(js.read_text())["metrics"]
    assert m["sqnr_db_after"] >= m["sqnr_db_before"]
    x = np.load(data)["input"][:1]
    assert [o.shape for o in outputs(out, x)] == [o.shape for o in outputs(model, x)]


EXACT_PASSES = ("cancel_transposes", "constant_folding", "equalize", "fold_batchnorm",
                "fuse_activations", "initializers_as_constants", "matmul_add_to_gemm",
                "remove_identity", "remove_noop_reshape", "upgrade_opset", "prune_unstructured",
                "prune_channels")


@pytest.mark.parametrize("kind, export", VARIANTS)
def test_every_pass_alone_on_every_export(built, kind, export):
    """Each registered pass applied on its own to the export as written (no fuse first):
    exact passes keep the outputs, lossy ones produce a model that runs, or the pass refuses
    in one line. This is the crash class of the first wave (bounds as inputs, 1-element
    tensors, initializers listed as inputs) checked pass by pass."""
    from edgesmith.errors import EdgesmithError
    from edgesmith.passes import load_all
    from edgesmith.passes.prune import PruneConfig, UnstructuredConfig

    model, x, expected = runnable(built, kind, export)
    if expected is None:
        return
    proto = onnx.load(model)
    configs = {"prune_unstructured": UnstructuredConfig(0.0),
               "prune_channels": PruneConfig(ratio=0.0, input_shapes={
                   proto.graph.input[0].name: list(x.shape)})}
    for name in EXACT_PASSES + ("quantize_dynamic", "to_fp16"):
        fn = load_all()[name]
        try:
            out, _ = fn(onnx.load(model), configs[name]) if name in configs else \
                fn(onnx.load(model))
        except EdgesmithError as exc:
            assert "\n" not in str(exc), (name, exc)
            continue
        session = ort.InferenceSession(out.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x})
        assert [g.shape for g in got] == [e.shape for e in expected], name
        if name in EXACT_PASSES:
            for a, b in zip(expected, got):
                np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(a).max()),
                                           err_msg=name)
