"""The dense iteration on a padded batch: ISTA, FISTA and BCD steps over whole weight tensors.

These are the iterates every backend's ``solve_fused`` reproduces (docs/design.md §3), and
the step loop ``tropfast.solve`` runs when it records the objective along the way.  The
steps take the backend's ``prox_step`` as a callable, so the same loop runs on any backend.

Layout: A, Â (L, r, d_in); B, B̂ (L, d_out, r); lam1, lam2, lr (L,), all in the compute dtype.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor


class State(NamedTuple):
    """The iterate and, for FISTA, the previous iterate and one momentum per hidden unit."""

    Ah: Tensor
    Bh: Tensor
    Ah_prev: Tensor
    Bh_prev: Tensor
    mom: Tensor  # (L, r)


def start(A: Tensor, B: Tensor) -> State:
    """(Â, B̂) = (A, B): the start of every solve."""
    Ah, Bh = A.clone(), B.clone()
    return State(Ah, Bh, Ah, Bh, torch.ones(A.shape[:2], dtype=A.dtype, device=A.device))


def _col(x: Tensor) -> Tensor:
    return x.view(-1, 1, 1)


def bcd_sweep(
    A: Tensor, B: Tensor, Ah: Tensor, Bh: Tensor, lam1: Tensor, lam2: Tensor, lam_gen: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One sweep of exact block minimisation: Â | B̂, then B̂ | Â, then per-unit rescaling.

    lam_gen (L,): the generator penalty (ops.GENERATOR_PENALTY); None runs the unpenalised
    arithmetic exactly."""
    tiny = torch.finfo(A.dtype).tiny
    # Â_i = S_λ1(s_i A_i) / β̂_i
    s = torch.relu(B * Bh).sum(-2)  # (L, r)
    beta_hat = (Bh * Bh).sum(-2)
    Z = s.unsqueeze(-1) * A
    Ah = torch.sign(Z) * torch.clamp_min(Z.abs() - _col(lam1), 0)
    if lam_gen is not None:
        # the group shrink of the sparse-group-lasso prox: max(0, 1 − lam_gen‖B̂_i‖₁/‖Z_i‖₂)
        lg = lam_gen.view(-1, 1)
        g = torch.clamp_min(1 - lg * Bh.abs().sum(-2) / torch.linalg.vector_norm(Ah, dim=-1).clamp_min(tiny), 0)
        Ah = Ah * torch.where(lg > 0, g, torch.ones_like(g)).unsqueeze(-1)
    Ah = torch.where(beta_hat.unsqueeze(-1) > 0, Ah / beta_hat.clamp_min(tiny).unsqueeze(-1), torch.zeros_like(Ah))
    # B̂_ji = sign(B_ji) · max(c_i |B_ji| − λ2, 0) / â_i  when c_i > 0, else 0
    c = (A * Ah).sum(-1)
    a_hat = (Ah * Ah).sum(-1)
    ok = ((c > 0) & (a_hat > 0)).unsqueeze(-2)
    thr2 = _col(lam2)
    if lam_gen is not None:  # λ2 + lam_gen·‖Â_i‖₂, per unit
        lg = lam_gen.view(-1, 1)
        l2u = lam2.view(-1, 1)
        thr2 = torch.where(lg > 0, l2u + lg * a_hat.sqrt(), l2u.expand_as(a_hat)).unsqueeze(-2)
    mag = torch.clamp_min(c.clamp_min(0).unsqueeze(-2) * B.abs() - thr2, 0) / a_hat.clamp_min(tiny).unsqueeze(-2)
    Bh = torch.where(ok, torch.sign(B) * mag, torch.zeros_like(B))
    # (Â_i, B̂_i) -> (tÂ_i, B̂_i/t) leaves the fit unchanged; t minimises λ1 t‖Â_i‖₁ + λ2‖B̂_i‖₁/t.
    nA = Ah.abs().sum(-1)
    nB = Bh.abs().sum(-2)
    l1, l2 = lam1.unsqueeze(-1), lam2.unsqueeze(-1)
    can = (nA > 0) & (nB > 0) & (l1 > 0) & (l2 > 0)
    t = torch.where(can, torch.sqrt((l2 * nB) / (l1 * nA).clamp_min(tiny)), torch.ones_like(nA))
    return Ah * t.unsqueeze(-1), Bh / t.unsqueeze(-2)


