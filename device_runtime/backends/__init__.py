"""Backends are found by file name: `device_runtime/backends/<name>.py` defines `Backend`."""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import RuntimeFailure


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def get(name: str):
    """The Backend class registered under `name` (the module's file name)."""
    if name not in names():
        raise RuntimeFailure("load", f"unknown backend {name!r}; this runtime has {names()}")
    return importlib.import_module(f"{__name__}.{name}").Backend
