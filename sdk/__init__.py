"""edgesmith: optimise a neural network for an edge device, measured on that device."""
from __future__ import annotations

from .errors import EdgesmithError

__version__ = "0.1.0"
__all__ = ["EdgesmithError", "__version__", "load", "profile"]


def load(path, input_shapes=None):
    """Load and validate a model file (see `sdk.model.load`)."""
    from .model import load as _load

    return _load(path, input_shapes)


def profile(model, **kwargs):
    """Bundle a model, run it on a device, return the Result (see `sdk.profiling.profile`)."""
    from .profiling import profile as _profile

    return _profile(model, **kwargs)
