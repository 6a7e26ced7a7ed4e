"""The public op wrappers: validate the input, pick the backend, run its kernel.

    tropfast.generators  tropfast.hsd_loss  tropfast.hsd_grad  tropfast.soft_threshold  tropfast.prox_step

Every check runs before any work and raises ``ValueError`` / ``TypeError`` naming the
argument.  Shape, dtype and argument checks are free; the NaN/Inf check reads each input
once, in eager mode only (under ``torch.compile`` and on meta/fake tensors the values are
not read; docs/design.md §6).  The backend is resolved once per device and dtype and cached,
so a compiled caller traces straight to the kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks, backends, ops

__all__ = ["generators", "hsd_grad", "hsd_loss", "prox_step", "soft_threshold"]


def _kernels(backend: str | None, ref: Tensor) -> ops.Kernels:
    shapes_only = not _checks.reads_values(ref) and not torch.compiler.is_compiling()
    return backends.get(backend, ref.device, ref.dtype, shapes_only=shapes_only).kernels


def _as_param(x: float | Tensor, ref: Tensor) -> Tensor:
    ct = ops.compute_dtype(ref.dtype)
    if isinstance(x, Tensor):
        return x.detach().to(device=ref.device, dtype=ct)
    return torch.tensor(float(x), device=ref.device, dtype=ct)


def _n_adapters(A: Tensor) -> int | None:
    return A.shape[0] if A.dim() == 3 else None


def generators(A: Tensor, B: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Zonotope generators G1_j = Diag(relu(B_j))·A, G2_j = Diag(relu(−B_j))·A.

    A: (r, d_in), B: (d_out, r) -> G1, G2: (d_out, r, d_in); batched: (L, d_out, r, d_in).
    Materialises d_out·r·d_in numbers per matrix: for inspection, not for optimisation.
    """
    _checks.check_adapter(A, B)
    return _kernels(backend, A).generators(A, B)


def hsd_loss(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor, *, backend: str | None = None) -> Tensor:
    """½Σ_j(‖G1_j−Ĝ1_j‖² + ‖G2_j−Ĝ2_j‖²) without the generators: () or (L,). Differentiable."""
    _checks.check_adapter(A, B)
    _checks.check_estimate(A, B, A_hat, B_hat)
    return _kernels(backend, A).hsd_loss(A, B, A_hat, B_hat)


def hsd_grad(
    A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor, *, backend: str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, ∂loss/∂A_hat, ∂loss/∂B_hat) in one pass: (), (r, d_in), (d_out, r) or batched."""
    _checks.check_adapter(A, B)
    _checks.check_estimate(A, B, A_hat, B_hat)
    args = [x.detach() for x in (A, B, A_hat, B_hat)]
    return _kernels(backend, A).hsd_grad(*args)


def soft_threshold(X: Tensor, tau: float | Tensor, *, backend: str | None = None) -> Tensor:
    """S_tau(X) = sign(X)·max(|X| − tau, 0); tau a number >= 0 or one per adapter (X: (L, …))."""
    _checks.check_tensor(X, "X")
    if isinstance(tau, Tensor) and tau.dim() == 1 and X.dim() != 3:
        raise ValueError(f"a per-adapter tau needs a batched X of shape (L, m, n), got X {tuple(X.shape)}")
    _checks.check_scalar(tau, "tau", X.shape[0] if X.dim() == 3 else None)
    return _kernels(backend, X).soft_threshold(X, _as_param(tau, X))


def prox_step(
    A: Tensor,
    B: Tensor,
    A_hat: Tensor,
    B_hat: Tensor,
    lr: float | Tensor,
    lam1: float | Tensor,
    lam2: float | Tensor,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """One step of Algorithm 1: A_hat ← S(A_hat − lr·gA, lr·lam1), B_hat ← S(B_hat − lr·gB, lr·lam2).

    Both gradients are taken at the current point.  lr > 0, lam >= 0: numbers or (L,) tensors.
    """
    _checks.check_adapter(A, B)
    _checks.check_estimate(A, B, A_hat, B_hat)
    n = _n_adapters(A)
    _checks.check_scalar(lr, "lr", n, positive=True)
    _checks.check_scalar(lam1, "lam1", n)
    _checks.check_scalar(lam2, "lam2", n)
    args = [x.detach() for x in (A, B, A_hat, B_hat)]
    params = [_as_param(p, A) for p in (lr, lam1, lam2)]
    return _kernels(backend, A).prox_step(*args, *params)
