"""NetAdapt (`edgesmith nas`) and its per-kernel latency table, on real models and devices.

The table is filled by real onnxruntime sessions on the local device and over a real sshd; the
searches fine-tune with real torch distillation on scikit-learn's digits. Speed and accuracy
goals are the benchmark's (`benchmarks/nas.py`); here: the table's keys follow the pruned graph
exactly, it is measured once per device, a search narrows the model and writes what it says,
and an interrupted search continues from its last completed iteration.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import load_json, run_cli, ssh_device
from edgesmith.search.latency_table import BRANCHES_PER_BUNDLE, LatencyTable, kernel_model, kernels_of
from edgesmith.model import load
from edgesmith.passes.fuse import fuse
from edgesmith.passes.prune import PruneConfig, channel_groups, prune_channels

torch = pytest.importorskip("torch", reason="nas fine-tunes with torch (the `train` extra)")


def fused(path):
    model = load(path)
    return fuse(model.proto)[0], model.input_shapes


def _concat_sharing_an_owner():
    """A (16 channels) is added to Concat(B, C) (8 + 8): its first half is one group with B,
    its second half one with C, so both groups have A among their owners."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             (("wa", (16, 3, 3, 3)), ("wb", (8, 3, 3, 3)), ("wc", (8, 3, 3, 3)),
              ("wd", (4, 16, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", w], [o], n, pads=p)
             for n, w, o, p in (("A", "wa", "a", [1] * 4), ("B", "wb", "b", [1] * 4),
                                ("C", "wc", "c", [1] * 4))]
    nodes += [helper.make_node("Concat", ["b", "c"], ["bc"], "cat", axis=1),
              helper.make_node("Add", ["a", "bc"], ["s"], "add"),
              helper.make_node("Conv", ["s", "wd"], ["y"], "D")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3, 8, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {
        "x": [1, 3, 8, 8]}


@pytest.mark.parametrize("name", ["digits_cnn", "digits_mnv2", "digits_resnet", "shared"])
def test_narrowed_kernels_are_the_pruned_models_kernels(models, name):
    """The search predicts a proposal from the current model's kernels narrowed by the group's
    removed channels; that must be exactly the kernels of the model pruning then builds
    (Flatten into a Gemm, depthwise groups, residual unions, groups sharing a producer), and
    no other group may change width."""
    proto, shapes = _concat_sharing_an_owner() if name == "shared" else \
        fused(models / f"{name}.onnx")
    kernels = kernels_of(proto, shapes)
    assert kernels and all(k.macs > 0 for k in kernels)
    groups = [g for g in channel_groups(proto, shapes) if g.key]
    assert groups
    for g in groups:
        width = max(1, g.channels // 2)
        pruned, _ = prune_channels(proto, PruneConfig(
            ratio=0.0, layer_ratios={g.key: 1 - width / g.channels}, round_to=1,
            input_shapes=shapes))
        predicted = Counter(k.narrowed(g.removed(width)).key for k in kernels)
        assert predicted == Counter(k.key for k in kernels_of(pruned, shapes)), g.owners
        after = {h.owners: h.channels for h in channel_groups(pruned, shapes)}
        assert after == {h.owners: width if h.owners == g.owners else h.channels
                         for h in channel_groups(proto, shapes)}


def test_latency_table_is_measured_once_per_device(models, isolated_cache):
    from edgesmith.devices import Job, get_device

    proto, shapes = fused(models / "digits_mnv2.onnx")
    kernels = kernels_of(proto, shapes)
    unique = {k.key for k in kernels}
    table = LatencyTable(get_device("local"), Job(threads=1))
    total = table.predict(kernels)
    assert table.measured == len(unique)
    assert table.round_trips == -(-len(unique) // BRANCHES_PER_BUNDLE)
    assert total > 0 and all(table.get(k) >= 0 for k in kernels)   # whole microseconds
    again = LatencyTable(get_device("local"), Job(threads=1))      # a later search: cached
    assert again.predict(kernels) == total and again.measured == again.round_trips == 0
    other = LatencyTable(get_device("local"), Job(threads=2))     # another context: its own
    assert other.get(kernels[0]) is None


def test_a_device_that_slows_between_round_trips_leaves_the_table_on_one_scale(isolated_cache,
                                                                               monkeypatch):
    """Before: a 2-core VM ran one trip 30 % slower than the last, a narrower layer looked
    slower than the full one and NetAdapt stopped with no iteration. A device slowing 3x on
    demand cannot be produced for real: the real measurements of the second trip are scaled
    (a mock of that fault only), and the anchors re-timed in it bring its entries back."""
    from edgesmith.devices import Job, get_device
    from edgesmith.search.latency_table import Kernel

    full = Kernel("Conv", 1, 64, 64, (16, 16), (16, 16), (3, 3), pads=(1, 1, 1, 1), act="Relu")
    narrow = Kernel("Conv", 1, 64, 16, (16, 16), (16, 16), (3, 3), pads=(1, 1, 1, 1), act="Relu")
    table = LatencyTable(get_device("local"), Job(threads=1))
    real, trips = table._measure, []

    def slower_from_the_second_trip(kernels):
        trips.append([k.key for k in kernels])
        return [ms * (3.0 if len(trips) > 1 else 1.0) for ms in real(kernels)]
    monkeypatch.setattr(table, "_measure", slower_from_the_second_trip)
    table.fill([full])
    table.fill([narrow, full])
    assert trips == [[full.key], [narrow.key, full.key]]    # the known kernel rode along
    assert table.measured == 2 and table.drift and table.drift[0] < 0.5
    assert table.get(narrow) < 0.6 * table.get(full)       # unscaled: about 0.75x


def test_kernel_model_computes_each_kernel(models):
    """Each branch of the table's model is its kernel: same output shape as in the model and
    the fused activation applied (ReLU6 bounds)."""
    proto, shapes = fused(models / "digits_mnv2.onnx")
    kernels = kernels_of(proto, shapes)[:6]
    session = ort.InferenceSession(kernel_model(kernels).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    feed = {i.name: np.random.default_rng(0).standard_normal(i.shape).astype(np.float32)
            for i in session.get_inputs()}
    for k, out in zip(kernels, session.run(None, feed)):
        assert out.shape == (k.batch, k.cout, *k.out_hw)
        if k.act == "Clip(0,6)":
            assert out.min() >= 0 and out.max() <= 6 and out.max() > 0


@pytest.fixture
def small_train(models, tmp_path):
    """400 of the digits CNN's training samples: searches here check behaviour, not accuracy."""
    data = np.load(models / "digits_cnn_train.npz")
    path = tmp_path / "train400.npz"
    np.savez(path, **{k: v[:400] for k, v in data.items()})
    return path


def _iterations(state_file) -> list[dict]:
    """Each iteration as last saved (the stop check re-saves the one it measured again)."""
    rows = [json.loads(line) for line in state_file.read_text().splitlines()]
    last = {r["id"]: r["recipe"]["iteration"] for r in rows if "iteration" in r["recipe"]}
    return list(last.values())


def _lut_rows(cache: Path) -> list[dict]:
    """The latency table's entries in the tuning cache (what searches measured on the device)."""
    rows = [json.loads(line) for line in (cache / "tuning.jsonl").read_text().splitlines()]
    return [r for r in rows if r["context"].startswith("lut")]


def test_nas_narrows_the_model_and_an_interrupted_search_continues(models, tmp_path,
                                                                  small_train, isolated_cache):
    from edgesmith.search.nas import NasConfig, nas

    out = tmp_path / "nas"
    args = dict(steps=14, final_epochs=2, threads=1)

    def interrupt_second(text: str) -> None:
        # after iteration 1 is kept: a second one, or the final stage on a CPU where one
        # iteration already met 0.75x (as on CI's machine)
        if text.startswith(("iteration 2:", "final distillation")):
            raise KeyboardInterrupt         # what Ctrl-C raises; it can come at any point
    with pytest.raises(KeyboardInterrupt):
        nas(models / "digits_cnn.onnx", small_train, out, cfg=NasConfig(latency_ratio=0.75, **args),
            eval_path=models / "digits_cnn_eval.npz", say=interrupt_second)
    first = _iterations(out / ".edgesmith-state" / "candidates.jsonl")
    assert len(first) == 1 and (out / "model.onnx").is_file()      # the best so far is written
    measured_before = _lut_rows(isolated_cache)
    assert measured_before          # the interrupted run's table was measured on the device, kept

    r = run_cli("nas", models / "digits_cnn.onnx", "--train", small_train,
                "--eval", models / "digits_cnn_eval.npz", "--latency-budget", "0.75x", "-o", out,
                "--steps", 14, "--final-epochs", 2, "--threads", 1, "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    report = load_json(tmp_path / "r.json")
    assert report["resumed"] == 1 and report["iterations"][0] == {**first[0], "lut_error":
                                                                 report["iterations"][0][
                                                                     "lut_error"]}
    for it in report["iterations"]:
        assert it["predicted_ms"] > 0 and it["measured_ms"] > 0 and it["width_after"] < \
            it["width_before"]
        assert it["lut_error"] == pytest.approx(it["predicted_ms"] / it["measured_ms"] - 1)
    # the search stopped only when the kept model, measured interleaved with the original,
    # met the budget
    stop = report["iterations"][-1]["checked_ms"]
    assert report["stopped"] is None and stop <= report["target_ms"] * 1.02
    assert all(it["checked_ms"] is None or it["checked_ms"] > report["target_ms"] * 1.02
               for it in report["iterations"][:-1])
    assert report["final"]["test_top1"] > 0.5 and report["uniform"]["measured_ms"] > 0
    assert sum(report["widths_after"].values()) < sum(report["widths_before"].values())
    # the continued search reads the same table; it measures only kernels not yet in it (none
    # where one iteration already met the budget, as on CI's machine)
    assert report["lut"]["context"] == measured_before[0]["context"]
    assert report["lut"]["entries_measured"] == len(_lut_rows(isolated_cache)) - len(measured_before)
    assert "<svg" in (out / "report.html").read_text()
    data = np.load(models / "digits_cnn_eval.npz")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: data["input"][:64]})[0]
    assert got.shape == (64, 10)
    assert np.mean(got.argmax(1) == data["labels"][:64]) == pytest.approx(
        report["final"]["test_top1"], abs=0.15)


def test_flops_driven_netadapt_in_parallel_workers(models, tmp_path, small_train):
    """The MACs proxy needs no table; proposals fine-tune in two worker processes at once."""
    from edgesmith.search.nas import NasConfig, nas

    report = nas(models / "digits_cnn.onnx", small_train, tmp_path / "o",
                 cfg=NasConfig(latency_ratio=0.9, proxy="macs", steps=10, final_epochs=1,
                               max_iterations=1, uniform_baseline=False, workers=2, threads=1))
    assert report.lut == {} and len(report.iterations) == 1
    it = report.iterations[0]
    assert len(it.proposals) >= 2 and all(p["holdout_top1"] is not None for p in it.proposals)
    assert all(p["predicted_ms"] > 0 for p in it.proposals)     # MACs scaled to milliseconds


def test_nas_on_the_corpus_detector(tmp_path):
    """A dynamic-shape detector export (no labels: proposals are judged by output SQNR)."""
    import corpus

    built = corpus.build([("yolo", "ts17")])
    from edgesmith.search.nas import NasConfig, nas

    report = nas(built[("yolo", "ts17")], corpus.data_path("yolo"), tmp_path / "o",
                 cfg=NasConfig(latency_ratio=0.95, steps=2, final_epochs=1, max_iterations=1,
                               uniform_baseline=False, threads=1, round_to=16,
                               min_channels=16))
    assert len(report.iterations) == 1 and report.iterations[0].holdout_sqnr_db is not None
    x = np.load(corpus.data_path("yolo"))["input"][:2]
    before = ort.InferenceSession(str(built[("yolo", "ts17")])).run(None, {"input": x})
    after = ort.InferenceSession(str(tmp_path / "o" / "model.onnx")).run(None, {"input": x})
    assert [a.shape for a in after] == [b.shape for b in before]


def test_nas_measures_over_ssh(models, tmp_path, sshd_server, ssh_home, small_train):
    from edgesmith.search.nas import NasConfig, nas

    dev = ssh_device(sshd_server)
    report = nas(models / "digits_cnn.onnx", small_train, tmp_path / "o",
                 dev, NasConfig(latency_ratio=0.9, steps=5, final_epochs=1, max_iterations=1,
                                uniform_baseline=False, threads=1))
    assert report.device == dev.name and report.lut["round_trips"] >= 1
    assert len(report.iterations) == 1 and report.final["measured_ms"] > 0


@pytest.mark.parametrize("budget, message", [("1.5x", "is between 0x and 1x"),
                                             ("fast", "give a share of the original"),
                                             ("0.6", "give a share of the original")])
def test_nas_refuses_a_bad_budget_in_one_line(models, tmp_path, budget, message):
    r = run_cli("nas", models / "digits_cnn.onnx", "--train", models / "digits_cnn_train.npz",
                "--latency-budget", budget, "-o", tmp_path / "o")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_a_gpu_asked_for_and_missing_is_one_line(models, tmp_path):
    """Training runs on the host's CUDA GPU when torch sees one; this machine has none, so
    asking for it must say so up front (and `auto` trains on the CPU, as every test here)."""
    from edgesmith.passes.distill import host_device

    assert host_device("auto", torch) == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        return          # a GPU host: nothing to refuse (and CI=true forbids a skip)
    r = run_cli("nas", models / "digits_cnn.onnx", "--train", models / "digits_cnn_train.npz",
                "--latency-budget", "0.8x", "--host-device", "cuda", "-o", tmp_path / "o")
    assert r.returncode == 1 and "sees no CUDA GPU" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
