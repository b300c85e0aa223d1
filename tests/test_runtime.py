"""device_runtime on real ORT and TFLite sessions: bundles, verification, measure, evaluate."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import device_runtime
from conftest import ROOT
from device_runtime.bundle import MANIFEST, onnx_external_locations, verify
from device_runtime.errors import RuntimeFailure
from device_runtime.measure import summarize
from edgesmith.model import load
from edgesmith.profiling import prepare


@pytest.fixture
def cnn_bundle(models):
    return prepare(load(models / "digits_cnn.onnx"), models / "digits_cnn_eval.npz")


def copy_bundle(bundle, tmp_path):
    """A writable copy under a non-hash name (the id check is about hash-named dirs)."""
    dest = tmp_path / "copy"
    shutil.copytree(bundle.path, dest)
    return dest


def test_embedding_api_matches_bare_onnxruntime(cnn_bundle, models):
    session = device_runtime.load(cnn_bundle.path, threads=1)
    x = np.load(models / "digits_cnn_eval.npz")["input"][:5]
    ours = session.run({"input": x})["logits"]
    bare = ort.InferenceSession(str(models / "digits_cnn.onnx")).run(None, {"input": x})[0]
    np.testing.assert_allclose(ours, bare, rtol=1e-5, atol=1e-5)
    assert session.config["intra_op_threads"] == 1


def test_bundle_is_content_addressed_and_reused(cnn_bundle, models):
    again = prepare(load(models / "digits_cnn.onnx"), models / "digits_cnn_eval.npz")
    assert again.id == cnn_bundle.id and again.path == cnn_bundle.path
    assert cnn_bundle.path.name == cnn_bundle.id
    manifest, bundle_id = verify(cnn_bundle.path)
    assert bundle_id == cnn_bundle.id and set(manifest.files) == {"model.onnx", "eval.npz"}


def test_changed_byte_is_refused(cnn_bundle, tmp_path):
    dest = copy_bundle(cnn_bundle, tmp_path)
    data = bytearray((dest / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dest / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(RuntimeFailure, match="does not match its sha256"):
        device_runtime.load(dest)


def test_damaged_cached_bundle_is_rebuilt(cnn_bundle, models):
    (cnn_bundle.path / "eval.npz").write_bytes(b"garbage")
    rebuilt = prepare(load(models / "digits_cnn.onnx"), models / "digits_cnn_eval.npz")
    verify(rebuilt.path)


def test_missing_file_is_refused(cnn_bundle, tmp_path):
    dest = copy_bundle(cnn_bundle, tmp_path)
    (dest / "eval.npz").unlink()
    with pytest.raises(RuntimeFailure, match="missing"):
        device_runtime.load(dest)


def test_renamed_hash_dir_is_refused(cnn_bundle, tmp_path):
    dest = tmp_path / ("0" * 64)
    shutil.copytree(cnn_bundle.path, dest)
    with pytest.raises(RuntimeFailure, match="does not match the bundle name"):
        verify(dest)


@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/passwd", "a/../../b", "./x", ""])
def test_paths_leaving_the_bundle_are_refused(cnn_bundle, tmp_path, bad):
    dest = copy_bundle(cnn_bundle, tmp_path)
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest["files"][bad] = {"sha256": "0" * 64, "size": 1}
    (dest / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RuntimeFailure, match="leaves the bundle"):
        verify(dest)


def test_symlink_out_of_the_bundle_is_refused(cnn_bundle, tmp_path):
    dest = copy_bundle(cnn_bundle, tmp_path)
    outside = tmp_path / "secret.npz"
    shutil.copy(dest / "eval.npz", outside)
    (dest / "eval.npz").unlink()
    (dest / "eval.npz").symlink_to(outside)
    with pytest.raises(RuntimeFailure, match="links outside"):
        verify(dest)


def _external_data_model(tmp_path, location: str):
    weight = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                              [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="w.bin",
              size_threshold=0)
    model = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    return model


def test_external_data_pointing_outside_is_refused(cnn_bundle, tmp_path):
    dest = copy_bundle(cnn_bundle, tmp_path)
    model = _external_data_model(tmp_path, "../../w.bin")
    assert onnx_external_locations_of(model, tmp_path) == {"../../w.bin"}
    data = model.SerializeToString()
    (dest / "model.onnx").write_bytes(data)
    manifest = json.loads((dest / MANIFEST).read_text())
    import hashlib
    manifest["files"]["model.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(),
                                       "size": len(data)}
    (dest / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RuntimeFailure, match="external data '../../w.bin'"):
        verify(dest)


def onnx_external_locations_of(model, tmp_path):
    path = tmp_path / "scan.onnx"
    path.write_bytes(model.SerializeToString())
    return onnx_external_locations(path)


def test_external_data_scan_finds_subgraph_tensors(tmp_path):
    """Locations inside an If branch (a subgraph attribute) are found too."""
    inner = numpy_helper.from_array(np.ones(2, np.float32), "c")
    inner.data_location = TensorProto.EXTERNAL
    inner.ClearField("raw_data")
    entry = inner.external_data.add()
    entry.key, entry.value = "location", "deep/../../x.bin"
    branch = helper.make_graph([helper.make_node("Constant", [], ["o"], value=inner)], "b", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2])])
    node = helper.make_node("If", ["cond"], ["o"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph)
    assert onnx_external_locations_of(model, tmp_path) == {"deep/../../x.bin"}


def test_tflite_backend_runs_the_real_model(models):
    from edgesmith.model import load as load_model
    tfl = prepare(load_model(models / "digits_mlp.tflite"), models / "digits_mlp_eval.npz")
    onx = prepare(load_model(models / "digits_mlp.onnx"), models / "digits_mlp_eval.npz")
    x = np.load(models / "digits_mlp_eval.npz")["input"][:1]
    a = device_runtime.load(tfl.path, threads=1).run({"input": x})["logits"]
    b = device_runtime.load(onx.path).run({"input": x})["logits"]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    xnn_off = device_runtime.load(tfl.path, xnnpack=False).run({"input": x})["logits"]
    np.testing.assert_allclose(a, xnn_off, rtol=1e-4, atol=1e-4)


def test_session_rejects_bad_feeds(cnn_bundle):
    session = device_runtime.load(cnn_bundle.path)
    x = np.zeros((1, 1, 8, 8), np.float32)
    with pytest.raises(RuntimeFailure, match="missing \\['input'\\], unknown \\['x'\\]"):
        session.run({"x": x})
    with pytest.raises(RuntimeFailure, match="dtype float64"):
        session.run({"input": x.astype(np.float64)})
    with pytest.raises(RuntimeFailure, match="shape \\[1, 1, 8, 7\\]"):
        session.run({"input": x[..., :7]})
    assert session.run({"input": np.zeros((3, 1, 8, 8), np.float32)})["logits"].shape == (3, 10)


def test_unavailable_provider_is_a_clear_load_error(cnn_bundle):
    with pytest.raises(RuntimeFailure, match="CUDAExecutionProvider is not available"):
        device_runtime.load(cnn_bundle.path, providers=["CUDAExecutionProvider"])


def test_summarize_matches_numpy_percentiles():
    samples = list(np.random.default_rng(0).exponential(2.0, 997))
    stats = summarize(samples, warmup=3)
    for q in (50, 90, 99):
        assert stats[f"p{q}"] == pytest.approx(np.percentile(samples, q))
    assert stats["mean"] == pytest.approx(np.mean(samples))
    assert stats["runs"] == 997 and stats["min"] == min(samples)


def test_a_model_newer_than_this_onnxruntime_names_the_versions_and_the_fix(models, tmp_path):
    """Host/device skew, produced for real: an IR version one past what this onnxruntime reads.
    (The emulated Pi tests cross a real older onnxruntime; this one runs everywhere.)"""
    from device_runtime.backends.onnxruntime import Backend
    from edgesmith.measure import explain_skew

    model = onnx.load(models / "digits_cnn.onnx")
    model.ir_version = onnx.IR_VERSION + 1
    path = tmp_path / "future.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(RuntimeFailure) as info:
        Backend(str(path), {})
    assert info.value.stage == "load"
    assert f"IR version {onnx.IR_VERSION + 1} is newer than onnxruntime {ort.__version__}" \
        in info.value.message
    skew = info.value.details        # structured: the host explains it from the fields
    assert skew == {"kind": "ir_version", "model": onnx.IR_VERSION + 1,
                    "device_max": onnx.IR_VERSION, "onnxruntime": ort.__version__}
    # the host fills in the opset: the model's own when it fits, else what the device reads
    assert "--opset 17 " in explain_skew(skew, device_opset=26, model_opset=17)
    assert "--opset 21 " in explain_skew(skew, device_opset=21, model_opset=24)
    opset_skew = {"kind": "opset", "model": 28, "device_max": 26, "onnxruntime": "1.27.0"}
    text = explain_skew(opset_skew, device_opset=26, model_opset=28)
    assert "opset 28 is newer than onnxruntime 1.27.0" in text and "--opset 26 " in text


def profile_beside_spinners(models, tmp_path, seconds: float | None, *args: str):
    """`edgesmith profile` of the digits CNN while processes spin on every core (for `seconds`,
    else until the profile ends): the finished process and its Result."""
    import os
    import subprocess
    import sys

    from conftest import run_cli

    out = tmp_path / "profile.json"
    spin = "while True: pass" if seconds is None else \
        f"import time\nt = time.time()\nwhile time.time() - t < {seconds}: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 2)]
    try:
        proc = run_cli("profile", models / "digits_cnn.onnx", *args, "--json", out)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())         # one device: the Result itself


def test_a_busy_device_is_said_to_be_busy(models, tmp_path):
    """Other processes spinning on every core while a profile measures (real load, not a
    mock): the Result carries their share of the cores and the table says the figures are
    unreliable. (A quiet device is not asserted: CI machines are shared.)"""
    proc, row = profile_beside_spinners(models, tmp_path, None, "--min-time", "0.5")
    assert row["load"]["others_share"] > 0.25 and row["load"]["loadavg_1m"] >= 0, row["load"]
    assert "the device was busy" in proc.stdout and "unreliable" in proc.stdout, proc.stdout


def test_labels_beyond_the_models_classes_are_refused_in_one_line(models, tmp_path):
    """1-based labels (or another model's) made top-1 silently wrong: label 10 of a 10-class
    model is now one line naming the cause, on the device's eval stage."""
    from conftest import run_cli

    data = dict(np.load(models / "digits_cnn_eval.npz"))
    data["labels"] = data["labels"] + 1          # counted from 1: the 9s become 10
    np.savez(tmp_path / "one_based.npz", **data)
    proc = run_cli("profile", models / "digits_cnn.onnx", "--eval", tmp_path / "one_based.npz")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "labels go up to 10 but output 'logits' has 10 class score(s)" in proc.stdout + proc.stderr


def test_wait_idle_waits_for_other_processes_to_leave_the_cores(models, tmp_path):
    """--wait-idle: processes spinning on every core for 4 s when the profile starts; the
    device runtime waits until they are gone before timing (real load, not a mock), and says
    how long it waited; a wait to the limit is right only when the device stayed busy."""
    _, row = profile_beside_spinners(models, tmp_path, 4.0, "--wait-idle", "20s")
    waited = row["stages_ms"]["idle_wait"] / 1e3
    assert waited >= 1.5, waited               # it waited for the spinners
    if waited >= 20:      # the whole limit: only right if the device stayed busy (a shared CI
        assert row["load"]["share_when_waited"] > 0.25, row["load"]     # machine may be)


def test_an_npz_that_expands_past_the_data_limit_is_refused_before_it_is_read(tmp_path,
                                                                             monkeypatch):
    """A compressed .npz of zeros is tiny on disk and large in memory: its headers are summed
    against the limit (EDGESMITH_MAX_DATA_GB) before any array is allocated."""
    from device_runtime.evaluate import load_eval

    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, input=np.zeros((4000, 1, 8, 8), np.float32))   # 1 MB of zeros
    assert path.stat().st_size < 20_000
    specs = {"input": {"dtype": "float32", "dims": [None, 1, 8, 8]}}
    monkeypatch.setenv("EDGESMITH_MAX_DATA_GB", "0.0004")
    with pytest.raises(RuntimeFailure, match="expands to 1 MB of arrays, over the 0 MB limit "
                       "for data; use fewer samples or raise EDGESMITH_MAX_DATA_GB"):
        load_eval(path, specs)
    monkeypatch.setenv("EDGESMITH_MAX_DATA_GB", "0.01")
    assert load_eval(path, specs).n == 4000


