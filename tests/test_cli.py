"""The CLI end to end in a subprocess, as a user runs it; bad inputs give one clear line."""
from __future__ import annotations

import json

import jsonschema
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT, load_json, reshape_model, run_cli

SCHEMA = json.loads((ROOT / "tests" / "schemas" / "result.json").read_text())


def test_profile_end_to_end_with_json(models, tmp_path):
    out = tmp_path / "result.json"
    proc = run_cli("profile", models / "digits_cnn.onnx", "--eval", models / "digits_cnn_eval.npz",
                   "--runs", "30", "--threads", "1", "--json", out)
    assert proc.returncode == 0, proc.stderr
    result = load_json(out)
    jsonschema.validate(result, SCHEMA)
    assert result["latency_ms"]["runs"] >= 30 and len(result["latency_ms"]["samples"]) >= 30
    assert result["accuracy"]["n"] == 359
    assert result["accuracy"]["top1"] > 0.95            # a trained model, real digits
    assert result["accuracy"]["agreement"] == 1.0       # unchanged model vs host reference
    assert result["config"]["intra_op_threads"] == 1
    assert "p50 ms" in proc.stdout and "onnxruntime" in proc.stdout


def test_profile_tflite_model(models, tmp_path):
    out = tmp_path / "result.json"
    proc = run_cli("profile", models / "digits_mlp.tflite", "--eval",
                   models / "digits_mlp_eval.npz", "--runs", "20", "--json", out)
    assert proc.returncode == 0, proc.stderr
    result = load_json(out)
    jsonschema.validate(result, SCHEMA)
    assert result["backend"] == "tflite" and result["accuracy"]["top1"] > 0.95


def test_profile_ops_reports_time_per_op_type(models, tmp_path):
    out = tmp_path / "result.json"
    proc = run_cli("profile", models / "digits_cnn.onnx", "--runs", "10", "--profile-ops",
                   "--json", out)
    assert proc.returncode == 0, proc.stderr
    ops = load_json(out)["op_profile_ms"]
    assert "Conv" in ops and all(ms >= 0 for ms in ops.values())


def test_device_facts_and_targets():
    proc = run_cli("device", "facts")
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts["arch"] and facts["cores"] >= 1 and "numpy" in facts["packages"]
    proc = run_cli("targets")
    assert proc.returncode == 0 and "x86-avx2" in proc.stdout


def _npz(tmp_path, name, **arrays):
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return path


