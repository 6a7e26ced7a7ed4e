"""Turn scores into masks: which weights (or hidden units) each group keeps.

A group keeps exactly ``kept_count(p, N) = round(p·N)`` of its N weights (Python's
``round``: half to even).  Ranking inside a group: the score, descending; ties by the
magnitude |W|, descending; remaining ties by position, lowest first, where positions run
over each adapter's A (row-major), then its B (row-major), adapters in discovery order.
The kept set is found by selection in O(N) per group (the n-th largest score, then only
the entries tied with it are ranked), never by sorting the group.

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
    gradient_rank                      each adapter keeps a fraction proportional to its
                                       normalised gradient rank, round(keep·N) in total
                                       (see ``gradient_rank_counts``); inside an adapter as
                                       ``layer``.  Needs data (``tropfast.prune(..., data=...)``)
The last three keep exactly round(p·N) weights in total (the per-matrix counts of
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
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .scores import ScoreResult

__all__ = [
    "ALLOCATIONS",
    "Allocation",
    "allocate",
    "allocate_gradient_rank",
    "canonical_allocation",
    "class_distribution_select",
    "erdos_renyi_counts",
    "gradient_rank_counts",
    "kept_count",
    "select_top",
    "select_top_rows",
    "top_n",
]

ALLOCATIONS = ("global", "layer", "matrix", "node", "structured", "erdos_renyi", "class_distribution", "gradient_rank")
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
    "gradient-rank": "gradient_rank",
    "gradrank": "gradient_rank",
}


def canonical_allocation(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"allocation must be a string, one of {', '.join(ALLOCATIONS)}; got {name!r}")
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


# A selection of the k best of N costs about as much as one of the N - k + 1 worst; below this
# share of N a partial top-k (a heap of k entries) is cheaper than torch's quickselect over all N.
_PARTIAL_SHARE = 1 / 64
# NumPy's selection (np.partition: an introselect, vectorised) takes about a tenth of
# torch.kthvalue's time on CPU tensors of these dtypes (0.09 vs 1.0 ms at 73 728 entries,
# 3.6 vs 30 ms at 2.36 M); other devices and dtypes take torch's.
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


def _kth_largest(x: Tensor, k: int) -> Tensor:
    """The k-th largest entry of 1-D ``x`` (1 <= k <= numel) by a selection, not a sort.

    np.partition on CPU tensors of NumPy's float dtypes, else ``_kth_largest_torch``; both give
    the exact k-th entry of the descending order, as a 0-d tensor of x's dtype and device.
    """
    if x.device.type == "cpu" and x.dtype in _NUMPY_DTYPES:
        i = x.numel() - k
        return torch.as_tensor(np.partition(x.detach().numpy(), i)[i], device=x.device)
    return _kth_largest_torch(x, k)


def _kth_largest_torch(x: Tensor, k: int) -> Tensor:
    """``_kth_largest`` by torch: a quickselect (``kthvalue``) in general; a partial top-k
    when k or N - k + 1 is a small share of N (the few best, or the few worst, of a large tie)."""
    N = x.numel()
    if k <= N * _PARTIAL_SHARE:
        return torch.topk(x, k, sorted=False).values.min()
    if N - k + 1 <= N * _PARTIAL_SHARE:
        return torch.topk(x, N - k + 1, largest=False, sorted=False).values.max()
    return torch.kthvalue(x, N - k + 1).values


def _nth_is_zero(x: Tensor, n: int) -> bool:
    """Whether the n-th largest entry of 1-D ``x`` is zero: fewer than n entries above zero, at least n not below.

    Scores of a sparse solution (tropical: |Â| of a solve that zeroed most weights) tie at
    zero with most of the group; two counts then find the threshold without a selection.
    """
    if _count(x > 0) >= n:
        return False
    return _count(x >= 0) >= n


def _count(m: Tensor) -> int:
    return int(torch.count_nonzero(m))


def select_top(primary: Tensor, secondary: Tensor, n: int) -> Tensor:
    """Mask of the n best entries of a 1-D group by (primary desc, secondary desc, position asc).

    O(N) expected: one selection finds the n-th largest primary value t; every entry above t
    is kept; only the entries tied at t are ranked, by a second selection on their secondary
    value, then by position.  Returns a bool tensor of primary's shape with exactly
    ``clamp(n, 0, N)`` True entries.  The values must not be NaN.
    """
    N = primary.numel()
    if n <= 0:
        return torch.zeros(N, dtype=torch.bool, device=primary.device)
    if n >= N:
        return torch.ones(N, dtype=torch.bool, device=primary.device)
    t = primary.new_zeros(()) if _nth_is_zero(primary, n) else _kth_largest(primary, n)
    keep = primary >= t
    if _count(keep) == n:  # the usual case for continuous scores: no tie at t to resolve
        return keep
    keep = primary > t
    tie = primary == t
    need = n - _count(keep)
    idx = tie.nonzero().squeeze(1)  # tied positions, ascending
    s = secondary[idx]
    t2 = _kth_largest(s, need)
    win = s > t2
    need2 = need - _count(win)
    win[(s == t2).nonzero().squeeze(1)[:need2]] = True  # remaining ties: lowest positions first
    keep[idx[win]] = True
    return keep


def select_top_rows(primary: Tensor, secondary: Tensor, n: int) -> Tensor:
    """``select_top`` on every row of (G, g) matrices at once: the n best entries of each row.

    One batched selection gives each row's threshold; rows whose entries tied at it must be
    ranked (by secondary, then column) are the only ones sorted, each over its g entries.
    """
    G, g = primary.shape
    if n <= 0 or G == 0:
        return torch.zeros(G, g, dtype=torch.bool, device=primary.device)
    if n >= g:
        return torch.ones(G, g, dtype=torch.bool, device=primary.device)
    if primary.device.type == "cpu" and primary.dtype in _NUMPY_DTYPES:  # as in _kth_largest
        t = torch.from_numpy(np.partition(primary.detach().numpy(), g - n, axis=1)[:, g - n : g - n + 1].copy())
    else:
        t = torch.kthvalue(primary, g - n + 1, dim=1, keepdim=True).values
    keep = primary > t
    tie = primary == t
    need = n - keep.sum(1)
    ambiguous = tie.sum(1) > need
    keep |= tie & ~ambiguous[:, None]
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(1)
        # among the tied entries of a row: secondary desc, then column asc (a stable sort);
        # the untied entries sort last and are never reached (need <= number tied)
        s = torch.where(tie[rows], secondary[rows], torch.full_like(secondary[rows], -math.inf))
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        take = torch.arange(g, device=primary.device)[None, :] < need[rows][:, None]
        keep[rows] |= torch.zeros_like(take).scatter_(1, order, take)
    return keep


def top_n(primary: Tensor, secondary: Tensor, n: int) -> Tensor:
    """Positions (ascending, int64) of the n best entries by (primary desc, secondary desc, position asc)."""
    return select_top(primary.reshape(-1), secondary.reshape(-1), n).nonzero().squeeze(1)


@dataclass
class Allocation:
    """Masks per adapter (True = kept) and, for structured, the kept hidden units."""

    name: str
    masks_A: list[Tensor]  # (r_k, d_in_k) bool
    masks_B: list[Tensor]  # (d_out_k, r_k) bool
    units: list[Tensor] | None = None  # structured: kept unit indices per adapter, ascending
    groups: int = 0


def _choose(P: Tensor, S: Tensor, n: int, combined_q: float | None) -> Tensor:
    """Mask of a 1-D group's n kept entries; combined: the top round(q·n) by P, the rest by S."""
    if combined_q is None:
        return select_top(P, S, n)
    nq = kept_count(combined_q, n)
    first = select_top(P, S, nq)
    if nq >= n:
        return first
    # the rest of the budget among the entries not taken yet, by magnitude then tropical
    neg = torch.full_like(P, -math.inf)
    return first | select_top(torch.where(first, neg, S), torch.where(first, neg, P), n - nq)


