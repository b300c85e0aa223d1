"""Deploy and profile over a real OpenSSH sshd on 127.0.0.1 (never skipped when CI=true)."""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

from conftest import run_cli, ssh_device
from device_runtime.bundle import verify
from edgesmith.devices import Job
from edgesmith.devices.ssh import SSHDevice
from edgesmith.errors import StageError
from edgesmith.model import load
from edgesmith.measure import measure
from edgesmith.profiling import prepare, profile, profile_many

pytestmark = pytest.mark.ssh
FAST = Job(runs=20, warmup=3)


device = ssh_device


def test_profile_over_ssh_equals_local(ssh_home, sshd_server, models):
    args = dict(eval_path=models / "digits_cnn_eval.npz", job=Job(runs=200, warmup=20, threads=1))
    remote = profile(models / "digits_cnn.onnx", device(sshd_server), **args)
    local = profile(models / "digits_cnn.onnx", "local", **args)
    assert remote.ok and local.ok, (remote.error, local.error)
    assert remote.accuracy == local.accuracy
    assert remote.bundle_sha256 == local.bundle_sha256
    ratio = remote.latency_ms["p50"] / local.latency_ms["p50"]
    assert 0.25 < ratio < 4, ratio   # same machine, same runtime: equal within (heavy) noise


def test_second_push_is_a_cache_hit(ssh_home, sshd_server, cnn):
    dev = device(sshd_server)
    sent = []
    dev.on_upload_progress = lambda done, total: sent.append(done)
    path = dev.push(cnn)
    assert sent, "first push uploaded nothing"
    sent.clear()
    assert dev.push(cnn) == path and sent == []
    manifest, bundle_id = verify(path)   # the device's copy (same machine) is whole
    assert bundle_id == cnn.id


def test_unknown_host_refused_then_accepted_with_the_flag(ssh_home, sshd_server, cnn):
    (ssh_home / ".ssh" / "known_hosts").write_text("")
    with pytest.raises(StageError, match="--accept-new-host-key"):
        device(sshd_server).push(cnn)
    device(sshd_server, accept_new_host_key=True).push(cnn)
    assert str(sshd_server.port) in (ssh_home / ".ssh" / "known_hosts").read_text()
    device(sshd_server).push(cnn)      # now known: no flag needed


def test_host_key_mismatch_is_refused_even_with_accept_new(ssh_home, sshd_server, cnn, tmp_path):
    from sshd import keygen

    other = keygen(tmp_path / "other_host_key").split()
    (ssh_home / ".ssh" / "known_hosts").write_text(
        f"[127.0.0.1]:{sshd_server.port} {other[0]} {other[1]}\n")
    for accept in (False, True):
        with pytest.raises(StageError, match="does not match known_hosts"):
            device(sshd_server, accept_new_host_key=accept).push(cnn)


def test_wrong_key_is_refused_clearly(ssh_home, sshd_server, cnn, tmp_path):
    from sshd import keygen

    keygen(tmp_path / "stranger")
    dev = SSHDevice.from_destination(sshd_server.destination, identity=str(tmp_path / "stranger"))
    with pytest.raises(StageError, match="authentication failed .* --identity"):
        dev.push(cnn)


def test_missing_numpy_and_backend_are_named(ssh_home, sshd_server, cnn):
    """The system python3 of this machine has neither numpy nor onnxruntime: a real bare device."""
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no system python3 to play a bare device")
    result = measure(device(sshd_server, python="/usr/bin/python3"), cnn, FAST)
    assert result.stage == "ensure-runtime"
    assert "lacks numpy, onnxruntime" in result.error and "edgesmith device setup" in result.error


@pytest.mark.parametrize("version, works", [("3.7", False), ("3.8", True)])
def test_device_python_too_old_is_named_and_the_oldest_supported_runs(ssh_home, sshd_server,
                                                                      version, works):
    """Real old interpreters (pyenv's) play an old Raspberry Pi OS: 3.7 is refused by name
    before anything is uploaded, 3.8 runs the device runtime."""
    python = Path("/root/.pyenv/versions").glob(f"{version}.*/bin/python{version}")
    python = next(iter(sorted(python)), None)
    if python is None:
        pytest.skip(f"no Python {version} here to play an old device")
    dev = device(sshd_server, python=str(python))
    if works:
        assert dev.facts()["python"].startswith(version)
        return
    with pytest.raises(StageError) as info:
        dev.facts()
    assert info.value.stage == "ensure-runtime"
    assert f"is Python {version}; the device runtime needs 3.8 or later" in info.value.message


