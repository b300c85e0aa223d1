"""`edgesmith deploy | rollback | status`: a bundle installed on devices under a NAME, activated
on each only after it passed its check there (the device side: device_runtime/deploy.py).

A fleet rolls out canaries first (`canary`, or `canary = true` in devices.toml), one at a time; a canary that fails its check (or cannot be
reached) stops the rollout before any other device. The rest go in parallel, `parallel` at a
time; an unreachable device is a failed row, not a failed fleet. Running the same deploy again
finishes the job: devices already serving the bundle answer "already active".
"""
from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from device_runtime.bundle import MANIFEST, verify
from device_runtime.errors import RuntimeFailure
from device_runtime.store import model_dir

from .bundle import Bundle
from .errors import EdgesmithError, StageError


@dataclass(kw_only=True)
class DeployRow:
    """What one device said."""

    device: str
    ok: bool
    version: int | None = None
    active: int | None = None
    activated: bool = False
    reasons: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0
    canary: bool = False


def bundle_of(source) -> Bundle:
    """An optimize OUT (its bundle/) or a bundle directory, verified here before it travels."""
    path = Path(source)
    if (path / "bundle" / MANIFEST).is_file():
        path = path / "bundle"
    if not (path / MANIFEST).is_file():
        raise EdgesmithError(f"{source} is neither an `edgesmith optimize` output (OUT/bundle) "
                             "nor a bundle directory (manifest.json); pass one of those")
    try:
        manifest, bundle_id = verify(path)
    except RuntimeFailure as exc:
        raise EdgesmithError(f"{path} is not a whole bundle: {exc.message}") from None
    return Bundle(path=path, id=bundle_id, manifest=manifest)


def check_name(name: str) -> str:
    try:
        model_dir(name, "/")
    except RuntimeFailure as exc:
        raise EdgesmithError(exc.message) from None
    return name


def store_on(device, store=None):
    """The store the device runtime uses: `store`, else for an SSH device the `models` folder
    of its remote dir (by default ~/.edgesmith/models, where `device_runtime.serve` looks; a
    devices.toml `remote_dir` moves it), else the runtime's own default."""
    if store is None and hasattr(device, "root"):
        return f"{device.root()}/models"
    return store


def _options(store, keep=None, tolerance=None, capture=None) -> list[str]:
    args = ["--host", f"{os.environ.get('USER', 'user')}@{socket.gethostname()}"]
    for flag, value in (("--store", store), ("--keep", keep), ("--latency-tolerance", tolerance),
                        ("--capture", capture)):
        if value is not None:
            args += [flag, str(value)]
    return args


def _row(device, reply: dict, t0: float, canary: bool = False) -> DeployRow:
    check = reply.get("check") or {}
    return DeployRow(device=device.name, ok=bool(reply.get("ok")), version=reply.get("version"),
                     active=reply.get("active"), activated=bool(reply.get("activated")),
                     reasons=check.get("reasons") or ([reply["error"]] if reply.get("error")
                                                      else []),
                     figures=check.get("figures") or {}, note=reply.get("note", ""),
                     seconds=time.monotonic() - t0, canary=canary)


def deploy(source, name: str, devices: list, *, store=None, keep: int = 5,
           tolerance: float = 1.5, capture: int = 0, canary: int = 0, parallel: int = 4,
           timeout_s: float = 900.0, say=None) -> list[DeployRow]:
    """Push, check on the device, activate; one row per device (see the module docstring)."""
    bundle, say = bundle_of(source), say or (lambda text: None)
    check_name(name)

    def one(device, is_canary: bool = False) -> DeployRow:
        t0 = time.monotonic()
        try:
            say(f"{device.name}: pushing {bundle.id[:12]}")
            remote = device.push(bundle)
            say(f"{device.name}: checking on the device")
            args = _options(store_on(device, store), keep, tolerance, capture)
            reply = device.call(["deploy", remote, "--name", name, *args], "deploy", timeout_s)
        except (StageError, EdgesmithError) as exc:
            return DeployRow(device=device.name, ok=False, reasons=[str(exc)],
                             seconds=time.monotonic() - t0, canary=is_canary)
        finally:
            if hasattr(device, "close"):
                device.close()
        return _row(device, reply, t0, is_canary)

    tagged = [d for d in devices if getattr(d, "canary", False)]    # devices.toml canary = true
    devices = tagged + [d for d in devices if d not in tagged]
    canary = max(canary, len(tagged))
    rows = []
    for device in devices[:canary]:
        rows.append(one(device, True))
        if not rows[-1].ok:
            return rows + [DeployRow(device=d.name, ok=False, reasons=[
                f"not deployed: canary {device.name} failed"]) for d in devices[canary:]]
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        rows += list(pool.map(one, devices[canary:]))
    return rows


def rollback(name: str, devices: list, *, to: int | None = None, store=None,
             timeout_s: float = 120.0) -> list[DeployRow]:
    """The previous version (or `to`) active again on every device: a pointer switch."""
    check_name(name)
    rows = []
    for device in devices:
        t0 = time.monotonic()
        try:
            args = ["rollback", "--name", name, *_options(store_on(device, store))] + \
                (["--to", str(to)] if to is not None else [])
            reply = device.call(args, "rollback", timeout_s)
            rows.append(_row(device, reply, t0))
        except StageError as exc:
            rows.append(DeployRow(device=device.name, ok=False, reasons=[str(exc)]))
    return rows


def status(name: str | None, devices: list, *, store=None,
           timeout_s: float = 120.0) -> list[tuple[str, dict]]:
    """Each device's store: pointers, versions with their checks, field figures and drift."""
    named = ["--name", check_name(name)] if name else []
    out = []
    for device in devices:
        try:
            args = ["status", *named, *_options(store_on(device, store))]
            out.append((device.name, device.call(args, "status", timeout_s)))
        except StageError as exc:
            out.append((device.name, {"ok": False, "error": str(exc)}))
    return out


def pull_samples(name: str, device, out, *, store=None, timeout_s: float = 300.0) -> int:
    """The field inputs the device kept for NAME (deploy --capture N), as an .npz at `out` that
    `optimize --calib` reads; returns how many samples."""
    args = ["samples", "--name", check_name(name), *_options(store_on(device, store))]
    reply = device.call(args, "samples", timeout_s)
    if not reply.get("ok"):
        raise EdgesmithError(f"{device.name}: {reply.get('error')}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    device.fetch(reply["path"], Path(out))
    return int(reply["samples"])