def _choose_rows(P: Tensor, S: Tensor, n: int, combined_q: float | None) -> Tensor:
    """``_choose`` on every row of (G, g) matrices."""
    if combined_q is None:
        return select_top_rows(P, S, n)
    nq = kept_count(combined_q, n)
    first = select_top_rows(P, S, nq)
    if nq >= n:
        return first
    neg = torch.full_like(P, -math.inf)
    return first | select_top_rows(torch.where(first, neg, S), torch.where(first, neg, P), n - nq)


def _choose_parts(Ps: list[Tensor], Ss: list[Tensor], n: int, combined_q: float | None, same: bool) -> list[Tensor]:
    """``_choose`` over the concatenation of the tensors ``Ps`` (scores; ``Ss`` the secondary
    ones, ``Ps`` itself when ``same``), as one mask per part of its shape.

    On CPU tensors of NumPy's dtypes (without ``combined``), ``select_top``'s rule applied part
    by part in NumPy: the n-th largest score t comes from one selection on a concatenation
    (or from two counts, when it is zero: a sparse solution's scores); every entry above t is
    kept; when exactly n entries reach t (no tie straddles the cut, the usual case for
    continuous scores) the masks are ``part >= t``, otherwise the entries tied at t are ranked
    by their secondary score, then by position in the concatenation.  No concatenated mask is
    built.  Otherwise ``_choose`` on the concatenation.
    """
    N = sum(p.numel() for p in Ps)
    dt = Ps[0].dtype
    fast = (
        combined_q is None
        and 0 < n < N
        and dt in _NUMPY_DTYPES
        and all(p.device.type == "cpu" and p.dtype == dt for p in Ps)
        and (same or all(s.device.type == "cpu" and s.dtype in _NUMPY_DTYPES for s in Ss))
    )
    if fast:
        # NumPy throughout: its comparisons and counts cost a fifth of torch's on CPU tensors
        # this small, and its selection a tenth of torch's
        arrs = [p.detach().reshape(-1).numpy() for p in Ps]
        gt0 = [a > 0 for a in arrs]
        pos = sum(int(np.count_nonzero(g)) for g in gt0)
        if pos < n <= sum(int(np.count_nonzero(a >= 0)) for a in arrs):
            # the n-th largest is zero (a sparse solution's scores, tropical |Â|): two counts found it
            tv = np.zeros((), dtype=arrs[0].dtype)[()]
        else:
            # the cut lies among the positive scores when n <= pos: select among them alone
            # (NumPy's selection slows about tenfold on the many equal zeros of a sparse solution)
            flat = np.concatenate([a[g] for a, g in zip(arrs, gt0)]) if n <= pos < N else np.concatenate(arrs)
            tv = _nth_largest(flat, n)
        ge = [np.greater_equal(a, tv) for a in arrs]
        if sum(int(np.count_nonzero(g)) for g in ge) == n:
            return [torch.from_numpy(g).view(p.shape) for g, p in zip(ge, Ps)]
        # entries tied at t: the need best by secondary score (desc), then position (asc)
        keep = [np.greater(a, tv) for a in arrs]
        need = n - sum(int(np.count_nonzero(k)) for k in keep)
        ties = [np.flatnonzero(a == tv) for a in arrs]  # tied positions, ascending
        sec = arrs if same else [x.detach().reshape(-1).numpy() for x in Ss]
        tied = np.concatenate([x[ix] for x, ix in zip(sec, ties)])
        t2 = _nth_largest(tied, need)
        win = tied > t2
        win[np.flatnonzero(tied == t2)[: need - int(np.count_nonzero(win))]] = True
        off = 0
        for k, ix in zip(keep, ties):
            k[ix[win[off : off + ix.size]]] = True
            off += ix.size
        return [torch.from_numpy(k).view(p.shape) for k, p in zip(keep, Ps)]
    P = _flat(Ps)
    out, off = [], 0
    sel = _choose(P, P if same else _flat(Ss), n, combined_q)
    for p in Ps:
        out.append(sel[off : off + p.numel()].view(p.shape).clone())
        off += p.numel()
    return out