def _bad_inputs(tmp_path, models):
    """(case, argv, expected words in the one-line error)."""
    cnn, ev = models / "digits_cnn.onnx", np.load(models / "digits_cnn_eval.npz")
    x, y = ev["input"], ev["labels"]
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    rand = tmp_path / "random.onnx"
    rand.write_bytes(np.random.default_rng(0).bytes(4096))
    trunc = tmp_path / "truncated.onnx"
    trunc.write_bytes(cnn.read_bytes()[:20000])
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    nan = x.copy()
    nan[3, 0, 2, 2] = np.nan
    dyn = tmp_path / "dynamic.onnx"
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "h"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "h"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), dyn)
    future = tmp_path / "future.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 99)]), future)
    unchecked = tmp_path / "unchecked.onnx"
    bad_graph = helper.make_graph([helper.make_node("Relu", ["nowhere"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    unchecked.write_bytes(helper.make_model(bad_graph).SerializeToString())
    return [
        ("empty file", [empty], "empty"),
        ("random bytes", [rand], "not an ONNX model"),
        ("truncated model", [trunc], "not an ONNX model"),
        ("text file", [text], "not an ONNX model"),
        ("missing model", [tmp_path / "nope.onnx"], "does not exist"),
        ("fails checker", [unchecked], "fails the ONNX checker"),
        ("opset too new", [future], "opset 99"),
        ("dynamic dims", [dyn], "--input-shape x=1x<"),      # a placeholder, never 1x1
        ("bad --input-shape", [cnn, "--input-shape", "image=1x1x8x8"], "model's inputs are"),
        ("wrong input name", [cnn, "--eval", _npz(tmp_path, "name", image=x, labels=y)],
         "not model inputs"),
        ("wrong shape", [cnn, "--eval", _npz(tmp_path, "shape", input=x[:, :, :4], labels=y)],
         "expected Nx1x8x8"),
        ("wrong dtype", [cnn, "--eval", _npz(tmp_path, "dtype", input=x.astype(np.float64))],
         "float64"),
        ("NaN inputs", [cnn, "--eval", _npz(tmp_path, "nan", input=nan)], "NaN"),
        ("pickled npz", [cnn, "--eval", _npz(tmp_path, "pickle",
                                              input=np.array([{"a": 1}], dtype=object))],
         "pickled objects"),
        ("labels of wrong length", [cnn, "--eval", _npz(tmp_path, "labels", input=x,
                                                         labels=y[:7])], "'labels' must be"),
        ("missing eval file", [cnn, "--eval", tmp_path / "none.npz"], "does not exist"),
        ("unknown device", [cnn, "--device", "no-such-host.invalid"], "no-such-host.invalid"),
        ("npz declaring 23 TiB", [cnn, "--eval", _npy_in_zip(tmp_path / "huge.npz", (
            100000, 1, 8, 8000000), b"")], "truncated or corrupt"),
        ("truncated npz array", [cnn, "--eval", _npy_in_zip(tmp_path / "cut.npz", x.shape,
                                                           x.tobytes()[:-1000])],
         f"declares {x.nbytes} bytes and holds {x.nbytes - 1000}"),
        ("a device as the model", ["/dev/zero"], "not a regular file"),
        ("a device as eval data", [cnn, "--eval", "/dev/zero"], "not a regular file"),
        ("negative labels", [cnn, "--eval", _npz(tmp_path, "neg", input=x, labels=-y - 1)],
         "class indices >= 0"),
        ("external data longer than its tensor", [_external(tmp_path, 1 << 20)],
         "takes 64 bytes but its external data declares 1048576"),
        ("threads beyond the cores", [cnn, "--threads", "100000"], "cores; use 1.."),
        ("an input shape of exabytes", [cnn, "--input-shape",
                                        "input=99999999999999999999x1x8x8"], "GB per sample"),
        ("a zero in --input-shape", [cnn, "--input-shape", "input=0x1x8x8"], "bad --input-shape"),
        ("an --input-shape that does not fit", [cnn, "--input-shape", "input=1x3x8x8"],
         "does not fit"),
        ("an .npz with no arrays", [cnn, "--eval", _npz(tmp_path, "nothing")], "lacks ['input']"),
        ("an .npz as the model", [models / "digits_cnn_eval.npz"], "not an ONNX model"),
        ("a model with no graph", [_no_graph(tmp_path)], "no graph or IR version"),
        ("infinity in inputs", [cnn, "--eval", _npz(tmp_path, "inf", input=x + np.inf)],
         "NaN or infinity"),
        ("float labels", [cnn, "--eval", _npz(tmp_path, "flabels", input=x,
                                              labels=y.astype(np.float32))], "'labels' must be"),
        ("labels beyond the classes", [cnn, "--eval", _npz(tmp_path, "l12", input=x,
                                                            labels=y + 12)], "labels go up to"),
        ("no samples", [cnn, "--eval", _npz(tmp_path, "zero", input=x[:0])], "non-zero number"),
        ("a zip that is no .npz", [cnn, "--eval", _text_zip(tmp_path)], "not a readable .npz"),
        ("an unknown const:", [cnn, "--eval", _npz(tmp_path, "const", input=x, **{
            "const:nope": np.zeros(1, np.float32)})], "'const:nope'"),
        *_stream_cases(tmp_path),
    ]


def _no_graph(tmp_path):
    path = tmp_path / "nograph.onnx"
    path.write_bytes(onnx.ModelProto(ir_version=8).SerializeToString())
    return path


def _text_zip(tmp_path):
    import zipfile

    path = tmp_path / "notes.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("notes.txt", "not an array")
    return path


def _stream_cases(tmp_path):
    """A streaming model's data and options (tests/streaming_vad.py)."""
    import streaming_vad as vad

    model = vad.build(tmp_path / "vad.onnx")
    audio, _ = vad.stream(12, seed=3)
    sr = np.array(16000, np.int64)
    npz = lambda name, **a: _npz(tmp_path, name, **a)  # noqa: E731
    return [
        ("a branch selector without data", [model, "--input-shape", "input=1x512"],
         "selects a branch of an If"),
        ("a scalar given per sample", [model, "--eval", npz(
            "sr_each", input=audio, sr=np.full(12, 16000, np.int64))], "as 'const:sr'"),
        ("a const of the wrong shape", [model, "--eval", npz(
            "sr_shape", input=audio, **{"const:sr": sr[None]})], "'const:sr' is 1"),
        ("a const of the wrong dtype", [model, "--eval", npz(
            "sr_dtype", input=audio, **{"const:sr": sr.astype(np.float64)})], "float64"),
        ("a state given per sample", [model, "--eval", npz(
            "state_each", input=audio, state=np.zeros((12, 2, 1, vad.HIDDEN), np.float32),
            **{"const:sr": sr})], "is a state input"),
        ("constants alone", [model, "--eval", npz(
            "consts", **{"const:sr": sr, "const:input": audio[:1]})], "no per-sample input"),
        ("--state naming no output", [model, "--eval", npz("ok", input=audio, **{
            "const:sr": sr}), "--state", "nope=state"], "must be one of the outputs"),
        ("--state of another shape", [model, "--eval", tmp_path / "ok.npz", "--state",
                                      "output=state"], "differ in type or shape"),
        ("--state without =", [model, "--eval", tmp_path / "ok.npz", "--state", "stateN"],
         "bad --state"),
    ]


def _npy_in_zip(path, shape, data: bytes):
    """An .npz whose one array's header declares `shape` (float32) over `data`."""
    import io
    import zipfile

    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False,
                                                "shape": tuple(shape)})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("input.npy", head.getvalue() + data)     # the header writes the magic
    return path


def _external(tmp_path, length: int):
    """A MatMul whose 4x4 weight's external data declares `length` bytes (a sparse file)."""
    from conftest import external_matmul

    folder = tmp_path / "external"
    external_matmul(folder / "m.onnx", np.eye(4, dtype=np.float32), "w.bin", length)
    with open(folder / "w.bin", "wb") as fh:
        fh.truncate(length)                         # sparse: no disk used
    return folder / "m.onnx"


def run_bounded(argv, cwd, timeout: float = 120):
    """`edgesmith ARGV` in `cwd`: (exit code, stderr, its own peak RSS in MB, seconds)."""
    import os
    import subprocess
    import sys
    import tempfile
    import threading
    import time

    with tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "edgesmith", *map(str, argv)],
                                 stdout=subprocess.DEVNULL, stderr=err, cwd=cwd)
        timer = threading.Timer(timeout, child.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)     # this child's rusage alone
        finally:
            timer.cancel()
        child.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return (child.returncode, err.read().decode(errors="replace"), usage.ru_maxrss / 1024,
                time.monotonic() - t0)


