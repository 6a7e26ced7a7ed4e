"""Triton kernels of the sorted path (``solve_sorted`` of the ``triton`` backend).

``backends/torch/sorted.py`` is the spec: the same recurrences, the same sums, the same dtypes.
The host launcher (``launch.solve_sorted``) sorts every unit once with
``sorted.sort_units`` (torch.sort: a segmented sort on the GPU), then:

``_bcd_sorted_kernel``    all T sweeps of BCD on the scalars (k_A, m_A, j_A, k_B, m_B, j_B) of
                          BLOCK_U units, a unit per lane; a unit whose B̂ state repeats stops
                          early (Brent's cycle finding), bit for bit what the remaining sweeps give.
``_ista_sorted_kernel``   all T ISTA steps: B̂ one affine piece, Â a table of up to MAX_PIECES
                          pieces held as [BLOCK_U, PS] tiles; units that leave the sorted form are
                          flagged ``bad`` (the host reruns their adapters densely).
``_materialise_kernel``   Â or B̂ from the per-unit pieces, one pass over the weights.

Layouts: ``neg`` (U, n) −|X| ascending in the compute dtype ``CT``; ``P`` (U, 2, n + 1) fp64
prefix sums, P[u, 0, j] = Σ_{i<j} −x_i, P[u, 1, j] = Σ_{i<j} x_i² (``sorted.SortedUnits``).
Unit u = l·r + i is row i of A[l] and column i of B[l].  Offsets are int64.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._mode import interpreting

INTERPRETED = interpreting()

_INF = tl.constexpr(float("inf"))


# ---------------------------------------------------------------------------------------
# Sorted-row primitives (SortedUnits), one lane per unit.
# ---------------------------------------------------------------------------------------
@triton.jit
def _count_above(neg_ptr, row, n, n_iter, tau, um):
    """Entries of each unit's row strictly greater than tau (fp64; +inf: none): (BLOCK_U,) int32.

    searchsorted(neg, −tau), left side, as ``n_iter`` = ceil(log2(n + 1)) lockstep halvings.
    Comparing in fp64 is exact: it is what SortedUnits.count_above's round-up achieves.
    """
    v = -tau
    lo = tl.zeros_like(tau).to(tl.int32)
    hi = lo + n
    for _ in range(n_iter):
        open_ = lo < hi
        mid = (lo + hi) // 2
        x = tl.load(neg_ptr + row + mid, mask=um & open_, other=0.0).to(tl.float64)
        right = x < v
        lo = tl.where(open_ & right, mid + 1, lo)
        hi = tl.where(open_ & ~right, mid, hi)
    return lo


@triton.jit
def _prefix(P_ptr, prow, n, j, um):
    """Σ_{i<j} x and x² (fp64) per unit; prow: the unit's offset in P (U, 2, n + 1)."""
    g1 = -tl.load(P_ptr + prow + j, mask=um, other=0.0)
    g2 = tl.load(P_ptr + prow + (n + 1) + j, mask=um, other=0.0)
    return g1, g2


@triton.jit
def _window(neg_ptr, row, j0, j, k, m, um, o: tl.constexpr):
    """Entry j0 + o (when below j) of the sorted row, and v = k·x − m there (0 above j)."""
    idx = j0 + o
    inside = idx < j
    x = -tl.load(neg_ptr + row + idx, mask=um & inside, other=0.0)
    v = tl.where(inside, k * x - m, 0.0)
    return x, v


