"""Findings of issue #14, each against a real OpenSSH sshd on 127.0.0.1 and real files.

Destinations that reach a shell, mistyped inventories, frozen devices, ONNX external data read
from an unlisted path, whole-file reads, leaked temp dirs, misleading errors, IdentitiesOnly and
@revoked host keys. Names new in the fix are imported inside the tests, so each test fails on
the old code by its behaviour, not by an ImportError.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import client_home, run_with_fault, ssh_device
from device_runtime.errors import RuntimeFailure
from edgesmith.devices import Job, load_inventory
from edgesmith.devices.ssh import SSHDevice
from edgesmith.errors import EdgesmithError, StageError

FAST = Job(runs=5, warmup=1)


device = ssh_device


def host_block(sshd_server, *lines: str) -> str:
    """~/.ssh/config `Host testdev` for the loopback sshd, plus `lines`."""
    return "\n  ".join(["Host testdev\n  HostName 127.0.0.1", f"Port {sshd_server.port}",
                        f"User {sshd_server.user}", *lines]) + "\n"


def temp_dirs(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.glob(".tmp-*")) if parent.is_dir() else []


# --- 4: a device name never reaches a shell --------------------------------------------------
def test_destination_with_shell_syntax_never_runs_match_exec(tmp_path, monkeypatch):
    pwned = tmp_path / "PWNED"
    client_home(tmp_path, monkeypatch, "", 'Match exec "test %h = x"\n  User nobody\n')
    inventory = tmp_path / "devices.toml"
    inventory.write_text(f'[[device]]\ndestination = "pi@x$(touch${{IFS}}{pwned})"\n')
    with pytest.raises(EdgesmithError) as err:
        load_inventory(inventory)
    assert not pwned.exists(), "the destination ran a command on the host"
    assert "only letters, digits" in str(err.value) and "\n" not in str(err.value)
    for evil in (f"pi@x;touch {pwned}", f"pi@x`touch {pwned}`", "pi@'x'", "pi@x y",
                 "-oProxyCommand=touch", f"pi@[::1$(touch {pwned})]", "pi@x:99999"):
        with pytest.raises(EdgesmithError):
            SSHDevice.from_destination(evil)
    assert not pwned.exists()


@pytest.mark.parametrize("destination, host, port", [
    ("pi@raspberrypi.local:2222", "raspberrypi.local", 2222), ("pi@[fe80::1]:22", "fe80::1", 22),
    ("my_pi", "my_pi", 22), ("10.0.0.2", "10.0.0.2", 22), ("first.last@host-1", "host-1", 22)])
def test_plain_destinations_still_resolve(tmp_path, monkeypatch, destination, host, port):
    client_home(tmp_path, monkeypatch, "")
    target = SSHDevice.from_destination(destination).target
    assert (target.hostname, target.port) == (host, port)


# --- 5: devices.toml fields are type-checked ---------------------------------------------------
@pytest.mark.parametrize("line, field", [
    ('accept_new_host_key = "false"', "accept_new_host_key"), ("python = 3", "python"),
    ("remote_dir = true", "remote_dir"), ('identity = ["k"]', "identity"),
    ('target = ""', "target")])
def test_inventory_field_of_the_wrong_type_is_one_line(tmp_path, line, field):
    inventory = tmp_path / "devices.toml"
    inventory.write_text(f'[[device]]\nname = "bench"\ndestination = "pi@h"\n{line}\n')
    with pytest.raises(EdgesmithError) as err:
        load_inventory(inventory)
    message = str(err.value)
    assert f"{field} must be" in message and "'bench'" in message and "\n" not in message


def test_the_inventorys_target_is_the_profile_a_run_uses(tmp_path):
    """`target` in devices.toml was type-checked and then ignored: now it chooses the profile
    (as --target does, which still wins), and an unknown name is refused when the file is read."""
    from edgesmith.run import Run

    inventory = tmp_path / "devices.toml"
    inventory.write_text('[[device]]\nname = "here"\ndestination = "local"\n'
                         'target = "rpi4"\n')
    [dev] = load_inventory(inventory)
    run = Run.open(dev)
    assert run.target.profile.name == "rpi4", run.target
    assert "in the device inventory" in run.target.reasons[0], run.target.reasons
    assert Run.open(dev, target="x86-avx2").target.profile.name == "x86-avx2"
    inventory.write_text('[[device]]\nname = "here"\ndestination = "local"\n'
                         'target = "no-such-board"\n')
    with pytest.raises(EdgesmithError, match="device #1: unknown target 'no-such-board'"):
        load_inventory(inventory)


@pytest.mark.ssh
def test_quoted_false_never_records_a_host_key(ssh_home, sshd_server, tmp_path):
    known_hosts = ssh_home / ".ssh" / "known_hosts"
    known_hosts.write_text("")
    inventory = tmp_path / "devices.toml"
    inventory.write_text(f'[[device]]\nname = "bench"\ndestination = "{sshd_server.destination}"\n'
                         f'identity = "{sshd_server.client_key}"\npython = "{sys.executable}"\n'
                         'accept_new_host_key = "false"\n')
    error = None
    try:
        devices = load_inventory(inventory)
    except EdgesmithError as exc:
        error = str(exc)
    else:
        for dev in devices:
            try:
                dev.connect()
            except StageError:
                pass
            dev.close()
    assert known_hosts.read_text() == "", "a quoted \"false\" recorded the unknown host key"
    assert error and "accept_new_host_key must be true or false" in error
    inventory.write_text(inventory.read_text().replace('"false"', "false"))
    with pytest.raises(StageError, match="--accept-new-host-key"):
        load_inventory(inventory)[0].connect()
    assert known_hosts.read_text() == ""


# --- 7: a frozen device is reported as lost within a bound, not after the whole timeout --------
@pytest.mark.ssh
def test_frozen_sshd_mid_run_is_lost_within_the_stall_bound(ssh_home, sshd_server, cnn):
    """SIGSTOP of the sshd processes serving the connection (a real freeze), 2 s into a run."""
    from sshd import is_sshd

    assert device(sshd_server).stall_timeout_s <= 30   # the default bound, a constant
    with sshd_server.new_sessions() as new:
        dev = device(sshd_server, stall_timeout_s=3)
        def freeze():
            for pid in filter(is_sshd, new()):
                os.kill(pid, signal.SIGSTOP)

        result, elapsed = run_with_fault(dev, dev.push(cnn), freeze)
    assert result.stage == "run" and "lost" in result.error, result.error
    assert "no answer" in result.error and "raise the timeout" not in result.error
    assert elapsed < 12, f"a frozen device took {elapsed:.0f}s to notice"
    assert device(sshd_server).facts()["arch"]       # the sshd itself serves the next connection


# --- 8: ONNX external data is resolved where onnxruntime reads it ------------------------------
def external_data_bundle(root: Path, model_rel: str, location: str, weights: np.ndarray,
                         listed: dict[str, np.ndarray], fmt: str = "onnx") -> Path:
    """A bundle of a real ONNX MatMul whose weight lives in external data at `location`
    (as written in the model); `listed` files are written and listed in the manifest."""
    from conftest import external_matmul
    from device_runtime.bundle import MANIFEST, Manifest, sha256_file

    external_matmul(root / model_rel, weights, location)
    for rel, array in listed.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(array.astype(np.float32).tobytes())
    files = {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
             for rel in [model_rel, *listed]}
    manifest = Manifest(model=model_rel, format=fmt, backend="onnxruntime",
                        inputs=[{"name": "X", "dims": [1, 4], "shape": [1, 4],
                                 "dtype": "float32"}], outputs=["Y"], files=files)
    (root / MANIFEST).write_bytes(manifest.to_json())
    return root


def test_unlisted_external_data_next_to_the_model_is_refused(tmp_path):
    """The model sits in sub/ and says location `w.bin`: onnxruntime reads sub/w.bin."""
    import device_runtime

    good, evil = np.eye(4, dtype=np.float32), np.full((4, 4), 666, np.float32)
    root = external_data_bundle(tmp_path / "b", "sub/model.onnx", "w.bin", good,
                                {"w.bin": good})
    (root / "sub" / "w.bin").write_bytes(evil.tobytes())       # not listed, not verified
    with pytest.raises(RuntimeFailure) as err:
        out = device_runtime.load(root).run({"X": np.ones((1, 4), np.float32)})
        pytest.fail(f"loaded unverified weights: {out}")
    assert err.value.stage == "verify" and "'sub/w.bin'" in str(err.value)


def test_listed_external_data_next_to_the_model_loads(tmp_path):
    import device_runtime

    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    root = external_data_bundle(tmp_path / "b", "sub/model.onnx", "w.bin", w, {"sub/w.bin": w})
    x = np.ones((1, 4), np.float32)
    out = device_runtime.load(root).run({"X": x})
    np.testing.assert_allclose(next(iter(out.values())), x @ w)


def test_a_manifest_cannot_switch_off_the_external_data_check_by_its_format(tmp_path):
    """"format": "tflite" on an ONNX file run by onnxruntime: the format comes from the file's
    content, so the unlisted data file is still found, and the lie itself is refused."""
    from device_runtime.bundle import verify

    w = np.eye(4, dtype=np.float32)
    root = external_data_bundle(tmp_path / "b", "sub/model.onnx", "w.bin", w, {}, fmt="tflite")
    (root / "sub" / "w.bin").write_bytes(w.tobytes())                # unlisted, unhashed
    with pytest.raises(RuntimeFailure, match="holds an ONNX model but the manifest says format "
                       "'tflite'") as err:
        verify(root)
    assert err.value.stage == "verify" and "\n" not in str(err.value)


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "../w.bin"])
def test_external_data_leaving_the_bundle_is_refused(tmp_path, location):
    from device_runtime.bundle import verify

    w = np.eye(4, dtype=np.float32)
    root = external_data_bundle(tmp_path / "b", "sub/model.onnx", location, w, {"sub/w.bin": w})
    with pytest.raises(RuntimeFailure, match="not a listed file of the bundle") as err:
        verify(root)
    assert "\n" not in str(err.value)


# --- 9: big files are streamed on the host and hashed in chunks on the device -----------------
BIG = 128 << 20


@pytest.fixture
def big_bundle(tmp_path) -> Path:
    """A bundle directory holding a 128 MB file (sparse: cheap to make, real to read)."""
    from device_runtime.bundle import MANIFEST, Manifest, sha256_file

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with open(bundle / "big.bin", "wb") as fh:
        fh.truncate(BIG)
    manifest = Manifest(model="big.bin", format="onnx", backend="onnxruntime", inputs=[],
                        outputs=[], files={"big.bin": {"sha256": sha256_file(bundle / "big.bin"),
                                                       "size": BIG}})
    (bundle / MANIFEST).write_bytes(manifest.to_json())
    return bundle


def push_measuring_host_memory(sshd_server, bundle: Path, python: str) -> tuple[str, int]:
    """Push `bundle` from a fresh interpreter; (remote path, MB its peak RSS grew by)."""
    script = f"""
