"""Target profiles, matching, and the autotuner through the real local device runtime."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import device_runtime
from conftest import run_cli
from edgesmith.errors import EdgesmithError
from edgesmith.targets import all_profiles, load_profile, match
from edgesmith.search.cache import TuningCache
from edgesmith.search.tune import tune
from edgesmith.variants import Space, space

FAST = {"runs": 30, "warmup": 3, "min_time_s": 0.0}
PI4 = {"arch": "aarch64", "cpu": "Cortex-A72", "cpu_flags": ["asimd"], "cores": 4}
PI5 = {"arch": "aarch64", "cpu": "Cortex-A76", "cpu_flags": ["asimd", "asimddp", "asimdhp"],
       "cores": 4}
ORIN = {"arch": "aarch64", "cpu": "Cortex-A78AE", "cpu_flags": ["asimd", "asimddp", "asimdhp"],
        "cores": 6, "gpu": {"kind": "jetson"}}


def test_all_shipped_profiles_load():
    names = set(all_profiles())
    assert {"rpi4", "rpi5", "jetson-orin-nano", "jetson-nano", "x86-avx2",
            "x86-avx512-vnni"} <= names


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.replace('arch = "x86_64"', 'arch = "sparc"'), "field 'arch'"),
    (lambda t: t.replace("threads = [1, 2, 4]", "warp_speed = [9]"), "search.warp_speed"),
    (lambda t: t.replace("threads = [1, 2, 4]", "threads = [0]"), "search.threads"),
    (lambda t: t.replace('cores = 4\n', ''), "missing field(s) ['cores']"),
    (lambda t: t.replace('precisions = ["fp32", "int8"]', 'precisions = "fp32"'), "'precisions'"),
    (lambda t: "bogus = 1\n" + t, "unknown field(s) ['bogus']"),
    (lambda t: "channel_multiple = 0\n" + t, "'channel_multiple' must be a positive integer"),
    (lambda t: t.replace("[measure]", "[measure\n"), "cannot read it"),
])
def test_broken_profile_names_file_and_field(tmp_path, edit, words):
    from importlib.resources import files
    path = tmp_path / "broken.toml"
    path.write_text(edit((files("edgesmith_targets") / "x86-avx2.toml").read_text()))
    with pytest.raises(EdgesmithError) as err:
        load_profile(path)
    assert str(path) in str(err.value) and words in str(err.value)


def test_this_machine_matches_a_shipped_profile_by_its_flags():
    """Whatever x86 CPU runs the tests: AVX-512 VNNI picks that profile, AVX2 alone the other."""
    from device_runtime import facts
    f = facts.collect()
    if f["arch"] != "x86_64" or "avx2" not in f["cpu_flags"]:
        pytest.skip("not an x86-64 CPU with AVX2")
    m = match(f)
    want = "x86-avx512-vnni" if {"avx512f", "avx512_vnni"} <= set(f["cpu_flags"]) else "x86-avx2"
    assert m.profile.name == want and not m.generic
    assert "arch is x86_64" in m.rejected["rpi4"]


def test_tuning_cache_keys_on_input_shapes(models, tmp_path):
    """The same model at another batch is another measurement, never a cache answer."""
    from edgesmith.model import load
    cache = TuningCache(tmp_path / "tuning.jsonl")
    one = load(models / "digits_cnn.onnx", {"input": [1, 1, 8, 8]})
    many = load(models / "digits_cnn.onnx", {"input": [64, 1, 8, 8]})
    first = tune(one, "local", measure_settings=FAST, cache=cache, confirm_rounds=0,
                 max_trials=2)
    second = tune(many, "local", measure_settings=FAST, cache=cache, confirm_rounds=0,
                  max_trials=2)
    assert first.measured == 2 and second.from_cache == 0 and second.measured == 2
    assert second.default.p50_ms > first.default.p50_ms      # 64 samples take longer than 1


def test_numeric_knobs_need_an_eval_set(models):
    """TensorRT fp16 changes outputs: without an eval set it is pruned with that reason."""
    forced = Space("onnxruntime", {"trt_fp16": [True]})
    report = tune(models / "digits_cnn.onnx", "local", measure_settings=FAST,
                  search_space=forced.without_numeric("changes numerics; tuned only with an "
                                                      "eval set to check them"),
                  confirm_rounds=0)
    assert {"knob": "trt_fp16", "value": True,
            "reason": "changes numerics; tuned only with an eval set to check them"} \
        in report.pruned


@pytest.mark.parametrize("facts, name", [(PI4, "rpi4"), (PI5, "rpi5"), (ORIN, "jetson-orin-nano")])
def test_boards_match_their_profiles(facts, name):
    assert match(facts).profile.name == name


def test_unknown_device_gets_a_generic_profile_and_says_so():
    m = match({"arch": "riscv64", "cpu": "U74", "cpu_flags": [], "cores": 4, "memory_mb": 8000,
               "packages": {"onnxruntime": "1.20"}})
    assert m.generic and "generic" in m.reasons[0]
    assert m.profile.search["threads"] == [1, 2, 4]


def test_impossible_variants_are_pruned_with_reasons():
    from device_runtime import facts
    f = facts.collect()
    profile = all_profiles()["jetson-orin-nano"]
    sp = space(profile.search, f, "onnxruntime")
    reasons = {(k, str(v)): r for k, v, r in sp.pruned}
    assert "no GPU" in reasons[("cudnn_conv_algo_search", "EXHAUSTIVE")]
    assert "no GPU" in reasons[("trt_fp16", "True")]
    assert "cudnn_conv_algo_search" not in sp.values and "trt_fp16" not in sp.values
    assert any(k == "threads" and "cores" in r for k, v, r in sp.pruned) or f["cores"] >= 4


def test_tuner_ranks_caches_and_writes_the_winner_into_the_bundle(models):
    cache = TuningCache()
    first = tune(models / "digits_cnn.onnx", "local", measure_settings=FAST, cache=cache)
    assert first.default.ok and first.measured >= 3 and first.from_cache == 0
    p50s = [t.p50_ms for t in first.trials if t.ok]
    assert p50s == sorted(p50s)
    if first.best.key != first.default.key:       # kept only because it held up interleaved
        best, default = first.confirm["best"], first.confirm["default"]
        assert best["high_ms"] < default["low_ms"] and not first.confirm["within_noise"]
    assert first.verdict
    session = device_runtime.load(first.bundle)
    for key, value in first.best.config.items():
        assert session.config[key] == value
    # the identical job: the whole answer (confirmation, kernel profile, bundle) is kept, unless
    # it was taken on a busy device (then it is measured again)
    same = tune(models / "digits_cnn.onnx", "local", measure_settings=FAST, cache=TuningCache())
    busy = any((t.device_load or {}).get("others_share", 0) > 0.25 for t in first.trials)
    assert same.measured == 0 and (same.answered_at == first.answered_at) != busy
    if not busy:
        assert (same.best.id, same.confirm, same.bundle) == (first.best.id, first.confirm,
                                                              first.bundle)
    again = tune(models / "digits_cnn.onnx", "local", measure_settings=FAST, cache=cache,
                 confirm_rounds=0)      # another confirmation: answered again, trials cached
    assert again.measured == 0 and again.from_cache == len(first.trials)
    assert again.answered_at > first.answered_at
    fresh = tune(models / "digits_cnn.onnx", "local", measure_settings=FAST, cache=cache, fresh=True,
                 confirm_rounds=0, max_trials=2)
    assert fresh.measured == 2 and fresh.stopped == "max_trials"
    # an answer cut short by 2 trials does not answer a job allowed 40
    whole = tune(models / "digits_cnn.onnx", "local", measure_settings=FAST, cache=cache,
                 confirm_rounds=0)
    assert whole.answered_at > fresh.answered_at and not whole.stopped
    assert len(whole.trials) == len(first.trials)
    shutil.rmtree(whole.bundle)     # the tuned bundle is gone: the answer is made again
    rebuilt = tune(models / "digits_cnn.onnx", "local", measure_settings=FAST, cache=cache,
                   confirm_rounds=0)
    assert rebuilt.answered_at > whole.answered_at and Path(rebuilt.bundle).is_dir()


def test_a_failing_variant_is_an_error_row(models):
    # XNNPACK is not in this onnxruntime build: forced into the space (bypassing pruning), the
    # real runtime refuses it at load time.
    forced = Space("onnxruntime", {"xnnpack": [True], "threads": [1]})
    report = tune(models / "digits_cnn.onnx", "local", measure_settings=FAST, search_space=forced,
                  confirm_rounds=0)
    bad = [t for t in report.trials if not t.ok]
    assert len(bad) == 1 and bad[0].stage == "load" and "Xnnpack" in bad[0].error
    assert report.best.ok and report.trials[-1] is bad[0]


def test_interrupted_tune_resumes_from_the_cache(models):
    cache = TuningCache()
    seen = []

    def interrupt_after_two(trial):
        seen.append(trial)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(models / "digits_cnn.onnx", "local", measure_settings=FAST, cache=cache,
             on_trial=interrupt_after_two)
    resumed = tune(models / "digits_cnn.onnx", "local", measure_settings=FAST, cache=TuningCache(),
                   confirm_rounds=0)
    assert resumed.from_cache == 2 and resumed.measured == len(resumed.trials) - 2


def test_cli_tune_and_targets_match(models, tmp_path):
    out, js = tmp_path / "tuned", tmp_path / "tune.json"
    proc = run_cli("tune", models / "digits_cnn.onnx", "--budget", "30s", "--max-trials", "3",
                   "-o", out, "--json", js)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(js.read_text())
    assert report["target"] and report["trials"] and (out / "manifest.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"] == report["best"]["config"]
    proc = run_cli("tune", models / "digits_cnn.onnx", "--budget", "30s", "--max-trials", "3")
    assert proc.returncode == 0 and "0 measured" in proc.stdout, proc.stdout
    assert "answered from the cache: this job was measured on local" in proc.stderr
    proc = run_cli("targets", "match")
    assert proc.returncode == 0 and "profile" in proc.stdout
    proc = run_cli("tune", models / "digits_cnn.onnx", "--budget", "soon")
    assert proc.returncode == 2 and "not a duration" in proc.stderr


def test_tune_never_deletes_a_directory_it_did_not_write(models, tmp_path):
    """Before: `tune -o myproject` replaced the whole directory with the bundle."""
    project = tmp_path / "myproject"
    (project / "src").mkdir(parents=True)
    (project / "src" / "IMPORTANT.txt").write_text("mine")
    proc = run_cli("tune", models / "digits_cnn.onnx", "--max-trials", "1", "-o", project)
    assert proc.returncode == 1 and "did not write" in proc.stderr and "--force" in proc.stderr
    assert (project / "src" / "IMPORTANT.txt").read_text() == "mine"
    proc = run_cli("tune", models / "digits_cnn.onnx", "--max-trials", "1", "-o", project,
                   "--force")
    assert proc.returncode == 0, proc.stderr
    assert (project / "src" / "IMPORTANT.txt").read_text() == "mine"
    assert (project / "manifest.json").is_file()
    device_runtime.load(project)
    ours = tmp_path / "ours"            # a directory tune wrote: re-used, the user's file kept
    assert run_cli("tune", models / "digits_cnn.onnx", "--max-trials", "1", "-o", ours
                   ).returncode == 0
    (ours / "notes.txt").write_text("mine")
    assert run_cli("tune", models / "digits_cnn.onnx", "--max-trials", "1", "-o", ours
                   ).returncode == 0
    assert (ours / "notes.txt").read_text() == "mine"


def test_tune_where_every_trial_fails_exits_1_in_one_line(tmp_path):
    """A model that loads but fails on every run (a Reshape of 4 values to 3x3): no verdict
    like "the runtime defaults were fastest" and exit 0, but one line that says why."""
    from conftest import reshape_model

    reshape_model(tmp_path / "bad.onnx", (3, 3))
    proc = run_cli("tune", tmp_path / "bad.onnx", "--max-trials", "2", "--fresh")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: every trial failed on local") and \
        "the model failed on this input" in last, last
    assert "defaults were fastest" not in proc.stdout