def test_bad_inputs_give_one_line_and_nonzero_exit(models, tmp_path):
    """The corpus of malformed models, data and options: each exits 1 with one line naming
    the cause, no traceback, nothing written in the working directory or beside the inputs,
    within bounded time and memory."""
    cases = _bad_inputs(tmp_path, models)
    assert len(cases) >= 40
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cache = tmp_path / "cache"         # the tool's own cache (conftest's EDGESMITH_CACHE)
    files = lambda: sorted(p for p in tmp_path.rglob("*") if cache not in p.parents  # noqa: E731
                           and p != cache)
    before = files()
    for case, argv, words in cases:
        code, err, peak_mb, seconds = run_bounded(["profile", *argv, "--runs", "5"], cwd)
        assert code == 1, (case, err)
        assert "Traceback" not in err, (case, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, err)
        assert words in lines[0], (case, lines[0])
        assert files() == before, (case, "wrote files")
        assert peak_mb < 1500 and seconds < 60, (case, peak_mb, seconds)


def test_usage_errors_exit_2(models):
    proc = run_cli("profile", models / "digits_cnn.onnx", "--runs", "0")
    assert proc.returncode == 2
    # a model given as data: the error names the option it was given to
    proc = run_cli("quantize", models / "digits_cnn.onnx", "--calib", models / "digits_cnn.onnx")
    assert proc.returncode == 2 and "'--calib': digits_cnn.onnx is not an .npz" in proc.stderr


