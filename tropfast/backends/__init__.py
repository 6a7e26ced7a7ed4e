"""Backend registry: which implementations exist here, why the others do not, and which runs.

Names accepted by every ``backend=`` argument and by ``TROPFAST_BACKEND``:

    auto    the fastest available for the tensors' device (the default)
    torch   the pure-PyTorch closed form (any device; always available)
    cpu     native C++ kernels (OpenMP), built from csrc/ when a compiler exists
    cuda    CUDA C++ kernels, built from csrc/cuda/ when torch has CUDA and nvcc exists
    triton  Triton kernels on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1

Asking for a backend that cannot run raises ``BackendUnavailable`` saying why; nothing
falls back silently to a slower path once a specific backend was requested.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

NAMES = ("torch", "cpu", "cuda", "triton")
CHOICES = ("auto",) + NAMES
ENV_VAR = "TROPFAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (not built, no device, unsupported dtype)."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is missing, or what it runs on

    def __str__(self) -> str:
        return f"{self.name:7s} {'yes' if self.available else 'no ':3s}  {self.reason}"


def _native_status(name: str) -> BackendStatus:
    from . import native

    ok, reason = native.status(name)
    return BackendStatus(name, ok, reason)


def _triton_status() -> BackendStatus:
    from . import triton_backend

    ok, reason = triton_backend.status()
    return BackendStatus("triton", ok, reason)


def _status(name: str) -> BackendStatus:
    if name == "torch":
        return BackendStatus("torch", True, "pure-PyTorch closed form, any device")
    if name in ("cpu", "cuda"):
        return _native_status(name)
    return _triton_status()


def available() -> dict[str, BackendStatus]:
    """Every backend with whether it can run here and, if not, why."""
    return {name: _status(name) for name in NAMES}


def requested(backend: str | None) -> str:
    """The backend name asked for (argument, else TROPFAST_BACKEND, else auto), checked."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto") or "auto"
    if not isinstance(name, str) or name.lower() not in CHOICES:
        src = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{src}={name!r} is not a backend; choose one of {', '.join(CHOICES)}")
    return name.lower()


def resolve(backend: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend that will run for tensors on ``device``."""
    name = requested(backend)
    if name == "auto":
        # statuses are looked up lazily: a CPU run never imports triton
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        for cand in order:
            if _status(cand).available and _supports(cand, device, dtype) is None:
                return cand
        return "torch"
    status = _status(name)
    if not status.available:
        raise BackendUnavailable(f"backend {name!r} is not available: {status.reason}")
    why_not = _supports(name, device, dtype)
    if why_not is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run here: {why_not}")
    return name


def _supports(name: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    """None if backend ``name`` handles tensors on ``device``, else the reason it does not."""
    if name == "torch":
        return None
    if name == "cpu" and device.type != "cpu":
        return f"it runs on CPU tensors, the input is on {device}"
    if name == "cuda" and device.type != "cuda":
        return f"it runs on CUDA tensors, the input is on {device}"
    if name == "triton":
        from . import triton_backend

        return triton_backend.supports(device, dtype)
    return None


def kernels(name: str):
    """The op table (``tropfast.ops.Kernels``) of a concrete backend name."""
    from .. import ops

    if name == "torch":
        return ops.CLOSED_FORM
    if name in ("cpu", "cuda"):
        # The native library registered CPU / CUDA kernels for the tropfast:: ops; the
        # dispatcher routes to them by device.
        return ops.DISPATCHED
    if name == "triton":
        from . import triton_backend

        return triton_backend.KERNELS
    raise ValueError(f"unknown backend {name!r}")
