"""One exception type for every expected failure, carrying the stage it happened in."""
from __future__ import annotations


class RuntimeFailure(Exception):
    """An expected failure: reported as a one-line error with its stage, never a traceback."""

    def __init__(self, stage: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.stage = stage
        self.message = message
        self.details = details      # structured facts the host explains (version skew)

    def __str__(self) -> str:
        return f"{self.stage}: {self.message}"
