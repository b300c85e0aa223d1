"""A streaming model with state and a scalar input (tests/streaming_vad.py, Silero-VAD class)
through profile, quantize and optimize: each chunk one call, the state output fed to the next
call's state input, the sample rate given once as `const:sr`, the sequence judged whole."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import streaming_vad as vad
from conftest import load_json, run_cli

CHUNKS = 120


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vad")
    vad.build(folder / "vad.onnx")
    vad.save_data(folder / "calib.npz", 160, seed=1)
    vad.save_data(folder / "heldout.npz", CHUNKS, seed=2)
    return folder


def carried(path, audio, carry: bool = True) -> np.ndarray:
    """Speech probabilities of plain onnxruntime over `audio`, the state carried or reset."""
    return vad.run(path, audio, carry=carry)[0]


def test_a_stream_is_judged_over_the_whole_sequence_with_its_state_carried(stream):
    from edgesmith import bundle as bundles
    from edgesmith.data import load_eval_set, reference_outputs
    from edgesmith.devices import Job, get_device
    from edgesmith.measure import measure
    from edgesmith.model import load

    model = load(stream / "vad.onnx", data=stream / "heldout.npz")
    assert model.state == {"stateN": "state"}            # paired by name, type and shape
    # the LSTM's MACs count (before: 0, its sequence output unasked for), so dynamic int8
    # (which covers LSTMs) is weighed against the whole model
    assert model.facts.macs_by_op["LSTM"] == 8 * 4 * vad.HIDDEN * (vad.FEATURES + vad.HIDDEN)
    assert model.input_shapes == {"input": [1, vad.CHUNK], "state": [2, 1, vad.HIDDEN],
                                  "sr": []}               # the state's batch on axis 1, a scalar
    data = load_eval_set(stream / "heldout.npz", model)
    assert data.n == CHUNKS and int(data.consts["sr"]) == 16000
    refs = reference_outputs(model, data, 1)["output"].reshape(-1)
    audio = data.inputs["input"]
    assert np.allclose(refs, carried(stream / "vad.onnx", audio), atol=1e-6)
    # the state matters: reset every call, the probabilities move by up to tenths
    reset = carried(stream / "vad.onnx", audio, carry=False)
    assert np.abs(reset - refs).max() > 0.1
    # the device carries the state too: judged against carried references it is exact, against
    # references computed with the state reset each call it is not
    device = get_device("local")
    job = Job(runs=10, warmup=2, min_time_s=0.0)
    data.refs = reference_outputs(model, data, 1)
    result = measure(device, bundles.build(model, eval_data=data), job)
    assert result.ok, result.error
    assert result.accuracy["n"] == CHUNKS and result.accuracy["agreement"] == 1.0
    assert result.accuracy["sqnr_db"] >= 100
    data.refs = {"output": reset.reshape(-1, 1, 1), "stateN": data.refs["stateN"]}
    result = measure(device, bundles.build(model, eval_data=data), job)
    assert result.ok and result.accuracy["sqnr_db"] < 35, result.accuracy


def test_a_streams_data_errors_name_the_fix(stream, tmp_path):
    model = stream / "vad.onnx"
    audio, _ = vad.stream(20, seed=3)
    cases = [
        # before: random values sent the If down one branch, a runtime traceback as "one line"
        ([], "'sr' of vad.onnx selects a branch of an If"),
        # before: "'sr' has shape [24], expected N"
        ([("bad1", {"input": audio, "sr": np.full(20, 16000, np.int64)})],
         "give its one value as 'const:sr'"),
        ([("bad2", {"input": audio, "const:sr": np.array([16000], np.int64)})],
         "'const:sr' is 1, the model's input is a scalar"),
        # before: "samples are 2x1x128, the model's input is 2x?x128" (these match)
        ([("bad3", {"input": audio, "const:sr": np.array(16000, np.int64),
                    "state": np.zeros((20, 2, 1, vad.HIDDEN), np.float32)})],
         "'state' is a state input"),
        ([("bad4", {"input": audio})], "lacks ['sr']"),
    ]
    for data, words in cases:
        args = ["--input-shape", f"input=1x{vad.CHUNK}"]
        for name, arrays in data:
            np.savez(tmp_path / f"{name}.npz", **arrays)
            args = ["--eval", tmp_path / f"{name}.npz"]
        r = run_cli("profile", model, *args, "--runs", 5)
        assert r.returncode in (1, 2) and words in r.stderr, (words, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_state_pairs_the_names_do_not_tell_are_given_with_state(stream, tmp_path):
    """A state whose names pair by no convention (`mem` -> `mem_after`) is named with --state;
    without it the data lacks the input, and the error suggests the pair; `--state none` carries nothing; a bad pair is refused
    naming the model's outputs and inputs."""
    import onnx

    proto = onnx.load(str(stream / "vad.onnx"))
    rename = {"state": "mem", "stateN": "mem_after"}
    for node in proto.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    for value in [*proto.graph.input, *proto.graph.output]:
        value.name = rename.get(value.name, value.name)
    onnx.save(proto, str(tmp_path / "mem.onnx"))
    held = stream / "heldout.npz"
    r = run_cli("profile", tmp_path / "mem.onnx", "--eval", held, "--runs", 5)
    assert r.returncode == 1 and "pass --state mem_after=mem" in r.stderr, r.stderr
    r = run_cli("profile", tmp_path / "mem.onnx", "--eval", held, "--runs", 5,
                "--state", "mem_after=mem", "--json", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    assert load_json(tmp_path / "p.json")["accuracy"]["n"] == CHUNKS
    r = run_cli("profile", stream / "vad.onnx", "--eval", held, "--state", "none")
    assert r.returncode == 1 and "no array named 'state'" in r.stderr, r.stderr
    r = run_cli("profile", stream / "vad.onnx", "--eval", held, "--state", "output=state")
    assert r.returncode == 1 and "differ in type or shape" in r.stderr, r.stderr
    r = run_cli("quantize", stream / "vad.onnx", "--calib", held, "--state", "nope=state",
                "-o", tmp_path / "q.onnx")
    assert r.returncode == 1 and "'nope' must be one of the outputs" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "q.onnx").exists()


