"""Backends: the kernels behind the ``tropfast::`` ops, and the registry that picks one.

Names accepted by every ``backend=`` argument and by ``TROPFAST_BACKEND``:

    auto    the fastest available for the tensors' device (the default)
    torch   the pure-PyTorch closed form (any device; always available)       backends/torch/
    cpu     native C++ kernels (OpenMP), built from csrc/ when a compiler exists backends/native.py
    cuda    CUDA C++ kernels, built from csrc/cuda/ when torch has CUDA and nvcc exists
    triton  Triton kernels on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1  backends/triton/

Asking for a backend that cannot run raises ``BackendUnavailable`` saying why; nothing
falls back silently to a slower path once a specific backend was requested.
"""
from __future__ import annotations

from ._registry import (
    CHOICES,
    ENV_VAR,
    NAMES,
    Backend,
    available,
    clear_cache,
    epoch,
    get,
    kernels,
    requested,
    resolve,
    status,
)
from ._status import BackendStatus, BackendUnavailable

__all__ = [
    "CHOICES",
    "ENV_VAR",
    "NAMES",
    "Backend",
    "BackendStatus",
    "BackendUnavailable",
    "available",
    "clear_cache",
    "epoch",
    "get",
    "kernels",
    "requested",
    "resolve",
    "status",
]