def test_external_data_outside_the_model_folder_is_one_line(tmp_path):
    """Before: an onnx ValidationError traceback for a location like ../../etc/passwd."""
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="../../etc/passwd")
    w.ClearField("raw_data")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (tmp_path / "evil.onnx").write_bytes(model.SerializeToString())
    proc = run_cli("profile", tmp_path / "evil.onnx")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "points outside" in proc.stderr


def add_one_body():
    """A Loop body adding 1 to a 1x4 value each trip."""
    one = numpy_helper.from_array(np.ones((1, 4), np.float32), "one")
    return helper.make_graph(
        [helper.make_node("Add", ["v_in", "one"], ["v_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 4])], [one])


def endless_loop_model(path) -> None:
    """A Loop of 10^15 trips around an Add: a valid model that never returns."""
    body = add_one_body()
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)], "endless",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(10 ** 15, np.int64), "trips"),
         numpy_helper.from_array(np.array(True), "cond")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_host_side_runs_end_at_the_timeout_and_at_ctrl_c(tmp_path):
    """The reference outputs of an endless model are computed on the host: --timeout ends them
    with one line, and Ctrl-C ends them within seconds (a run is one C call that neither a
    signal handler nor a timeout reached before)."""
    import signal
    import subprocess
    import sys
    import time

    endless_loop_model(tmp_path / "endless.onnx")
    np.savez(tmp_path / "eval.npz", x=np.zeros((4, 4), np.float32))
    t0 = time.monotonic()
    proc = run_cli("profile", tmp_path / "endless.onnx", "--eval", tmp_path / "eval.npz",
                   "--timeout", "3", timeout=120)
    assert proc.returncode == 1 and time.monotonic() - t0 < 60, proc.stderr
    assert "took longer than 3s" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    child = subprocess.Popen([sys.executable, "-m", "edgesmith", "profile",
                              str(tmp_path / "endless.onnx"), "--eval", str(tmp_path / "eval.npz")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        time.sleep(8)                   # imports, load and checks done: the endless run is on
        assert child.poll() is None, child.communicate()
        t0 = time.monotonic()
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=30)
        assert time.monotonic() - t0 < 5 and child.returncode == 130, err
        assert "Traceback" not in err, err
    finally:
        child.kill()
        child.communicate()


def data_driven_loop_model(path) -> None:
    """A Loop whose trip count is the input's largest value, then a MatMul to quantize: quick on
    zeros, endless on 1e15 (so only the calibration data makes it endless)."""
    body = add_one_body()
    weight = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["x"], ["top"], keepdims=0),
         helper.make_node("Cast", ["top"], ["trips"], to=TensorProto.INT64),
         helper.make_node("Loop", ["trips", "cond", "x"], ["looped"], body=body),
         helper.make_node("MatMul", ["looped", "w"], ["y"])], "data_driven",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(True), "cond"), numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_ctrl_c_reaches_onnxruntimes_own_calibration_runs(tmp_path):
    """onnxruntime's quantizer runs calibration in a session of its own; Ctrl-C during a
    calibration run that never ends stops `quantize` within seconds, with no traceback and
    nothing written (before, the run was one C call that the signal waited for)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data_driven_loop_model(tmp_path / "m.onnx")
    np.savez(tmp_path / "eval.npz", x=np.zeros((4, 4), np.float32))
    np.savez(tmp_path / "calib.npz", x=np.full((4, 4), 1e15, np.float32))
    out = tmp_path / "m_int8.onnx"
    temp = tmp_path / "temp"      # where onnxruntime writes the model it calibrates with
    temp.mkdir()
    child = subprocess.Popen([sys.executable, "-m", "edgesmith", "quantize", str(tmp_path / "m.onnx"),
                              "--calib", str(tmp_path / "calib.npz"), "--eval",
                              str(tmp_path / "eval.npz"), "-o", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "TMPDIR": str(temp)})
    try:
        deadline = time.monotonic() + 120      # imports, the fp32 measurement, then calibration
        while (time.monotonic() < deadline and child.poll() is None
               and not any(temp.rglob("augmented_model.onnx"))):
            time.sleep(0.5)
        assert child.poll() is None and any(temp.rglob("augmented_model.onnx")), \
            child.communicate() if child.poll() is not None else "calibration never started"
        time.sleep(2)
        t0 = time.monotonic()
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
        assert time.monotonic() - t0 < 5 and child.returncode == 130, err
        assert "Traceback" not in err and not out.exists(), err
    finally:
        child.kill()
        child.communicate()


def test_a_model_output_never_replaces_an_unrelated_file_or_a_link(models, tmp_path):
    """fuse -o onto a text file, a symlink (dangling too) or a name without .onnx is refused
    (exit 2, naming -o) and nothing is written; onto its own earlier output it is replaced."""
    cnn = models / "digits_cnn.onnx"
    notes = tmp_path / "notes.onnx"
    notes.write_text("my notes")
    link, dangling = tmp_path / "link.onnx", tmp_path / "dangling.onnx"
    link.symlink_to(notes)
    dangling.symlink_to(tmp_path / "nowhere.onnx")
    for out, words in ((notes, "is not an ONNX model"), (link, "symbolic link"),
                       (dangling, "symbolic link"), (tmp_path / "rec_q", "does not end in .onnx")):
        proc = run_cli("fuse", cnn, "-o", out)
        assert proc.returncode == 2 and words in proc.stderr and "'-o'" in proc.stderr, \
            (out, proc.stderr)
    assert notes.read_text() == "my notes" and link.is_symlink() and dangling.is_symlink()
    assert not (tmp_path / "rec_q").exists() and not (tmp_path / "nowhere.onnx").exists()
    mine = tmp_path / "fused.onnx"
    for _ in range(2):                      # a re-run replaces its own output
        assert run_cli("fuse", cnn, "-o", mine).returncode == 0
    assert onnx.load(str(mine)).graph.node


def test_a_failed_profile_ops_run_leaves_no_profile_behind(tmp_path):
    """onnxruntime writes its profile into the working directory unless told otherwise; a run
    that fails before the profile is read must not leave it there (nor in a temp folder)."""
    import glob

    reshape_model(tmp_path / "bad.onnx", (3, 3))      # 4 values into 3x3: fails at run time
    before = set(glob.glob("/tmp/edgesmith-profile-*"))
    proc = run_cli("profile", tmp_path / "bad.onnx", "--profile-ops", cwd=tmp_path)
    assert proc.returncode == 1 and "the model failed on this input" in proc.stderr, proc.stderr
    assert not list(tmp_path.rglob("*profile*"))       # (tmp_path/cache: the test's cache)
    assert set(glob.glob("/tmp/edgesmith-profile-*")) <= before


def test_commands_refuse_what_they_cannot_use_in_one_line(models, tmp_path):
    """A .tflite given to an ONNX pass, a model with nothing to prune, a ratio list that is not
    numbers: one line naming the cause (they were tracebacks, or a no-op written with exit 0)."""
    matmul_free = reshape_model(tmp_path / "reshape.onnx", (2, 2))
    for argv, code, words in (
            (["fuse", models / "digits_mlp.tflite", "-o", tmp_path / "f.onnx"], 1,
             "is a TFLite model; fuse works on ONNX models"),
            (["prune", matmul_free, "--ratio", "0.5", "-o", tmp_path / "p.onnx"], 1,
             "no Conv, Gemm or MatMul weights to prune"),
            (["optimize", models / "digits_cnn.onnx", "-o", tmp_path / "o", "--nas-ratios",
              "abc"], 2, "Invalid value for --nas-ratios: 'abc' is not a comma-separated")):
        proc = run_cli(*argv)
        assert proc.returncode == code and words in proc.stderr, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "f.onnx").exists() and not (tmp_path / "p.onnx").exists()