def test_quantize_and_optimize_a_stream(stream, tmp_path):
    from edgesmith.model import load
    from edgesmith.passes.quantize import quantize_dynamic

    model, calib, held = (stream / n for n in ("vad.onnx", "calib.npz", "heldout.npz"))
    # onnxruntime has an int8 LSTM kernel: dynamic int8 covers the recurrent weights
    q, _ = quantize_dynamic(load(model, data=held).proto)
    assert "DynamicQuantizeLSTM" in {n.op_type for n in q.graph.node}
    r = run_cli("quantize", model, "--calib", calib, "--eval", held, "-o", tmp_path / "q.onnx",
                "--json", tmp_path / "q.json")
    assert r.returncode == 0, r.stderr
    report = load_json(tmp_path / "q.json")
    assert any(f"judged over {CHUNKS} consecutive calls with the state carried" in n
               for n in report["notes"]), report["notes"]
    measured = [report["baseline"]] + [c for c in report["candidates"] if c.get("accuracy")]
    assert {"fp32", "dynamic-int8", "qdq-u8s8"} <= {c["id"] for c in measured}
    for c in measured:        # each judged on the whole held-out stream, by its decisions
        assert c["accuracy"]["n"] == CHUNKS and "agreement" in c["accuracy"], c
    chosen = carried(tmp_path / "q.onnx", vad.stream(CHUNKS, seed=2)[0])
    fp32 = carried(model, vad.stream(CHUNKS, seed=2)[0])
    assert np.mean((chosen > 0.5) == (fp32 > 0.5)) >= 0.99
    # without a separate judging set, the stream's tail judges (cut in order)
    r = run_cli("quantize", model, "--calib", calib, "-o", tmp_path / "q2.onnx",
                "--json", tmp_path / "q2.json")
    assert r.returncode == 0, r.stderr
    assert any("judged on the last 40 calls of calib.npz" in n
               for n in load_json(tmp_path / "q2.json")["notes"])
    r = run_cli("optimize", model, "--calib", calib, "--eval", held, "-o", tmp_path / "out",
                "--budget", "40s", timeout=400)
    assert r.returncode == 0, r.stderr
    result = load_json(tmp_path / "out" / "report.json")
    # TFLite (a default backend) says why it has no candidate (before: a KeyError on 'state')
    from edgesmith.convert.tflite import available

    skip = next(s for s in result["skipped"] if s["id"] == "tflite:*")
    litert = any(importlib.util.find_spec(m) for m in ("ai_edge_litert", "tflite_runtime"))
    if available() is None and litert:
        assert "streams" in skip["reason"], skip
    assert (tmp_path / "out" / "model.onnx").is_file() and result["chosen"]
    judged = [c for c in result["candidates"] if c.get("accuracy")]
    assert {"original (as given)", "int8:dynamic-int8"} <= {c["id"] for c in judged}
    assert all(c["accuracy"]["n"] == CHUNKS for c in judged), judged


