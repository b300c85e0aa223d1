"""Devices: one interface for the local machine and SSH hosts.

`facts() -> dict`, `push(bundle) -> remote path`, `run(remote path, job) -> Result`. A failure
inside push or run returns a Result carrying `error` and `stage`; it never raises into a search.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from device_runtime.result import Result

from ..bundle import Bundle


@dataclass(frozen=True)
class Job:
    """How to measure a bundle on the device."""

    runs: int = 100
    warmup: int = 10
    min_time_s: float = 0.0
    max_time_s: float = 120.0
    threads: int | None = None
    config: dict = field(default_factory=dict)   # runtime config overrides
    evaluate: bool = True
    profile_ops: bool = False
    timeout_s: float = 600.0                     # hard limit for the whole run on the device
    lock_timeout_s: float = 600.0                # wait this long for another benchmark to end
    backend: str = "onnxruntime"                 # what the bundle needs (checked before running)

    def __post_init__(self):
        if self.runs < 1:
            raise ValueError(f"Job.runs must be >= 1, got {self.runs}")
        if self.warmup < 0:
            raise ValueError(f"Job.warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 0:
            raise ValueError(f"Job.threads must be >= 0, got {self.threads}")

    def argv(self) -> list[str]:
        """Arguments of `python -m device_runtime run BUNDLE` for this job."""
        import json

        args = ["--json", "--runs", str(self.runs), "--warmup", str(self.warmup),
                "--min-time", str(self.min_time_s), "--max-time", str(self.max_time_s)]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        if self.config:
            args += ["--config", json.dumps(self.config, sort_keys=True)]
        if not self.evaluate:
            args.append("--no-eval")
        if self.profile_ops:
            args.append("--profile-ops")
        return args


class Device(Protocol):
    name: str

    def facts(self) -> dict: ...

    def push(self, bundle: Bundle) -> str: ...

    def run(self, remote_path: str, job: Job) -> Result: ...


def parse_result(stdout: str, stderr: str, returncode: int) -> Result:
    """The runtime prints one JSON object; anything else means it crashed."""
    import json

    for line in reversed(stdout.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and "schema" in data:
            return Result.from_dict(data)
    tail = " | ".join(stderr.strip().splitlines()[-3:]) or "no output"
    return Result.failure("run", f"device runtime crashed (exit {returncode}): {tail}")


def get_device(destination: str | None, **ssh_options):
    """`local` (or nothing) is this machine; anything else is an SSH destination.

    `ssh_options`: identity, accept_new_host_key, python, remote_dir, name.
    """
    if destination in (None, "", "local"):
        from .local import LocalDevice
        return LocalDevice()
    from .ssh import SSHDevice
    return SSHDevice.from_destination(destination, **ssh_options)


def load_inventory(path) -> list:
    """devices.toml: [[device]] name, destination, target, identity, python, remote_dir."""
    from pathlib import Path

    from ..errors import EdgesmithError
    from ..targets import tomllib

    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise EdgesmithError(f"device inventory {path}: cannot read it ({exc})") from None
    devices = []
    for i, entry in enumerate(data.get("device", [])):
        if not isinstance(entry, dict) or "destination" not in entry:
            raise EdgesmithError(f"device inventory {path}: device #{i + 1} needs a "
                                 "'destination' (local or user@host[:port])")
        unknown = set(entry) - {"name", "destination", "target", "identity", "python",
                                "remote_dir", "accept_new_host_key"}
        if unknown:
            raise EdgesmithError(f"device inventory {path}: device #{i + 1} has unknown "
                                 f"field(s) {sorted(unknown)}")
        opts = {k: entry[k] for k in ("identity", "python", "remote_dir", "accept_new_host_key")
                if k in entry}
        device = get_device(entry["destination"], name=entry.get("name"), **opts) \
            if entry["destination"] != "local" else get_device("local")
        devices.append(device)
    if not devices:
        raise EdgesmithError(f"device inventory {path} lists no [[device]] entries")
    return devices