def fista_step(prox_step: Callable, A, B, st: State, lr, lam1, lam2) -> State:
    """One FISTA step with per-unit momentum and gradient restart (O'Donoghue & Candès 2015)."""
    mom_next = (1 + torch.sqrt(1 + 4 * st.mom * st.mom)) / 2
    w = (st.mom - 1) / mom_next
    YA = st.Ah + w.unsqueeze(-1) * (st.Ah - st.Ah_prev)
    YB = st.Bh + w.unsqueeze(-2) * (st.Bh - st.Bh_prev)
    nA, nB = prox_step(A, B, YA, YB, lr, lam1, lam2)
    # drop the momentum of a unit whose step points uphill
    uphill = ((YA - nA) * (nA - st.Ah)).sum(-1) + ((YB - nB) * (nB - st.Bh)).sum(-2) > 0
    return State(nA, nB, st.Ah, st.Bh, torch.where(uphill, torch.ones_like(mom_next), mom_next))


def with_gen(prox_gen: Callable, lam_gen: Tensor) -> Callable:
    """A prox_step-like callable (A, B, Â, B̂, lr, λ1, λ2) that runs ``prox_gen`` with lam_gen."""

    def prox(A, B, Ah, Bh, lr, lam1, lam2):
        return prox_gen(A, B, Ah, Bh, lr, lam1, lam2, lam_gen)

    return prox


def grad_prox_gen(hsd_grad: Callable) -> Callable:
    """``prox_step_gen`` from any backend's hsd_grad: its gradients, then the penalised prox."""
    from .closed_form import gen_prox

    def prox(A, B, Ah, Bh, lr, lam1, lam2, lam_gen):
        _, gA, gB = hsd_grad(A, B, Ah, Bh)
        return gen_prox(Ah, Bh, gA, gB, lr, lam1, lam2, lam_gen)

    return prox


def step(prox_step: Callable, method: str, A: Tensor, B: Tensor, st: State, lam1, lam2, lr, lam_gen=None,
         prox_gen: Callable | None = None) -> State:
    """One iteration of ``method`` from state ``st``.

    lam_gen (L,) with ``prox_gen`` (A, B, Â, B̂, lr, λ1, λ2, lam_gen): the generator penalty;
    None runs the unpenalised iteration exactly."""
    if lam_gen is not None:
        if method == "bcd":
            Ah, Bh = bcd_sweep(A, B, st.Ah, st.Bh, lam1, lam2, lam_gen)
            return State(Ah, Bh, Ah, Bh, st.mom)
        prox_step = with_gen(prox_gen, lam_gen)
    if method == "ista":
        Ah, Bh = prox_step(A, B, st.Ah, st.Bh, lr, lam1, lam2)
        return State(Ah, Bh, Ah, Bh, st.mom)
    if method == "fista":
        return fista_step(prox_step, A, B, st, lr, lam1, lam2)
    Ah, Bh = bcd_sweep(A, B, st.Ah, st.Bh, lam1, lam2)
    return State(Ah, Bh, Ah, Bh, st.mom)


def dense_solve(prox_step: Callable, A, B, lam1, lam2, lr, method: str, steps: int, lam_gen=None,
                prox_gen: Callable | None = None) -> tuple[Tensor, Tensor]:
    """``steps`` iterations of ``method`` from (A, B): (Â, B̂)."""
    st = start(A, B)
    for _ in range(steps):
        st = step(prox_step, method, A, B, st, lam1, lam2, lr, lam_gen, prox_gen)
    return st.Ah, st.Bh
