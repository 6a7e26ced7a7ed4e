"""The oracle: materialised zonotope generators and autograd.  Small shapes only.

Everything else in tropfast is checked against these functions.  They follow the paper's
definitions literally (Bhardwaj, Vaidya, Poria 2023):

    G1_j = Diag(relu(B[j, :])) · A        G2_j = Diag(relu(-B[j, :])) · A
    loss  = ½ Σ_j ( ‖G1_j − Ĝ1_j‖²_F + ‖G2_j − Ĝ2_j‖²_F )

and cost O(d_out · r · d_in) memory per adapter.  Shapes: A (r, d_in), B (d_out, r), or
batched (L, r, d_in), (L, d_out, r); losses are per adapter.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "generators_ref",
    "hsd_loss_ref",
    "hsd_grad_ref",
    "soft_threshold_ref",
    "prox_step_ref",
    "generator_l21_ref",
    "objective_ref",
]


def generators_ref(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """(G1, G2), each (d_out, r, d_in) (batched: (L, d_out, r, d_in)), built one output at a time."""
    d_out = B.shape[-2]
    G1 = torch.stack([torch.diag_embed(torch.relu(B[..., j, :])) @ A for j in range(d_out)], dim=-3)
    G2 = torch.stack([torch.diag_embed(torch.relu(-B[..., j, :])) @ A for j in range(d_out)], dim=-3)
    return G1, G2


def hsd_loss_ref(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor) -> Tensor:
    """½ Σ_j ‖G1_j − Ĝ1_j‖² + ‖G2_j − Ĝ2_j‖² on materialised generators: () or (L,)."""
    G1, G2 = generators_ref(A, B)
    H1, H2 = generators_ref(A_hat, B_hat)
    return 0.5 * (((G1 - H1) ** 2).sum(dim=(-3, -2, -1)) + ((G2 - H2) ** 2).sum(dim=(-3, -2, -1)))


def hsd_grad_ref(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dloss/dA_hat, dloss/dB_hat) by autograd through the materialised generators."""
    with torch.enable_grad():
        Ah = A_hat.detach().clone().requires_grad_(True)
        Bh = B_hat.detach().clone().requires_grad_(True)
        loss = hsd_loss_ref(A.detach(), B.detach(), Ah, Bh)
        gA, gB = torch.autograd.grad(loss.sum(), (Ah, Bh))
    return loss.detach(), gA, gB


def soft_threshold_ref(X: Tensor, tau: float) -> Tensor:
    """sign(X)·max(|X| − tau, 0), written elementwise from the definition."""
    out = torch.zeros_like(X)
    out = torch.where(X > tau, X - tau, out)
    return torch.where(X < -tau, X + tau, out)


def prox_step_ref(
    A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor, lr: float, lam1: float, lam2: float
) -> tuple[Tensor, Tensor]:
    """One step of the paper's Algorithm 1 with autograd gradients."""
    _, gA, gB = hsd_grad_ref(A, B, A_hat, B_hat)
    return soft_threshold_ref(A_hat - lr * gA, lr * lam1), soft_threshold_ref(B_hat - lr * gB, lr * lam2)


def generator_l21_ref(A_hat: Tensor, B_hat: Tensor) -> Tensor:
    """Σ_j (‖Ĝ1_j‖_{2,1} + ‖Ĝ2_j‖_{2,1}) on materialised generators: the ℓ2 norm of every
    generator (row i of Ĝ1_j or Ĝ2_j), summed.  () or (L,)."""
    H1, H2 = generators_ref(A_hat, B_hat)
    norms = torch.linalg.vector_norm(H1, dim=-1) + torch.linalg.vector_norm(H2, dim=-1)
    return norms.sum(dim=(-2, -1))


def objective_ref(
    A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor, lam1: float, lam2: float, lam_gen: float = 0.0
) -> Tensor:
    """F = smooth part + λ1‖Â‖₁ + λ2‖B̂‖₁ + lam_gen·Σ_j(‖Ĝ1_j‖_{2,1} + ‖Ĝ2_j‖_{2,1}) per adapter."""
    l1 = lam1 * A_hat.abs().sum(dim=(-2, -1)) + lam2 * B_hat.abs().sum(dim=(-2, -1))
    F = hsd_loss_ref(A, B, A_hat, B_hat) + l1
    if lam_gen:
        F = F + lam_gen * generator_l21_ref(A_hat, B_hat)
    return F
