"""Triton kernels of the ``triton`` backend (launched from ``launch.py``).

Layout (contiguous, batched): A, A_hat: (L, r, d_in);  B, B_hat: (L, d_out, r);
per-adapter parameters: (L,) in the compute dtype ``CT`` (float32, or float64).

The unit kernels run one program per (adapter, block of BLOCK_R hidden units) and hold
the block as two tiles: rows of A (BLOCK_R, BLOCK_I) and columns of B (BLOCK_O, BLOCK_R).
Everything a unit needs is a reduction along one tile axis (docs/design.md §2), so no program
ever reads another program's data.  Offsets are int64; every load is upcast to ``CT``.

``triton.jit`` picks compiled or interpreted functions when this module is imported
(from TRITON_INTERPRET), so the launcher reloads it if that setting changed since.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._mode import interpreting

INTERPRETED = interpreting()


# ---------------------------------------------------------------------------------------
# Helpers (inlined into the kernels).
# ---------------------------------------------------------------------------------------
@triton.jit
def _soft(x, tau):
    mag = tl.maximum(tl.abs(x) - tau, 0.0)
    return tl.where(x > 0, mag, tl.where(x < 0, -mag, 0.0))


@triton.jit
def _signed(ref, mag):
    return tl.where(ref > 0, mag, tl.where(ref < 0, -mag, 0.0))


@triton.jit
def _sqrt(x, CT: tl.constexpr):
    # fp32 sqrt rounded to nearest (tl.sqrt may lower to an approximation); fp64 is exact.
    if CT == tl.float64:
        y = tl.sqrt(x)
    else:
        y = tl.sqrt_rn(x)
    return y


@triton.jit
def _unit_tiles(r, d_in, d_out, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr):
    """Offsets and masks of this program's tiles: A-like (BLOCK_R, BLOCK_I), B-like (BLOCK_O, BLOCK_R)."""
    l = tl.program_id(0).to(tl.int64)
    units = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    k = tl.arange(0, BLOCK_I).to(tl.int64)
    j = tl.arange(0, BLOCK_O).to(tl.int64)
    um = units < r
    a_off = (l * r + units[:, None]) * d_in + k[None, :]
    a_mask = um[:, None] & (k < d_in)[None, :]
    b_off = (l * d_out + j[:, None]) * r + units[None, :]
    b_mask = (j < d_out)[:, None] & um[None, :]
    return l, units, um, a_off, a_mask, b_off, b_mask


@triton.jit
def _unit_loss(A, B, Ah, Bh):
    """Twice each unit's share of the fit term, β‖E_i‖² + 2q⟨E_i, Â_i⟩ + δâ with E = A − Â,
    summed from differences so nothing cancels near Â = A (closed_form._loss): (BLOCK_R,)."""
    E = A - Ah
    pB = tl.maximum(B, 0.0)
    nB = tl.maximum(-B, 0.0)
    dP = pB - tl.maximum(Bh, 0.0)
    dN = nB - tl.maximum(-Bh, 0.0)
    q = tl.sum(pB * dP + nB * dN, axis=0)
    delta = tl.sum(dP * dP + dN * dN, axis=0)
    beta = tl.sum(B * B, axis=0)
    a_hat = tl.sum(Ah * Ah, axis=1)
    return beta * tl.sum(E * E, axis=1) + 2.0 * q * tl.sum(E * Ah, axis=1) + delta * a_hat


@triton.jit
def _prox_tiles(A, B, Ah, Bh, lr, lam1, lam2):
    """One proximal-gradient step of a block of units, both gradients at (Ah, Bh)."""
    prod = B * Bh
    same = prod > 0
    s = tl.sum(tl.where(same, prod, 0.0), axis=0)
    beta_hat = tl.sum(Bh * Bh, axis=0)
    a_hat = tl.sum(Ah * Ah, axis=1)
    c = tl.sum(A * Ah, axis=1)
    gA = beta_hat[:, None] * Ah - s[:, None] * A
    gB = a_hat[None, :] * Bh - c[None, :] * tl.where(same, B, 0.0)
    nA = _soft(Ah - lr * gA, lr * lam1)
    nB = _soft(Bh - lr * gB, lr * lam2)
    return nA, nB


