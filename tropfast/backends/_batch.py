"""Batching helpers shared by the Python backends (torch, triton): written once."""
from __future__ import annotations

import torch
from torch import Tensor


def batch(*xs: Tensor, dtype: torch.dtype | None = None) -> tuple[bool, list[Tensor]]:
    """Add the adapter dim to 2-D input; make contiguous; cast to ``dtype`` if given.

    Returns (squeeze, tensors): squeeze is True when the input was a single adapter.
    """
    squeeze = xs[0].dim() == 2
    out = []
    for x in xs:
        x = x.unsqueeze(0) if squeeze else x
        out.append((x if dtype is None else x.to(dtype)).contiguous())
    return squeeze, out


def unbatch(squeeze: bool, dtype: torch.dtype | None, *ys: Tensor) -> tuple[Tensor, ...]:
    """Undo ``batch``: drop the adapter dim of a single adapter; cast to ``dtype`` if given."""
    return tuple((y.squeeze(0) if squeeze else y) if dtype is None else (y.squeeze(0) if squeeze else y).to(dtype) for y in ys)


def generator_penalty(Ah: Tensor, Bh: Tensor) -> Tensor:
    """Σ_i ‖Â_i‖₂ ‖B̂_{:,i}‖₁ per adapter: (L, r, d_in), (L, d_out, r) -> (L,)."""
    return (torch.linalg.vector_norm(Ah, dim=-1) * Bh.abs().sum(-2)).sum(-1)


def solve_stats(
    A: Tensor, B: Tensor, Ah: Tensor, Bh: Tensor, lam1: Tensor, lam2: Tensor, hsd_loss, lam_gen: Tensor | None = None
) -> Tensor:
    """The whole-solve ops' stats from the iterate, by extra passes (backends whose kernels do
    not sum them): (L, 3) float64 = (F at the start, F at the end, nonzeros of (Â, B̂)).

    F at the start is λ1‖A‖₁ + λ2‖B‖₁ (+ lam_gen·Σ_i‖A_i‖₂‖B_i‖₁): the fit term is exactly
    zero at (Â, B̂) = (A, B).
    """
    start = lam1 * A.abs().sum((-2, -1)) + lam2 * B.abs().sum((-2, -1))
    end = hsd_loss(A, B, Ah, Bh) + lam1 * Ah.abs().sum((-2, -1)) + lam2 * Bh.abs().sum((-2, -1))
    if lam_gen is not None:
        start = start + lam_gen * generator_penalty(A, B)
        end = end + lam_gen * generator_penalty(Ah, Bh)
    nnz = (Ah != 0).sum((-2, -1)) + (Bh != 0).sum((-2, -1))
    return torch.stack([start.double(), end.double(), nnz.double()], -1)
