"""The ``triton`` backend."""
from __future__ import annotations

import torch

KERNELS = None


def status() -> tuple[bool, str]:
    """(available, reason)."""
    return False, "the Triton kernels are not part of this version"


def supports(device: torch.device, dtype: torch.dtype | None) -> str | None:
    return "not available"