_SAMPLE_STEP = 17  # prime: a stride sample does not line up with rows of power-of-two widths


def _nth_largest(x: np.ndarray, n: int):
    """The n-th largest entry of the 1-D array x (1 <= n <= x.size), exactly; x is not changed.

    NumPy's selection (introselect) costs about 8 ns an entry.  A sample of every 17th
    entry, partitioned, brackets the n-th largest with a margin of three standard deviations
    of its rank; one count above the bracket and the entries inside it (a few percent) then
    give it exactly, at about a third of the cost.  A bracket that misses (a sample that
    does not represent x) falls back to the full selection.
    """
    M = x.size
    if M >= 64 * _SAMPLE_STEP:
        sample = x[::_SAMPLE_STEP]
        s = sample.size
        q = n * s / M  # the n-th largest's expected rank in the sample, from the top
        margin = 3.0 * math.sqrt(q * (1.0 - n / M)) + 3.0
        lo_rank, hi_rank = max(1, int(q - margin)), min(s, int(math.ceil(q + margin)))
        part = np.partition(sample, [s - hi_rank, s - lo_rank])
        top, bottom = part[s - lo_rank], part[s - hi_rank]
        above = int(np.count_nonzero(x > top))
        band = x[(x >= bottom) & (x <= top)]
        if above < n <= above + band.size:
            k = band.size - (n - above)
            band.partition(k)
            return band[k]
    return np.partition(x, M - n)[M - n]


