"""Expected failures: the CLI prints them as one line and exits 1, never with a traceback."""
from __future__ import annotations


class EdgesmithError(Exception):
    """A failure the user can fix; the message names the cause and the fix."""