def test_fuse_tune_and_prune_a_stream(stream, tmp_path):
    """The rest of the corpus matrix's commands: fuse keeps the stream's outputs, tune times
    and judges it on its data (--eval; random values would pick the If's other branch), prune
    says in one line why it cannot narrow an LSTM."""
    model, calib, held = (stream / n for n in ("vad.onnx", "calib.npz", "heldout.npz"))
    r = run_cli("fuse", model, "-o", tmp_path / "fused.onnx")
    assert r.returncode == 0, r.stderr
    audio = vad.stream(40, seed=5)[0]
    assert np.allclose(carried(tmp_path / "fused.onnx", audio), carried(model, audio), atol=1e-5)
    r = run_cli("tune", model, "--eval", held, "--max-trials", 3, "--budget", "30s",
                "--json", tmp_path / "tune.json")
    assert r.returncode == 0, r.stderr
    tuned = load_json(tmp_path / "tune.json")
    assert all(t["error"] is None for t in tuned["trials"]), tuned["trials"]
    assert tuned["default"]["accuracy"]["n"] == CHUNKS       # judged on the whole stream
    r = run_cli("tune", model, "--input-shape", f"input=1x{vad.CHUNK}")
    assert r.returncode == 1 and "selects a branch of an If" in r.stderr, r.stderr
    r = run_cli("prune", model, "--ratio", "0.3", "--calib", calib, "-o", tmp_path / "p.onnx")
    assert r.returncode == 1 and "unsupported op LSTM" in r.stdout + r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "p.onnx").exists()


def test_state_pairs_come_from_state_names_only():
    """Exporters' state names pair (Silero's state/stateN, an RNN's h0/hn and h/hn, caches);
    an image-to-image model's x_in/x_out of one shape is no stream and stays unpaired."""
    from onnx import TensorProto, helper

    from edgesmith.model import state_pairs

    def model(pairs):
        nodes = [helper.make_node("Identity", [i], [o]) for i, o in pairs]
        info = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4])  # noqa: E731
        return helper.make_model(helper.make_graph(
            nodes, "g", [info(i) for i, _ in pairs], [info(o) for _, o in pairs]))

    for pairs, paired in [([("state", "stateN")], True), ([("h0", "hn"), ("c0", "cn")], True),
                          ([("h", "hn"), ("c", "cn")], True), ([("cache", "new_cache")], True),
                          ([("state_in", "state_out")], True), ([("x_in", "x_out")], False),
                          ([("input", "inputn")], False), ([("image", "image_out")], False)]:
        assert state_pairs(model(pairs)) == ({o: i for i, o in pairs} if paired else {}), pairs


def test_one_score_outputs_are_judged_by_their_decision():
    """A binary classifier's single score (a VAD's probability, a logit): before, its arg-max
    over one column always agreed, so any int8 model passed the agreement rule."""
    from device_runtime.evaluate import EvalData, metrics

    refs = np.array([[0.9], [0.2], [0.7], [0.1]], np.float32)
    data = EvalData({}, None, {"p": refs}, 4)
    got = metrics({"p": np.array([[0.4], [0.3], [0.8], [0.05]], np.float32)}, data)
    assert got["agreement"] == 0.75
    logits = EvalData({}, None, {"z": refs * 8 - 4}, 4)
    assert metrics({"z": -(refs * 8 - 4)}, logits)["agreement"] == 0.0
    # labels 0/1 against one score: its decision (before: "labels go up to 1 but output 'p'
    # has 1 class score(s)")
    labelled = EvalData({}, np.array([1, 0, 0, 0]), {}, 4)
    assert metrics({"p": refs}, labelled)["top1"] == 0.75


def test_an_if_on_the_inputs_shape_alone_needs_no_data(tmp_path):
    """A dynamic-axes export's `if x.shape[1] > 4` depends on the shape, not the values:
    random values run the same branch, so no data is asked for."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgesmith.model import branch_inputs, load

    one = lambda n, v: numpy_helper.from_array(np.array(v, np.int64), n)  # noqa: E731
    branch = lambda n, op: helper.make_graph(  # noqa: E731
        [helper.make_node(op, ["x"], [f"y_{n}"])], n, [],
        [helper.make_tensor_value_info(f"y_{n}", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["shape"]),
         helper.make_node("Gather", ["shape", "i1"], ["width"]),
         helper.make_node("Greater", ["width", "four"], ["wide"]),
         helper.make_node("If", ["wide"], ["y"], then_branch=branch("a", "Relu"),
                          else_branch=branch("b", "Neg"))], "shape_if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [one("i1", 1), one("four", 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert branch_inputs(model) == set()
    onnx.save(model, str(tmp_path / "shape_if.onnx"))
    assert load(tmp_path / "shape_if.onnx").inputs[0].shape == [1, 8]
