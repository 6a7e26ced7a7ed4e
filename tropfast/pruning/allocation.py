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
    gradient_rank                      each adapter keeps a fraction proportional to its
                                       normalised gradient rank, round(keep·N) in total
                                       (see ``gradient_rank_counts``); inside an adapter as
                                       ``layer``.  Needs data (``tropfast.prune(..., data=...)``)
Biases and LayerNorms are never scored, masked or removed (other than a removed unit's
down-projection bias entry under ``structured``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .scores import ScoreResult

__all__ = [
    "ALLOCATIONS",
    "Allocation",
    "allocate",
    "allocate_gradient_rank",
    "canonical_allocation",
    "gradient_rank_counts",
    "kept_count",
    "top_n",
]

ALLOCATIONS = ("global", "layer", "matrix", "node", "structured", "gradient_rank")
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
    "gradient-rank": "gradient_rank",
    "gradrank": "gradient_rank",
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
    if allocation == "gradient_rank":
        raise ValueError(
            "allocation='gradient_rank' needs each adapter's gradient rank: use allocate_gradient_rank "
            "(tropfast.prune(..., allocation='gradient_rank', data=batches) measures the ranks)"
        )
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


def gradient_rank_counts(
    ranks: Sequence[float], max_ranks: Sequence[float], numels: Sequence[int], keep: float
) -> list[int]:
    """Kept weights per adapter, proportional to the normalised gradient rank; exactly round(keep·N) in all.

    With w_k = rank_k / max_rank_k (the normalised rank, in [0, 1]) and N_k the adapter's
    weights, adapter k keeps the fraction p_k = min(1, c·w_k), where c is the one constant
    that makes Σ p_k N_k = round(keep·N): adapters that would exceed 1 are capped at all of
    their weights and c is raised for the rest (water-filling).  The real quotas p_k N_k are
    rounded by largest remainder (ties: the earlier adapter), so the counts add up exactly.
    An adapter of rank 0 keeps nothing, unless the budget exceeds what the others hold: the
    rest is then spread over the rank-0 adapters in proportion to their size.  If every rank
    is 0, every w_k is taken as 1 (one fraction for all).
    """
    L = len(numels)
    if not (len(ranks) == len(max_ranks) == L):
        raise ValueError(f"{len(ranks)} ranks, {len(max_ranks)} maximum ranks and {L} adapter sizes: they must match")
    N = [int(n) for n in numels]
    if any(n < 0 for n in N):
        raise ValueError("adapter sizes must be non-negative")
    w = []
    for k, (rk, mk) in enumerate(zip(ranks, max_ranks)):
        rk, mk = float(rk), float(mk)
        if not (math.isfinite(rk) and math.isfinite(mk)) or rk < 0 or mk < 0 or rk > mk:
            raise ValueError(f"adapter #{k}: rank {rk} and maximum rank {mk} must satisfy 0 <= rank <= maximum")
        w.append(rk / mk if mk > 0 else 0.0)
    if all(x == 0 for x in w):
        w = [1.0] * L
    total = kept_count(keep, sum(N))
    active = [k for k in range(L) if w[k] > 0 and N[k] > 0]
    capped: set[int] = set()
    c = 0.0
    while True:
        free = [k for k in active if k not in capped]
        rem = total - sum(N[k] for k in capped)
        denom = sum(w[k] * N[k] for k in free)
        if not free or denom <= 0:
            break
        c = rem / denom
        newly = {k for k in free if c * w[k] >= 1.0}
        if not newly:
            break
        capped |= newly
    q = [0.0] * L
    for k in active:
        q[k] = float(N[k]) if k in capped else min(float(N[k]), c * w[k] * N[k])
    left = total - sum(q)
    zero = [k for k in range(L) if k not in active and N[k] > 0]
    if left > 1e-9 and zero:
        nz = sum(N[k] for k in zero)
        for k in zero:
            q[k] = min(float(N[k]), left * N[k] / nz)
    counts = [min(N[k], int(math.floor(q[k] + 1e-9))) for k in range(L)]
    short = total - sum(counts)
    order = sorted(range(L), key=lambda k: (-(q[k] - counts[k]), k))
    while short > 0:
        progressed = False
        for k in order:
            if short == 0:
                break
            if counts[k] < N[k]:
                counts[k] += 1
                short -= 1
                progressed = True
        if not progressed:
            break
    return counts


def allocate_gradient_rank(
    scores: ScoreResult,
    keep: float,
    ranks: Sequence[float],
    max_ranks: Sequence[float],
    *,
    combined_q: float | None = None,
) -> Allocation:
    """Masks for ``allocation="gradient_rank"``: ``gradient_rank_counts`` weights per adapter,
    chosen inside each adapter (A and B together) by the score, as ``layer`` does."""
    numels = [sa.numel() + sb.numel() for sa, sb in zip(scores.SA, scores.SB)]
    counts = gradient_rank_counts(ranks, max_ranks, numels, keep)
    choose = _chooser(combined_q)
    mA, mB = [], []
    for sa, sb, ma, mb, n in zip(scores.SA, scores.SB, scores.MA, scores.MB, counts):
        P = torch.cat([sa.flatten(), sb.flatten()])
        S = torch.cat([ma.flatten(), mb.flatten()])
        sel = torch.zeros(P.numel(), dtype=torch.bool, device=P.device)
        sel[choose(P, S, n)] = True
        mA.append(sel[: sa.numel()].view(sa.shape).clone())
        mB.append(sel[sa.numel() :].view(sb.shape).clone())
    return Allocation("gradient_rank", mA, mB, None, len(counts))