import hashlib, resource
from pathlib import Path
from edgesmith.bundle import Bundle
from edgesmith.devices.ssh import SSHDevice
dev = SSHDevice.from_destination({sshd_server.destination!r}, python={python!r},
                                 identity={str(sshd_server.client_key)!r})
dev.ensure_runtime()
raw = Path({str(bundle)!r}, "manifest.json").read_bytes()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(dev.push(Bundle(Path({str(bundle)!r}), hashlib.sha256(raw).hexdigest(), None)))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-1500:]
    remote, grown_mb = proc.stdout.split()
    assert (Path(remote) / "big.bin").stat().st_size == BIG
    return remote, int(grown_mb)


def test_streamed_tar_is_what_tarfile_writes(tmp_path):
    """The hand-streamed tar (headers, padding, end blocks) equals tarfile's own, byte for byte."""
    import io
    import tarfile

    from edgesmith.devices.ssh import tar_stream

    contents = {"manifest.json": b"{}", "model.onnx": os.urandom(70_001), "empty": b"",
                "a" * 120: b"long name"}
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w") as tar:
        for name, data in contents.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    size, chunks = tar_stream({name: tmp_path / name for name in contents})
    streamed = b"".join(chunks)
    assert size == len(streamed) and streamed == expected.getvalue()


