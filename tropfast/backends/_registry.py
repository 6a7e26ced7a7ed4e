"""The backend registry: which backends exist here, why the others do not, and which runs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .. import ops
from . import native
from . import torch as torch_backend
from . import triton as triton_backend
from ._status import BackendStatus, BackendUnavailable
from .torch import dense

NAMES = ("torch", "cpu", "cuda", "triton")
CHOICES = ("auto",) + NAMES
ENV_VAR = "TROPFAST_BACKEND"


@dataclass(frozen=True)
class Backend:
    """A concrete backend: its op table and the whole-solve callables ``solve`` runs."""

    name: str
    kernels: ops.Kernels
    _prepare_sorted: Callable | None = None

    @property
    def prepares_sorted(self) -> bool:
        """Whether ``sorted_solver`` prepares a solver for the weights it is given (the torch
        backend sorts them once for many solves) rather than handing back the op."""
        return self._prepare_sorted is not None

    def sorted_solver(self, A3: Tensor, B3: Tensor) -> Callable:
        """The ``solve_sorted`` callable for repeated solves of these weights (a λ search).

        The torch backend's sorted path branches on values (its dense fallback), so under
        ``torch.compile`` it runs eagerly: one graph break, here (docs/design.md §6).
        """
        if self._prepare_sorted is None:
            return self.kernels.solve_sorted
        if torch.compiler.is_compiling():
            return _torch_sorted_eager
        return self._prepare_sorted(A3, B3)

    def start(self, A3: Tensor, B3: Tensor) -> dense.State:
        """The state of a step-by-step solve at (Â, B̂) = (A, B)."""
        return dense.start(A3, B3)

    def step(
        self, method: str, A3: Tensor, B3: Tensor, state: dense.State, lam1, lam2, lr, lam_gen=None
    ) -> dense.State:
        """One iteration of ``method``, with this backend's prox_step (the diagnostic step loop).

        With a generator penalty (lam_gen (L,)) the ISTA/FISTA step takes this backend's
        hsd_grad and the penalised prox of ops.GENERATOR_PENALTY (prox_step has no lam_gen)."""
        prox_gen = dense.grad_prox_gen(self.kernels.hsd_grad) if lam_gen is not None else None
        return dense.step(self.kernels.prox_step, method, A3, B3, state, lam1, lam2, lr, lam_gen, prox_gen)


_torch_sorted_eager = ops.eager(torch_backend.KERNELS.solve_sorted, "tropfast: the torch backend's sorted path branches on values")
SHAPES_ONLY = Backend("torch", ops.DISPATCHED)
"""Meta and fake tensors: the registered ops, whose fake kernels give shapes and dtypes."""

_BACKENDS = {
    "torch": Backend("torch", torch_backend.KERNELS, torch_backend.prepare_sorted),
    "cpu": Backend("cpu", native.KERNELS),
    "cuda": Backend("cuda", native.KERNELS),
    "triton": Backend("triton", triton_backend.KERNELS),
}


def status(name: str) -> BackendStatus:
    """Whether backend ``name`` can run here, and why not."""
    if name == "torch":
        return torch_backend.STATUS
    if name in ("cpu", "cuda"):
        return native.status(name)
    if name == "triton":
        ok, why = triton_backend.status()
        return BackendStatus("triton", ok, why)
    raise ValueError(f"unknown backend {name!r}")


def _can_run(name: str) -> bool:
    """``status(name).available`` without building the reason (cheap, and traceable)."""
    if name == "torch":
        return True
    if name in ("cpu", "cuda"):
        return native.available(name)
    return status(name).available


def available() -> dict[str, BackendStatus]:
    """Every backend with whether it can run here and, if not, why."""
    return {name: status(name) for name in NAMES}


def requested(backend: str | None) -> str:
    """The backend name asked for (argument, else TROPFAST_BACKEND, else auto), checked."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto") or "auto"
    if not isinstance(name, str) or name.lower() not in CHOICES:
        src = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{src}={name!r} is not a backend; choose one of {', '.join(CHOICES)}")
    return name.lower()


def _supports(name: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    """None if backend ``name`` handles tensors on ``device``, else the reason it does not."""
    if name == "torch":
        return None
    if name in ("cpu", "cuda"):
        return native.supports(name, device)
    return triton_backend.supports(device, dtype)


_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_resolved: dict = {}


def resolve(backend: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend that will run for tensors on ``device``.

    Decided once per (request, device type, dtype) and cached: later calls, including those
    inside a ``torch.compile`` trace, are a dictionary lookup.
    """
    name = requested(backend)
    key = (name, device.type, dtype, os.environ.get("TRITON_INTERPRET"))
    hit = _resolved.get(key)
    if hit is not None:
        return hit
    if name == "auto":
        # statuses are looked up lazily: a CPU run never imports triton
        chosen = "torch"
        for cand in _AUTO_ORDER.get(device.type, ("torch",)):
            if _can_run(cand) and _supports(cand, device, dtype) is None:
                chosen = cand
                break
    else:
        if not _can_run(name):
            raise BackendUnavailable(f"backend {name!r} is not available: {status(name).reason}")
        why_not = _supports(name, device, dtype)
        if why_not is not None:
            raise BackendUnavailable(f"backend {name!r} cannot run here: {why_not}")
        chosen = name
    _resolved[key] = chosen
    return chosen


_epoch = 0


def clear_cache() -> None:
    """Forget the cached resolutions (after a backend's availability changed)."""
    global _epoch
    _resolved.clear()
    _epoch += 1


def epoch() -> int:
    """How many times the resolutions were forgotten: what was decided from them under
    another epoch is stale (``solve`` keys its plans on it)."""
    return _epoch


def get(backend: str | None, device: torch.device, dtype: torch.dtype | None = None, *, shapes_only: bool = False) -> Backend:
    """The ``Backend`` that runs tensors of ``device`` and ``dtype`` for the request ``backend``.

    ``shapes_only`` (meta or fake tensors outside a compile trace): the registered ops, so
    the fake kernels answer; the request is still checked.
    """
    if shapes_only or device.type == "meta":
        resolve(backend, device, dtype)  # the request is checked all the same
        return SHAPES_ONLY
    return _BACKENDS[resolve(backend, device, dtype)]


def kernels(name: str) -> ops.Kernels:
    """The op table of a concrete backend name."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}")
    return _BACKENDS[name].kernels