@triton.jit
def _affine_sums(neg_ptr, P_ptr, row, prow, n, k, m, j, um, WINDOW: tl.constexpr):
    """For v = k·x − m on the j largest entries: (Σ x·v, Σ v, Σ v²), as SortedUnits.affine_sums.

    The WINDOW smallest kept entries are summed from their values (in k's dtype), the larger
    ones come from the fp64 prefix sums: a unit left with a few entries just above the
    threshold keeps its digits.
    """
    j0 = tl.maximum(j - WINDOW, 0)
    g0 = j0.to(tl.float64)
    g1, g2 = _prefix(P_ptr, prow, n, j0, um)
    x, v = _window(neg_ptr, row, j0, j, k, m, um, 0)
    sx = x * v
    s1 = v
    s2 = v * v
    for o in tl.static_range(1, WINDOW):
        x, v = _window(neg_ptr, row, j0, j, k, m, um, o)
        sx += x * v
        s1 += v
        s2 += v * v
    xv = k * g2 - m * g1
    v1 = k * g1 - m * g0
    vv = k * xv - m * v1
    return xv + sx, v1 + s1, vv + s2


@triton.jit
def _affine_l1(neg_ptr, P_ptr, row, prow, n, k, m, j, um, WINDOW: tl.constexpr):
    """Σ v for v = k·x − m on the j largest entries (``affine_sums(..., l1_only=True)``)."""
    j0 = tl.maximum(j - WINDOW, 0)
    g1, _ = _prefix(P_ptr, prow, n, j0, um)
    _, s1 = _window(neg_ptr, row, j0, j, k, m, um, 0)
    for o in tl.static_range(1, WINDOW):
        _, v = _window(neg_ptr, row, j0, j, k, m, um, o)
        s1 += v
    return k * g1 - m * j0.to(tl.float64) + s1


@triton.jit
def _smallest_kept(neg_ptr, row, j, um):
    """x_{j−1}, the smallest of the j largest entries (+inf for j = 0), in neg's dtype."""
    x = -tl.load(neg_ptr + row + tl.maximum(j - 1, 0), mask=um & (j > 0), other=0.0)
    return tl.where(j > 0, x, _INF)


# ---------------------------------------------------------------------------------------
# BCD.
# ---------------------------------------------------------------------------------------
@triton.jit
def _bcd_sweep(
    negA_ptr, PA_ptr, rowA, prowA, nA, itA, negB_ptr, PB_ptr, rowB, prowB, nB, itB, um,
    l1, l2, can_scale, kB, mB, jB, CT: tl.constexpr, TINY: tl.constexpr, WINDOW: tl.constexpr,
    lg=0.0, GEN: tl.constexpr = False,
):
    """One sweep on the scalars (sorted._bcd_sweep_sorted): from B̂ = (kB, mB) on the jB largest
    |B|, the state after the Â step, the B̂ step and the rescaling; sums in fp64, state in CT.
    GEN: the generator penalty lg (fp64, per unit): the group shrink scales Â's (k, m), the
    B̂ threshold is λ2 + lg‖Â‖₂."""
    # Â | B̂:  k = s/β̂, m = λ1/β̂ above τ = λ1/s.
    s, nBo, bh = _affine_sums(negB_ptr, PB_ptr, rowB, prowB, nB, kB, mB, jB, um, WINDOW)
    hasB = jB > 0
    bh = tl.maximum(bh, TINY)
    kA = tl.where(hasB, s / bh, 0.0)
    mA = tl.where(hasB, l1 / bh, 0.0)
    jA = _count_above(negA_ptr, rowA, nA, itA, tl.where(hasB, l1 / tl.maximum(s, TINY), _INF), um)
    t2 = l2
    if GEN:
        _, _, zz = _affine_sums(negA_ptr, PA_ptr, rowA, prowA, nA, s, l1, jA, um, WINDOW)
        g = tl.maximum(1 - lg * nBo / tl.maximum(tl.sqrt(tl.maximum(zz, 0.0)), TINY), 0.0)
        g = tl.where(lg > 0, g, 1.0)
        kA = kA * g
        mA = mA * g
        jA = tl.where(g > 0, jA, 0)
    # B̂ | Â:  k = c/â, m = λ2/â above τ = λ2/c.
    c, nrmA, ah = _affine_sums(negA_ptr, PA_ptr, rowA, prowA, nA, kA, mA, jA, um, WINDOW)
    hasA = jA > 0
    ah = tl.maximum(ah, TINY)
    if GEN:
        t2 = tl.where(lg > 0, l2 + lg * tl.sqrt(ah), l2)
    kB2 = tl.where(hasA, c / ah, 0.0)
    mB2 = tl.where(hasA, t2 / ah, 0.0)
    jB2 = _count_above(negB_ptr, rowB, nB, itB, tl.where(hasA, t2 / tl.maximum(c, TINY), _INF), um)
    nrmB = _affine_l1(negB_ptr, PB_ptr, rowB, prowB, nB, kB2, mB2, jB2, um, WINDOW)
    # Free rescaling: thresholds are scale-free, only (k, m) move.
    ok = can_scale & (nrmA > 0) & (nrmB > 0)
    ratio = (l2 * nrmB) / tl.maximum(l1 * nrmA, TINY)
    t = tl.where(ok, tl.sqrt(tl.where(ok, ratio, 1.0)), 1.0)
    return (kA * t).to(CT), (mA * t).to(CT), jA, (kB2 / t).to(CT), (mB2 / t).to(CT), jB2


