"""Shared fixtures: the committed example models, an isolated cache, the CLI in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"


@pytest.fixture(scope="session")
def ort_header(tmp_path_factory) -> Path | None:
    """onnxruntime's C API header, fetched (and sha256-checked) once for the whole session;
    None when it cannot be fetched: tests that build kernels then fail saying why."""
    from edgesmith.errors import EdgesmithError
    from edgesmith.own_kernels import header_dir

    saved = os.environ.get("EDGESMITH_CACHE")
    os.environ["EDGESMITH_CACHE"] = str(tmp_path_factory.mktemp("header-cache"))
    try:
        return header_dir()
    except EdgesmithError:
        return None
    finally:
        if saved is None:
            os.environ.pop("EDGESMITH_CACHE")
        else:
            os.environ["EDGESMITH_CACHE"] = saved


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch, ort_header):
    """Every test gets its own bundle cache: no test sees another's bundles (the kernel header
    is the exception: a pinned download, fetched once)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGESMITH_CACHE", str(cache))
    if ort_header is not None and "EDGESMITH_ORT_INCLUDE" not in os.environ:
        monkeypatch.setenv("EDGESMITH_ORT_INCLUDE", str(ort_header))
    return cache


@pytest.fixture(scope="session")
def models() -> Path:
    return MODELS


def run_cli(*args: str, timeout: float = 300, cwd=ROOT) -> subprocess.CompletedProcess:
    """Run `edgesmith ARGS` as a user would: a separate process, real exit code and streams."""
    return subprocess.run([sys.executable, "-m", "edgesmith", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=dict(os.environ))


def ssh_device(server, key=None, **options):
    """An SSHDevice for a test sshd (the loopback one, or a netns host's), running the test's
    own interpreter unless the test says otherwise."""
    from edgesmith.devices.ssh import SSHDevice

    options.setdefault("python", sys.executable)
    return SSHDevice.from_destination(server.destination, identity=str(
        key or server.client_key), **options)


@pytest.fixture
def cnn(models):
    """The digits CNN bundled with its eval set: what most device tests push and run."""
    from edgesmith.model import load
    from edgesmith.profiling import prepare

    return prepare(load(models / "digits_cnn.onnx"), models / "digits_cnn_eval.npz")


def run_with_fault(dev, path: str, fault, after_s: float = 2.0, timeout_s: float = 20):
    """A long run on `dev` with `fault()` injected `after_s` into it: (Result, seconds taken)."""
    import threading
    import time

    from edgesmith.devices import Job

    timer = threading.Timer(after_s, fault)
    t0 = time.monotonic()
    timer.start()
    try:
        result = dev.run(path, Job(runs=1, warmup=0, min_time_s=60, max_time_s=120,
                                   timeout_s=timeout_s, lock_timeout_s=1, evaluate=False))
    finally:
        timer.cancel()
        timer.join()
    return result, time.monotonic() - t0


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def require(ok: bool, message: str) -> None:
    """Skip on a developer machine that lacks something; under CI=true, fail instead."""
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def require_kernel_build() -> None:
    """edgesmith's kernels can be built here: a C compiler for this machine and onnxruntime's
    C API header (downloaded once, or $EDGESMITH_ORT_INCLUDE); off CI a skip naming what is
    missing, not an error from the build."""
    from device_runtime.facts import collect
    from edgesmith.errors import EdgesmithError
    from edgesmith.own_kernels import header_dir, toolchain

    found = toolchain(collect(with_providers=False))
    require(not isinstance(found, str), f"{found} (.ci/run installs it)")
    try:
        why = "" if header_dir() is not None else "EDGESMITH_ORT_INCLUDE has no onnxruntime_c_api.h"
    except EdgesmithError as exc:
        why = str(exc)
    require(not why, why)


def small_disk(path: Path, size: str, what: str):
    """A tmpfs of `size` mounted at `path` (a device's or a store's disk that fills up): a
    context manager that unmounts it; skips off CI where mounting needs root it lacks."""
    import contextlib

    @contextlib.contextmanager
    def mounted():
        path.mkdir(parents=True, exist_ok=True)
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, timeout=30).returncode == 0
        require(ok, f"cannot mount a tmpfs here (needs root) to fill {what}")
        try:
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)
    return mounted()