def test_sshd_killed_mid_upload_then_next_push_succeeds(ssh_home, sshd_server, models, tmp_path):
    big = prepare(load(models / "digits_mnv2.onnx"), models / "digits_mnv2_eval.npz")
    dev = device(sshd_server)
    dev.ensure_runtime()

    def kill_midway(done, total):
        if done < total:     # the link really drops: sshd and its session are SIGKILLed
            sshd_server.stop()

    dev.on_upload_progress = kill_midway
    try:
        with pytest.raises(StageError, match="upload|connect"):
            dev.push(big)
    finally:
        sshd_server.start()
    remote_bundles = tmp_path / "remote" / "bundles"
    assert not (remote_bundles / big.id).exists(), "a partial bundle was left under its real name"
    fresh = device(sshd_server)
    result = measure(fresh, big, FAST)
    assert result.ok, result.error
    assert result.accuracy["agreement"] == 1.0
    assert not [p for p in remote_bundles.iterdir() if p.name.startswith(".tmp-")]


def test_runtime_crash_is_an_error_row_and_others_go_on(ssh_home, sshd_server, models, tmp_path):
    # A real SIGSEGV of the runtime process cannot be provoked through a valid bundle, so the
    # device's python is a wrapper that segfaults itself on `run` (the crash itself is real).
    wrapper = tmp_path / "crashing python"
    wrapper.write_text(f"#!/bin/sh\ncase \" $* \" in *\" run \"*) kill -SEGV $$;; esac\n"
                       f"exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    rows = profile_many(models / "digits_cnn.onnx",
                        [device(sshd_server, python=str(wrapper), name="crashy"),
                         device(sshd_server, name="healthy")], job=FAST)
    by_name = dict(rows)
    assert not by_name["crashy"].ok and "crashed (killed by " in by_name["crashy"].error, \
        by_name["crashy"].error
    assert by_name["healthy"].ok, by_name["healthy"].error


def test_runtime_over_its_timeout_is_an_error_and_host_keeps_going(ssh_home, sshd_server, cnn):
    dev = device(sshd_server)
    slow = measure(dev, cnn, Job(runs=1, warmup=0, min_time_s=60, max_time_s=120, timeout_s=3,
                                 lock_timeout_s=1))
    assert not slow.ok and "longer than" in slow.error and "--timeout" in slow.error
    assert measure(dev, cnn, FAST).ok


def test_remote_dir_with_spaces_and_semicolon(ssh_home, sshd_server, cnn, tmp_path, monkeypatch):
    evil = tmp_path / "dir with space; touch PWNED; $(touch PWNED2)"
    monkeypatch.chdir(tmp_path)
    result = measure(device(sshd_server, remote_dir=str(evil)), cnn, FAST)
    assert result.ok, result.error
    assert (evil / "bundles" / cnn.id / "manifest.json").is_file()
    assert not list(Path("/").glob("PWNED*")) and not list(tmp_path.glob("PWNED*"))
    assert not list(Path.home().glob("PWNED*"))


def test_two_concurrent_profiles_are_serialized_by_the_device_lock(ssh_home, sshd_server, cnn):
    job = Job(runs=1, warmup=0, min_time_s=1.0, evaluate=False)
    results = [None, None]

    def go(i):
        results[i] = measure(device(sshd_server), cnn, job)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    a, b = results
    assert a.ok and b.ok, (a.error, b.error)
    first, second = sorted([a.window_s, b.window_s])
    assert first[1] <= second[0], f"measurements overlapped: {first} {second}"
    assert max(a.stages_ms["lock_wait"], b.stages_ms["lock_wait"]) > 500


def test_cli_alias_facts_and_fleet_with_an_unreachable_device(ssh_home, sshd_server, models,
                                                              tmp_path):
    proc = run_cli("device", "facts", "testdev", "--python", sys.executable)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["arch"]
    inventory = tmp_path / "devices.toml"
    inventory.write_text(
        f'[[device]]\nname = "bench"\ndestination = "testdev"\npython = "{sys.executable}"\n\n'
        f'[[device]]\nname = "gone"\ndestination = "{sshd_server.user}@127.0.0.1:1"\n')
    out = tmp_path / "fleet.json"
    proc = run_cli("profile", models / "digits_cnn.onnx", "--device", inventory, "--device",
                   "local", "--runs", "10", "--json", out)
    assert proc.returncode == 1
    rows = {row["name"]: row for row in json.loads(out.read_text())}
    assert rows["bench"]["error"] is None and rows["local"]["error"] is None
    assert rows["gone"]["stage"] == "connect" and "cannot reach" in rows["gone"]["error"]
    assert "Traceback" not in proc.stderr


def test_a_tampered_bundle_on_the_device_is_uploaded_again_and_said(ssh_home, sshd_server, cnn,
                                                                    tmp_path, capsys):
    dev = device(sshd_server)
    assert measure(dev, cnn, FAST).ok
    remote = tmp_path / "remote" / "bundles" / cnn.id
    (remote / "eval.npz").write_bytes(b"changed on the device")
    again = measure(device(sshd_server), cnn, FAST)
    assert again.ok, again.error
    said = capsys.readouterr().err
    assert "failed its check" in said and "uploading it again" in said, said
    verify(remote)