@triton.jit
def _bcd_sorted_kernel(
    negA_ptr, PA_ptr, negB_ptr, PB_ptr, lam1_ptr, lam2_ptr,
    kA_ptr, mA_ptr, lowA_ptr, kB_ptr, mB_ptr, lowB_ptr, sweeps_ptr,
    U, r, nA, nB, itA, itB, steps, lg_ptr,
    CT: tl.constexpr, TINY: tl.constexpr, WINDOW: tl.constexpr, EARLY_EXIT: tl.constexpr, BLOCK_U: tl.constexpr,
    GEN: tl.constexpr = False,
):
    """`steps` (>= 1) BCD sweeps of BLOCK_U units; writes Â = (kA, mA) above lowA, B̂ = (kB, mB)
    above lowB (low: the smallest kept magnitude, +inf for none) and the sweeps run per unit.

    A sweep reads only B̂'s state (kB, mB, jB), so a unit's states are a deterministic
    recurrence that ends in a short cycle in floating point.  With EARLY_EXIT, Brent's cycle
    finding (one saved state, O(1) per sweep) spots state(t) == state(t − p); the unit then
    needs only (T − t) mod p more sweeps to be where sweep T would leave it, and the program
    stops once all its units are there.
    """
    units = tl.program_id(0).to(tl.int64) * BLOCK_U + tl.arange(0, BLOCK_U).to(tl.int64)
    um = units < U
    adapter = units // r
    l1 = tl.load(lam1_ptr + adapter, mask=um, other=0.0).to(tl.float64)
    l2 = tl.load(lam2_ptr + adapter, mask=um, other=0.0).to(tl.float64)
    lg = l1 * 0
    if GEN:
        lg = tl.load(lg_ptr + adapter, mask=um, other=0.0).to(tl.float64)
    can_scale = (l1 > 0) & (l2 > 0)
    rowA = units * nA
    rowB = units * nB
    prowA = units * (2 * (nA + 1))
    prowB = units * (2 * (nB + 1))

    # The start B̂ = B is the member k = 1, m = 0 on the nonzero entries.
    zero = tl.zeros([BLOCK_U], tl.float64)
    kB = (zero + 1.0).to(CT)
    mB = zero.to(CT)
    jB = _count_above(negB_ptr, rowB, nB, itB, zero, um)
    kA = mB
    mA = mB
    jA = jB * 0
    target = tl.where(um, jA + steps, 0)  # sweeps this unit still needs to reach sweep T
    # Brent: the state saved at sweep t − lam, lam <= power.
    sk = kB
    sm = mB
    sj = jB
    power = jA + 1
    lam = jA
    found = target < 0
    t = tl.program_id(0) * 0
    last = tl.max(target, axis=0)
    while t < last:
        t += 1
        nkA, nmA, njA, nkB, nmB, njB = _bcd_sweep(
            negA_ptr, PA_ptr, rowA, prowA, nA, itA, negB_ptr, PB_ptr, rowB, prowB, nB, itB, um,
            l1, l2, can_scale, kB, mB, jB, CT, TINY, WINDOW, lg, GEN,
        )
        act = t <= target
        kA = tl.where(act, nkA, kA)
        mA = tl.where(act, nmA, mA)
        jA = tl.where(act, njA, jA)
        kB = tl.where(act, nkB, kB)
        mB = tl.where(act, nmB, mB)
        jB = tl.where(act, njB, jB)
        if EARLY_EXIT:
            lam += 1
            hit = act & ~found & (kB == sk) & (mB == sm) & (jB == sj)
            # state(t) == state(t − lam): sweep T leaves what sweep t + (T − t) mod lam does.
            target = tl.where(hit, t + (steps - t) % lam, target)
            found = found | hit
            move = lam == power
            sk = tl.where(move, kB, sk)
            sm = tl.where(move, mB, sm)
            sj = tl.where(move, jB, sj)
            power = tl.where(move, power * 2, power)
            lam = tl.where(move, 0, lam)
            last = tl.max(target, axis=0)

    tl.store(kA_ptr + units, kA, mask=um)
    tl.store(mA_ptr + units, mA, mask=um)
    tl.store(lowA_ptr + units, _smallest_kept(negA_ptr, rowA, jA, um).to(CT), mask=um)
    tl.store(kB_ptr + units, kB, mask=um)
    tl.store(mB_ptr + units, mB, mask=um)
    tl.store(lowB_ptr + units, _smallest_kept(negB_ptr, rowB, jB, um).to(CT), mask=um)
    tl.store(sweeps_ptr + units, target, mask=um)