@pytest.mark.ssh
def test_host_streams_a_big_bundle_from_disk(ssh_home, sshd_server, big_bundle):
    _, grown_mb = push_measuring_host_memory(sshd_server, big_bundle, sys.executable)
    assert grown_mb < 40, f"host peak RSS grew by {grown_mb} MB to push a 128 MB file"


@pytest.mark.ssh
def test_device_checks_a_big_file_in_chunks(ssh_home, sshd_server, big_bundle, tmp_path):
    """The device's upload check runs under `ulimit -v` 80 MB: a small device, kernel-enforced."""
    small = tmp_path / "small-memory-python"
    small.write_text(f'#!/bin/sh\ncase "$1" in -c) ulimit -v 80000;; esac\n'
                     f'exec {sys.executable} "$@"\n')
    small.chmod(0o755)
    push_measuring_host_memory(sshd_server, big_bundle, str(small))


# --- 10: temp dirs never pile up; a full disk and a relative remote dir ------------------------
@pytest.mark.ssh
def test_losing_an_upload_race_leaves_no_temp_dir(ssh_home, sshd_server, tmp_path):
    runtime = tmp_path / "remote" / "runtime"
    devices = [device(sshd_server) for _ in range(4)]
    start = threading.Barrier(len(devices))
    errors = []

    def first_push(dev):
        start.wait(timeout=30)
        try:
            dev.ensure_runtime()
        except StageError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first_push, args=(dev,)) for dev in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and temp_dirs(runtime) == [], (errors, temp_dirs(runtime))
    dev = devices[0]   # the loser of a race, for certain: the same content uploaded twice
    dest = f"{dev.root()}/wheels/abc"
    for _ in range(2):
        dev.upload_files({"a.whl": b"wheel"}, dest, sys.executable, "setup")
    assert temp_dirs(tmp_path / "remote" / "wheels") == []