def client_home(tmp_path, monkeypatch, known_hosts_line: str, ssh_config: str = "") -> Path:
    """A user HOME whose ~/.ssh knows the test device, and a remote dir of the test's own."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(known_hosts_line + "\n")
    (home / ".ssh" / "config").write_text(ssh_config)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setenv("EDGESMITH_REMOTE_DIR", str(tmp_path / "remote"))
    return home


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory):
    """A real sshd for the session; CI=true turns a missing sshd into a failure, not a skip."""
    import sshd as sshd_mod

    require(sshd_mod.available(),
            "/usr/sbin/sshd or ssh-keygen missing (apt-get install -y openssh-server)")
    server = sshd_mod.Sshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def ssh_home(tmp_path, monkeypatch, sshd_server):
    """HOME for the loopback sshd, with a Host alias `testdev` in ~/.ssh/config."""
    return client_home(tmp_path, monkeypatch, sshd_server.known_hosts_line(),
                       f"Host testdev\n  HostName 127.0.0.1\n  Port {sshd_server.port}\n"
                       f"  User {sshd_server.user}\n  IdentityFile {sshd_server.client_key}\n")


@pytest.fixture(scope="session")
def netns_host(tmp_path_factory, sshd_server):
    """sshd in a network namespace created here (10.200.x.x over a veth); CI=true: never skip."""
    import netns

    require(netns.available(), "cannot create network namespaces here (needs root, iproute2)")
    host = netns.NetnsHost(tmp_path_factory.mktemp("netns"),
                           netns.free_index(10 + os.getpid() % 240))           # own subnet
    try:
        host.start()
        yield host
    finally:
        host.stop()


@pytest.fixture
def netns_home(tmp_path, monkeypatch, netns_host):
    return client_home(tmp_path, monkeypatch, netns_host.known_hosts_line())


@pytest.fixture(scope="session")
def emulated_pi(tmp_path_factory):
    """An aarch64 Debian 'Raspberry Pi' under qemu in its own namespace (tests/emulated_pi.py).

    The cold build takes ~10 min and is cached; off CI an uncached rootfs is a skip, not a build.
    """
    import emulated_pi as pi
    import netns

    require(netns.available(), "cannot create network namespaces here (needs root, iproute2)")
    if os.environ.get("CI") != "true" and not (pi.cached_rootfs() / pi.COMPLETE).exists():
        pytest.skip("no emulated-Pi rootfs cached: run `scripts/emulated-pi build` (~10 min)")
    device = pi.EmulatedPi(tmp_path_factory.mktemp("pi"), 10 + (os.getpid() + 120) % 240)
    try:
        yield device.start()
    finally:
        device.stop()


def pytest_sessionfinish(session, exitstatus):
    """Under CI=true nothing may skip: .ci/run installs every tool the tests drive, so a skip
    there is a missing install step (or a test that hides a path), and the run fails."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("CI") == "true" and skipped and exitstatus == 0:
        for report in skipped:
            reporter.write_line(f"skipped under CI=true: {report.nodeid}: {report.longrepr}")
        session.exitstatus = 1


def reshape_model(path: Path, shape: tuple[int, int]) -> Path:
    """An ONNX model of one Reshape of a 1x4 input into `shape`: no weights (0 MACs), and one
    that loads but fails on every run when `shape` does not hold 4 values."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        [numpy_helper.from_array(np.array(shape, np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def external_matmul(path: Path, weights, location: str, length: int | None = None) -> Path:
    """A MatMul of a 1x4 input by `weights` (4x4) kept in external data at `location` (as
    written in the model; `length` as declared there, when given). Only the model is written."""
    import onnx
    from onnx import TensorProto, external_data_helper, helper, numpy_helper

    w = numpy_helper.from_array(weights, "W")
    external_data_helper.set_external_data(w, location=location, length=length)
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path
