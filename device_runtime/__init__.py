"""edgesmith device runtime: verify a bundle, run it, measure it. Deployable alone.

Imports only the standard library at import time; numpy and the backend are imported when a
bundle is loaded, so `import device_runtime` stays cheap on a Raspberry Pi.
"""
from __future__ import annotations

__version__ = "0.1.0"
RESULT_SCHEMA = 1


def load(bundle_dir, **config_overrides):
    """Verify the bundle at `bundle_dir` and return a ready `Session` (`.run({name: array})`)."""
    from .session import Session

    return Session.open(bundle_dir, **config_overrides)


def serve(name: str, store=None, pin=None, **options):
    """The active version of a model deployed under `name` (`edgesmith deploy`), followed
    across deploys and rollbacks between calls, with field telemetry; see serving.py."""
    from .serving import Served

    return Served(name, store, pin, **options)