# ---------------------------------------------------------------------------------------
# ISTA.
# ---------------------------------------------------------------------------------------
@triton.jit
def _pick(x, sel, empty):
    """The entry of each row of a [BLOCK_U, PS] tile where sel (at most one per row) is set."""
    return tl.max(tl.where(sel, x, empty), axis=1)


@triton.jit
def _ista_sorted_kernel(
    negA_ptr, PA_ptr, negB_ptr, PB_ptr, lam1_ptr, lam2_ptr, lr_ptr,
    kP_ptr, mP_ptr, lowP_ptr, cnt_ptr, kB_ptr, mB_ptr, lowB_ptr, bad_ptr,
    U, r, nA, nB, itA, itB, steps, lg_ptr,
    CT: tl.constexpr, TINY: tl.constexpr, WINDOW: tl.constexpr,
    MAX_PIECES: tl.constexpr, PS: tl.constexpr, BLOCK_U: tl.constexpr, GEN: tl.constexpr = False,
):
    """`steps` ISTA steps of BLOCK_U units on the scalars (sorted._ista_state).

    Â's piece table is a set of [BLOCK_U, PS] tiles (PS: MAX_PIECES rounded up to a power of
    two): slot p covers sorted positions [lo_p, hi_p) with value sign(A)·(k_p|A| − m_p),
    slots >= cnt are empty ranges at n.  Each slot also carries its range sums D1 = Σx,
    D2 = Σx² (computed as P[hi] − P[lo], as sorted.py does from its bounds every step) and
    its smallest magnitude x_{hi−1}: only the last kept slot changes in a step, so a step
    gathers O(1) prefix sums per unit, not O(pieces).  The piece born in a step goes to slot
    cnt; sorted.py's spare slot MAX_PIECES is handled as scalars (a unit whose new piece
    lands there is bad anyway).  Writes the table (kP, mP, lowP: (U, PS); cnt), B̂ = (kB, mB)
    above lowB, and bad (U,): the unit left the sorted form and its values are meaningless.
    """
    units = tl.program_id(0).to(tl.int64) * BLOCK_U + tl.arange(0, BLOCK_U).to(tl.int64)
    um = units < U
    adapter = units // r
    l1 = tl.load(lam1_ptr + adapter, mask=um, other=0.0).to(tl.float64)
    l2 = tl.load(lam2_ptr + adapter, mask=um, other=0.0).to(tl.float64)
    eta = tl.load(lr_ptr + adapter, mask=um, other=0.0).to(tl.float64)
    eta_l1 = eta * l1
    eta_l2 = eta * l2
    lg = l1 * 0
    if GEN:  # the generator penalty (sorted._ista_state)
        lg = tl.load(lg_ptr + adapter, mask=um, other=0.0).to(tl.float64)
    rowA = units * nA
    rowB = units * nB
    prowA = units * (2 * (nA + 1))
    prowB = units * (2 * (nB + 1))
    slot = tl.arange(0, PS)[None, :]
    zero = tl.zeros([BLOCK_U], tl.float64)
    xminA = -tl.load(negA_ptr + rowA + (nA - 1), mask=um, other=0.0)

    # Slot 0: the nonzero entries with k = 1, m = 0 (Â = A).
    nnz = _count_above(negA_ptr, rowA, nA, itA, zero, um)
    g1n, g2n = _prefix(PA_ptr, prowA, nA, nnz, um)
    g1z, g2z = _prefix(PA_ptr, prowA, nA, nnz * 0, um)
    first_slot = slot == 0
    lo = tl.where(first_slot, 0, tl.zeros([BLOCK_U, PS], tl.int32) + nA)
    hi = tl.where(first_slot, nnz[:, None], nA)
    D1 = tl.where(first_slot, (g1n - g1z)[:, None], 0.0)
    D2 = tl.where(first_slot, (g2n - g2z)[:, None], 0.0)
    low = tl.where(first_slot, _smallest_kept(negA_ptr, rowA, tl.maximum(nnz, 1), um)[:, None], 0.0).to(CT)
    kP = tl.where(first_slot, 1.0, zero[:, None])
    mP = tl.where(first_slot, 0.0, zero[:, None])
    cnt = nnz * 0 + 1
    end = nnz  # hi of the last slot: where the next new piece starts
    kB = zero + 1.0
    mB = zero
    jB = _count_above(negB_ptr, rowB, nB, itB, zero, um)
    bad = um & False

    for _ in range(steps):
        valid = slot < cnt[:, None]
        # c = ⟨A, Â⟩ and â = ‖Â‖² from the pieces' range sums.
        xv = kP * D2 - mP * D1
        v1 = kP * D1 - mP * (hi - lo).to(tl.float64)
        vv = kP * xv - mP * v1
        c = tl.sum(tl.where(valid, xv, 0.0), axis=1)
        ah = tl.sum(tl.where(valid, vv, 0.0), axis=1)
        s, nBo, bh = _affine_sums(negB_ptr, PB_ptr, rowB, prowB, nB, kB, mB, jB, um, WINDOW)
        alB = 1.0 - eta * ah
        alA = 1.0 - eta * bh
        bad = bad | ((alA < 0) & (cnt > 0)) | ((alB < 0) & (jB > 0))
        # B̂ ← S((1 − η â) B̂ + η c B·1[B B̂ > 0], η λ2): one piece whose support only shrinks.
        KB = alB * kB + eta * c
        if GEN:
            MB = alB * mB + tl.where(lg > 0, eta * (l2 + lg * tl.sqrt(tl.maximum(ah, 0.0))), eta_l2)
        else:
            MB = alB * mB + eta_l2
        tauB = tl.where(KB > 0, MB / tl.maximum(KB, TINY), _INF)
        jB = tl.minimum(jB, _count_above(negB_ptr, rowB, nB, itB, tauB, um))
        kB = KB
        mB = MB
        # Â ← S((1 − η β̂) Â + η s A, η λ1): every piece stays affine; the zero region
        # [end, n) becomes a candidate piece (η s, η λ1) in slot cnt.
        ks = eta * s
        is_new = (slot == cnt[:, None]) & (cnt[:, None] < MAX_PIECES)
        kP = tl.where(is_new, ks[:, None], alA[:, None] * kP + ks[:, None])
        mP = tl.where(is_new, eta_l1[:, None], alA[:, None] * mP + eta_l1[:, None])
        live = valid | is_new
        lo = tl.where(is_new, end[:, None], lo)
        low = tl.where(is_new, xminA[:, None], low)
        # The new function is nondecreasing in |A|: its nonzeros are a prefix that ends in the
        # first piece with a zero (its smallest entry <= its threshold).
        tau = tl.where(kP > 0, mP / tl.maximum(kP, TINY), _INF)
        has_zero = live & (hi > lo) & (low.to(tl.float64) <= tau)
        first = tl.min(tl.where(has_zero, slot, PS), axis=1)
        # sorted.py's spare slot MAX_PIECES: the new piece when every slot is in use.
        spare = cnt == MAX_PIECES
        tau_s = tl.where(ks > 0, eta_l1 / tl.maximum(ks, TINY), _INF)
        zero_s = spare & (first == PS) & (nA > end) & (xminA.to(tl.float64) <= tau_s)
        sel = slot == first[:, None]
        tau_f = tl.where(zero_s, tau_s, _pick(tau, sel, -_INF))
        lo_f = tl.where(zero_s, end, _pick(lo, sel, 0))
        hi_f = tl.where(zero_s, nA, _pick(hi, sel, 0))
        cand = _count_above(negA_ptr, rowA, nA, itA, tau_f, um)
        cand = tl.minimum(tl.maximum(cand, lo_f), hi_f)
        q = tl.where((first < PS) | zero_s, cand, nA)
        keep = live & (lo < q[:, None])
        cnt = tl.sum(keep.to(tl.int32), axis=1) + (spare & (end < q)).to(tl.int32)
        bad = bad | (cnt > MAX_PIECES)
        hi = tl.where(keep, tl.minimum(hi, q[:, None]), nA)
        lo = tl.where(keep, lo, nA)
        # The last kept slot ends at q (cut, new, or unchanged): its sums as P[q] − P[lo].
        is_last = keep & (slot == (cnt - 1)[:, None])
        lo_last = _pick(lo, is_last, 0)
        g1q, g2q = _prefix(PA_ptr, prowA, nA, q, um)
        g1l, g2l = _prefix(PA_ptr, prowA, nA, lo_last, um)
        D1 = tl.where(is_last, (g1q - g1l)[:, None], tl.where(keep, D1, 0.0))
        D2 = tl.where(is_last, (g2q - g2l)[:, None], tl.where(keep, D2, 0.0))
        low = tl.where(is_last, _smallest_kept(negA_ptr, rowA, tl.maximum(q, 1), um)[:, None], low)
        low = tl.where(keep, low, 0.0).to(CT)
        kP = tl.where(keep, kP, 0.0)
        mP = tl.where(keep, mP, 0.0)
        end = q
        if GEN:
            # the group shrink g = max(0, 1 − η lg ‖B̂‖₁/‖U‖₂) of every piece (B̂ the old iterate);
            # g = 0 empties the row (its zeros may come back as a new piece)
            xv2 = kP * D2 - mP * D1
            v12 = kP * D1 - mP * (hi - lo).to(tl.float64)
            uu = tl.sum(tl.where(keep, kP * xv2 - mP * v12, 0.0), axis=1)
            g = tl.maximum(1 - eta * lg * nBo / tl.maximum(tl.sqrt(tl.maximum(uu, 0.0)), TINY), 0.0)
            g = tl.where(lg > 0, g, 1.0)
            kP = kP * g[:, None]
            mP = mP * g[:, None]
            dead = g == 0
            cnt = tl.where(dead, 0, cnt)
            lo = tl.where(dead[:, None], nA, lo)
            hi = tl.where(dead[:, None], nA, hi)
            D1 = tl.where(dead[:, None], 0.0, D1)
            D2 = tl.where(dead[:, None], 0.0, D2)
            low = tl.where(dead[:, None], 0.0, low).to(CT)
            kP = tl.where(dead[:, None], 0.0, kP)
            mP = tl.where(dead[:, None], 0.0, mP)
            end = tl.where(dead, 0, end)

    tile = units[:, None] * PS + slot
    tm = um[:, None] & (slot < PS)
    tl.store(kP_ptr + tile, kP, mask=tm)
    tl.store(mP_ptr + tile, mP, mask=tm)
    tl.store(lowP_ptr + tile, low, mask=tm)
    tl.store(cnt_ptr + units, tl.minimum(cnt, MAX_PIECES), mask=um)
    tl.store(kB_ptr + units, kB, mask=um)
    tl.store(mB_ptr + units, mB, mask=um)
    tl.store(lowB_ptr + units, _smallest_kept(negB_ptr, rowB, jB, um).to(CT), mask=um)
    tl.store(bad_ptr + units, bad.to(tl.int8), mask=um)