@pytest.mark.ssh
def test_stale_temp_dirs_are_swept_from_runtime_and_wheels(ssh_home, sshd_server, tmp_path):
    remote = tmp_path / "remote"
    old = time.time() - 2 * 3600
    for parent in ("runtime", "wheels"):
        (remote / parent / ".tmp-dropped").mkdir(parents=True)
        os.utime(remote / parent / ".tmp-dropped", (old, old))
    (remote / "wheels" / ".tmp-in-flight").mkdir()      # fresh: maybe another upload's
    dev = device(sshd_server)
    dev.ensure_runtime()
    dev.upload_files({"a.whl": b"wheel"}, f"{dev.root()}/wheels/abc", sys.executable, "setup")
    assert temp_dirs(remote / "runtime") == []
    assert temp_dirs(remote / "wheels") == [".tmp-in-flight"]


@pytest.mark.ssh
def test_full_device_disk_says_no_space_left(ssh_home, sshd_server, cnn, tmp_path):
    from conftest import small_disk

    with small_disk(tmp_path / "small-disk", "320k", "a device's disk") as disk:
        dev = device(sshd_server, remote_dir=str(disk), stall_timeout_s=10)
        dev.ensure_runtime()                       # ~0.1 MB fits; the 0.4 MB bundle does not
        with pytest.raises(StageError) as err:
            dev.push(cnn)
        assert "no space left" in err.value.message and "retry the push" not in err.value.message
        assert temp_dirs(disk / "bundles") == []   # the failed upload cleaned up after itself


@pytest.mark.ssh
def test_relative_remote_dir_resolves_against_the_device_home(ssh_home, sshd_server, cnn):
    home = Path(pwd.getpwnam(sshd_server.user).pw_dir)    # the device user's real home
    relative = f".edgesmith-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        dev = device(sshd_server, remote_dir=f"{relative}/dir")
        path = dev.push(cnn)
        assert path == f"{home}/{relative}/dir/bundles/{cnn.id}"
        assert (Path(path) / "manifest.json").is_file()
        result = dev.run(path, FAST)
        assert result.ok, result.error
    finally:
        shutil.rmtree(home / relative, ignore_errors=True)
    with pytest.raises(StageError, match="~user paths are not supported"):
        device(sshd_server, remote_dir="~bob/x").root()