def _flat(ts: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts]) if len(ts) != 1 else ts[0].reshape(-1)


def _alive_masks(scores: ScoreResult, alive_A, alive_B) -> tuple[list[Tensor], list[Tensor]] | None:
    """Full per-adapter survivor masks, or None when nothing was pruned before."""
    if not any(m is not None for m in (alive_A or []) + (alive_B or [])):
        return None
    outA, outB = [], []
    for k, (sa, sb) in enumerate(zip(scores.SA, scores.SB)):
        a = alive_A[k] if alive_A is not None else None
        b = alive_B[k] if alive_B is not None else None
        for m, ref in ((a, sa), (b, sb)):
            if m is not None and m.shape != ref.shape:
                raise ValueError(f"adapter #{k}: survivor mask of shape {tuple(m.shape)} for scores {tuple(ref.shape)}")
        outA.append(torch.ones_like(sa, dtype=torch.bool) if a is None else a.to(device=sa.device, dtype=torch.bool))
        outB.append(torch.ones_like(sb, dtype=torch.bool) if b is None else b.to(device=sb.device, dtype=torch.bool))
    return outA, outB


def _restrict(scores: ScoreResult, alive: tuple[list[Tensor], list[Tensor]], fill: float) -> ScoreResult:
    """Scores with every pruned weight set to ``fill`` (-inf: never selected; 0: no share of a unit's norm)."""
    done: dict[int, Tensor] = {}

    def r(t: Tensor, m: Tensor) -> Tensor:
        if id(t) not in done:  # the same tensor as score and tie-break (magnitude) stays one tensor
            done[id(t)] = torch.where(m, t, torch.full_like(t, fill))
        return done[id(t)]

    aA, aB = alive
    return ScoreResult(
        scores.name,
        [r(t, m) for t, m in zip(scores.SA, aA)],
        [r(t, m) for t, m in zip(scores.SB, aB)],
        [r(t, m) for t, m in zip(scores.MA, aA)],
        [r(t, m) for t, m in zip(scores.MB, aB)],
    )


def _refuse(keep: float, n: int, N: int, left: int, what: str) -> None:
    raise ValueError(
        f"keep={keep:g} asks for {n} of the {N} weights of {what}, but only {left} survive an earlier prune "
        f"(keep is a fraction of all weights, pruned ones included; a prune never revives a weight): "
        f"use keep <= {left / N:.4g}, or remove_masks(model) to start afresh"
    )


