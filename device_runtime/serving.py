"""Serve a deployed NAME in an application: `device_runtime.serve("digits").run(feed)`.

The session follows the store's active pointer between calls: when it moves (a deploy, a
rollback), the new version is verified and loaded beside the old one on a background thread,
warmed with one call, then swapped in; calls go on on the old version meanwhile, so none fails
and none waits for a load (TF Serving's availability-preserving policy). `pin=V` serves one
version whatever the pointer says. Field telemetry is recorded per version (telemetry.py).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

from . import store
from .errors import RuntimeFailure
from .session import Session
from .telemetry import Telemetry


_SWITCH_LOCK, _LOADING = threading.Lock(), [0, 0.0]   # loads under way, the app's own interval


@contextmanager
def _short_switch_interval(seconds: float = 0.0002):
    """While a version loads beside the serving one, the interpreter hands the GIL over every
    0.2 ms instead of 5: the load's Python work (verifying, the protobuf walk) would otherwise
    hold an application's call for up to the whole interval each time the call needs the GIL."""
    with _SWITCH_LOCK:
        if _LOADING[0] == 0:
            _LOADING[1] = sys.getswitchinterval()
            sys.setswitchinterval(min(seconds, _LOADING[1]))
        _LOADING[0] += 1
    try:
        yield
    finally:
        with _SWITCH_LOCK:
            _LOADING[0] -= 1
            if _LOADING[0] == 0:
                sys.setswitchinterval(_LOADING[1])


class Served:
    def __init__(self, name: str, store_dir=None, pin: int | None = None, poll_s: float = 0.2,
                 flush_s: float = 10.0, telemetry: bool = True, **config_overrides):
        self.name, self.store_dir, self.pin, self.poll_s = name, store_dir, pin, poll_s
        self._dir, self._overrides = store.model_dir(name, store_dir), config_overrides
        self._stamp, self._next_poll, self._loading = self._stat(), 0.0, None
        self._last_feed: dict | None = None      # the warm-up of a new version: a real input
        now = store.pointer(name, store_dir)
        version = pin if pin is not None else now.get("version")
        if version is None:
            raise RuntimeFailure("serve", f"{name} has no active version in "
                                 f"{store.root(store_dir)}: deploy one (`edgesmith deploy OUT "
                                 f"--name {name}`)")
        if not store.version_dir(name, version, store_dir).is_dir():
            raise RuntimeFailure("serve", f"version {version} of {name} is not on this device")
        self._current = (Session.open(store.version_dir(name, version, store_dir),
                                      **config_overrides), version)
        self.last_version = version
        self.telemetry = Telemetry(self._dir / "telemetry", flush_s, capture=now.get(
            "capture", 0)) if telemetry else None

    @property
    def version(self) -> int:
        return self._current[1]

    @property
    def session(self) -> Session:
        return self._current[0]

    def _stat(self):
        try:
            st = os.stat(self._dir / "active.json")
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino, st.st_size

    def _follow(self) -> None:
        now = time.monotonic()
        if self.pin is not None or now < self._next_poll:
            return
        self._next_poll = now + self.poll_s
        stamp = self._stat()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        want = store.pointer(self.name, self.store_dir)
        if self.telemetry is not None:
            self.telemetry.capture = want.get("capture", 0)
        version = want.get("version")
        if version is not None and version not in (self._current[1], self._loading):
            self._loading = version
            threading.Thread(target=self._load, args=(version,), daemon=True).start()

    def _load(self, version: int) -> None:
        retired = None
        try:
            with _short_switch_interval():
                session = Session.open(store.version_dir(self.name, version, self.store_dir),
                                       **self._overrides)
                feed = self._last_feed        # the first call after the swap is warm
                try:
                    session.run(feed if feed is not None else session.example_feed())
                except RuntimeFailure:        # the new version takes other inputs
                    session.run(session.example_feed())
            retired, self._current = self._current, (session, version)
        except Exception as exc:   # noqa: BLE001 - the old version keeps serving; say why
            if self.telemetry is not None:
                self.telemetry.load_failed(version, f"{type(exc).__name__}: {exc}")
        finally:
            self._loading = None
        if retired is not None:    # calls in flight on the old version end; then it is freed
            time.sleep(max(1.0, 5 * self.poll_s))     # here, not inside an application's call
            del retired

    def run(self, feed: dict) -> dict:
        """Like Session.run, on the active version as of this call (`last_version` says
        which answered)."""
        self._follow()
        session, version = self._current
        t0 = time.perf_counter()
        try:
            outputs = session.run(feed)
        except Exception:
            if self.telemetry is not None:
                self.telemetry.error(version)
            raise
        if self.telemetry is not None:
            self.telemetry.record(version, (time.perf_counter() - t0) * 1e6, feed, outputs)
        self.last_version, self._last_feed = version, feed
        return outputs

    def close(self) -> None:
        if self.telemetry is not None:
            self.telemetry.flush()

    def __enter__(self) -> "Served":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