@triton.jit
def _bcd_tiles(A, B, Ah, Bh, lam1, lam2, CT: tl.constexpr, TINY: tl.constexpr):
    """One sweep of exact block minimisation with the free per-unit rescaling."""
    prod = B * Bh
    s = tl.sum(tl.where(prod > 0, prod, 0.0), axis=0)
    beta_hat = tl.sum(Bh * Bh, axis=0)
    nA = _soft(s[:, None] * A, lam1)
    nA = tl.where(beta_hat[:, None] > 0, nA / tl.maximum(beta_hat, TINY)[:, None], 0.0)
    c = tl.sum(A * nA, axis=1)
    a_hat = tl.sum(nA * nA, axis=1)
    ok = (c > 0) & (a_hat > 0)
    mag = tl.maximum(tl.maximum(c, 0.0)[None, :] * tl.abs(B) - lam2, 0.0) / tl.maximum(a_hat, TINY)[None, :]
    nB = tl.where(ok[None, :], _signed(B, mag), 0.0)
    l1A = tl.sum(tl.abs(nA), axis=1)
    l1B = tl.sum(tl.abs(nB), axis=0)
    zero = tl.zeros_like(l1A)
    can = (l1A > 0) & (l1B > 0) & ((zero + lam1) > 0) & ((zero + lam2) > 0)
    ratio = (lam2 * l1B) / tl.maximum(lam1 * l1A, TINY)
    t = tl.where(can, _sqrt(tl.where(can, ratio, 1.0), CT), 1.0)
    return nA * t[:, None], nB / t[None, :]


@triton.jit
def _prox_tiles_gen(A, B, Ah, Bh, lr, lam1, lam2, lg, CT: tl.constexpr, TINY: tl.constexpr):
    """_prox_tiles with the generator penalty lg (ops.GENERATOR_PENALTY, closed_form.gen_prox):
    both blocks' proxes at (Ah, Bh), each with the other block's norm there."""
    prod = B * Bh
    same = prod > 0
    s = tl.sum(tl.where(same, prod, 0.0), axis=0)
    beta_hat = tl.sum(Bh * Bh, axis=0)
    a_hat = tl.sum(Ah * Ah, axis=1)
    c = tl.sum(A * Ah, axis=1)
    nB = tl.sum(tl.abs(Bh), axis=0)
    gA = beta_hat[:, None] * Ah - s[:, None] * A
    gB = a_hat[None, :] * Bh - c[None, :] * tl.where(same, B, 0.0)
    U = _soft(Ah - lr * gA, lr * lam1)
    un = _sqrt(tl.sum(U * U, axis=1), CT)
    g = tl.maximum(1 - lr * lg * nB / tl.maximum(un, TINY), 0.0)
    thr = lr * (lam2 + lg * _sqrt(a_hat, CT))
    return U * g[:, None], _soft(Bh - lr * gB, thr[None, :])


@triton.jit
def _bcd_tiles_gen(A, B, Ah, Bh, lam1, lam2, lg, CT: tl.constexpr, TINY: tl.constexpr):
    """_bcd_tiles with the generator penalty lg (dense.bcd_sweep): the group shrink of Â's
    sparse-group-lasso prox, B̂'s threshold λ2 + lg‖Â_i‖₂, the same rescaling."""
    prod = B * Bh
    s = tl.sum(tl.where(prod > 0, prod, 0.0), axis=0)
    beta_hat = tl.sum(Bh * Bh, axis=0)
    nBo = tl.sum(tl.abs(Bh), axis=0)
    Z = _soft(s[:, None] * A, lam1)
    g = tl.maximum(1 - lg * nBo / tl.maximum(_sqrt(tl.sum(Z * Z, axis=1), CT), TINY), 0.0)
    nA = tl.where(beta_hat[:, None] > 0, (Z * g[:, None]) / tl.maximum(beta_hat, TINY)[:, None], 0.0)
    c = tl.sum(A * nA, axis=1)
    a_hat = tl.sum(nA * nA, axis=1)
    ok = (c > 0) & (a_hat > 0)
    thr = lam2 + lg * _sqrt(a_hat, CT)
    mag = tl.maximum(tl.maximum(c, 0.0)[None, :] * tl.abs(B) - thr[None, :], 0.0) / tl.maximum(a_hat, TINY)[None, :]
    nB = tl.where(ok[None, :], _signed(B, mag), 0.0)
    l1A = tl.sum(tl.abs(nA), axis=1)
    l1B = tl.sum(tl.abs(nB), axis=0)
    zero = tl.zeros_like(l1A)
    can = (l1A > 0) & (l1B > 0) & ((zero + lam1) > 0) & ((zero + lam2) > 0)
    ratio = (lam2 * l1B) / tl.maximum(lam1 * l1A, TINY)
    t = tl.where(can, _sqrt(tl.where(can, ratio, 1.0), CT), 1.0)
    return nA * t[:, None], nB / t[None, :]