def allocate(
    scores: ScoreResult,
    keep: float,
    allocation: str,
    *,
    combined_q: float | None = None,
    structured_scope: str = "layer",
    alive_A: list[Tensor | None] | None = None,
    alive_B: list[Tensor | None] | None = None,
    labels: list[str] | None = None,
) -> Allocation:
    """Masks keeping exactly round(keep·N) weights (or units) per group.

    combined_q: for the ``combined`` score, the fraction of each group's budget given to
    the top tropical weights; the rest of the budget is filled by magnitude.
    alive_A, alive_B: per adapter, None or a bool mask of the weights an earlier prune left
    (True = still there).  The others are never kept; N still counts them (keep is a
    fraction of all weights), and a group asked for more weights than it has left is
    refused with a ValueError naming it (``labels``: adapter names for that message).
    Under ``structured`` the units are scored by their surviving weights only.

    Every group is selected in O(N) (``select_top``), not sorted; the masks are those of a
    full sort by (score desc, |W| desc, position asc).
    """
    allocation = canonical_allocation(allocation)
    if structured_scope not in ("layer", "global"):
        raise ValueError(f"structured_scope must be 'layer' or 'global', got {structured_scope!r}")
    if allocation == "gradient_rank":
        raise ValueError(
            "allocation='gradient_rank' needs each adapter's gradient rank: use allocate_gradient_rank "
            "(tropfast.prune(..., allocation='gradient_rank', data=batches) measures the ranks)"
        )
    L = len(scores.SA)
    labels = labels or [f"#{k}" for k in range(L)]
    alive = _alive_masks(scores, alive_A, alive_B)
    if allocation == "class_distribution":  # its class spreads are those of the surviving scores
        return _class_distribution(scores, keep, combined_q, alive, labels)
    if alive is not None:
        scores = _restrict(scores, alive, 0.0 if allocation == "structured" else -math.inf)
    if allocation == "erdos_renyi":
        return _erdos_renyi(scores, keep, combined_q, alive, labels)
    same = all(sa is ma and sb is mb for sa, sb, ma, mb in zip(scores.SA, scores.SB, scores.MA, scores.MB))
    if allocation == "structured":
        UP = [sa.norm(dim=1) * sb.norm(dim=0) for sa, sb in zip(scores.SA, scores.SB)]
        US = UP if same else [ma.norm(dim=1) * mb.norm(dim=0) for ma, mb in zip(scores.MA, scores.MB)]
        units: list[Tensor] = []
        if structured_scope == "layer":
            for up, us in zip(UP, US):
                units.append(_choose(up, us, kept_count(keep, up.numel()), combined_q).nonzero().squeeze(1))
            groups = L
        else:
            P = _flat(UP)
            sel = _choose(P, P if same else _flat(US), kept_count(keep, P.numel()), combined_q)
            off = 0
            for up in UP:
                units.append(sel[off : off + up.numel()].nonzero().squeeze(1))
                off += up.numel()
            groups = 1
        mA, mB = [], []
        for k, (u, sa, sb) in enumerate(zip(units, scores.SA, scores.SB)):
            keep_u = torch.zeros(sa.shape[0], dtype=torch.bool, device=sa.device)
            keep_u[u] = True
            a, b = keep_u[:, None].expand_as(sa).clone(), keep_u[None, :].expand_as(sb).clone()
            if alive is not None:  # a kept unit keeps only its surviving weights
                a &= alive[0][k]
                b &= alive[1][k]
            mA.append(a)
            mB.append(b)
        return Allocation(allocation, mA, mB, units, groups)

    mA, mB = [], []
    if allocation == "node":
        # the group of unit i is row A_i then column B_{:,i}: row i of [S_A | S_B^T]
        n_groups = 0
        for sa, sb, ma, mb in zip(scores.SA, scores.SB, scores.MA, scores.MB):
            d_in = sa.shape[1]
            P = torch.cat([sa, sb.t()], 1)
            S = P if same else torch.cat([ma, mb.t()], 1)
            n = kept_count(keep, P.shape[1])
            if alive is not None:
                left = alive[0][len(mA)].sum(1) + alive[1][len(mA)].sum(0)
                if left.numel() and int(left.min()) < n:
                    unit = int(left.argmin())
                    _refuse(keep, n, P.shape[1], int(left[unit]), f"unit {unit} of adapter {labels[len(mA)]}")
            sel = _choose_rows(P, S, n, combined_q)
            mA.append(sel[:, :d_in].contiguous())
            mB.append(sel[:, d_in:].t().contiguous())
            n_groups += sa.shape[0]
        return Allocation(allocation, mA, mB, None, n_groups)

    def budget(N: int, masks: list[Tensor], what: str) -> int:
        n = kept_count(keep, N)
        if alive is not None:
            left = sum(_count(m) for m in masks)
            if left < n:
                _refuse(keep, n, N, left, what)
        return n

    if allocation == "global":
        mats = [t for sa, sb in zip(scores.SA, scores.SB) for t in (sa, sb)]
        n = budget(sum(t.numel() for t in mats), alive[0] + alive[1] if alive else [], "the adapters")
        sec = [t for ma, mb in zip(scores.MA, scores.MB) for t in (ma, mb)]
        parts = _choose_parts(mats, sec, n, combined_q, same)
        return Allocation(allocation, parts[0::2], parts[1::2], None, 1)
    for k, (sa, sb, ma, mb) in enumerate(zip(scores.SA, scores.SB, scores.MA, scores.MB)):
        if allocation == "layer":
            n = budget(sa.numel() + sb.numel(), [alive[0][k], alive[1][k]] if alive else [], f"adapter {labels[k]}")
            a, b = _choose_parts([sa, sb], [ma, mb], n, combined_q, same)
        else:  # matrix
            na = budget(sa.numel(), [alive[0][k]] if alive else [], f"A of adapter {labels[k]}")
            nb = budget(sb.numel(), [alive[1][k]] if alive else [], f"B of adapter {labels[k]}")
            a = _choose(sa.reshape(-1), ma.reshape(-1), na, combined_q).view(sa.shape)
            b = _choose(sb.reshape(-1), mb.reshape(-1), nb, combined_q).view(sb.shape)
        mA.append(a)
        mB.append(b)
    return Allocation(allocation, mA, mB, None, L if allocation == "layer" else 2 * L)


