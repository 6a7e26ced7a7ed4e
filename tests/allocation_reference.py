"""The sort-based allocation that ``tropfast.pruning.allocation`` replaced: the tests' reference.

Two full stable sorts per group rank every entry by (score desc, |W| desc, position asc);
the first n are kept.  O(n log n), but obviously right, so the O(n) selection is checked
against it bit for bit.  Kept verbatim from the implementation it replaced.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tropfast.pruning.allocation import Allocation, canonical_allocation, kept_count


def top_n_sorted(primary: Tensor, secondary: Tensor, n: int) -> Tensor:
    """Positions of the n best entries by (primary desc, secondary desc, position asc): (n,) int64."""
    if n <= 0:
        return torch.zeros(0, dtype=torch.long, device=primary.device)
    if n >= primary.numel():
        return torch.arange(primary.numel(), device=primary.device)
    o2 = torch.sort(secondary, descending=True, stable=True).indices
    o1 = torch.sort(primary[o2], descending=True, stable=True).indices
    return o2[o1[:n]]


def _chooser(combined_q):
    def choose(P: Tensor, S: Tensor, n: int) -> Tensor:
        if combined_q is None:
            return top_n_sorted(P, S, n)
        nq = kept_count(combined_q, n)
        first = top_n_sorted(P, S, nq)
        if nq >= n:
            return first
        rest = torch.ones(P.numel(), dtype=torch.bool, device=P.device)
        rest[first] = False
        ridx = rest.nonzero().squeeze(1)
        second = ridx[top_n_sorted(S[ridx], P[ridx], n - nq)]
        return torch.cat([first, second])

    return choose


def allocate_sorted(
    scores, keep: float, allocation: str, *, combined_q=None, structured_scope: str = "layer"
) -> Allocation:
    """The replaced ``allocate``: same arguments, same result type."""
    allocation = canonical_allocation(allocation)
    choose = _chooser(combined_q)
    L = len(scores.SA)
    dev = scores.SA[0].device
    if allocation == "structured":
        UP = [sa.norm(dim=1) * sb.norm(dim=0) for sa, sb in zip(scores.SA, scores.SB)]
        US = [ma.norm(dim=1) * mb.norm(dim=0) for ma, mb in zip(scores.MA, scores.MB)]
        units = []
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
    groups = []
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
