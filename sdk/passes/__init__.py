"""Passes: each is `apply(model: onnx.ModelProto, config) -> (ModelProto, PassReport)`.

One contract: a pass is pure (no disk, no global logging, no caches of its own); data a pass needs
(calibration feeds, training data, a teacher) arrives in its config, and caches belong to the
caller. Every pass is checked numerically against the original in its tests. The registry is a
plain dict filled by a decorator that refuses duplicate names; `get()` loads every pass module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

PASSES: dict[str, Callable] = {}
MODULES = ("fuse", "quantize", "equalize", "prune", "distill", "reconstruct", "qat", "ranges",
           "kernels", "int8_kernels")   # torch is imported lazily


@dataclass
class PassReport:
    name: str
    changed: int = 0                                   # how many rewrites it made
    details: list[str] = field(default_factory=list)   # one line per rewrite or skip
    metrics: dict = field(default_factory=dict)

    def add(self, line: str) -> None:
        self.changed += 1
        self.details.append(line)


def register(name: str):
    def wrap(fn):
        if name in PASSES:
            raise ValueError(f"pass {name!r} is registered twice")
        PASSES[name] = fn
        return fn
    return wrap


def load_all() -> dict[str, Callable]:
    """Import every pass module (each registers on import); the full registry."""
    import importlib

    for module in MODULES:
        importlib.import_module(f"{__name__}.{module}")
    return PASSES


def get(name: str) -> Callable:
    from ..errors import EdgesmithError

    load_all()
    if name not in PASSES:
        raise EdgesmithError(f"unknown pass {name!r}; known: {sorted(PASSES)}")
    return PASSES[name]
