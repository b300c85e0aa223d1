"""edgesmith: optimise a neural network for an edge device, measured on that device.

The Python API the CLI is a thin layer over: `load`, `profile`, `optimize` (and the modules
below for single passes: `edgesmith.passes`, `edgesmith.search.int8`, `edgesmith.search.tune`).
"""
from __future__ import annotations

from .errors import EdgesmithError

__version__ = "0.1.0"
__all__ = ["EdgesmithError", "OptimizeConfig", "__version__", "load", "optimize", "profile"]


def load(path, input_shapes=None):
    """Load and validate a model file (see `edgesmith.model.load`)."""
    from .model import load as _load

    return _load(path, input_shapes)


def profile(model, **kwargs):
    """Bundle a model, run it on a device, return the Result (see `edgesmith.profiling`)."""
    from .profiling import profile as _profile

    return _profile(model, **kwargs)


def optimize(model, out_dir, **kwargs):
    """The main job: the fastest variant within the budgets (see `edgesmith.pipeline`)."""
    from .pipeline import optimize as _optimize

    return _optimize(model, out_dir, **kwargs)


def __getattr__(name):
    if name == "OptimizeConfig":
        from .pipeline import OptimizeConfig
        return OptimizeConfig
    raise AttributeError(f"module 'edgesmith' has no attribute {name!r}")
