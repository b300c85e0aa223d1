"""Deploy to an emulated Raspberry Pi: Debian arm64 under qemu-user, its own Python 3.11, numpy,
onnxruntime 1.27 and ai-edge-litert, reached over a veth into a network namespace.

Latency under emulation means nothing, so nothing here checks speed; what is checked is that the
facts, the accuracy and the failures are right on a real aarch64 userland (tests/emulated_pi.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import client_home, require, run_cli
from edgesmith.devices import Job
from edgesmith.devices.ssh import SSHDevice
from edgesmith.data import calibration_batches
from edgesmith.model import load, save
from edgesmith.passes.quantize import (PreprocessConfig, QuantizeConfig, QuantRecipe, preprocess,
                                       quantize_static)
from edgesmith.profiling import profile_many

# the first test also builds the rootfs when it is not cached (~7 min here, more on a busy CI)
pytestmark = [pytest.mark.emulated_pi, pytest.mark.ssh, pytest.mark.netns, pytest.mark.slow,
              pytest.mark.timeout(2400)]
FEW = ("--runs", "3", "--warmup", "1")


@pytest.fixture
def pi_home(tmp_path, monkeypatch, emulated_pi):
    """HOME whose ~/.ssh/config names the Pi `pi`; the remote dir is the one the rootfs's venv
    lives in (`edgesmith device setup` puts it there on a real Pi)."""
    host = emulated_pi.host
    home = client_home(tmp_path, monkeypatch, emulated_pi.known_hosts_line(),
                       f"Host pi\n  HostName {host.address}\n  Port {host.sshd.port}\n"
                       f"  User {host.sshd.user}\n  IdentityFile {host.sshd.client_key}\n")
    monkeypatch.setenv("EDGESMITH_REMOTE_DIR", "~/.edgesmith")
    return home


def pi_device() -> SSHDevice:
    return SSHDevice.from_destination("pi")


def test_facts_say_aarch64_with_neon_under_emulation_and_match_a_pi(pi_home, tmp_path):
    out = tmp_path / "facts.json"
    proc = run_cli("device", "facts", "pi", "--json", out, timeout=600)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(out.read_text())
    assert facts["arch"] == "aarch64"
    assert "asimd" in facts["cpu_flags"]          # NEON, read from the ARM HWCAPs in auxv
    assert facts["emulated"] is True
    assert facts["python"].startswith("3.11")
    import onnxruntime

    assert facts["packages"]["onnxruntime"] != onnxruntime.__version__   # the skew is real
    assert facts["packages"]["ai-edge-litert"]
    proc = run_cli("targets", "match", "pi", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "rpi" in proc.stdout.split("\n", 1)[0], proc.stdout


def test_profile_digits_over_ssh_gives_the_x86_accuracy_labelled_emulated(pi_home, models,
                                                                          tmp_path):
    out = tmp_path / "pi.json"
    proc = run_cli("profile", models / "digits_cnn.onnx", "--eval", models / "digits_cnn_eval.npz",
                   "--device", "pi", "--device", "local", *FEW, "--json", out, timeout=900)
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(out.read_text())}
    pi, local = rows["pi"], rows["local"]
    assert pi["error"] is None, pi["error"]
    assert pi["device"]["arch"] == "aarch64" and pi["device"]["emulated"] is True
    assert pi["latency_ms"]["p50"] > 0
    assert abs(pi["accuracy"]["top1"] - local["accuracy"]["top1"]) <= 1 / 300   # <= 1 digit
    assert pi["accuracy"]["top1"] > 0.97
    assert "emulated" in proc.stdout and "not meaningful" in proc.stdout


def test_int8_and_tflite_models_keep_their_x86_accuracy_on_arm(pi_home, models, tmp_path):
    cnn = load(models / "digits_cnn.onnx")
    int8 = tmp_path / "cnn_int8.onnx"
    pre, _ = preprocess(cnn.proto, PreprocessConfig(input_shapes=cnn.input_shapes))
    q, _ = quantize_static(pre, QuantizeConfig(QuantRecipe("qdq-u8s8"), list(
        calibration_batches(models / "digits_cnn_train.npz", cnn, 32))))
    save(q, int8)
    cases = [(int8, models / "digits_cnn_eval.npz"),
             (models / "digits_mlp.tflite", models / "digits_mlp_eval.npz")]
    from edgesmith.convert.tflite import available, to_tflite

    x = {"input": np.load(models / "digits_cnn_eval.npz")["input"][:1]}
    for name, proto in (("cnn_fp32.tflite", cnn.proto), ("cnn_int8.tflite", q)):
        if available() is None:            # converted on the x86 host
            (tmp_path / name).write_bytes(to_tflite(proto, x)[0])
            cases.append((tmp_path / name, models / "digits_cnn_eval.npz"))
    for model, eval_set in cases:
        rows = dict(profile_many(model, [pi_device(), "local"], eval_set, Job(runs=3, warmup=1)))
        pi, local = rows["pi"], rows["local"]
        assert pi.ok, pi.error
        assert local.ok, local.error
        assert pi.device["arch"] == "aarch64"
        assert abs(pi.accuracy["top1"] - local.accuracy["top1"]) <= 0.01, \
            (model.name, pi.accuracy, local.accuracy)
        assert pi.accuracy["agreement"] >= 0.98, (model.name, pi.accuracy)   # vs host reference
        if model.suffix == ".tflite":      # every op is accounted for, delegated or not
            d = pi.delegation      # (XNNPACK's cpuinfo finds no /sys CPU lists under qemu-user)
            assert d["delegated"] + sum(d["fallback"].values()) == d["ops"] > 0, d
            assert d["applied"] or d["delegated"] == 0, d
    require(available() is None, f"converted models not tried: {available()} (.ci/run "
            "installs it)")


def test_neon_kernels_equal_onnxruntime_on_arm_and_are_chosen_by_measurement(pi_home, models):
    """The cross-built NEON library runs inside the Pi's own onnxruntime (an older version than
    the header's: the library asks for the oldest API it needs) with onnxruntime's numerics
    (tuning judges every rewritten variant's outputs on the device against the original's);
    tuning on the Pi measures it there and ships it only if it measured faster."""
    from edgesmith.own_kernels import LIBRARY, rewrite_for_device
    from edgesmith.search.tune import tune
    from edgesmith.variants import space

    dev = pi_device()
    facts = dev.facts()
    original = load(models / "digits_mnv2.onnx")
    made = rewrite_for_device(original, 8, 0, facts)
    require(not isinstance(made, str), f"{made}: .ci/run installs it")
    files = made[1]
    assert files[LIBRARY][:4] == b"\x7fELF" and files[LIBRARY][18] == 183    # EM_AARCH64
    report = tune(original, dev, search_space=space({"edgesmith_kernels": [0, 8]}, facts,
                                                    "onnxruntime"),
                  measure_settings={"runs": 3, "warmup": 1, "min_time_s": 0}, confirm_rounds=2)
    ours = next(t for t in report.trials if t.id == "edgesmith_kernels=8")
    # ok = ran on the Pi, and its outputs there are within 1e-4 of the original's range
    assert ours.ok and not ours.cached and "max_abs_err" in ours.accuracy, ours.error
    shipped = json.loads((Path(report.bundle) / "manifest.json").read_text())
    assert (LIBRARY in shipped["files"]) == (report.best.id == "edgesmith_kernels=8")
    assert report.best.id == "runtime defaults" or report.confirm["kept"] == "best"
    assert report.kernels == []      # no per-block verdicts from emulated timings


def test_a_model_too_new_for_the_device_is_explained_and_fuse_opset_fixes_it(pi_home, models,
                                                                            tmp_path):
    facts = pi_device().facts()
    limit = facts["ort_opset"]
    newest = onnx.defs.onnx_opset_version()
    assert limit < newest, "the device's onnxruntime should be older than the host's onnx"
    too_new = tmp_path / "too_new.onnx"
    proc = run_cli("fuse", models / "digits_cnn.onnx", "--opset", newest, "-o", too_new)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("profile", too_new, "--device", "pi", *FEW, timeout=600)
    assert proc.returncode == 1
    assert f"opset {newest}" in proc.stderr and f"--opset {limit}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr

    # the opset fits but the IR version does not: only the device's onnxruntime can say so
    stamped = onnx.load(models / "digits_cnn.onnx")
    stamped.ir_version = onnx.IR_VERSION
    ir_too_new = tmp_path / "ir_too_new.onnx"
    onnx.save(stamped, ir_too_new)
    proc = run_cli("profile", ir_too_new, "--device", "pi", *FEW, timeout=600)
    assert proc.returncode == 1
    assert f"IR version {onnx.IR_VERSION}" in proc.stderr, proc.stderr
    assert "--opset 17" in proc.stderr, proc.stderr    # its own opset fits: only re-stamp IR

    fixed = tmp_path / "fixed.onnx"
    proc = run_cli("fuse", too_new, "--opset", limit, "-o", fixed)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "fixed.json"
    proc = run_cli("profile", fixed, "--eval", models / "digits_cnn_eval.npz", "--device", "pi",
                   *FEW, "--json", out, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["accuracy"]["top1"] > 0.97


def test_device_setup_installs_from_pushed_aarch64_wheels_offline(pi_home, emulated_pi, models,
                                                                  monkeypatch, tmp_path):
    """What a user does for a Pi without internet: push the wheels, pip installs only those."""
    monkeypatch.setenv("EDGESMITH_REMOTE_DIR", "/root/edgesmith-fresh")   # no venv there yet
    proc = run_cli("device", "setup", "pi", "--wheels", emulated_pi.wheels, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    assert "/root/edgesmith-fresh/venv/bin/python3 has" in proc.stdout
    assert "onnxruntime 1.27.0" in proc.stdout, proc.stdout
    out = tmp_path / "r.json"
    proc = run_cli("profile", models / "digits_cnn.onnx", "--eval", models / "digits_cnn_eval.npz",
                   "--device", "pi", *FEW, "--json", out, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["accuracy"]["top1"] > 0.97


def test_deploy_then_serve_by_name_and_status_on_the_pi(pi_home, models, tmp_path):
    """The deploy check, the store and the serving session on a real aarch64 userland (with
    its own, older onnxruntime): activated after its check there, served by name, and the
    field figures the Pi-side session flushed come back in `status`."""
    from shlex import quote as q

    from test_deploy import bundle_of

    from device_runtime import facts

    # "chosen" at 1 us on this host's CPU: on the Pi's (another CPU) that is not compared
    bundle = bundle_of(models, 0.0, latency_ms=0.001,
                       cpu=facts.collect(with_providers=False).get("cpu"))
    proc = run_cli("deploy", bundle.path, "--name", "digits", "--device", "pi", timeout=1200)
    assert proc.returncode == 0 and "activated" in proc.stdout, proc.stdout + proc.stderr
    dev = pi_device()
    rt = dev.ensure_runtime()
    app = ("import numpy as np, device_runtime; s = device_runtime.serve('digits'); "
           "x = np.load('eval.npz')['input'][:1]; "
           "[s.run({'input': x}) for _ in range(20)]; s.close(); print(s.last_version)")
    remote = dev.push(bundle)
    status, out, err = dev.execute(f"cd {q(remote)} && PYTHONPATH={q(rt.path)} {q(rt.python)} "
                                   f"-c {q(app)}", "run", 600)
    assert status == 0 and out.strip() == "1", err[-2000:]
    out_json = tmp_path / "status.json"
    proc = run_cli("status", "digits", "--device", "pi", "--json", out_json, timeout=600)
    assert proc.returncode == 0, proc.stderr
    version = json.loads(out_json.read_text())["pi"]["models"]["digits"]["versions"]["1"]
    assert version["check"]["passed"] and version["field"]["calls"] == 20
    assert "not compared" in version["check"]["figures"]["latency_note"]   # another CPU


ARM_CHECK = """
import sys
import numpy as np
import onnxruntime as ort

