"""The closed form of docs/design.md §1-2 in plain PyTorch (the torch backend's arithmetic).

Nothing here materialises the generators: the cost is O(L·r·(d_in + d_out)).

Conventions (shared by every backend):
    A, A_hat: (L, r, d_in)      B, B_hat: (L, d_out, r)
    lr, lam1, lam2, tau: scalars or tensors of shape (L,) (one value per adapter)
Inputs here are already validated and batched; half precision is upcast by the caller.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["generators", "hsd_grad", "hsd_loss", "soft_threshold", "prox_step", "prox_step_gen", "gen_prox"]


def _per_adapter(x: Tensor | float, like: Tensor) -> Tensor | float:
    """Broadcast a per-adapter value (shape () or (L,)) against a (L, m, n) tensor."""
    if isinstance(x, Tensor) and x.dim() == 1:
        return x.to(like.dtype).view(-1, 1, 1)
    return x


def generators(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """G1 = Diag(relu(B_j))·A, G2 = Diag(relu(-B_j))·A.  A: (L, r, d_in), B: (L, d_out, r) -> (L, d_out, r, d_in) x2."""
    A4 = A.unsqueeze(-3)
    return torch.relu(B).unsqueeze(-1) * A4, torch.relu(-B).unsqueeze(-1) * A4


def _loss(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor, beta: Tensor, a_hat: Tensor) -> Tensor:
    # ½Σ_i(β a − 2 s c + β̂ â) cancels badly near Â = A (the start of every solve).  The same
    # value rearranged around E = A − Â is a sum of small terms:
    #   ½Σ_i( β‖E_i‖² + 2 q_i ⟨E_i, Â_i⟩ + δ_i â_i ),   q = β − s,   δ = β − 2s + β̂,
    # with q and δ summed from the differences of the relu parts, so nothing cancels.
    E = A - A_hat
    dP = torch.relu(B) - torch.relu(B_hat)
    dN = torch.relu(-B) - torch.relu(-B_hat)
    q = (torch.relu(B) * dP + torch.relu(-B) * dN).sum(-2)
    delta = (dP * dP + dN * dN).sum(-2)
    per_unit = beta * (E * E).sum(-1) + 2.0 * q * (E * A_hat).sum(-1) + delta * a_hat
    return 0.5 * per_unit.sum(-1)


def hsd_loss(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor) -> Tensor:
    """Smooth part of F per adapter: (L,)."""
    return _loss(A, B, A_hat, B_hat, (B * B).sum(-2), (A_hat * A_hat).sum(-1))


def _grads(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dF/dA_hat, dF/dB_hat, a_hat) without the loss."""
    prod = B * B_hat
    s = torch.relu(prod).sum(-2)
    beta_hat = (B_hat * B_hat).sum(-2)
    c = (A * A_hat).sum(-1)
    a_hat = (A_hat * A_hat).sum(-1)
    grad_A = beta_hat.unsqueeze(-1) * A_hat - s.unsqueeze(-1) * A
    grad_B = a_hat.unsqueeze(-2) * B_hat - c.unsqueeze(-2) * torch.where(prod > 0, B, torch.zeros_like(B))
    return grad_A, grad_B, a_hat


def hsd_grad(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(loss (L,), dF/dA_hat (L, r, d_in), dF/dB_hat (L, d_out, r)) from the closed form."""
    grad_A, grad_B, a_hat = _grads(A, B, A_hat, B_hat)
    return _loss(A, B, A_hat, B_hat, (B * B).sum(-2), a_hat), grad_A, grad_B


def soft_threshold(X: Tensor, tau: Tensor | float) -> Tensor:
    """S_tau(X) = sign(X)·max(|X| − tau, 0); tau scalar or per adapter (L,)."""
    tau = _per_adapter(tau, X)
    return torch.sign(X) * torch.clamp_min(X.abs() - tau, 0)


def prox_step(
    A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor, lr: Tensor | float, lam1: Tensor | float, lam2: Tensor | float
) -> tuple[Tensor, Tensor]:
    """One ISTA step: both gradients at the current point, then soft-thresholding."""
    gA, gB, _ = _grads(A, B, A_hat, B_hat)
    lr_a = _per_adapter(lr, A_hat)
    new_A = soft_threshold(A_hat - lr_a * gA, lr_a * _per_adapter(lam1, A_hat))
    new_B = soft_threshold(B_hat - lr_a * gB, lr_a * _per_adapter(lam2, B_hat))
    return new_A, new_B


def gen_prox(
    A_hat: Tensor, B_hat: Tensor, gA: Tensor, gB: Tensor, lr, lam1, lam2, lam_gen: Tensor
) -> tuple[Tensor, Tensor]:
    """The proximal step with the generator penalty (ops.GENERATOR_PENALTY) from the gradients
    gA, gB at (A_hat, B_hat): each block's prox with the other block's norm at (A_hat, B_hat).

    Â ← max(0, 1 − lr·lam_gen·‖B̂_i‖₁/‖U_i‖₂)·U_i with U = S(Â − lr·gA, lr·λ1);
    B̂ ← S(B̂ − lr·gB, lr·(λ2 + lam_gen·‖Â_i‖₂)).  lam_gen: (L,); lr, lam1, lam2 scalars or (L,).
    """
    tiny = torch.finfo(A_hat.dtype).tiny
    lr_a = _per_adapter(lr, A_hat)
    lg = lam_gen.to(A_hat.dtype).view(-1, 1)  # (L, 1) against per-unit (L, r)
    lr_u = lr_a.view(-1, 1) if isinstance(lr_a, Tensor) else lr_a
    on = lg > 0
    U = soft_threshold(A_hat - lr_a * gA, lr_a * _per_adapter(lam1, A_hat))
    norm_u = torch.linalg.vector_norm(U, dim=-1).clamp_min(tiny)
    shrink = torch.clamp_min(1 - lr_u * lg * B_hat.abs().sum(-2) / norm_u, 0)
    new_A = U * torch.where(on, shrink, torch.ones_like(shrink)).unsqueeze(-1)
    l2 = _per_adapter(lam2, B_hat)
    l2_u = l2.view(-1, 1) if isinstance(l2, Tensor) else l2
    norm_a = torch.linalg.vector_norm(A_hat, dim=-1)
    thr = lr_u * torch.where(on, l2_u + lg * norm_a, l2_u * torch.ones_like(shrink))
    Z = B_hat - lr_a * gB
    new_B = torch.sign(Z) * torch.clamp_min(Z.abs() - thr.unsqueeze(-2), 0)
    return new_A, new_B


def prox_step_gen(
    A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor, lr: Tensor | float, lam1: Tensor | float, lam2: Tensor | float,
    lam_gen: Tensor,
) -> tuple[Tensor, Tensor]:
    """One ISTA step with the generator penalty: ``gen_prox`` of the closed-form gradients."""
    gA, gB, _ = _grads(A, B, A_hat, B_hat)
    return gen_prox(A_hat, B_hat, gA, gB, lr, lam1, lam2, lam_gen)
