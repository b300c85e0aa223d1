"""The local machine as a device: the same runtime CLI and JSON as over SSH, minus SSH."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import device_runtime
from device_runtime.result import Result

from ..bundle import Bundle
from ..errors import EdgesmithError, StageError
from . import Job, parse_reply, parse_result

RUNTIME_PARENT = str(Path(device_runtime.__file__).resolve().parent.parent)


class LocalDevice:
    name = "local"

    def __init__(self):
        self._facts: dict | None = None   # this machine does not change during a run

    def _cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "device_runtime", *args]

    def _env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [RUNTIME_PARENT, env.get("PYTHONPATH")]))
        return env

    def facts(self) -> dict:
        """Read once per device object, like SSHDevice (the pipeline and tuner both ask)."""
        if self._facts is None:
            try:
                out = subprocess.run(self._cmd("facts"), capture_output=True, text=True,
                                     timeout=60, env=self._env())
                self._facts = json.loads(out.stdout)
            except (subprocess.TimeoutExpired, ValueError) as exc:
                raise EdgesmithError(f"local device runtime did not report its facts: "
                                     f"{exc}") from None
        return self._facts

    def push(self, bundle: Bundle) -> str:
        return str(bundle.path)   # bundles are built on this machine already

    def run(self, remote_path: str, job: Job) -> Result:
        try:
            proc = subprocess.run(self._cmd("run", remote_path, *job.argv()), capture_output=True,
                                  text=True, timeout=job.timeout_s, env=self._env())
        except subprocess.TimeoutExpired:
            return Result.failure("run", f"the device runtime took longer than "
                                  f"{job.timeout_s:.0f}s; raise the timeout (--timeout)")
        return parse_result(proc.stdout, proc.stderr, proc.returncode)

    def compare(self, paths: list[str], job: Job, rounds: int) -> dict:
        """`paths` timed in rotating rounds in one runtime process (see runtime `compare`)."""
        return self.call(["compare", *paths, *job.argv(), "--rounds", str(rounds)], "compare",
                         job.timeout_s * len(paths) * rounds)

    def call(self, args: list[str], stage: str, timeout_s: float = 600.0) -> dict:
        """`python -m device_runtime ARGS` here; its JSON reply."""
        try:
            proc = subprocess.run(self._cmd(*args), capture_output=True, text=True,
                                  timeout=timeout_s, env=self._env())
        except subprocess.TimeoutExpired:
            raise StageError(stage, f"the device runtime took longer than {timeout_s:.0f}s") \
                from None
        return parse_reply(proc.stdout, proc.stderr, proc.returncode, stage)

    def fetch(self, remote_path: str, local_path: Path) -> None:
        """A file the runtime wrote on the device, to `local_path` (temp file + rename)."""
        from ..model import atomic_write

        atomic_write(Path(local_path), Path(remote_path).read_bytes())
