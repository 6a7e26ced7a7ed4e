"""What every backend module and the registry share: the unavailability error and the status record."""
from __future__ import annotations

from dataclasses import dataclass


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (not built, no device, unsupported dtype)."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is missing, or what it runs on

    def __str__(self) -> str:
        return f"{self.name:7s} {'yes' if self.available else 'no ':3s}  {self.reason}"