# ---------------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------------
@triton.jit
def _generators_kernel(A_ptr, B_ptr, G1_ptr, G2_ptr, r, d_in, d_out, n_blocks, CT: tl.constexpr, BLOCK: tl.constexpr):
    """G1[l, j, i, k] = relu(B[l, j, i])·A[l, i, k], G2 with relu(−B): one (l, j) row chunk per program."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_blocks  # l * d_out + j
    idx = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # flat (i, k) in the row
    l = row // d_out
    i = idx // d_in
    mask = i < r
    a = tl.load(A_ptr + l * r * d_in + idx, mask=mask, other=0.0).to(CT)
    b = tl.load(B_ptr + row * r + i, mask=mask, other=0.0).to(CT)
    out = row * r * d_in + idx
    tl.store(G1_ptr + out, (tl.maximum(b, 0.0) * a).to(G1_ptr.dtype.element_ty), mask=mask)
    tl.store(G2_ptr + out, (tl.maximum(-b, 0.0) * a).to(G2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _soft_threshold_kernel(X_ptr, tau_ptr, Y_ptr, M, n_blocks, tau_stride, BLOCK: tl.constexpr):
    """Y = S_tau(X) on rows of M elements; row l uses tau[l * tau_stride]."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_blocks
    idx = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < M
    tau = tl.load(tau_ptr + row * tau_stride)
    x = tl.load(X_ptr + row * M + idx, mask=mask, other=0.0).to(tau.dtype)
    tl.store(Y_ptr + row * M + idx, _soft(x, tau).to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hsd_kernel(
    A_ptr, B_ptr, Ah_ptr, Bh_ptr, loss_ptr, gA_ptr, gB_ptr, r, d_in, d_out,
    WITH_GRAD: tl.constexpr, CT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Per-unit loss terms into loss[l, i] (summed on the host), and optionally the gradients.

    The loss is the cancellation-free form of closed_form._loss (halved on the host).
    """
    l, units, um, a_off, a_mask, b_off, b_mask = _unit_tiles(r, d_in, d_out, BLOCK_R, BLOCK_I, BLOCK_O)
    A = tl.load(A_ptr + a_off, mask=a_mask, other=0.0).to(CT)
    Ah = tl.load(Ah_ptr + a_off, mask=a_mask, other=0.0).to(CT)
    B = tl.load(B_ptr + b_off, mask=b_mask, other=0.0).to(CT)
    Bh = tl.load(Bh_ptr + b_off, mask=b_mask, other=0.0).to(CT)

    tl.store(loss_ptr + l * r + units, _unit_loss(A, B, Ah, Bh), mask=um)

    if WITH_GRAD:
        prod = B * Bh
        same = prod > 0
        s = tl.sum(tl.where(same, prod, 0.0), axis=0)
        beta_hat = tl.sum(Bh * Bh, axis=0)
        c = tl.sum(A * Ah, axis=1)
        a_hat = tl.sum(Ah * Ah, axis=1)
        gA = beta_hat[:, None] * Ah - s[:, None] * A
        gB = a_hat[None, :] * Bh - c[None, :] * tl.where(same, B, 0.0)
        tl.store(gA_ptr + a_off, gA.to(gA_ptr.dtype.element_ty), mask=a_mask)
        tl.store(gB_ptr + b_off, gB.to(gB_ptr.dtype.element_ty), mask=b_mask)


@triton.jit
def _prox_step_kernel(
    A_ptr, B_ptr, Ah_ptr, Bh_ptr, lr_ptr, lam1_ptr, lam2_ptr, outA_ptr, outB_ptr, r, d_in, d_out,
    CT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """One step of Algorithm 1 for a block of units."""
    l, units, um, a_off, a_mask, b_off, b_mask = _unit_tiles(r, d_in, d_out, BLOCK_R, BLOCK_I, BLOCK_O)
    lr = tl.load(lr_ptr + l).to(CT)
    lam1 = tl.load(lam1_ptr + l).to(CT)
    lam2 = tl.load(lam2_ptr + l).to(CT)
    A = tl.load(A_ptr + a_off, mask=a_mask, other=0.0).to(CT)
    Ah = tl.load(Ah_ptr + a_off, mask=a_mask, other=0.0).to(CT)
    B = tl.load(B_ptr + b_off, mask=b_mask, other=0.0).to(CT)
    Bh = tl.load(Bh_ptr + b_off, mask=b_mask, other=0.0).to(CT)
    nA, nB = _prox_tiles(A, B, Ah, Bh, lr, lam1, lam2)
    tl.store(outA_ptr + a_off, nA.to(outA_ptr.dtype.element_ty), mask=a_mask)
    tl.store(outB_ptr + b_off, nB.to(outB_ptr.dtype.element_ty), mask=b_mask)


@triton.jit
def _solve_kernel(
    A_ptr, B_ptr, lam1_ptr, lam2_ptr, lr_ptr, outA_ptr, outB_ptr, stats_ptr, r, d_in, d_out, steps, lg_ptr,
    METHOD: tl.constexpr, CT: tl.constexpr, TINY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr, GEN: tl.constexpr = False,
):
    """All `steps` iterations of METHOD (0 ista, 1 fista, 2 bcd) for a block of units, on chip.

    Reads A and B once and writes (Â, B̂) once, whatever `steps` is.  The iterates are
    those of backends/torch/dense.py: FISTA keeps one momentum per unit and restarts a unit
    whose step points uphill (dense.fista_step); BCD is dense.bcd_sweep.  Per unit it also
    writes stats[l, i, :] = (F at the start, F at the end, nonzeros), summed per adapter on
    the host (the ops' stats).  GEN: the generator penalty, weight lg_ptr[l] (ops.GENERATOR_PENALTY);
    without it the kernel is exactly the one without the penalty.
    """
    l, units, um, a_off, a_mask, b_off, b_mask = _unit_tiles(r, d_in, d_out, BLOCK_R, BLOCK_I, BLOCK_O)
    lr = tl.load(lr_ptr + l).to(CT)
    lam1 = tl.load(lam1_ptr + l).to(CT)
    lam2 = tl.load(lam2_ptr + l).to(CT)
    lg = lam1 * 0
    if GEN:
        lg = tl.load(lg_ptr + l).to(CT)
    A = tl.load(A_ptr + a_off, mask=a_mask, other=0.0).to(CT)
    B = tl.load(B_ptr + b_off, mask=b_mask, other=0.0).to(CT)
    Ah = A
    Bh = B
    # FISTA state: the last step (Â_t − Â_{t−1}, B̂_t − B̂_{t−1}) and one momentum per unit.
    # Carrying the step rather than the previous iterate also keeps every loop-carried
    # value distinct before the loop: the compiler finds them by comparing values.
    dA = tl.zeros_like(A)
    dB = tl.zeros_like(B)
    mom = tl.full([BLOCK_R], 1.0, CT)
    for _ in tl.range(0, steps):
        if METHOD == 0:
            if GEN:
                Ah, Bh = _prox_tiles_gen(A, B, Ah, Bh, lr, lam1, lam2, lg, CT, TINY)
            else:
                Ah, Bh = _prox_tiles(A, B, Ah, Bh, lr, lam1, lam2)
        elif METHOD == 1:
            mom_next = (1.0 + _sqrt(1.0 + 4.0 * mom * mom, CT)) / 2.0
            w = (mom - 1.0) / mom_next
            YA = Ah + w[:, None] * dA
            YB = Bh + w[None, :] * dB
            if GEN:
                nA, nB = _prox_tiles_gen(A, B, YA, YB, lr, lam1, lam2, lg, CT, TINY)
            else:
                nA, nB = _prox_tiles(A, B, YA, YB, lr, lam1, lam2)
            dA = nA - Ah
            dB = nB - Bh
            # gradient restart per unit: drop the momentum of a unit whose step points uphill
            uphill = tl.sum((YA - nA) * dA, axis=1) + tl.sum((YB - nB) * dB, axis=0) > 0
            mom = tl.where(uphill, 1.0, mom_next).to(CT)
            Ah = nA
            Bh = nB
        else:
            if GEN:
                Ah, Bh = _bcd_tiles_gen(A, B, Ah, Bh, lam1, lam2, lg, CT, TINY)
            else:
                Ah, Bh = _bcd_tiles(A, B, Ah, Bh, lam1, lam2, CT, TINY)
    oA = Ah.to(outA_ptr.dtype.element_ty)
    oB = Bh.to(outB_ptr.dtype.element_ty)
    tl.store(outA_ptr + a_off, oA, mask=a_mask)
    tl.store(outB_ptr + b_off, oB, mask=b_mask)
    # the stats: F = ½·fit + λ1‖Â_i‖₁ + λ2‖B̂_i‖₁ per unit at the start (fit 0) and the end
    start = lam1 * tl.sum(tl.abs(A), axis=1) + lam2 * tl.sum(tl.abs(B), axis=0)
    end = 0.5 * _unit_loss(A, B, Ah, Bh) + lam1 * tl.sum(tl.abs(Ah), axis=1) + lam2 * tl.sum(tl.abs(Bh), axis=0)
    if GEN:
        start += lg * _sqrt(tl.sum(A * A, axis=1), CT) * tl.sum(tl.abs(B), axis=0)
        end += lg * _sqrt(tl.sum(Ah * Ah, axis=1), CT) * tl.sum(tl.abs(Bh), axis=0)
    nnz = tl.sum((oA != 0).to(tl.int32), axis=1) + tl.sum((oB != 0).to(tl.int32), axis=0)
    row = (l * r + units) * 3
    tl.store(stats_ptr + row, start.to(tl.float64), mask=um)
    tl.store(stats_ptr + row + 1, end.to(tl.float64), mask=um)
    tl.store(stats_ptr + row + 2, nnz.to(tl.float64), mask=um)
