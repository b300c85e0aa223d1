"""The model store on the device: numbered versions per NAME and an active pointer.

    <store>/<name>/versions/<n>/   a verified bundle; <n> in deploy order (a bundle deployed
                                   again keeps its number) with `.deployed.json` (its check)
    <store>/<name>/active.json     {"version", "previous", "history"}: replaced by rename after
                                   an fsync, so a reader sees the old pointer or the new one
    <store>/<name>/.lock           deploys to one name are serialized, whichever host sends them
    <store>/<name>/telemetry/      field figures the serving sessions flush (serving.py)

A version is made active only by `activate`, which the deploy command calls after the version
passed its check on this device (TF Serving's numbered versions; Mender's commit-or-stay).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from .bundle import MANIFEST, verify
from .errors import RuntimeFailure

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HISTORY = 20          # pointer switches remembered in active.json


def root(path=None) -> Path:
    """The store: `path`, else $EDGESMITH_STORE, else ~/.edgesmith/models."""
    return Path(path or os.environ.get("EDGESMITH_STORE") or
                Path.home() / ".edgesmith" / "models")


def model_dir(name: str, store=None) -> Path:
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise RuntimeFailure("deploy", f"model name {name!r}: use 1-64 letters, digits, '.', "
                             "'_' or '-', starting with a letter or digit (no paths, no spaces)")
    return root(store) / name


def device_lock(path, timeout_s: float):
    """Hold an exclusive flock on `path`; waits up to `timeout_s`, saying so once on stderr."""
    import fcntl

    handle = open(path, "a+")
    deadline, told = time.monotonic() + timeout_s, False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if not told:
                print(f"waiting for another edgesmith job on this device (lock {path})",
                      file=sys.stderr, flush=True)
                told = True
            if time.monotonic() > deadline:
                handle.close()
                raise RuntimeFailure("lock", f"another edgesmith job held {path} for more than "
                                     f"{timeout_s:.0f}s; raise --lock-timeout or retry later")
            time.sleep(0.05)


def lock(name: str, store=None, timeout_s: float = 600.0):
    directory = model_dir(name, store)
    directory.mkdir(parents=True, exist_ok=True)
    return device_lock(directory / ".lock", timeout_s)


def write_json(path: Path, data: dict) -> None:
    """Temp file, fsync, rename, fsync the directory: the old content or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def pointer(name: str, store=None) -> dict:
    """The active pointer ({} before the first activation)."""
    return read_json(model_dir(name, store) / "active.json")


def versions(name: str, store=None) -> dict:
    """{version number: its .deployed.json} for every complete version."""
    found = {}
    directory = model_dir(name, store) / "versions"
    for child in directory.iterdir() if directory.is_dir() else ():
        if child.name.isdigit() and (child / ".deployed.json").is_file():
            found[int(child.name)] = read_json(child / ".deployed.json")
    return dict(sorted(found.items()))


def version_dir(name: str, version: int, store=None) -> Path:
    return model_dir(name, store) / "versions" / str(int(version))


def install(bundle_dir, name: str, store=None, host: str = "") -> tuple[int, bool]:
    """Copy a verified bundle in as the next version (built aside, verified again, renamed);
    the same bundle deployed again is its old version. Hold `lock(name)` around it."""
    manifest, bundle_id = verify(bundle_dir)
    for number, info in versions(name, store).items():
        if info.get("bundle_sha256") == bundle_id:
            return number, False
    parent = model_dir(name, store) / "versions"
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(".tmp-*"):      # a killed deploy's leftovers: never loadable
        shutil.rmtree(stale, ignore_errors=True)
    number = max([int(c.name) for c in parent.iterdir() if c.name.isdigit()] or [0]) + 1
    tmp = parent / f".tmp-{number}-{os.getpid()}"
    tmp.mkdir()
    try:
        for rel in [*manifest.files, MANIFEST]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(bundle_dir) / rel, tmp / rel)
        verify(tmp)
        write_json(tmp / ".deployed.json", {"bundle_sha256": bundle_id, "host": host,
                                            "installed": time.time(), "meta": manifest.meta})
        os.rename(tmp, parent / str(number))
    except OSError as exc:
        raise RuntimeFailure("install", f"cannot install version {number} of {name}: "
                             f"{exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return number, True


def record_check(name: str, version: int, check: dict, store=None) -> None:
    path = version_dir(name, version, store) / ".deployed.json"
    write_json(path, {**read_json(path), "check": check})


def activate(name: str, version: int, store=None, host: str = "", keep: int = 5,
             capture: int = 0) -> dict:
    """Point NAME at `version` (the previous one stays for rollback); keep the newest `keep`
    versions besides the two pointed at. `capture`: how many field inputs the serving sessions
    keep as samples (0: none). Hold `lock(name)` around it."""
    old = pointer(name, store)
    if old.get("version") == version and old.get("capture", 0) == capture:
        return old
    history = (old.get("history") or [])[-(HISTORY - 1):]
    new = {"version": version, "previous": old.get("previous") if old.get("version") == version
           else old.get("version"), "host": host, "capture": capture, "activated": time.time(),
           "history": history + [{"version": version, "host": host, "at": time.time()}]}
    write_json(model_dir(name, store) / "active.json", new)
    keep_too = {version, old.get("version")}
    numbers = sorted(versions(name, store))
    for number in numbers[:max(0, len(numbers) - keep)]:
        if number not in keep_too:
            shutil.rmtree(version_dir(name, number, store), ignore_errors=True)
    return new
