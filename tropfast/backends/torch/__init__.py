"""The ``torch`` backend: the closed form in plain PyTorch, on any device.

    closed_form  the batched closed form of the objective, its gradient and the prox step
    dense        the dense iteration (ISTA, FISTA, BCD steps) over a backend's prox_step
    sorted       the sorted path: one sort per hidden unit, then scalar recurrences
    kernels      the op-level kernels, registered as every op's default kernel
"""
from __future__ import annotations

from ... import ops
from .._status import BackendStatus
from .kernels import KERNELS, prepare_sorted

ops.register_default(KERNELS)

STATUS = BackendStatus("torch", True, "pure-PyTorch closed form, any device")

__all__ = ["KERNELS", "STATUS", "prepare_sorted"]
