"""Devices: one interface for the local machine and SSH hosts.

`facts() -> dict`, `push(bundle) -> remote path`, `run(remote path, job) -> Result`, and
`call(args) -> dict` for the runtime's other commands (deploy, rollback, status). A failure
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
    wait_idle_s: float = 0.0                     # before timing: wait for a quiet device

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
        if self.wait_idle_s:
            args += ["--wait-idle", str(self.wait_idle_s)]
        return args


FINGERPRINT_FACTS = ("arch", "cpu", "cpu_flags", "cores", "memory_mb", "gpu", "packages",
                     "ort_providers")


def fingerprint(facts: dict) -> str:
    """Same hardware and software -> same key; the hostname does not matter (a fleet shares)."""
    import hashlib
    import json

    keep = {k: facts.get(k) for k in FINGERPRINT_FACTS}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


class Device(Protocol):
    name: str

    def facts(self) -> dict: ...

    def push(self, bundle: Bundle) -> str: ...

    def run(self, remote_path: str, job: Job) -> Result: ...

    def call(self, args: list[str], stage: str, timeout_s: float) -> dict: ...


def crashed(stderr: str, returncode: int) -> str:
    """One line for a runtime that died without its reply: the signal that killed it (a local
    child reports -N, a remote shell 128+N; over SSH -1 is "no exit status", which sshd sends
    for a command killed by a signal), and its last words."""
    import signal

    number = -returncode if returncode < -1 else returncode - 128 if returncode > 128 else 0
    try:
        how = (f"killed by {signal.Signals(number).name}" if number else
               "killed by a signal" if returncode == -1 else f"exit {returncode}")
    except ValueError:
        how = f"exit {returncode}"
    tail = " | ".join(stderr.strip().splitlines()[-3:]) or "no output"
    return f"device runtime crashed ({how}): {tail}"


def parse_reply(stdout: str, stderr: str, returncode: int, stage: str) -> dict:
    """The JSON object a runtime command (deploy, rollback, status) printed, or a StageError
    naming its last words."""
    import json

    from ..errors import StageError

    for line in reversed(stdout.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    raise StageError(stage, crashed(stderr, returncode))


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
    return Result.failure("run", crashed(stderr, returncode))


def get_device(destination: str | None, **ssh_options):
    """`local` (or nothing) is this machine; anything else is an SSH destination.

    `ssh_options`: identity, accept_new_host_key, python, remote_dir, name.
    """
    if destination in (None, "", "local"):
        from .local import LocalDevice
        return LocalDevice()
    from .ssh import SSHDevice
    return SSHDevice.from_destination(destination, **ssh_options)


INVENTORY_FIELDS = {"name": str, "destination": str, "target": str, "identity": str,
                    "python": str, "remote_dir": str, "accept_new_host_key": bool,
                    "canary": bool}


def _inventory_entry(path, i: int, entry) -> dict:
    """One [[device]] table, every field type-checked: TOML's `"false"` is a non-empty string,
    which Python reads as true, so a quoted boolean would silently record unknown host keys."""
    from ..errors import EdgesmithError

    where = f"device inventory {path}: device #{i + 1}"
    if not isinstance(entry, dict):
        raise EdgesmithError(f"{where} is not a table; write it as [[device]] with key = value "
                             "lines")
    if isinstance(entry.get("name"), str):
        where += f" ({entry['name']!r})"
    if "destination" not in entry:
        raise EdgesmithError(f"{where} needs a 'destination' (local or user@host[:port])")
    unknown = set(entry) - set(INVENTORY_FIELDS)
    if unknown:
        raise EdgesmithError(f"{where} has unknown field(s) {sorted(unknown)}; known: "
                             f"{sorted(INVENTORY_FIELDS)}")
    for key, value in entry.items():
        want = INVENTORY_FIELDS[key]
        if want is bool and type(value) is not bool:
            raise EdgesmithError(f"{where}: {key} must be true or false without quotes, got "
                                 f"{value!r}")
        if want is str and (type(value) is not str or not value.strip()):
            raise EdgesmithError(f"{where}: {key} must be a non-empty quoted string, got "
                                 f"{value!r}")
    return entry


def load_inventory(path) -> list:
    """devices.toml: [[device]] name, destination, target, identity, python, remote_dir,
    accept_new_host_key, canary; a wrong type is a one-line error naming the device and the
    field."""
    from pathlib import Path

    from ..errors import EdgesmithError
    from ..targets import tomllib

    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise EdgesmithError(f"device inventory {path}: cannot read it ({exc})") from None
    tables = data.get("device", [])
    if not isinstance(tables, list):
        raise EdgesmithError(f"device inventory {path}: 'device' must be [[device]] tables")
    devices = []
    for i, raw in enumerate(tables):
        entry = _inventory_entry(path, i, raw)
        opts = {k: entry[k] for k in ("identity", "python", "remote_dir", "accept_new_host_key")
                if k in entry}
        device = get_device(entry["destination"], name=entry.get("name"), **opts) \
            if entry["destination"] != "local" else get_device("local")
        device.canary = entry.get("canary", False)     # deploy: these go first, one by one
        if "target" in entry:                          # the profile searches use (run.Run)
            from ..targets import get_profile

            try:
                get_profile(entry["target"])          # an unknown name: refused here
            except EdgesmithError as exc:
                raise EdgesmithError(f"device inventory {path}: device #{i + 1}: {exc}") from None
            device.target_profile = entry["target"]
        devices.append(device)
    if not devices:
        raise EdgesmithError(f"device inventory {path} lists no [[device]] entries")
    return devices