lib, out = sys.argv[1], sys.argv[2]
x = np.load("x.npy", allow_pickle=False)
opts = ort.SessionOptions()
opts.register_custom_ops_library(lib)
ours = ort.InferenceSession("fused.onnx", opts, providers=["CPUExecutionProvider"])
theirs = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
np.save(out + "-ours.npy", ours.run(None, {"x": x})[0])
np.save(out + "-theirs.npy", theirs.run(None, {"x": x})[0])
"""


def test_int8_kernels_equal_onnxruntime_on_arm_with_and_without_the_dot_product(
        pi_home, emulated_pi):
    """Both ARM paths of the int8 kernel in the Pi's own (older) onnxruntime, each under qemu's
    model of its CPU: `sdot` on a Cortex-A76 (Raspberry Pi 5), `smull`/`sadalp` on a
    Cortex-A72 (Pi 4), whose CPU has no dot product: the sdot build dies there, so the
    emulated CPU is the one asked for. The outputs equal onnxruntime's on >= 99.9 % of
    elements, none more than one step apart: MLAS adds residuals in fixed point on ARM, the
    kernel in float."""
    from test_int8_kernels import qdq
    from test_kernels import MIXED, STEMS, block_model
    from edgesmith.own_kernels import build, toolchain
    from edgesmith.passes.int8_kernels import fuse_int8_inverted_residual

    shape = [2, 3, 13, 13]
    model = qdq(block_model(STEMS + MIXED, 13, 13, 2), shape)
    fused, report = fuse_int8_inverted_residual(model)
    assert report.changed == len(STEMS + MIXED)
    work = emulated_pi.root / "tmp" / "int8-check"       # /tmp/int8-check on the Pi
    work.mkdir(parents=True)
    for proto in (model, fused):        # the Pi's onnxruntime reads IR 10 at most
        proto.ir_version = 10
    onnx.save(model, work / "model.onnx")
    onnx.save(fused, work / "fused.onnx")
    np.save(work / "x.npy", np.random.default_rng(3).standard_normal(shape).astype(np.float32))
    (work / "check.py").write_text(ARM_CHECK)
    libs = {"dotprod": ["asimd", "asimddp"], "plain": ["asimd"]}
    for name, flags in libs.items():
        found = toolchain({"arch": "aarch64", "cpu_flags": flags})
        require(not isinstance(found, str), f"{found} (.ci/run installs it)")
        library = build({"arch": "aarch64", "cpu_flags": flags})[0]
        (work / f"{name}.so").write_bytes(library.read_bytes())
    dev = pi_device()
    python = dev.ensure_runtime().python
    for cpu, lib in (("cortex-a76", "dotprod"), ("cortex-a72", "plain")):
        status, _, err = dev.execute(f"cd /tmp/int8-check && QEMU_CPU={cpu} {python} check.py "
                                     f"./{lib}.so {cpu}", "run", 900)
        assert status == 0, err[-2000:]
        ours, theirs = (np.load(work / f"{cpu}-{side}.npy") for side in ("ours", "theirs"))
        step = float(numpy_helper.to_array(next(
            t for t in model.graph.initializer if t.name == next(
                n for n in model.graph.node if n.output[0] == model.graph.output[0].name
            ).input[1])).min())
        diff = np.abs(ours.astype(np.float64) - theirs)
        assert (diff == 0).mean() >= 0.999 and diff.max() <= step * 1.0001, (cpu, diff.max())
    status, _, _ = dev.execute(f"cd /tmp/int8-check && QEMU_CPU=cortex-a72 {python} check.py "
                               "./dotprod.so sigill", "run", 900)
    assert status != 0                  # SIGILL: the Pi 4 has no sdot, and qemu knows it
