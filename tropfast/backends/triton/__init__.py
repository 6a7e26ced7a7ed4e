"""The ``triton`` backend: Triton kernels on CUDA tensors, or on CPU tensors in the interpreter.

    launch          host launchers with the op-level semantics, status and device support
    kernels         the unit kernels (ops and the fused dense solve)
    sorted_kernels  the sorted path's recurrence and materialisation kernels
    _mode           whether Triton runs compiled or interpreted (TRITON_INTERPRET=1)

Importing this package never imports triton; the kernels are imported at their first launch.
"""
from __future__ import annotations

from .._status import BackendStatus
from .launch import KERNELS, MAX_D, status, supports

__all__ = ["KERNELS", "MAX_D", "BackendStatus", "status", "supports"]
