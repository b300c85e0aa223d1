"""Ctrl-C reaches work on other threads. Python raises KeyboardInterrupt in the main thread
only; an upload or a model run on a pool's thread would go on, and the pool's shutdown would
wait for it to finish. The CLI installs `on_sigint`, which also sets `requested`: uploads and
host-side runs on any thread watch it and stop within moments."""
from __future__ import annotations

import signal
import threading

requested = threading.Event()


def on_sigint(signum, frame) -> None:
    requested.set()
    raise KeyboardInterrupt


def install() -> None:
    """From the main thread, at a command's start (a library user keeps their own handler)."""
    requested.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_sigint)