@pytest.mark.parametrize("case, change, words", [
    ("files null", lambda m: m.update(files=None), "'files' is a NoneType"),
    ("files a list", lambda m: m.update(files=[]), "'files' is a list"),
    ("a top-level list", lambda m: [m], "a JSON list, not an object"),
    ("an input without dtype", lambda m: m["inputs"][0].pop("dtype") and None,
     "needs a name, dtype"),
    ("config a list", lambda m: m.update(config=[1]), "'config' is a list")])
def test_a_malformed_manifest_is_a_result_with_one_line(cnn_bundle, tmp_path, case, change,
                                                        words):
    """The runtime's own process, as the host runs it: a Result naming the field, not a
    traceback and no Result (the host then had only 'crashed')."""
    root = copy_bundle(cnn_bundle, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    changed = change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest if changed is None else changed))
    proc = subprocess.run([sys.executable, "-m", "device_runtime", "run", str(root), "--runs",
                           "2"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["stage"] == "verify" and words in result["error"], (case, result["error"])
    assert "Traceback" not in proc.stderr, proc.stderr


def test_a_config_of_the_wrong_type_fails_the_load_not_the_verify(cnn_bundle):
    """stage "verify" makes the host drop the bundle and upload it again: a config the backend
    cannot take is the load's failure, and the bundle stays."""
    proc = subprocess.run([sys.executable, "-m", "device_runtime", "run", str(cnn_bundle.path),
                           "--runs", "2", "--config", '{"intra_op_threads": "many"}'],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["stage"] == "load" and "many" in result["error"], result


def test_compare_times_bundles_in_rotating_rounds_in_one_process(cnn_bundle, models, tmp_path):
    """`compare`: each bundle's p50 per round, from one process; a bundle that cannot load is
    named in `errors` and the others are still timed; the SDK's interleave reads it."""
    from edgesmith.devices import Job, get_device
    from edgesmith.measure import interleave

    mlp = prepare(load(models / "digits_mlp.onnx"), None)
    broken = copy_bundle(cnn_bundle, tmp_path)
    (broken / "model.onnx").write_bytes(b"not a model")
    proc = subprocess.run([sys.executable, "-m", "device_runtime", "compare", str(cnn_bundle.path),
                           str(mlp.path), str(broken), "--rounds", "3", "--runs", "5",
                           "--warmup", "1", "--no-eval"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    reply = json.loads(proc.stdout)
    assert proc.returncode == 0 and reply["ok"], proc.stderr
    assert {len(v) for v in reply["p50_ms"].values()} == {3} and len(reply["p50_ms"]) == 2
    assert list(reply["errors"]) == [str(broken)] and "verify" in reply["errors"][str(broken)]
    job = Job(runs=5, warmup=1, evaluate=False)
    spreads = interleave(get_device("local"), {"cnn": (cnn_bundle, job), "mlp": (mlp, job)}, 3)
    assert {s.rounds for s in spreads.values()} == {3} and set(spreads) == {"cnn", "mlp"}
