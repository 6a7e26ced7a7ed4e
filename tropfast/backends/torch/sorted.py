"""The sorted path (docs/design.md §4) in PyTorch: sort once, then O(log d) per unit per step.

This module is the specification of the sorted path; csrc/sorted.h and the Triton
kernels in backends/triton/sorted_kernels.py follow it.


Every BCD half-step maps a hidden unit to soft-thresholded, rescaled magnitudes of its
*original* weights, so a unit's state is a few scalars and every statistic the next step
needs is a sum over the entries above a threshold.  With each unit's magnitudes sorted
(descending) and prefix sums of x¹, x² built once, a sum over "x > τ" is one binary search
and one gather, whatever d is.  Â and B̂ are materialised once, at the end.

Exactness: the same iterates as ``dense.dense_solve`` up to rounding (an entry exactly on a
threshold is zero in both).  BCD stops sweeping once every unit's state cycles, which
returns bit for bit what the remaining sweeps would.  ISTA falls back to the dense loop,
per adapter, when an iterate leaves the sorted form.  FISTA has no sorted form.

Layout: A (L, r, d_in), B (L, d_out, r), already in the compute dtype; lam1, lam2, lr (L,).
Units are flattened to U = L·r rows: A's rows and B's columns, both (U, d).
``sort_units`` does the O(d log d) part; pass its result as ``units=`` to reuse it across
solves of the same weights (a λ search).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import closed_form, dense

__all__ = ["CycleDetector", "SortedUnits", "bcd_sorted", "ista_sorted", "solve_sorted", "sort_units"]

_SERIAL_SEARCH = 192  # values per CPU searchsorted call that ATen runs without threads
_WINDOW = 4  # smallest kept entries per unit summed directly (SortedUnits.affine_sums)


class SortedUnits:
    """|X| of every unit sorted descending, with prefix sums of x and x².  X: (U, n).

    The entries above any threshold are then a prefix: ``count_above(tau)`` is its length j
    and ``prefix(j)`` its sums.  ``neg``: (U, n) −|X| ascending (what searchsorted needs);
    ``P``: (U, 2, n + 1) with P[u, :, j] = Σ_{i < j} (−x_i, x_i²), in ``acc``: fp64 unless
    the device has no fp64 (the sums cancel, see ``affine_sums``).
    """

    def __init__(self, X: Tensor):
        self.acc = _acc_dtype(X)
        neg = torch.sort(X.abs().neg_(), dim=-1).values.contiguous()
        U, n = neg.shape
        # Summed from the largest entry down, so the short prefixes above a high threshold
        # carry no rounding from the many small entries.  P[:, 0] holds −Σx (neg's sign).
        P = torch.empty(U, 2, n + 1, dtype=self.acc, device=X.device)
        P[:, :, 0] = 0
        torch.cumsum(neg, dim=1, dtype=self.acc, out=P[:, 0, 1:])
        torch.cumsum(torch.square(neg.to(self.acc)), dim=1, out=P[:, 1, 1:])
        self.neg, self.P, self.n = neg, P, n
        self._offsets = torch.arange(min(_WINDOW, n), device=X.device)

    def count_above(self, tau: Tensor) -> Tensor:
        """Number of entries strictly greater than tau (+inf: none): (U,) -> (U,) long."""
        v = tau.neg()
        if v.dtype != self.neg.dtype:
            # neg < v for a value of neg's dtype iff neg < (v rounded up to that dtype).
            up = v.to(self.neg.dtype)
            v = torch.where(up.to(v.dtype) < v, torch.nextafter(up, torch.full_like(up, math.inf)), up)
        return self._search(v.unsqueeze(-1)).squeeze(-1)

    def _search(self, v: Tensor) -> Tensor:
        # ATen's CPU searchsorted opens an OpenMP region above 200 values.  With a few
        # thousand tiny searches the region's barrier is the whole cost, and on a busy CPU
        # it waits for a descheduled thread (milliseconds, measured): below that size the
        # search runs inline, so search in chunks that stay below it.
        U, Q = v.shape
        rows = max(1, _SERIAL_SEARCH // Q)
        if self.neg.device.type != "cpu" or rows >= U:
            return torch.searchsorted(self.neg, v)
        return torch.cat([torch.searchsorted(a, b) for a, b in zip(self.neg.split(rows), v.split(rows))])

    def prefix(self, j: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Σ_{i < j} 1, x, x² per unit: j (U,) -> three (U,)."""
        g = self.P.gather(2, j.view(-1, 1, 1).expand(-1, 2, 1))
        return j.to(g.dtype), -g[:, 0, 0], g[:, 1, 0]

    def prefix_many(self, j: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Prefix sums at several indices per unit: j (U, Q) -> three (U, Q)."""
        # Two gathers, not one over (U, 2, Q): each stays under ATen's threading grain, for
        # the same reason as in _search.
        return j.to(self.P.dtype), -self.P[:, 0].gather(1, j), self.P[:, 1].gather(1, j)

    def smallest_kept(self, j: Tensor) -> Tensor:
        """x_{j−1}, the smallest of the j largest entries (+inf for j = 0): (U,) -> (U,)."""
        x = -self.neg.gather(1, (j - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return torch.where(j > 0, x, torch.full_like(x, math.inf))

    def affine_sums(self, k: Tensor, m: Tensor, j: Tensor, l1_only: bool = False):
        """For v = k·x − m on the j largest entries: (Σ x·v, Σ v, Σ v²), each (U,);
        with ``l1_only``, Σ v alone.

        From the prefix sums, Σ v² = k²Σx² − 2kmΣx + m²Σ1 cancels by about (x / (x − m/k))²
        for entries just above the threshold: a unit left with a few such entries would
        lose most digits of â or β̂.  So the ``_WINDOW`` smallest kept entries are summed
        from their values, as the dense loop does, and only the larger ones come from the
        prefix sums (in fp64 for fp32 weights, see ``acc``).
        """
        j0 = (j - self._offsets.numel()).clamp_min(0)
        idx = j0.unsqueeze(-1) + self._offsets
        x = -self.neg.gather(1, idx.clamp_max(self.n - 1))
        v = torch.where(idx < j.unsqueeze(-1), k.unsqueeze(-1) * x - m.unsqueeze(-1), 0.0)
        g0, g1, g2 = self.prefix(j0)
        if l1_only:
            return k * g1 - m * g0 + v.sum(-1)
        xv, v1, vv = _affine_stats(k, m, g0, g1, g2)
        return xv + (x * v).sum(-1), v1 + v.sum(-1), vv + (v * v).sum(-1)


def _acc_dtype(X: Tensor) -> torch.dtype:
    return X.dtype if X.device.type == "mps" else torch.float64


def sort_units(A: Tensor, B: Tensor) -> tuple[SortedUnits, SortedUnits]:
    """The sorted rows of A and columns of B: A (L, r, d_in), B (L, d_out, r) -> (U = L·r rows each)."""
    return SortedUnits(A.reshape(-1, A.shape[-1])), SortedUnits(B.transpose(-1, -2).reshape(-1, B.shape[-2]))


def _per_unit(x: Tensor, L: int, r: int) -> Tensor:
    """A per-adapter value ((L,), (1,) or ()) repeated for each of the adapter's r units: (L·r,)."""
    return x.reshape(-1, 1).expand(L, r).reshape(-1)


def _affine_stats(k: Tensor, m: Tensor, g0: Tensor, g1: Tensor, g2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For v = k·x − m over the entries summed in g0, g1, g2 = Σ1, Σx, Σx²:
    (Σ x·v, Σ v, Σ v²).  Σ v² = k·Σ x·v − m·Σ v needs no fourth sum."""
    xv = k * g2 - m * g1
    v1 = k * g1 - m * g0
    return xv, v1, k * xv - m * v1


# ---------------------------------------------------------------------------------------
# BCD: both blocks are one affine piece on the j largest magnitudes.
# ---------------------------------------------------------------------------------------
def _bcd_sweep_sorted(SA: SortedUnits, SB: SortedUnits, l1, l2, can_scale, kB, mB, jB, lg=None):
    """One sweep on the scalars, from B̂ = (kB, mB) on the jB largest |B| of each unit.

    Returns (kA, mA, jA, kB, mB, jB) after the Â step, the B̂ step and the rescaling.  The
    sums run in the units' accumulation dtype; the state keeps kB's dtype (the weights'),
    so with fp32 weights it rounds like the dense loop's and cycles as soon.
    lg (U,): the generator penalty per unit, or None.  It keeps the sorted form: the Â
    step scales (k, m) by the group shrink g = max(0, 1 − lg‖B̂‖₁/‖S_λ1(sA)‖₂) (g = 0 empties
    the row) and the B̂ step's threshold is λ2 + lg‖Â‖₂ (ops.GENERATOR_PENALTY).
    """
    sdt = kB.dtype
    tiny = torch.finfo(SA.acc).tiny
    # Â | B̂:  Â_i = S_λ1(s_i A_i) / β̂_i, i.e. k = s/β̂, m = λ1/β̂ above τ = λ1/s.
    s, nBo, bh = SB.affine_sums(kB, mB, jB)
    hasB = jB > 0
    bh = bh.clamp_min(tiny)
    kA = torch.where(hasB, s / bh, 0.0)
    mA = torch.where(hasB, l1 / bh, 0.0)
    jA = SA.count_above(torch.where(hasB, l1 / s.clamp_min(tiny), math.inf))
    if lg is not None:
        zz = SA.affine_sums(s, l1.expand_as(s), jA)[2]  # ‖S_λ1(sA)‖²
        g = torch.clamp_min(1 - lg * nBo / zz.clamp_min(0).sqrt().clamp_min(tiny), 0)
        g = torch.where(lg > 0, g, 1.0)
        kA, mA = kA * g, mA * g
        jA = torch.where(g > 0, jA, 0)
    # B̂ | Â:  B̂ = sign(B)·max(c|B| − λ2, 0)/â when c > 0, i.e. k = c/â, m = λ2/â above τ = λ2/c.
    c, nA, ah = SA.affine_sums(kA, mA, jA)
    hasA = jA > 0
    ah = ah.clamp_min(tiny)
    t2 = l2 if lg is None else torch.where(lg > 0, l2 + lg * ah.sqrt(), l2)
    kB = torch.where(hasA, c / ah, 0.0)
    mB = torch.where(hasA, t2 / ah, 0.0)
    jB = SB.count_above(torch.where(hasA, t2 / c.clamp_min(tiny), math.inf))
    nB = SB.affine_sums(kB, mB, jB, l1_only=True)
    # Free rescaling (tÂ_i, B̂_i/t): thresholds are scale-free, only (k, m) move.
    ok = can_scale & (nA > 0) & (nB > 0)
    t = torch.where(ok, torch.sqrt((l2 * nB) / (l1 * nA).clamp_min(tiny)), 1.0)
    return (kA * t).to(sdt), (mA * t).to(sdt), jA, (kB / t).to(sdt), (mB / t).to(sdt), jB


def _bcd_state(A, B, lam1, lam2, steps: int, early_exit: bool, units=None, lam_gen=None):
    """Run the sweeps on the scalars.  Returns (SA, SB, kA, mA, jA, kB, mB, jB), all (U,).

    A sweep reads only B̂'s state (kB, mB, jB) and treats every unit on its own, so each
    unit's states form a deterministic recurrence, which in floating point ends in a short
    cycle.  With ``early_exit``, the cycle detector of docs/design.md §4 (Brent's: one saved
    state per unit, O(1) per sweep) spots state(t) == state(t − p); the unit then needs only
    (T − t) mod p more sweeps to be where sweep T leaves it, bit for bit, and is frozen
    there.  The loop ends once every unit is frozen.
    """
    L, r, _ = A.shape
    dev = A.device
    SA, SB = units if units is not None else sort_units(A, B)
    dt = A.dtype  # of the state; the sums run in SA.acc
    l1, l2 = _per_unit(lam1.to(SA.acc), L, r), _per_unit(lam2.to(SA.acc), L, r)
    lg = None if lam_gen is None else _per_unit(lam_gen.to(SA.acc), L, r)
    can_scale = (l1 > 0) & (l2 > 0)
    U = L * r
    # The start B̂ = B is the member k = 1, m = 0 on the nonzero entries.
    kB = torch.ones(U, dtype=dt, device=dev)
    mB = torch.zeros(U, dtype=dt, device=dev)
    jB = SB.count_above(mB)
    kA, mA, jA = torch.zeros_like(kB), torch.zeros_like(mB), SA.count_above(mB)
    detector = CycleDetector(steps, (kB, mB, jB)) if early_exit else None
    t = 0
    while t < steps:
        t += 1
        new = _bcd_sweep_sorted(SA, SB, l1, l2, can_scale, kB, mB, jB, lg)
        if detector is None:
            kA, mA, jA, kB, mB, jB = new
            continue
        act = detector.active(t)
        kA, mA, jA, kB, mB, jB = (torch.where(act, n, o) for n, o in zip(new, (kA, mA, jA, kB, mB, jB)))
        if detector.observe(t, (kB, mB, jB)):
            break
    return SA, SB, kA, mA, jA, kB, mB, jB


class CycleDetector:
    """Brent's cycle detection, per unit, over a recurrence of ``steps`` iterations.

    The state after iteration t is compared with one saved state (the one after iteration
    t − lam, lam <= power); on a match the period is lam, and the unit's state after
    iteration T equals its state after iteration t + (T − t) mod lam.  Each unit gets a
    ``target``: the last iteration it must run; ``active(t)`` says which units still run
    iteration t, ``observe`` reports whether every unit has reached its target.  The same
    detector runs in csrc/sorted.h and the Triton sorted kernel (docs/design.md §4).
    """

    def __init__(self, steps: int, state: tuple[Tensor, ...]):
        U = state[0].shape[0]
        dev = state[0].device
        self.steps = steps
        self.saved = tuple(x.clone() for x in state)
        self.power = torch.ones(U, dtype=torch.long, device=dev)
        self.lam = torch.zeros(U, dtype=torch.long, device=dev)
        self.found = torch.zeros(U, dtype=torch.bool, device=dev)
        self.target = torch.full((U,), steps, dtype=torch.long, device=dev)

    def active(self, t: int) -> Tensor:
        return t <= self.target

    def observe(self, t: int, state: tuple[Tensor, ...]) -> bool:
        """Take the state after iteration t; True once every unit has run its last iteration."""
        self.lam += 1
        same = torch.stack([x == s for x, s in zip(state, self.saved)]).all(0)
        hit = (t <= self.target) & ~self.found & same
        self.target = torch.where(hit, t + torch.remainder(self.steps - t, self.lam), self.target)
        self.found |= hit
        move = self.lam == self.power
        self.saved = tuple(torch.where(move, x, s) for x, s in zip(state, self.saved))
        self.power = torch.where(move, self.power * 2, self.power)
        self.lam = torch.where(move, torch.zeros_like(self.lam), self.lam)
        return bool((self.target <= t).all())


def _materialise(X: Tensor, k: Tensor, m: Tensor, x_lo: Tensor) -> Tensor:
    """sign(X)·max(k|X| − m, 0) where |X| >= x_lo, else 0, in X's dtype; k, m, x_lo broadcast
    against X (x_lo is a value of |X|)."""
    ax = X.abs()
    keep = ax >= x_lo
    if k.dtype != X.dtype:
        ax = ax.to(k.dtype)
    val = torch.addcmul(-m, k, ax).clamp_min_(0).masked_fill_(~keep, 0).to(X.dtype)
    return torch.copysign(val, X)


def bcd_sorted(
    A: Tensor,
    B: Tensor,
    lam1: Tensor,
    lam2: Tensor,
    steps: int,
    *,
    units: tuple[SortedUnits, SortedUnits] | None = None,
    early_exit: bool = True,
    lam_gen: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """T sweeps of BCD with rescaling (``dense.bcd_sweep``) in the sorted form.

    A: (L, r, d_in), B: (L, d_out, r), lam1, lam2: (L,) -> (Â, B̂) of the same shapes.
    Cost: one sort of every row of A and column of B, then O(L·r·log d) per sweep, and no
    more sweeps once every unit's state cycles (``CycleDetector``; ``early_exit=False``
    runs all T sweeps).  ``units``: ``sort_units(A, B)``, if already computed.
    """
    L, r, _ = A.shape
    if steps < 1:
        return A.clone(), B.clone()
    SA, SB, kA, mA, jA, kB, mB, jB = _bcd_state(A, B, lam1, lam2, steps, early_exit, units, lam_gen)
    Ah = _materialise(A, kA.view(L, r, 1), mA.view(L, r, 1), SA.smallest_kept(jA).view(L, r, 1))
    Bh = _materialise(B, kB.view(L, 1, r), mB.view(L, 1, r), SB.smallest_kept(jB).view(L, 1, r))
    return Ah, Bh


# ---------------------------------------------------------------------------------------
# ISTA: B̂ stays one affine piece on the largest |B| (a support that only shrinks); Â is
# a convex piecewise-affine function of |A| whose pieces are index ranges of the sorted row.
# ---------------------------------------------------------------------------------------
def _ista_state(A, B, lam1, lam2, lr, steps: int, max_pieces: int, units=None, lam_gen=None):
    """ISTA on the scalars.  Returns (SA, SB, hi, kP, mP, cnt, kB, mB, jB, bad).

    Â's pieces sit in slots, largest magnitudes first: slot p covers sorted positions
    [hi_{p−1}, hi_p) (hi_{−1} = 0) with value sign(A)·(k_p|A| − m_p); slots >= cnt are
    unused and positions >= hi_{cnt−1} are zero.  ``bad`` (U,) marks units whose iterates
    left the sorted form (more than max_pieces pieces, or a step with 1 − lr·β̂ < 0 or
    1 − lr·â < 0, where signs could flip); their values are meaningless.
    """
    L, r, _ = A.shape
    dev = A.device
    SA, SB = units if units is not None else sort_units(A, B)
    dt = SA.acc
    tiny = torch.finfo(dt).tiny
    n = SA.n
    U = L * r
    P = max_pieces
    l1, l2 = _per_unit(lam1.to(dt), L, r), _per_unit(lam2.to(dt), L, r)
    eta = _per_unit(lr.to(dt), L, r)
    eta_l1, eta_l2 = (eta * l1).unsqueeze(-1), eta * l2
    lg = None if lam_gen is None else _per_unit(lam_gen.to(dt), L, r)
    # One spare slot (index P) receives the piece born in a step.  bounds = [0, hi_0, …, hi_P]:
    # slot p covers [bounds_p, bounds_{p+1}); unused slots are empty ranges at n.
    slot = torch.arange(P + 1, device=dev).expand(U, P + 1)
    zeros = torch.zeros(U, dtype=dt, device=dev)
    bounds = torch.full((U, P + 2), n, dtype=torch.long, device=dev)
    bounds[:, 0] = 0
    bounds[:, 1] = SA.count_above(zeros)
    kP = torch.zeros(U, P + 1, dtype=dt, device=dev)
    mP = torch.zeros(U, P + 1, dtype=dt, device=dev)
    kP[:, 0] = 1
    cnt = torch.ones(U, dtype=torch.long, device=dev)
    kB = torch.ones(U, dtype=dt, device=dev)
    mB = zeros.clone()
    jB = SB.count_above(zeros)
    bad = torch.zeros(U, dtype=torch.bool, device=dev)
    for _ in range(steps):
        valid = slot < cnt.unsqueeze(-1)
        lo, hi = bounds[:, :-1], bounds[:, 1:]
        # Range sums of (1, x, x²) per piece, then the unit's c = ⟨A, Â⟩ and â = ‖Â‖².
        g0, g1, g2 = SA.prefix_many(bounds)
        xv, _, vv = _affine_stats(kP, mP, g0.diff(dim=1), g1.diff(dim=1), g2.diff(dim=1))
        c = torch.where(valid, xv, 0.0).sum(-1)
        ah = torch.where(valid, vv, 0.0).sum(-1)
        s, nBo, bh = SB.affine_sums(kB, mB, jB)
        alB = 1 - eta * ah
        alA = 1 - eta * bh
        bad |= ((alA < 0) & (cnt > 0)) | ((alB < 0) & (jB > 0))
        # B̂ ← S((1 − η â) B̂ + η c B·1[B B̂ > 0], η λ2): on the support, sign(B)·(K|B| − M);
        # off it the gradient is zero and B̂ stays zero, so the support only shrinks.
        # With the generator penalty the threshold is η(λ2 + lg‖Â‖₂), Â the old iterate.
        KB = alB * kB + eta * c
        if lg is None:
            MB = alB * mB + eta_l2
        else:
            MB = alB * mB + torch.where(lg > 0, eta * (l2 + lg * ah.clamp_min(0).sqrt()), eta_l2)
        jB = torch.minimum(jB, SB.count_above(torch.where(KB > 0, MB / KB.clamp_min(tiny), math.inf)))
        kB, mB = KB, MB
        # Â ← S((1 − η β̂) Â + η s A, η λ1): each piece stays affine, and the zero region
        # [hi_{cnt−1}, n) becomes a candidate piece (η s, η λ1) in slot cnt: entries at zero
        # revive where s|A| > λ1.
        is_new = slot == cnt.unsqueeze(-1)
        ks = (eta * s).unsqueeze(-1)
        kP = torch.where(is_new, ks, alA.unsqueeze(-1) * kP + ks)
        mP = torch.where(is_new, eta_l1, alA.unsqueeze(-1) * mP + eta_l1)
        live = valid | is_new
        # The new function is nondecreasing in |A|, so its nonzeros are a prefix: it ends
        # inside the first piece that has a zero.  Every index here is a searchsorted count
        # or a piece boundary, so equal magnitudes are never split between pieces.
        # A piece has a zero iff its smallest entry is <= its threshold; only the first such
        # piece needs a search.
        tau = torch.where(kP > 0, mP / kP.clamp_min(tiny), math.inf)
        smallest = -SA.neg.gather(1, (hi - 1).clamp(0, n - 1))
        has_zero = live & (hi > lo) & (smallest <= tau)
        first = has_zero.to(torch.int8).argmax(-1, keepdim=True)
        cand = SA.count_above(tau.gather(1, first).squeeze(-1)).unsqueeze(-1)
        cand = torch.minimum(torch.maximum(cand, lo.gather(1, first)), hi.gather(1, first))
        q = torch.where(has_zero.any(-1, keepdim=True), cand, n)
        keep = live & (lo < q)
        cnt = keep.sum(-1)
        bad |= cnt > P
        bounds = torch.cat([bounds[:, :1], torch.where(keep, torch.minimum(hi, q), n)], dim=1)
        kP = torch.where(keep, kP, 0.0)
        mP = torch.where(keep, mP, 0.0)
        if lg is not None:
            # the group shrink of the sparse-group-lasso prox scales every piece by
            # g = max(0, 1 − η lg ‖B̂‖₁/‖U‖₂), U the soft-thresholded step (B̂ the old iterate);
            # g = 0 empties the row, whose zeros may revive as a new piece later.
            g0, g1, g2 = SA.prefix_many(bounds)
            _, _, vv = _affine_stats(kP, mP, g0.diff(dim=1), g1.diff(dim=1), g2.diff(dim=1))
            uu = torch.where(keep, vv, 0.0).sum(-1).clamp_min(0)
            g = torch.clamp_min(1 - eta * lg * nBo / uu.sqrt().clamp_min(tiny), 0)
            g = torch.where(lg > 0, g, 1.0)
            kP, mP = kP * g.unsqueeze(-1), mP * g.unsqueeze(-1)
            dead = g == 0
            cnt = torch.where(dead, 0, cnt)
            bounds[:, 1:] = torch.where(dead.unsqueeze(-1), n, bounds[:, 1:])
    return SA, SB, bounds[:, 1 : P + 1], kP[:, :P], mP[:, :P], cnt.clamp_max(P), kB, mB, jB, bad


def _materialise_pieces(A: Tensor, SA: SortedUnits, hi, kP, mP, cnt) -> Tensor:
    """Â from its piece table: an entry's piece is the number of pieces whose smallest
    magnitude exceeds the entry's."""
    L, r, d = A.shape
    U, P = hi.shape
    valid = torch.arange(P, device=A.device).expand(U, P) < cnt.unsqueeze(-1)
    low = -SA.neg.gather(1, (hi - 1).clamp_min(0)).to(kP.dtype)
    low = torch.where(valid, low, -math.inf)
    low = torch.sort(low, dim=-1).values
    ax = A.abs().reshape(U, d).to(kP.dtype)
    which = P - torch.searchsorted(low, ax, right=True)
    inside = which < cnt.unsqueeze(-1)
    which = which.clamp_max(P - 1)
    val = torch.clamp_min(kP.gather(1, which) * ax - mP.gather(1, which), 0)
    val = val.masked_fill_(~inside, 0).to(A.dtype)
    return val.mul_(torch.sign(A.reshape(U, d))).reshape(L, r, d)


def _dense_adapters(A, B, lam1, lam2, lr, method: str, steps: int, adapters: Tensor, lam_gen=None):
    """The dense loop on some adapters only: adapters (n,) indices into L -> (Â, B̂) for them."""
    L, i = A.shape[0], adapters
    l1, l2, eta = (p.to(A.dtype).reshape(-1).expand(L)[i] for p in (lam1, lam2, lr))
    lg = None if lam_gen is None else lam_gen.to(A.dtype).reshape(-1).expand(L)[i]
    return dense.dense_solve(
        closed_form.prox_step, A[i], B[i], l1, l2, eta, method, steps, lg, closed_form.prox_step_gen
    )


def ista_sorted(
    A: Tensor,
    B: Tensor,
    lam1: Tensor,
    lam2: Tensor,
    lr: Tensor,
    steps: int,
    *,
    units: tuple[SortedUnits, SortedUnits] | None = None,
    max_pieces: int = 16,
    lam_gen: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """T steps of the paper's ISTA (a loop of ``prox_step``) in the sorted form.

    A: (L, r, d_in), B: (L, d_out, r), lam1, lam2, lr: (L,) -> (Â, B̂) of the same shapes.
    B̂ is one affine piece on the largest |B| (its support only shrinks); Â is a convex
    piecewise-affine function of |A| (entries at zero revive where s|A| > λ1), kept as up
    to ``max_pieces`` ranges of the sorted row.  An adapter with a unit that needs more
    pieces, or meets a step so long that 1 − lr·β̂ or 1 − lr·â turns negative (signs could
    flip), is rerun by the dense loop: the same reductions as ``dense_solve``, so the same
    iterates even where the dense iteration itself is unstable.  ``units``: ``sort_units(A, B)``.
    """
    L, r, _ = A.shape
    if steps < 1:
        return A.clone(), B.clone()
    SA, SB, hi, kP, mP, cnt, kB, mB, jB, bad = _ista_state(A, B, lam1, lam2, lr, steps, max_pieces, units, lam_gen)
    Ah = _materialise_pieces(A, SA, hi, kP, mP, cnt)
    Bh = _materialise(B, kB.view(L, 1, r), mB.view(L, 1, r), SB.smallest_kept(jB).view(L, 1, r))
    adapters = bad.view(L, r).any(-1).nonzero().squeeze(-1)
    if adapters.numel():
        Ah[adapters], Bh[adapters] = _dense_adapters(A, B, lam1, lam2, lr, "ista", steps, adapters, lam_gen)
    return Ah, Bh


def solve_sorted(
    A: Tensor,
    B: Tensor,
    lam1: Tensor,
    lam2: Tensor,
    lr: Tensor,
    method: str,
    steps: int,
    *,
    units: tuple[SortedUnits, SortedUnits] | None = None,
    lam_gen: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``solve_fused`` on the sorted path: A (L, r, d_in), B (L, d_out, r); lam1, lam2, lr (L,).

    "bcd" and "ista" run in the sorted form; "fista" has no sorted form (its extrapolation
    mixes two iterates with different thresholds) and runs the dense loop.
    ``units``: ``sort_units(A, B)``, if already computed.  lam_gen (L,) or None: the generator
    penalty, which keeps the sorted form of both (a per-unit scale of Â's pieces and a
    per-unit B̂ threshold; see ``_bcd_sweep_sorted`` and ``_ista_state``).
    """
    if method == "bcd":
        return bcd_sorted(A, B, lam1, lam2, steps, units=units, lam_gen=lam_gen)
    if method == "ista":
        return ista_sorted(A, B, lam1, lam2, lr, steps, units=units, lam_gen=lam_gen)
    if method == "fista":
        return dense.dense_solve(closed_form.prox_step, A, B, lam1, lam2, lr, method, steps, lam_gen,
                                 closed_form.prox_step_gen)
    raise ValueError(f"unknown method {method!r}")
