"""SSH devices (paramiko). Placeholder until the SSH issue lands: refuses clearly."""
from __future__ import annotations

from ..errors import EdgesmithError


class SSHDevice:
    @classmethod
    def from_destination(cls, destination: str):
        raise EdgesmithError(f"unknown device {destination!r}: only `local` is supported yet")
