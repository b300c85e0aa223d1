"""`edgesmith optimize` end to end on the bundled digits example, local and over the test sshd."""
from __future__ import annotations

import html
import importlib.util
import json
import statistics
import sys
import time

import jsonschema
import numpy as np
import pytest

import device_runtime
from conftest import ROOT, require, run_cli
from rendered import check_plot, plot_boxes
from edgesmith.measure import ms_digits
from edgesmith.model import load as load_model
from edgesmith.pipeline import OptimizeConfig, optimize

SCHEMA = json.loads((ROOT / "tests" / "schemas" / "report.json").read_text())
QUICK = ["--tune-budget", "5s"]
ORT = ("onnxruntime",)      # tests of other things skip the TFLite conversions (test_tflite.py)


def written_model(out):
    """OUT/model.onnx or OUT/model.tflite (whichever runtime won): exactly one."""
    found = sorted(out.glob("model.*"))
    assert [p.suffix for p in found] in ([".onnx"], [".tflite"]), found
    return found[0]


def check_outputs(out, report):
    jsonschema.validate(report, SCHEMA)
    assert written_model(out) and (out / "report.html").is_file()
    session = device_runtime.load(out / "bundle")
    batch = session.inputs["input"]["dims"][0] or 3     # a .tflite is converted at batch 1
    x = np.load(ROOT / "examples/models/digits_cnn_eval.npz")["input"][:batch]
    assert session.run({"input": x})["logits"].shape == (batch, 10)
    html = (out / "report.html").read_text()
    assert '<svg id="scatter"' in html and 'class="point"' in html


