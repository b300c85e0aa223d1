"""Passes: each is `apply(model: onnx.ModelProto, cfg) -> (ModelProto, PassReport)`.

No disk I/O inside a pass; every pass is checked numerically against the original in its tests.
The registry is a plain dict filled by a decorator that refuses duplicate names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

PASSES: dict[str, Callable] = {}


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


def get(name: str) -> Callable:
    from ..errors import EdgesmithError

    _load_all()
    if name not in PASSES:
        raise EdgesmithError(f"unknown pass {name!r}; known: {sorted(PASSES)}")
    return PASSES[name]


def _load_all() -> None:
    from . import fuse  # noqa: F401  (registers on import)
