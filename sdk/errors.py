"""Expected failures: the CLI prints them as one line and exits 1, never with a traceback."""
from __future__ import annotations


class EdgesmithError(Exception):
    """A failure the user can fix; the message names the cause and the fix."""


class StageError(EdgesmithError):
    """A failure in one named stage of a device round trip (connect, upload, run, ...)."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage, self.message = stage, message