def _hand_out_remainders(counts: list[int], exact: Sequence[float], caps: Sequence[int], total: int) -> list[int]:
    """Largest-remainder rounding with caps: ``counts`` (the floors of ``exact``) gain one each,
    largest remainder first (ties by position), round after round while short of ``total`` and
    some group has room below its cap.  Modifies and returns ``counts``."""
    short = total - sum(counts)
    order = sorted(range(len(counts)), key=lambda k: (-(exact[k] - counts[k]), k))
    while short > 0:  # at most a few rounds: each hands out one to every group with room
        moved = False
        for k in order:
            if short == 0:
                break
            if counts[k] < caps[k]:
                counts[k] += 1
                short -= 1
                moved = True
        if not moved:
            break
    return counts


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
    return _hand_out_remainders(counts, q, N, total)


def allocate_gradient_rank(
    scores: ScoreResult,
    keep: float,
    ranks: Sequence[float],
    max_ranks: Sequence[float],
    *,
    combined_q: float | None = None,
    alive_A: list[Tensor | None] | None = None,
    alive_B: list[Tensor | None] | None = None,
    labels: list[str] | None = None,
) -> Allocation:
    """Masks for ``allocation="gradient_rank"``: ``gradient_rank_counts`` weights per adapter,
    chosen inside each adapter (A and B together) by the score, as ``layer`` does; among the
    survivors of an earlier prune when ``alive_A`` / ``alive_B`` are given (see ``allocate``)."""
    numels = [sa.numel() + sb.numel() for sa, sb in zip(scores.SA, scores.SB)]
    counts = gradient_rank_counts(ranks, max_ranks, numels, keep)
    alive = _alive_masks(scores, alive_A, alive_B)
    if alive is not None:
        scores = _restrict(scores, alive, -math.inf)
    labels = labels or [f"#{k}" for k in range(len(numels))]
    mA, mB = [], []
    for k, (sa, sb, ma, mb, n) in enumerate(zip(scores.SA, scores.SB, scores.MA, scores.MB, counts)):
        if alive is not None:
            left = _count(alive[0][k]) + _count(alive[1][k])
            if left < n:
                _refuse(keep, n, numels[k], left, f"adapter {labels[k]}")
        sel = _choose(_flat([sa, sb]), _flat([ma, mb]), n, combined_q)
        mA.append(sel[: sa.numel()].view(sa.shape).clone())
        mB.append(sel[sa.numel() :].view(sb.shape).clone())
    return Allocation("gradient_rank", mA, mB, None, len(counts))


# ---------------------------------------------------------------------------------------
# Erdős–Rényi and class-distribution: budgets spread by a rule over the whole model.
# ---------------------------------------------------------------------------------------
def _matrices(scores: ScoreResult) -> tuple[list[Tensor], list[Tensor]]:
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
    return _hand_out_remainders(counts, exact, sizes, total)