# ---------------------------------------------------------------------------------------
# Materialisation.
# ---------------------------------------------------------------------------------------
@triton.jit
def _unit_vec(ptr, u, umask, UNIT_AXIS: tl.constexpr):
    """A per-unit value as a column (units along rows) or a row (units along columns) of the tile."""
    v = tl.load(ptr + u, mask=umask, other=0.0)
    if UNIT_AXIS == 1:
        out = v[:, None]
    else:
        out = v[None, :]
    return out


@triton.jit
def _materialise_kernel(
    X_ptr, Y_ptr, k_ptr, m_ptr, low_ptr, cnt_ptr, r, M, N,
    UNIT_AXIS: tl.constexpr, NP: tl.constexpr, HAS_CNT: tl.constexpr, CT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Y = sign(X)·max(k_p|X| − m_p, 0) for X: (L, M, N), where p is the piece of |X|, else 0.

    Units run along axis UNIT_AXIS (1: rows of A, 2: columns of B).  Per unit, NP pieces
    (k, m, low): (U, NP), low their smallest magnitude.  Without HAS_CNT (NP == 1) the piece is
    kept where |X| >= low (sorted._materialise); with it the first cnt (U,) pieces are valid,
    in decreasing magnitude (sorted._materialise_pieces).
    The value is computed in k's dtype and rounded through CT, as sorted.py does.
    """
    l = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(2).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    off = (l * M + rows[:, None]) * N + cols[None, :]
    x = tl.load(X_ptr + off, mask=mask, other=0.0).to(CT)
    ax = tl.abs(x)
    if UNIT_AXIS == 1:
        u = l * r + rows
        umask = rows < M
    else:
        u = l * r + cols
        umask = cols < N
    if not HAS_CNT:
        k = _unit_vec(k_ptr, u, umask, UNIT_AXIS)
        m = _unit_vec(m_ptr, u, umask, UNIT_AXIS)
        inside = ax >= _unit_vec(low_ptr, u, umask, UNIT_AXIS)
    else:
        # An entry's piece is the number of valid pieces whose smallest magnitude exceeds its own.
        cnt = _unit_vec(cnt_ptr, u, umask, UNIT_AXIS)
        which = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        for p in tl.static_range(NP):
            low = _unit_vec(low_ptr, u * NP + p, umask, UNIT_AXIS)
            which += ((p < cnt) & (low > ax)).to(tl.int32)
        inside = which < cnt
        at = (l * r + rows[:, None] if UNIT_AXIS == 1 else l * r + cols[None, :]) * NP + tl.minimum(which, NP - 1)
        k = tl.load(k_ptr + at, mask=mask & inside, other=0.0)
        m = tl.load(m_ptr + at, mask=mask & inside, other=0.0)
    val = tl.maximum(k * ax.to(k.dtype) - m, 0.0)
    val = tl.where(inside, val, 0.0).to(CT)
    y = tl.where(x < 0, -val, val)
    tl.store(Y_ptr + off, y.to(Y_ptr.dtype.element_ty), mask=mask)