# --- 11: a missing key file is named --------------------------------------------------------
@pytest.mark.ssh
@pytest.mark.parametrize("where", ["ssh_config", "flag"])
def test_missing_identity_file_is_named(tmp_path, monkeypatch, sshd_server, where):
    missing = tmp_path / "no-such-key"
    client_home(tmp_path, monkeypatch, sshd_server.known_hosts_line(),
                host_block(sshd_server, f"IdentityFile {missing}"))
    dev = SSHDevice.from_destination("testdev") if where == "ssh_config" else \
        SSHDevice.from_destination(sshd_server.destination, identity=str(missing))
    with pytest.raises(StageError) as err:
        dev.connect()
    assert f"identity file {missing} does not exist" in err.value.message
    assert "sshd running" not in err.value.message


# --- 12: IdentitiesOnly and @revoked are honoured ----------------------------------------------
@pytest.fixture
def agent_with(sshd_server, monkeypatch):
    """A real ssh-agent holding the key the device accepts."""
    sock_dir = Path(tempfile.mkdtemp(prefix="es-agent-", dir="/tmp"))   # short: sun_path limit
    sock = sock_dir / "sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        subprocess.run(["ssh-add", "-q", str(sshd_server.client_key)], check=True, timeout=30,
                       env={**os.environ, "SSH_AUTH_SOCK": str(sock)}, capture_output=True)
        yield sock
    finally:
        proc.kill()
        proc.wait(timeout=10)
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.mark.ssh
@pytest.mark.parametrize("offered_by", ["agent", "default_key_file"])
def test_identities_only_offers_only_the_configured_key(tmp_path, monkeypatch, sshd_server,
                                                        request, offered_by):
    from sshd import keygen

    keygen(tmp_path / "stranger")      # a key the device does not accept
    home = client_home(tmp_path, monkeypatch, sshd_server.known_hosts_line())
    if offered_by == "agent":
        monkeypatch.setenv("SSH_AUTH_SOCK", str(request.getfixturevalue("agent_with")))
    else:
        shutil.copy(sshd_server.client_key, home / ".ssh" / "id_ed25519")
    config = home / ".ssh" / "config"
    config.write_text(host_block(sshd_server, f"IdentityFile {tmp_path / 'stranger'}"))
    SSHDevice.from_destination("testdev").connect()      # without IdentitiesOnly: works
    config.write_text(host_block(sshd_server, f"IdentityFile {tmp_path / 'stranger'}",
                                 "IdentitiesOnly yes"))
    with pytest.raises(StageError, match="authentication failed"):
        SSHDevice.from_destination("testdev").connect()


@pytest.mark.ssh
def test_revoked_host_key_is_refused_even_when_another_line_accepts_it(ssh_home, sshd_server):
    known_hosts = ssh_home / ".ssh" / "known_hosts"
    key_type, key = sshd_server.host_key_pub.split()[:2]
    revoked = f"@revoked * {key_type} {key}\n"
    known_hosts.write_text(f"{sshd_server.known_hosts_line()}\n{revoked}")
    for accept in (False, True):
        with pytest.raises(StageError, match="marked @revoked") as err:
            device(sshd_server, accept_new_host_key=accept).connect()
        assert "\n" not in str(err.value)
    known_hosts.write_text(revoked)                    # unknown otherwise: never recorded
    with pytest.raises(StageError, match="marked @revoked"):
        device(sshd_server, accept_new_host_key=True).connect()
    assert known_hosts.read_text() == revoked


@pytest.mark.ssh
def test_cert_authority_lines_do_not_break_known_hosts(ssh_home, sshd_server):
    from sshd import keygen

    ca = keygen(ssh_home / "ca").split()
    known_hosts = ssh_home / ".ssh" / "known_hosts"
    known_hosts.write_text(f"@cert-authority *.example {ca[0]} {ca[1]}\n"
                           f"{sshd_server.known_hosts_line()}\n")
    dev = device(sshd_server)
    dev.connect()
    dev.close()