def _erdos_renyi(
    scores: ScoreResult, keep: float, combined_q: float | None, alive: tuple[list[Tensor], list[Tensor]] | None,
    labels: list[str],
) -> Allocation:
    """Each weight matrix keeps its Erdős–Rényi count, chosen by the usual ranking inside it;
    ``scores`` already restricted to the survivors of an earlier prune (``alive``)."""
    P, S = _matrices(scores)
    counts = erdos_renyi_counts([tuple(t.shape) for t in P], keep)
    if alive is not None:
        for m, n in enumerate(counts):
            left = _count(alive[m % 2][m // 2])
            if left < n:
                _refuse(keep, n, P[m].numel(), left, f"{'AB'[m % 2]} of adapter {labels[m // 2]}")
    sel = [_choose(p.reshape(-1), s.reshape(-1), n, combined_q) for p, s, n in zip(P, S, counts)]
    return _masks_from(scores, sel, "erdos_renyi", len(P))


def _class_std(x: Tensor) -> Tensor:
    """The population standard deviation of a class's scores; the smallest positive number for
    a class whose scores are all equal (the limit of a vanishing spread)."""
    sd = x.double().std(unbiased=False) if x.numel() > 1 else x.new_zeros((), dtype=torch.float64)
    return sd.clamp_min(torch.finfo(torch.float64).tiny)


def class_distribution_select(
    P: list[Tensor],
    S: list[Tensor],
    classes: list[list[int]],
    keep: float,
    combined_q: float | None = None,
    alive: list[Tensor] | None = None,
) -> list[Tensor]:
    """Class-distribution pruning (See et al. 2016) with an exact count.

    A weight w of class c is pruned when score(w) < q·σ_c, σ_c the standard deviation of the
    scores of c; one q for all classes.  That keeps exactly the weights whose normalised score
    score(w)/σ_c is >= q, so q is found by ranking every weight by its normalised score and
    keeping the top round(keep·N): q is the smallest kept normalised score.  Weights tied at q
    are ranked by their magnitude over its class's standard deviation (|W|/σ_c of |W|), then
    by position, so the kept count is exact even when several weights sit on q.
    P, S: scores and magnitudes per weight matrix; classes: the matrices of each class;
    alive: None, or per matrix the weights an earlier prune left (the spreads are those of
    the survivors, and no other weight is kept).  Returns one boolean (numel,) selection per
    matrix.
    """
    Pn: list[Tensor] = [P[0]] * len(P)
    Sn: list[Tensor] = [S[0]] * len(P)
    for cls in classes:
        live = [P[m].reshape(-1) if alive is None else P[m].reshape(-1)[alive[m].reshape(-1)] for m in cls]
        live_s = [S[m].reshape(-1) if alive is None else S[m].reshape(-1)[alive[m].reshape(-1)] for m in cls]
        sp = _class_std(torch.cat(live))
        ss = _class_std(torch.cat(live_s))
        for m in cls:
            Pn[m] = P[m].reshape(-1).double() / sp
            Sn[m] = S[m].reshape(-1).double() / ss
            if alive is not None:
                gone = ~alive[m].reshape(-1)
                Pn[m] = Pn[m].masked_fill(gone, -math.inf)
                Sn[m] = Sn[m].masked_fill(gone, -math.inf)
    sel = _choose(_flat(Pn), _flat(Sn), kept_count(keep, sum(p.numel() for p in P)), combined_q)
    out, off = [], 0
    for p in P:
        out.append(sel[off : off + p.numel()])
        off += p.numel()
    return out


def _class_distribution(
    scores: ScoreResult, keep: float, combined_q: float | None, alive: tuple[list[Tensor], list[Tensor]] | None,
    labels: list[str],
) -> Allocation:
    """One class per adapter (A and B together, as in ``layer``)."""
    P, S = _matrices(scores)
    live = None
    if alive is not None:
        live = [t for a, b in zip(*alive) for t in (a, b)]
        N = sum(p.numel() for p in P)
        n, left = kept_count(keep, N), sum(_count(m) for m in live)
        if left < n:
            _refuse(keep, n, N, left, "the adapters")
    classes = [[2 * k, 2 * k + 1] for k in range(len(scores.SA))]
    return _masks_from(
        scores, class_distribution_select(P, S, classes, keep, combined_q, live), "class_distribution", 1
    )
