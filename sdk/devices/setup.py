"""`edgesmith device setup`: a venv under the device's edgesmith dir with numpy and a backend.

Devices often have no internet: with `--wheels DIR` the host's wheels are pushed (hash-checked)
and pip installs from them alone (`--no-index`).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EdgesmithError, StageError
from .ssh import SSHDevice

q = shlex.quote
DEFAULT_PACKAGES = ("numpy", "onnxruntime")
OFFLINE_HINTS = ("Failed to establish a new connection", "Temporary failure in name resolution",
                 "No matching distribution", "Could not find a version", "Network is unreachable",
                 "Max retries exceeded")


@dataclass
class SetupReport:
    device: str
    python: str
    installed: dict = field(default_factory=dict)   # package -> version, as the device reports
    wheels_pushed: int = 0


def setup(device: SSHDevice, packages: tuple[str, ...] = DEFAULT_PACKAGES,
          wheels: str | Path | None = None, timeout_s: float = 1800) -> SetupReport:
    """Create `<remote dir>/venv` (system site packages visible) and pip install `packages`."""
    root = device.root()
    venv = f"{root}/venv"
    base = device.python or "python3"   # --python picks the interpreter the venv is built on
    status, _, err = device.execute(
        f"test -x {q(venv)}/bin/python3 || {q(base)} -m venv --system-site-packages {q(venv)}",
        "setup", 300)
    if status != 0:
        last = err.strip().splitlines()[-1] if err.strip() else f"exit {status}"
        raise StageError("setup", f"cannot create a venv on {device.target.label} ({last}); "
                         "install python3 and python3-venv there (apt-get install python3-venv)")
    pip = f"{q(venv)}/bin/python3 -m pip install --disable-pip-version-check"
    pushed = 0
    if wheels is not None:
        files = {p.name: p.read_bytes() for p in sorted(Path(wheels).glob("*.whl"))}
        if not files:
            raise EdgesmithError(f"--wheels {wheels} holds no .whl files; fill it with `pip "
                                 "download --only-binary=:all: --platform <device platform> "
                                 f"--python-version <device python> -d {wheels} "
                                 f"{' '.join(packages)}`")
        wheel_dir = f"{root}/wheels/{_digest(files)}"
        device.upload_files(files, wheel_dir, base, "setup")
        # --isolated: the device's pip.conf must not add other sources; these wheels alone
        pip += f" --isolated --no-index --find-links {q(wheel_dir)}"
        pushed = len(files)
    status, out, err = device.execute(f"{pip} {' '.join(q(p) for p in packages)}", "setup",
                                    timeout_s)
    if status != 0:
        text = out + err
        last = next((line for line in reversed(text.strip().splitlines()) if line.strip()), "")
        hint = ("; the device may have no internet: pass --wheels DIR with wheels for its "
                "platform" if any(h in text for h in OFFLINE_HINTS) else "")
        raise StageError("setup", f"pip on {device.target.label} could not install "
                         f"{', '.join(packages)}: {last.strip()}{hint}")
    device.python, device._runtime = f"{venv}/bin/python3", None
    facts = device.ensure_runtime().facts
    return SetupReport(device.name, device.python, facts.get("packages", {}), pushed)


def _digest(files: dict[str, bytes]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, data in sorted(files.items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:16]
