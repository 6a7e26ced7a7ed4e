"""Turn scores into masks: which weights (or hidden units) each group keeps.

A group keeps exactly ``kept_count(p, N) = round(p·N)`` of its N weights (Python's
``round``: half to even).  Ranking inside a group: the score, descending; ties by the
magnitude |W|, descending; remaining ties by position, lowest first, where positions run
over each adapter's A (row-major), then its B (row-major), adapters in discovery order.

Allocations ("class" = a group of weights):
    global      (alias class-blind)    one threshold over every weight of every adapter
    layer       (alias class-uniform)  the same kept fraction in every adapter (A and B together)
    matrix                             the same kept fraction in every weight matrix
    node                               per hidden unit i: row A_i and column B_{:,i} together
    structured                         whole hidden units; the adapter is physically shrunk.
                                       Unit score ‖S_A[i,:]‖₂·‖S_B[:,i]‖₂; round(p·r) units per
                                       adapter (scope "layer") or over all units ("global")
Biases and LayerNorms are never scored, masked or removed (other than a removed unit's
down-projection bias entry under ``structured``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .scores import ScoreResult

__all__ = ["ALLOCATIONS", "Allocation", "allocate", "canonical_allocation", "kept_count", "top_n"]

ALLOCATIONS = ("global", "layer", "matrix", "node", "structured")
_ALIASES = {
    "class-blind": "global",
    "class_blind": "global",
    "class-uniform": "layer",
    "class_uniform": "layer",
    "layer-wise": "layer",
    "layerwise": "layer",
    "adapter": "layer",
    "node-wise": "node",
    "nodewise": "node",
    "unit": "node",
    "matrix-wise": "matrix",
}


def canonical_allocation(name: str) -> str:
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in ALLOCATIONS:
        raise ValueError(
            f"allocation={name!r} is not an allocation; choose one of {', '.join(ALLOCATIONS)} "
            "(aliases: class-blind = global, class-uniform = layer)"
        )
    return key


def kept_count(p: float, n: int) -> int:
    """How many of a group's n weights are kept at kept fraction p: round(p·n)."""
    return max(0, min(int(n), int(round(float(p) * int(n)))))


def top_n(primary: Tensor, secondary: Tensor, n: int) -> Tensor:
    """Positions of the n best entries by (primary desc, secondary desc, position asc): (n,) int64."""
    if n <= 0:
        return torch.zeros(0, dtype=torch.long, device=primary.device)
    if n >= primary.numel():
        return torch.arange(primary.numel(), device=primary.device)
    o2 = torch.sort(secondary, descending=True, stable=True).indices
    o1 = torch.sort(primary[o2], descending=True, stable=True).indices
    return o2[o1[:n]]


@dataclass
class Allocation:
    """Masks per adapter (True = kept) and, for structured, the kept hidden units."""

    name: str
    masks_A: list[Tensor]  # (r_k, d_in_k) bool
    masks_B: list[Tensor]  # (d_out_k, r_k) bool
    units: list[Tensor] | None = None  # structured: kept unit indices per adapter, ascending
    groups: int = 0


def _chooser(combined_q: float | None):
    def choose(P: Tensor, S: Tensor, n: int) -> Tensor:
        if combined_q is None:
            return top_n(P, S, n)
        nq = kept_count(combined_q, n)
        first = top_n(P, S, nq)
        if nq >= n:
            return first
        rest = torch.ones(P.numel(), dtype=torch.bool, device=P.device)
        rest[first] = False
        ridx = rest.nonzero().squeeze(1)
        second = ridx[top_n(S[ridx], P[ridx], n - nq)]
        return torch.cat([first, second])

    return choose


def allocate(
    scores: ScoreResult,
    keep: float,
    allocation: str,
    *,
    combined_q: float | None = None,
    structured_scope: str = "layer",
) -> Allocation:
    """Masks keeping exactly round(keep·N) weights (or units) per group.

    combined_q: for the ``combined`` score, the fraction of each group's budget given to
    the top tropical weights; the rest of the budget is filled by magnitude.
    """
    allocation = canonical_allocation(allocation)
    choose = _chooser(combined_q)
    L = len(scores.SA)
    dev = scores.SA[0].device
    if allocation == "structured":
        if structured_scope not in ("layer", "global"):
            raise ValueError(f"structured_scope must be 'layer' or 'global', got {structured_scope!r}")
        UP = [sa.norm(dim=1) * sb.norm(dim=0) for sa, sb in zip(scores.SA, scores.SB)]
        US = [ma.norm(dim=1) * mb.norm(dim=0) for ma, mb in zip(scores.MA, scores.MB)]
        units: list[Tensor] = []
        if structured_scope == "layer":
            for up, us in zip(UP, US):
                units.append(torch.sort(choose(up, us, kept_count(keep, up.numel()))).values)
            groups = L
        else:
            P, S = torch.cat(UP), torch.cat(US)
            sel = torch.zeros(P.numel(), dtype=torch.bool, device=dev)
            sel[choose(P, S, kept_count(keep, P.numel()))] = True
            off = 0
            for up in UP:
                units.append(sel[off : off + up.numel()].nonzero().squeeze(1))
                off += up.numel()
            groups = 1
        mA, mB = [], []
        for u, sa, sb in zip(units, scores.SA, scores.SB):
            keep_u = torch.zeros(sa.shape[0], dtype=torch.bool, device=dev)
            keep_u[u] = True
            mA.append(keep_u[:, None].expand_as(sa).clone())
            mB.append(keep_u[None, :].expand_as(sb).clone())
        return Allocation(allocation, mA, mB, units, groups)

    P = torch.cat([t.flatten() for sa, sb in zip(scores.SA, scores.SB) for t in (sa, sb)])
    S = torch.cat([t.flatten() for ma, mb in zip(scores.MA, scores.MB) for t in (ma, mb)])
    sizes = [t.numel() for sa, sb in zip(scores.SA, scores.SB) for t in (sa, sb)]
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    groups: list[Tensor] = []
    if allocation == "global":
        groups.append(torch.arange(P.numel(), device=dev))
    elif allocation == "layer":
        for k in range(L):
            groups.append(torch.arange(offs[2 * k], offs[2 * k + 2], device=dev))
    elif allocation == "matrix":
        for m in range(2 * L):
            groups.append(torch.arange(offs[m], offs[m + 1], device=dev))
    else:  # node
        for k, (sa, sb) in enumerate(zip(scores.SA, scores.SB)):
            r, d_in = sa.shape
            d_out = sb.shape[0]
            a_idx = offs[2 * k] + torch.arange(r * d_in, device=dev).view(r, d_in)
            b_idx = offs[2 * k + 1] + torch.arange(d_out * r, device=dev).view(d_out, r)
            for i in range(r):
                groups.append(torch.cat([a_idx[i], b_idx[:, i]]))
    sel = torch.zeros(P.numel(), dtype=torch.bool, device=dev)
    for g in groups:
        sel[g[choose(P[g], S[g], kept_count(keep, g.numel()))]] = True
    mA, mB = [], []
    for k, (sa, sb) in enumerate(zip(scores.SA, scores.SB)):
        mA.append(sel[offs[2 * k] : offs[2 * k + 1]].view(sa.shape).clone())
        mB.append(sel[offs[2 * k + 1] : offs[2 * k + 2]].view(sb.shape).clone())
    return Allocation(allocation, mA, mB, None, len(groups))
