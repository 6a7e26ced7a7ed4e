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
                                       adapter (scope "layer") or over all units ("global").
                                       score="tropical" with tropical={"lam_gen": x} ranks the
                                       units by the solution of the problem with the generator
                                       l2,1 penalty, whose zero units rank last
    erdos_renyi                        per weight matrix, density ∝ (n_in + n_out)/(n_in·n_out)
                                       scaled to the global budget and capped at 1 (SparseAdapter)
    class_distribution                 one q over every adapter: a weight is kept when its score
                                       is at least q·σ_c, σ_c the std of its adapter's scores
                                       (See et al. 2016); see ``class_distribution_select``
The last two keep exactly round(p·N) weights in total (the per-matrix counts of
``erdos_renyi`` are rounded by largest remainder, see ``erdos_renyi_counts``).

Ties at the threshold: SparseAdapter's code prunes every weight whose score equals the
k-th largest (mask = score > threshold), which keeps fewer than asked when scores tie there
(a SynFlow or SNIP score of zero, a magnitude of zero).  tropfast keeps the exact count for
every score, SparseAdapter's included, and breaks such ties by |W| then position as above,
so results of different scores and allocations always compare at the same kept count.
Biases and LayerNorms are never scored, masked or removed (other than a removed unit's
down-projection bias entry under ``structured``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .scores import ScoreResult

__all__ = [
    "ALLOCATIONS",
    "Allocation",
    "allocate",
    "canonical_allocation",
    "class_distribution_select",
    "erdos_renyi_counts",
    "kept_count",
    "top_n",
]

ALLOCATIONS = ("global", "layer", "matrix", "node", "structured", "erdos_renyi", "class_distribution")
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
    "erdos-renyi": "erdos_renyi",
    "er": "erdos_renyi",
    "class-distribution": "class_distribution",
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
    if allocation == "erdos_renyi":
        return _erdos_renyi(scores, keep, choose)
    if allocation == "class_distribution":
        return _class_distribution(scores, keep, choose)
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


# ---------------------------------------------------------------------------------------
# Erdős–Rényi and class-distribution: budgets spread by a rule over the whole model.
# ---------------------------------------------------------------------------------------
def _flat(scores: ScoreResult) -> tuple[list[Tensor], list[Tensor]]:
    """Scores and tie-break magnitudes of every weight matrix, in position order (A_0, B_0, A_1, …)."""
    P = [t for sa, sb in zip(scores.SA, scores.SB) for t in (sa, sb)]
    S = [t for ma, mb in zip(scores.MA, scores.MB) for t in (ma, mb)]
    return P, S


def _masks_from(scores: ScoreResult, sel: list[Tensor], name: str, groups: int) -> Allocation:
    """An Allocation from one boolean (numel,) selection per weight matrix (A_0, B_0, A_1, …)."""
    mA = [sel[2 * k].view(sa.shape).clone() for k, sa in enumerate(scores.SA)]
    mB = [sel[2 * k + 1].view(sb.shape).clone() for k, sb in enumerate(scores.SB)]
    return Allocation(name, mA, mB, None, groups)


def erdos_renyi_counts(shapes: list[tuple[int, int]], keep: float) -> list[int]:
    """Kept weights per matrix under Erdős–Rényi densities; the counts sum to round(keep·N).

    shapes: (n_out, n_in) per weight matrix.  Density d_m = min(1, ε·(n_in + n_out)/(n_in·n_out))
    with ε such that Σ d_m·N_m = keep·N (matrices that would exceed density 1 are capped and
    ε is solved again over the rest, until none exceeds it).  Counts are floor(d_m·N_m) plus
    one for the matrices with the largest remainders (ties: the first matrix), never above N_m.
    """
    sizes = [int(o) * int(i) for o, i in shapes]
    N = sum(sizes)
    total = kept_count(keep, N)
    rho = [(o + i) / (o * i) if o * i > 0 else 0.0 for o, i in shapes]
    capped = [n == 0 for n in sizes]
    dens = [0.0] * len(sizes)
    while True:
        free = [m for m in range(len(sizes)) if not capped[m]]
        budget = total - sum(sizes[m] for m in range(len(sizes)) if capped[m] and sizes[m] > 0)
        denom = sum(rho[m] * sizes[m] for m in free)
        eps = budget / denom if denom > 0 else 0.0
        over = [m for m in free if eps * rho[m] > 1.0]
        if not over:
            break
        for m in over:
            capped[m] = True
    for m in range(len(sizes)):
        dens[m] = 1.0 if capped[m] and sizes[m] > 0 else (0.0 if sizes[m] == 0 else max(0.0, eps * rho[m]))
    exact = [d * n for d, n in zip(dens, sizes)]
    counts = [min(n, int(math.floor(x))) for x, n in zip(exact, sizes)]
    rest = total - sum(counts)
    order = sorted(range(len(sizes)), key=lambda m: (-(exact[m] - counts[m]), m))
    while rest > 0:  # at most a few rounds: each hands out one weight per matrix with room
        moved = False
        for m in order:
            if rest == 0:
                break
            if counts[m] < sizes[m]:
                counts[m] += 1
                rest -= 1
                moved = True
        if not moved:
            break
    return counts


def _erdos_renyi(scores: ScoreResult, keep: float, choose) -> Allocation:
    """Each weight matrix keeps its Erdős–Rényi count, chosen by the usual ranking inside it."""
    P, S = _flat(scores)
    counts = erdos_renyi_counts([tuple(t.shape) for t in P], keep)
    sel = []
    for p, s, n in zip(P, S, counts):
        m = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
        m[choose(p.flatten(), s.flatten(), n)] = True
        sel.append(m)
    return _masks_from(scores, sel, "erdos_renyi", len(P))


def _class_std(x: Tensor) -> Tensor:
    """The population standard deviation of a class's scores; the smallest positive number for
    a class whose scores are all equal (the limit of a vanishing spread)."""
    sd = x.double().std(unbiased=False) if x.numel() > 1 else x.new_zeros((), dtype=torch.float64)
    return sd.clamp_min(torch.finfo(torch.float64).tiny)


def class_distribution_select(P: list[Tensor], S: list[Tensor], classes: list[list[int]], keep: float, choose) -> list[Tensor]:
    """Class-distribution pruning (See et al. 2016) with an exact count.

    A weight w of class c is pruned when score(w) < q·σ_c, σ_c the standard deviation of the
    scores of c; one q for all classes.  That keeps exactly the weights whose normalised score
    score(w)/σ_c is >= q, so q is found by ranking every weight by its normalised score and
    keeping the top round(keep·N): q is the smallest kept normalised score.  Weights tied at q
    are ranked by their magnitude over its class's standard deviation (|W|/σ_c of |W|), then
    by position, so the kept count is exact even when several weights sit on q.
    P, S: scores and magnitudes per weight matrix; classes: the matrices of each class.
    Returns one boolean (numel,) selection per matrix.
    """
    Pn, Sn = [None] * len(P), [None] * len(P)
    for cls in classes:
        sp = _class_std(torch.cat([P[m].flatten() for m in cls]))
        ss = _class_std(torch.cat([S[m].flatten() for m in cls]))
        for m in cls:
            Pn[m] = P[m].flatten().double() / sp
            Sn[m] = S[m].flatten().double() / ss
    allP, allS = torch.cat(Pn), torch.cat(Sn)
    sel = torch.zeros(allP.numel(), dtype=torch.bool, device=allP.device)
    sel[choose(allP, allS, kept_count(keep, allP.numel()))] = True
    out, off = [], 0
    for p in P:
        out.append(sel[off : off + p.numel()])
        off += p.numel()
    return out


def _class_distribution(scores: ScoreResult, keep: float, choose) -> Allocation:
    """One class per adapter (A and B together, as in ``layer``)."""
    P, S = _flat(scores)
    classes = [[2 * k, 2 * k + 1] for k in range(len(scores.SA))]
    return _masks_from(scores, class_distribution_select(P, S, classes, keep, choose), "class_distribution", 1)
