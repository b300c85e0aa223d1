"""`edgesmith device setup` over the real sshd: a venv on the device, wheels pushed from the host."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import run_cli
from edgesmith.devices import Job
from edgesmith.devices.setup import setup
from edgesmith.devices.ssh import SSHDevice
from edgesmith.errors import StageError
from edgesmith.model import load
from edgesmith.measure import measure
from edgesmith.profiling import prepare

pytestmark = pytest.mark.ssh
SYSTEM_PYTHON = Path("/usr/bin/python3")


def tiny_wheel(directory: Path) -> Path:
    """A valid pure-python wheel that is not what the device needs: pip must then fail offline."""
    path = directory / "edgesmith_dummy-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("edgesmith_dummy/__init__.py", "")
        zf.writestr("edgesmith_dummy-0.1.dist-info/METADATA",
                    "Metadata-Version: 2.1\nName: edgesmith-dummy\nVersion: 0.1\n")
        zf.writestr("edgesmith_dummy-0.1.dist-info/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("edgesmith_dummy-0.1.dist-info/RECORD", "")
    return path


def device(sshd_server, **options) -> SSHDevice:
    return SSHDevice.from_destination(sshd_server.destination,
                                      identity=str(sshd_server.client_key), **options)


def test_empty_wheels_dir_is_a_clear_error(ssh_home, sshd_server, tmp_path):
    (tmp_path / "wheels").mkdir()
    proc = run_cli("device", "setup", sshd_server.destination, "-i", sshd_server.client_key,
                   "--wheels", tmp_path / "wheels")
    assert proc.returncode == 1 and "holds no .whl files" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_offline_device_without_the_wheels_says_so(ssh_home, sshd_server, tmp_path):
    if not SYSTEM_PYTHON.exists():
        pytest.skip("no system python3 to play a bare device")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    tiny_wheel(wheels)
    with pytest.raises(StageError, match="could not install numpy.*no internet.*--wheels"):
        setup(device(sshd_server, python=str(SYSTEM_PYTHON)), wheels=wheels)


def test_setup_from_pushed_wheels_makes_a_bare_device_usable(ssh_home, sshd_server, tmp_path,
                                                             models):
    """System python3 (no numpy, no onnxruntime) -> setup --wheels -> profiles like local."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip("no system python3 to play a bare device")
    version = subprocess.run([str(SYSTEM_PYTHON), "-c", "import sys; print('%d%d' % "
                              "sys.version_info[:2])"], capture_output=True, text=True).stdout
    wheels = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                           "--python-version", version.strip(), "-d", str(wheels), "numpy",
                           "onnxruntime"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-1000:]
    cnn = prepare(load(models / "digits_cnn.onnx"), models / "digits_cnn_eval.npz")
    bare = device(sshd_server, python=str(SYSTEM_PYTHON))
    before = measure(bare, cnn, Job(runs=5))
    assert before.stage == "ensure-runtime" and "lacks numpy" in before.error
    report = setup(device(sshd_server, python=str(SYSTEM_PYTHON)), wheels=wheels)
    assert {"numpy", "onnxruntime"} <= set(report.installed) and report.wheels_pushed >= 2
    after = measure(device(sshd_server), cnn, Job(runs=5))   # default python is now the venv
    assert after.ok, after.error
    assert after.accuracy["agreement"] == 1.0