def test_optimize_digits_locally_meets_the_budget(models, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("optimize", models / "digits_cnn.onnx", "--eval",
                   models / "digits_cnn_eval.npz", "-o", out, *QUICK, "--backends", "onnxruntime")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    check_outputs(out, report)
    chosen = next(c for c in report["candidates"] if c["id"] == report["chosen"])
    assert chosen["accuracy_drop"] <= 0.01 and chosen["within_budget"]
    # the figures name the set they were judged on and its size (eval only: its held-out part)
    held = next(c for c in report["candidates"] if c["id"] == "fp32")["accuracy"]["n"]
    assert report["judged_on"] == f"{held} samples of digits_cnn_eval.npz, held out from " \
        "calibration", report["judged_on"]
    assert f"accuracy judged on {held} samples" in proc.stdout
    confirmed = [c for c in report["candidates"] if c["confirm"] and c["within_budget"]]
    if len(confirmed) > 1:     # the fastest on interleaved re-measurement, or tied with it
        from edgesmith.measure import Candidate
        from edgesmith.search.select import tie_break

        fastest = min(confirmed, key=lambda c: c["confirm"]["median_ms"])
        tied = chosen["confirm"]["low_ms"] <= fastest["confirm"]["high_ms"] and \
            fastest["confirm"]["low_ms"] <= chosen["confirm"]["high_ms"]
        assert chosen is fastest or (tied and tie_break(Candidate(**chosen)) <= tie_break(
            Candidate(**fastest))), (chosen, fastest)
    # every measured recipe is a row, every recipe not tried says why
    measured = {c["id"] for c in report["candidates"]}
    assert "fp32" in measured and any(i.startswith("int8:") for i in measured)
    assert report["skipped"] and all(s["reason"] for s in report["skipped"])
    for row in report["skipped"] + [{"id": i} for i in measured]:
        assert row["id"] in proc.stdout           # the table shows them all
    for skip in report["skipped"]:               # reasons below the table, one line each
        assert f"  {skip['id']}: not tried: {skip['reason']}" in proc.stdout.splitlines()
    # one speedup figure: the summary's is the re-measurement's, with its spread, split into
    # the model's gain (at the runtime defaults) and the runtime config's, from the same rounds
    rem = report["remeasure"]
    assert abs(rem["model_gain"] * rem["config_gain"] - rem["speedup"]) < 1e-9
    assert (f"the model {rem['model_gain']:.2f}x" in report["summary"]) != rem["within_noise"]
    # each gain is the median of the rounds' paired ratios (a device drifting between rounds
    # cancels out); more rounds where the model's gain was not pinned to +-5 %
    m = rem.get("model_at_defaults", rem["chosen"])
    ratios = [o / x for o, x in zip(rem["original"]["p50s"], m["p50s"])]
    assert len(ratios) == rem["original"]["rounds"] == m["rounds"] >= 3
    assert abs(rem["model_gain"] - statistics.median(ratios)) < 1e-9
    assert rem["model_gain_range"] == [min(ratios), max(ratios)]
    assert rem["original"]["rounds"] <= 9
    speed = f"{rem['speedup']:.2f}x"
    assert (speed in report["summary"]) != rem["within_noise"]
    if rem["within_noise"]:
        assert "within noise" in report["summary"] and "within noise" in proc.stdout
    d = ms_digits(rem["chosen"]["low_ms"], rem["original"]["low_ms"])
    assert f"{rem['chosen']['low_ms']:.{d}f}-{rem['chosen']['high_ms']:.{d}f}" in report["summary"]
    # the config search on the chosen model is in both reports: what each variant measured,
    # and edgesmith's kernels, which this CNN has no block for, as not tried with the reason
    tuning = report["tuning"]
    assert tuning["kept"] in [t["variant"] for t in tuning["trials"]]
    kernels = [n for n in tuning["not_tried"] if n["variant"].startswith("edgesmith_kernels=")]
    assert kernels and all(n["reason"] for n in kernels)
    page = (out / "report.html").read_text()
    assert all(f"not tried: {html.escape(n['reason'])}" in page for n in kernels)
    assert f"tuning: {tuning['verdict']}" in proc.stderr
    chosen_row = next(line for line in proc.stdout.splitlines() if "chosen" in line
                      and report["chosen"] in line)   # the table shows what ships
    assert f"{rem['chosen']['median_ms']:.3f}" in chosen_row and speed in chosen_row


def test_optimize_with_pruning_distillation_and_netadapt(models, tmp_path):
    pytest.importorskip("torch")
    report = optimize(models / "digits_cnn.onnx", tmp_path / "out",
                      eval_path=models / "digits_cnn_eval.npz",
                      train=models / "digits_cnn_train.npz",
                      cfg=OptimizeConfig(prune_ratios=(0.5,), nas_ratios=(0.8,), distill_epochs=8,
                                         tune_budget_s=0, backends=ORT))
    ids = {c.id for c in report.candidates}
    assert {"prune50+distill", "nas80+distill"} <= ids, report.notes
    pruned = next(c for c in report.candidates if c.id == "prune50+distill")
    fp32 = next(c for c in report.candidates if c.id == "fp32")
    assert pruned.macs < 0.3 * fp32.macs and pruned.accuracy_drop <= 0.02
    searched = next(c for c in report.candidates if c.id == "nas80+distill")
    assert searched.macs < fp32.macs and searched.recipe["nas"]["iterations"] >= 1
    assert searched.accuracy_drop <= 0.05


def test_interrupted_optimize_resumes(models, tmp_path):
    out = tmp_path / "out"
    cfg = OptimizeConfig(tune_budget_s=0, backends=ORT)

    def interrupt_in_the_int8_search(text):
        if text.startswith("measuring qdq"):     # fp32 is measured, the int8 search starts
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        optimize(models / "digits_cnn.onnx", out, eval_path=models / "digits_cnn_eval.npz",
                 cfg=cfg, say=interrupt_in_the_int8_search)
    assert written_model(out)                     # the best so far was already written
    seen = []
    report = optimize(models / "digits_cnn.onnx", out, eval_path=models / "digits_cnn_eval.npz",
                      cfg=cfg, say=seen.append)
    assert report.resumed == 2 and not any(s.startswith(("measuring fp32 ", "measuring original"))
                                           for s in seen)    # fp32 and the model as given
    assert any(s.startswith("measuring qdq") for s in seen)    # it went on where it stopped


def test_another_model_in_the_same_output_starts_afresh(models, tmp_path):
    """Before: the CNN's run resumed the MLP's results and shipped the MLP as the answer."""
    out = tmp_path / "out"
    cfg = OptimizeConfig(tune_budget_s=0, backends=ORT)
    optimize(models / "digits_mlp.onnx", out, eval_path=models / "digits_mlp_eval.npz", cfg=cfg)
    report = optimize(models / "digits_cnn.onnx", out, eval_path=models / "digits_cnn_eval.npz",
                      cfg=cfg)
    assert report.resumed == 0 and any("started afresh" in n for n in report.notes)
    [aside] = out.glob("previous-*")                      # the MLP's result, kept
    assert any(f"its result moved to {aside}" in n for n in report.notes), report.notes
    assert "digits_mlp" in (aside / "report.json").read_text()
    written = load_model(written_model(out))              # the CNN's answer, not the MLP's
    assert written.inputs[0].shape == [1, 1, 8, 8]
    check_outputs(out, json.loads((out / "report.json").read_text()))
    written = (out / "report.json").read_bytes()
    again = optimize(models / "digits_cnn.onnx", out, eval_path=models / "digits_cnn_eval.npz",
                     cfg=cfg)      # the same job, finished: answered, nothing re-measured
    assert again.already_finished and again.chosen == report.chosen
    assert (out / "report.json").read_bytes() == written


def test_a_finished_result_answers_only_while_its_report_is_as_written(tmp_path):
    """The state's finished mark holds the report's hash: an edited (or missing) report.json
    makes the job resume and write it again instead of answering with it."""
    from edgesmith.run.state import State

    key = {"model": "m", "config": {"budget_s": 60}}
    state = State(tmp_path, key)
    (tmp_path / "report.json").write_text('{"chosen": "fp32"}')
    assert state.finished() is None                     # not finished yet
    state.finish()
    assert State(tmp_path, key).finished() == b'{"chosen": "fp32"}'
    (tmp_path / "report.json").write_text('{"chosen": "int8"}')
    assert State(tmp_path, key).finished() is None
    state.finish()
    assert State(tmp_path, {**key, "model": "other"}).finished() is None    # another job


def test_calib_without_eval_judges_on_held_out_samples_and_can_choose_int8(models, tmp_path):
    """Before: with --calib only, fp32 had no accuracy, every drop was None, fp32 always won."""
    report = optimize(models / "digits_cnn.onnx", tmp_path / "out",
                      calib=models / "digits_cnn_eval.npz",
                      cfg=OptimizeConfig(tune_budget_s=0, backends=ORT))
    int8 = [c for c in report.candidates if c.id.startswith("int8:") and c.ok]
    assert int8 and all(c.accuracy_drop is not None for c in int8)
    assert all(c.accuracy["n"] < 359 for c in int8)        # judged on the held-out part only
    assert any("held out" in n for n in report.notes)
    assert any(c.within_budget for c in int8)


def test_optimize_refuses_a_directory_it_did_not_write(models, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    proc = run_cli("optimize", models / "digits_cnn.onnx", "-o", mine, "--tune-budget", "0")
    assert proc.returncode == 1 and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_impossible_budget_saves_tradeoffs(models, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("optimize", models / "digits_cnn.onnx", "--eval",
                   models / "digits_cnn_eval.npz", "-o", out, "--latency-budget-ms", "0.000001",
                   "--tune-budget", "0", "--backends", "onnxruntime")
    assert proc.returncode == 1
    assert "no candidate met the budget" in proc.stdout
    assert "Traceback" not in proc.stderr
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["chosen"] is None and written_model(out)
    assert list((out / "tradeoffs").glob("*.*"))


def test_report_renders_in_a_headless_browser(models, tmp_path):
    """report.html as Chromium lays it out: the chosen point where the table says, readable
    ticks, the Pareto front, no label on a label, a point or an axis (tests/rendered.py)."""
    out = tmp_path / "out"
    optimize(models / "digits_cnn.onnx", out, eval_path=models / "digits_cnn_eval.npz",
             cfg=OptimizeConfig(tune_budget_s=0, backends=ORT))
    report = json.loads((out / "report.json").read_text())
    check_plot(plot_boxes(out / "report.html", tmp_path), report)


@pytest.mark.ssh
def test_optimize_over_ssh(ssh_home, sshd_server, models, tmp_path):
    from edgesmith.devices.ssh import SSHDevice
    dev = SSHDevice.from_destination(sshd_server.destination, python=sys.executable,
                                     identity=str(sshd_server.client_key))
    report = optimize(models / "digits_cnn.onnx", tmp_path / "out", dev,
                      eval_path=models / "digits_cnn_eval.npz",
                      cfg=OptimizeConfig(tune_budget_s=3))
    assert report.outcome == "met" and report.device == sshd_server.destination
    assert all(c.ok for c in report.candidates)
    check_outputs(tmp_path / "out", json.loads((tmp_path / "out" / "report.json").read_text()))


def test_force_writes_only_edgesmith_names_into_a_users_directory(models, tmp_path):
    """Before: --force deleted the user's own .state/ and failed at the very end on their
    bundle/ folder, after the whole search."""
    mine = tmp_path / "mine"
    (mine / ".state").mkdir(parents=True)
    (mine / "bundle").mkdir()
    (mine / ".state" / "important.txt").write_text("keep")
    (mine / "bundle" / "mine.txt").write_text("keep")
    (mine / "model.tflite").write_text("keep")      # the user's own, not an earlier answer
    proc = run_cli("optimize", models / "digits_cnn.onnx", "--eval",
                   models / "digits_cnn_eval.npz", "-o", mine, "--tune-budget", "0", "--force",
                   "--backends", "onnxruntime")
    assert proc.returncode == 0, proc.stderr
    assert (mine / ".state" / "important.txt").read_text() == "keep"
    assert (mine / "bundle" / "mine.txt").read_text() == "keep"
    assert (mine / "model.tflite").read_text() == "keep" and (mine / "model.onnx").is_file()
    device_runtime.load(mine / "bundle")          # the bundle's files were replaced by name


def test_state_that_is_not_ours_is_never_trusted_or_crashes(tmp_path):
    from edgesmith.errors import EdgesmithError
    from edgesmith.run.state import STATE_DIR, State, source_digest

    out = tmp_path / "out"
    out.mkdir()
    (out / STATE_DIR).write_text("a file")
    with pytest.raises(EdgesmithError, match="is a file"):
        State(out, {"model": "a"})
    (out / STATE_DIR).unlink()
    state = State(out, {"model": "a"})
    state.path.write_text('{"id": ["x"]}\n{"id": "torn", "p50')      # foreign + torn lines
    (state.dir / "keep.txt").write_text("user file")
    again = State(out, {"model": "a"})
    assert again.done == {}
    from edgesmith.measure import Candidate
    again.save(Candidate(id="fp32", p50_ms=1.0), None)     # appended after the torn line
    assert "fp32" in State(out, {"model": "a"}).done
    State(out, {"model": "b"})                              # another job: ours reset only
    assert (state.dir / "keep.txt").read_text() == "user file"
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes(b"\x89PNG" + bytes(100))
    before = source_digest(images)
    (images / "a.png").write_bytes(b"\x89PNG" + bytes([1]) * 100)   # same size, new pixels
    assert source_digest(images) != before


def test_speedup_ranges_print_with_digits_enough_to_tell_them_apart():
    """0.01784 and 0.01841 ms both printed as 0.018 made a measured speedup read as noise."""
    d = ms_digits(0.01784, 0.01841)
    assert f"{0.01784:.{d}f}" != f"{0.01841:.{d}f}"
    assert ms_digits(5.92, 6.31) == 3 and ms_digits(None, 0.145) == 3


def test_a_gain_is_the_median_of_paired_rounds_and_pinned_only_when_they_agree():
    """A device that runs at another speed in each round moves both trials of the round: the
    paired ratios say 2.0, the ratio of the medians (from different rounds) 1.875."""
    from edgesmith.measure import Spread, paired_ratios, pinned

    original, chosen = Spread.of([2.0, 4.0, 3.0]), Spread.of([1.0, 2.0, 1.6])
    assert statistics.median(paired_ratios(original, chosen)) == 2.0
    assert original.median_ms / chosen.median_ms == pytest.approx(1.875)
    assert pinned([2.0, 2.0, 2.0]) and pinned([2.0, 2.05, 1.95, 2.5, 1.5, 2.0, 2.02])
    assert not pinned([1.6, 2.0, 2.4]) and not pinned([2.0, 2.0])     # two rounds pin nothing
    assert not pinned([1.8, 1.81, 2.0, 2.0, 2.0])    # a middle half lopsided beyond -5 %
    both = original.then(Spread.of([2.1], 0.4))
    assert both.p50s == [2.0, 4.0, 3.0, 2.1] and both.rounds == 4 and both.others_share == 0.4
    assert paired_ratios(both, chosen) == [both.median_ms / chosen.median_ms]   # rounds missing


def test_candidates_within_noise_are_tied_and_the_tie_break_is_stable():
    """Three in-budget candidates whose interleaved rounds overlap: the more accurate wins over
    the fastest median; then the smaller; a candidate outside the spread never ties."""
    from edgesmith.measure import Candidate
    from edgesmith.search.select import choose

    def cand(cid, median, low, high, drop, size):
        return Candidate(id=cid, p50_ms=median, model_sha256="x" * 64, accuracy_drop=drop,
                         accuracy={"top1": 0.9 - drop}, size_bytes=size,
                         confirm={"median_ms": median, "low_ms": low, "high_ms": high,
                                  "rounds": 3})

    cfg = OptimizeConfig(backends=ORT)
    fast = cand("int8:qdq-s8s8", 1.00, 0.95, 1.10, 0.004, 100)
    exact = cand("int8:qdq-u8s8", 1.02, 0.98, 1.08, 0.000, 100)
    small = cand("int8:qdq-u8s8-mse", 1.03, 0.99, 1.09, 0.000, 90)
    slow = cand("fp32", 1.50, 1.45, 1.60, 0.0, 400)
    for order in ([fast, exact, small, slow], [slow, small, exact, fast]):
        assert choose(order, cfg).id == "int8:qdq-u8s8-mse"
    assert choose([fast, slow], cfg).id == "int8:qdq-s8s8"     # fp32 is outside the spread
    # judged by the SQNR floor, every drop is 0: the more faithful output wins the tie
    lossy = cand("int8:qdq-u8s8", 4.0, 3.8, 4.6, 0.0, 100)     # faster, and smaller
    given = cand("original (as given)", 4.1, 3.9, 4.4, 0.0, 400)
    lossy.accuracy, given.accuracy = {"sqnr_db": 56.1}, {"sqnr_db": 200.0}
    assert choose([lossy, given], cfg).id == "original (as given)"


def test_budget_is_kept_on_an_imagenet_size_model(tmp_path):
    """--budget is a promise: a MobileNetV2 at 224x224 (ImageNet's size; random weights) with
    calibration and training data wants minutes (int8 recipes, pruning + distillation,
    NetAdapt, TFLite, tuning); given 30 s it ends within them plus the slowest single step it
    measured, and says what it left out and why."""
    require(importlib.util.find_spec("torch") is not None,
            "needs torch: pip install torch==2.13.0 'edgesmith[train]'")
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from imagenet_mobilenetv2 import MobileNetV2
    finally:
        sys.path.remove(str(ROOT / "examples"))
    torch.manual_seed(0)
    model, x = MobileNetV2().eval(), torch.randn(1, 3, 224, 224)
    path = tmp_path / "mnv2_224.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])
    rng = np.random.default_rng(0)
    images = rng.standard_normal((48, 3, 224, 224)).astype(np.float32)
    np.savez(tmp_path / "data.npz", input=images, labels=rng.integers(0, 1000, 48))
    out, budget = tmp_path / "out", 30
    t0 = time.monotonic()
    proc = run_cli("optimize", path, "--calib", tmp_path / "data.npz", "--train",
                   tmp_path / "data.npz", "-o", out, "--budget", f"{budget}s",
                   "--input-shape", "input=1x3x224x224")
    wall = time.monotonic() - t0
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    slowest = max(report["step_costs_s"].values())
    assert report["elapsed_s"] <= budget + slowest, report["step_costs_s"]
    assert report["overshoot_s"] == pytest.approx(max(0, report["elapsed_s"] - budget))
    assert wall <= budget + slowest + 10, wall      # + the interpreter's start and imports
    assert ("took" in proc.stdout and "--budget" in proc.stdout), proc.stdout[-2000:]
    cut = [s for s in report["skipped"] if "--budget" in s["reason"]] + \
        [n for n in report["notes"] if "--budget" in n]
    assert cut, (report["skipped"], report["notes"])    # 30 s cannot hold everything
