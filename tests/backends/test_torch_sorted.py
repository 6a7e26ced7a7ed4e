"""The sorted-path solvers against the dense loops of solver.py, iterate for iterate."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tropfast import solver
from tropfast.backends.torch import closed_form, dense
from tropfast.backends.torch import sorted as sorted_path

# Relative to the largest entry of the dense iterate, per adapter, plus a tenth of that
# relative to the largest original weight.  An entry right at a threshold may be kept by one
# path and not the other, so elementwise relative error is not the measure; and an iterate
# that sits just above its thresholds everywhere (k|W| − m with k|W| ≈ m) carries the
# rounding of k|W| and m, which is relative to |W|, not to the small result.
REL = {torch.float64: 1e-12, torch.float32: 2e-5}


def _dense(A, B, lam1, lam2, lr, method, T):
    return dense.dense_solve(closed_form.prox_step, A, B, lam1, lam2, lr, method, T)


def _assert_iterates(got, want, dtype, what, orig=None):
    orig = orig if orig is not None else want
    for name, g, w, o in zip(("A_hat", "B_hat"), got, want, orig):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what} {name}: {g.shape}/{g.dtype} vs {w.shape}/{w.dtype}"
        assert bool(torch.isfinite(g).all()), f"{what} {name}: non-finite values"
        err = (g - w).abs().flatten(1).amax(1).double()
        scale = w.abs().flatten(1).amax(1).double()
        floor = o.abs().flatten(1).amax(1).double() / 10
        bound = REL[dtype] * (scale + floor) + torch.finfo(dtype).tiny
        worst = float((err / (scale + floor).clamp_min(1e-300)).max())
        assert bool((err <= bound).all()), f"{what} {name}: worst relative mismatch {worst:.3e} (tol {REL[dtype]:g})"


def _adapter(L, r, d_in, d_out, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(L, r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(L, d_out, r, generator=g, dtype=torch.float64)
    return A.to(dtype), B.to(dtype)


def _lams(L, dtype, scale, zero_one=False):
    lam1 = torch.linspace(1.0, 0.5, L, dtype=dtype) * scale
    lam2 = torch.linspace(0.7, 1.2, L, dtype=dtype) * scale
    if zero_one and L > 1:
        lam2[-1] = 0.0  # λ = 0 in one adapter: no rescaling there
    return lam1, lam2


SHAPES = [(2, 8, 24, 40), (1, 1, 7, 5)]
STEPS = [1, 2, 5, 30]
# λ scales from "almost nothing pruned" to "most units die" on N(0, 1) weights of these sizes.
LAM_SCALES = [0.3, 10.0, 60.0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", LAM_SCALES)
def test_bcd_matches_dense_fp64(shape, scale):
    A, B = _adapter(*shape, seed=int(scale * 10))
    lam1, lam2 = _lams(shape[0], A.dtype, scale, zero_one=True)
    for T in STEPS:
        want = _dense(A, B, lam1, lam2, None, "bcd", T)
        _assert_iterates(sorted_path.bcd_sorted(A, B, lam1, lam2, T), want, A.dtype, f"bcd T={T}", (A, B))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", LAM_SCALES)
@pytest.mark.parametrize("lr_mul", [1.0, 3.0])
def test_ista_matches_dense_fp64(shape, scale, lr_mul):
    A, B = _adapter(*shape, seed=int(scale * 10) + 1)
    lam1, lam2 = _lams(shape[0], A.dtype, scale, zero_one=True)
    lr = solver.safe_lr(A, B) * lr_mul
    for T in STEPS:
        want = _dense(A, B, lam1, lam2, lr, "ista", T)
        _assert_iterates(sorted_path.ista_sorted(A, B, lam1, lam2, lr, T), want, A.dtype, f"ista T={T}", (A, B))


def test_ista_pieces_in_use_without_fallback():
    # λ2 well below λ1 lets B̂ grow, so s grows and entries of Â that hit zero revive:
    # Â needs several pieces, and no unit leaves the sorted form, so the match is the sorted path's own.
    A, B = _adapter(2, 8, 24, 40, seed=3)
    lam1 = torch.tensor([30.0, 18.0], dtype=A.dtype)
    lam2 = torch.tensor([0.0, 7.2], dtype=A.dtype)
    lr = solver.safe_lr(A, B)
    T = 60
    *_, cnt, _, _, _, bad = sorted_path._ista_state(A, B, lam1, lam2, lr, T, 16)
    assert not bool(bad.any())
    assert int(cnt[:8].max()) >= 4 and int(cnt[8:].max()) >= 2
    want = _dense(A, B, lam1, lam2, lr, "ista", T)
    _assert_iterates(sorted_path.ista_sorted(A, B, lam1, lam2, lr, T), want, A.dtype, "ista", (A, B))


def test_ista_falls_back_per_adapter():
    # λ2 = 0 lets B̂ grow until 1 − lr·β̂ < 0: that adapter leaves the sorted form and is rerun
    # densely; max_pieces = 1 forces the other one out as soon as an entry revives.
    A, B = _adapter(2, 8, 24, 40, seed=4)
    lam1 = torch.tensor([30.0, 15.0], dtype=A.dtype)
    lam2 = torch.tensor([30.0, 0.0], dtype=A.dtype)
    lr = solver.safe_lr(A, B) * 3
    for T, P in [(200, 16), (30, 1)]:
        *_, bad = sorted_path._ista_state(A, B, lam1, lam2, lr, T, P)
        assert bool(bad.any())
        got = sorted_path.ista_sorted(A, B, lam1, lam2, lr, T, max_pieces=P)
        _assert_iterates(got, _dense(A, B, lam1, lam2, lr, "ista", T), A.dtype, f"ista T={T} P={P}", (A, B))
    # The same with one λ and step for every adapter, given as 0-dim tensors.
    lam1, lam2, eta = torch.tensor(10.0, dtype=A.dtype), torch.tensor(2.0, dtype=A.dtype), lr.min()
    *_, bad = sorted_path._ista_state(A, B, lam1, lam2, eta, 30, 1)
    assert bool(bad.any())
    got = sorted_path.ista_sorted(A, B, lam1, lam2, eta, 30, max_pieces=1)
    want = _dense(A, B, lam1.expand(2), lam2.expand(2), eta.expand(2), "ista", 30)
    _assert_iterates(got, want, A.dtype, "ista 0-dim λ", (A, B))


@pytest.mark.parametrize("method", ["bcd", "ista"])
def test_zero_padding_stays_exact(method):
    # Two adapters of different shapes in one padded batch: the padding stays exactly zero
    # and each adapter's iterates are those of its own unpadded solve.
    A1, B1 = _adapter(1, 5, 11, 9, seed=5)
    A2, B2 = _adapter(1, 8, 24, 40, seed=6)
    A, B = solver.pad_adapters([A1[0], A2[0]], [B1[0], B2[0]])
    lam1 = torch.tensor([4.0, 9.0], dtype=A.dtype)
    lam2 = torch.tensor([6.0, 7.0], dtype=A.dtype)
    lr = torch.minimum(solver.safe_lr(A, B), torch.tensor(0.01, dtype=A.dtype))
    for T in [1, 5, 30]:
        got = sorted_path.solve_sorted(A, B, lam1, lam2, lr, method, T)
        _assert_iterates(got, _dense(A, B, lam1, lam2, lr, method, T), A.dtype, f"{method} T={T}", (A, B))
        Ah, Bh = got
        assert bool((Ah[0, 5:] == 0).all()) and bool((Ah[0, :, 11:] == 0).all())
        assert bool((Bh[0, 9:] == 0).all()) and bool((Bh[0, :, 5:] == 0).all())
        own = sorted_path.solve_sorted(A1, B1, lam1[:1], lam2[:1], lr[:1], method, T)
        _assert_iterates((Ah[:1, :5, :11], Bh[:1, :9, :5]), own, A.dtype, f"{method} T={T} own shape", (A1, B1))


def adversarial_case():
    """(A, B, lam1, lam2, lr) in fp64: ties in |A| and |B| (small integers), exact zeros, a
    dead unit, a unit whose weights all tie, and λ1 = s·|A_ik| exactly on the first BCD step
    (s = β is an exact integer there), so an entry sits exactly on the threshold."""
    g = torch.Generator().manual_seed(7)
    dt = torch.float64
    A = torch.randint(-3, 4, (2, 6, 15), generator=g).to(dt)
    B = torch.randint(-2, 3, (2, 10, 6), generator=g).to(dt)
    A[0, 1] = 0.0  # a unit with no A
    B[1, :, 2] = 0.0  # a unit with no B
    A[1, 3] = 2.0  # every |A| tied
    B[0, :, 4] = -1.0
    beta = (B * B).sum(-2)  # (L, r): s on the first Â step
    lam1 = torch.stack([beta[0, 4] * 2.0, beta[1, 3] * 2.0])  # hits |A| = 2 exactly
    lam2 = torch.tensor([3.0, 5.0], dtype=dt)
    return A, B, lam1, lam2, solver.safe_lr(A, B)


@pytest.mark.parametrize("method", ["bcd", "ista"])
def test_adversarial_inputs(method):
    # The entry exactly on its threshold must be zero in both paths.
    A, B, lam1, lam2, lr = adversarial_case()
    dt = A.dtype
    for T in [1, 2, 5, 30]:
        want = _dense(A, B, lam1, lam2, lr, method, T)
        got = sorted_path.solve_sorted(A, B, lam1, lam2, lr, method, T)
        _assert_iterates(got, want, dt, f"{method} T={T}", (A, B))
        assert bool((got[0][A == 0] == 0).all()) and bool((got[1][B == 0] == 0).all())
    if method == "bcd":
        Ah, _ = sorted_path.bcd_sorted(A, B, lam1, lam2, 1)
        assert bool((Ah[0, 4][A[0, 4].abs() == 2] == 0).all())
        assert bool((Ah[1, 3] == 0).all())


@pytest.mark.parametrize("method", ["bcd", "ista"])
def test_fp32(method):
    A, B = _adapter(3, 16, 96, 80, dtype=torch.float32, seed=8)
    lam1, lam2 = _lams(3, torch.float32, 15.0, zero_one=True)
    lr = solver.safe_lr(A, B)
    for T in [1, 5, 30]:
        got = sorted_path.solve_sorted(A, B, lam1, lam2, lr, method, T)
        _assert_iterates(got, _dense(A, B, lam1, lam2, lr, method, T), torch.float32, f"{method} T={T}", (A, B))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bcd_cycle_shortcut_is_bit_exact(dtype, monkeypatch):
    # Stopping once every unit's state cycles must give what running all T sweeps gives,
    # for every T (the phase inside a cycle of period > 1 depends on T).
    # Small units over a range of λ: besides fixed points, states cycle with period 2 and 3.
    A, B = _adapter(64, 4, 12, 9, dtype=dtype, seed=9)
    lam = torch.logspace(-2, 1.5, 64, dtype=dtype)
    sweeps = [0]
    sweep = sorted_path._bcd_sweep_sorted

    def counted(*args):
        sweeps[0] += 1
        return sweep(*args)

    for T in list(range(12, 40)) + [101, 333]:
        full = sorted_path.bcd_sorted(A, B, lam, 0.7 * lam, T, early_exit=False)
        monkeypatch.setattr(sorted_path, "_bcd_sweep_sorted", counted)
        sweeps[0] = 0
        fast = sorted_path.bcd_sorted(A, B, lam, 0.7 * lam, T)
        monkeypatch.setattr(sorted_path, "_bcd_sweep_sorted", sweep)
        assert all(bool(torch.equal(x, y)) for x, y in zip(fast, full)), f"T={T}"
    assert sweeps[0] < 333, "the state never cycled: the shortcut went untested"


@pytest.mark.parametrize("tail,period", [(0, 1), (5, 1), (3, 2), (7, 3), (1, 5), (20, 13)])
def test_cycle_detector_on_a_known_recurrence(tail, period):
    # x_t = t for t < tail, then tail + (t - tail) mod period: the detector must stop early and
    # leave each unit where step T would, for every T; a second unit never cycles (x_t = t).
    for T in range(1, 80):
        state = torch.tensor([0, 0])
        det = sorted_path.CycleDetector(T, (state,))
        t = 0
        while t < T:
            t += 1
            x = t if t < tail else tail + (t - tail) % period
            new = torch.tensor([x, t])
            state = torch.where(det.active(t), new, state)
            if det.observe(t, (state,)):
                break
        want0 = T if T < tail else tail + (T - tail) % period
        assert state.tolist() == [want0, T], f"tail={tail} period={period} T={T}"
    # with the second unit cycling too, the loop ends long before T
    det = sorted_path.CycleDetector(1000, (torch.tensor([0]),))
    t = 0
    while t < 1000:
        t += 1
        if det.observe(t, (torch.tensor([tail + (t - tail) % period if t >= tail else t]),)):
            break
    assert t < 4 * (tail + period) + 2


def test_bcd_one_768x64_adapter_fp64():
    A, B = _adapter(1, 64, 768, 768, seed=10)
    A, B = A * 0.02, B * 0.02
    lam1 = lam2 = torch.tensor([2e-3], dtype=A.dtype)
    for T in [1, 30]:
        want = _dense(A, B, lam1, lam2, None, "bcd", T)
        _assert_iterates(sorted_path.bcd_sorted(A, B, lam1, lam2, T), want, A.dtype, f"bcd 768x64 T={T}", (A, B))


def test_solve_sorted_dispatch():
    A, B = _adapter(1, 3, 9, 7, seed=11)
    lam = torch.tensor([1.0], dtype=A.dtype)
    lr = solver.safe_lr(A, B)
    got = sorted_path.solve_sorted(A, B, lam, lam, lr, "fista", 7)
    _assert_iterates(got, _dense(A, B, lam, lam, lr, "fista", 7), A.dtype, "fista")
    with pytest.raises(ValueError, match="unknown method"):
        sorted_path.solve_sorted(A, B, lam, lam, lr, "newton", 3)


def test_sorted_units_reused_and_scalar_lam():
    # One sort serves several λ (a λ search); a 0-dim λ means the same for every adapter.
    A, B = _adapter(3, 4, 20, 16, seed=12)
    units = sorted_path.sort_units(A, B)
    lr = solver.safe_lr(A, B)
    for lam in (0.5, 3.0):
        lam_t = torch.tensor(lam, dtype=A.dtype)
        lam_v = lam_t.expand(3)
        for method, fn in (("bcd", sorted_path.bcd_sorted), ("ista", sorted_path.ista_sorted)):
            args = (A, B, lam_t, lam_t) + ((lr,) if method == "ista" else ()) + (9,)
            got = fn(*args, units=units)
            assert all(torch.equal(x, y) for x, y in zip(got, fn(*args)))
            _assert_iterates(got, _dense(A, B, lam_v, lam_v, lr, method, 9), A.dtype, method, (A, B))


def test_bcd_single_entry_just_above_threshold():
    # One kept entry a hair above its threshold: from prefix sums alone, â = Σ(k|A| − m)²
    # loses ~6 digits to cancellation (found by the property test below).
    A, B = _adapter(2, 3, 1, 4, seed=2)
    lam1, lam2 = _lams(2, A.dtype, 1.0, zero_one=True)
    want = _dense(A, B, lam1, lam2, None, "bcd", 1)
    _assert_iterates(sorted_path.bcd_sorted(A, B, lam1, lam2, 1), want, A.dtype, "bcd", (A, B))


@settings(max_examples=150, deadline=None)
@given(
    L=st.integers(1, 3),
    r=st.integers(1, 5),
    d_in=st.integers(1, 13),
    d_out=st.integers(1, 13),
    T=st.integers(1, 25),
    log_lam=st.floats(-2.0, 1.5),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_bcd_property(L, r, d_in, d_out, T, log_lam, ties, seed):
    A, B = _adapter(L, r, d_in, d_out, seed=seed)
    if ties:
        A, B = torch.round(A * 2), torch.round(B * 2)
    lam1, lam2 = _lams(L, A.dtype, 10.0**log_lam, zero_one=True)
    want = _dense(A, B, lam1, lam2, None, "bcd", T)
    _assert_iterates(sorted_path.bcd_sorted(A, B, lam1, lam2, T), want, A.dtype, f"bcd T={T}", (A, B))


@settings(max_examples=150, deadline=None)
@given(
    L=st.integers(1, 3),
    r=st.integers(1, 5),
    d_in=st.integers(1, 13),
    d_out=st.integers(1, 13),
    T=st.integers(1, 40),
    log_lam=st.floats(-2.0, 1.5),
    lr_mul=st.sampled_from([0.5, 1.0, 3.0]),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_ista_property(L, r, d_in, d_out, T, log_lam, lr_mul, ties, seed):
    A, B = _adapter(L, r, d_in, d_out, seed=seed)
    if ties:
        A, B = torch.round(A * 2), torch.round(B * 2)
    lam1, lam2 = _lams(L, A.dtype, 10.0**log_lam, zero_one=True)
    lr = solver.safe_lr(A, B) * lr_mul
    want = _dense(A, B, lam1, lam2, lr, "ista", T)
    _assert_iterates(sorted_path.ista_sorted(A, B, lam1, lam2, lr, T), want, A.dtype, f"ista T={T}", (A, B))


@pytest.mark.parametrize("zero", ["lam1", "lam2", "both"])
@pytest.mark.parametrize("method", ["bcd", "ista"])
def test_a_zero_penalty_matches_dense(zero, method):
    """λ1 = 0 or λ2 = 0 in every adapter: no rescaling (it would push the penalised block to
    zero and the other to infinity), no thresholding of the unpenalised block."""
    A, B = _adapter(2, 4, 10, 9, seed=13)
    lam1, lam2 = _lams(2, A.dtype, 3.0)
    if zero in ("lam1", "both"):
        lam1 = torch.zeros_like(lam1)
    if zero in ("lam2", "both"):
        lam2 = torch.zeros_like(lam2)
    lr = solver.safe_lr(A, B) * 0.5
    for T in [1, 2, 7]:
        want = _dense(A, B, lam1, lam2, lr, method, T)
        got = sorted_path.solve_sorted(A, B, lam1, lam2, lr, method, T)
        _assert_iterates(got, want, A.dtype, f"{method} {zero}=0 T={T}", (A, B))


def test_count_above_is_strict_for_thresholds_of_another_dtype():
    """count_above counts entries strictly above tau, for a tau in the accumulation dtype
    (fp64) and entries in fp32: one exactly on an fp32 entry, one a hair below it."""
    units = sorted_path.SortedUnits(torch.tensor([[0.5, -1.0, 0.25]], dtype=torch.float32))
    def count(t):
        return int(units.count_above(torch.tensor([t], dtype=torch.float64)))

    assert count(0.5) == 1 and count(1.0) == 0 and count(0.25) == 2
    assert count(0.5 - 1e-12) == 2 and count(1.0 - 1e-12) == 1 and count(0.0) == 3
    assert count(float("inf")) == 0


def test_cycle_detector_targets_are_exact_past_2_to_the_24():
    """A 2-cycle from sweep 1 on, found at sweep 3, with T = 2^25 + 2 sweeps: the unit must end
    in the phase of sweep T, which needs T − 3 = 2^25 − 1 (odd, not an fp32 number) exactly."""
    T = 2**25 + 2
    state = torch.tensor([0.0])
    det = sorted_path.CycleDetector(T, (state,))
    t = 0
    while t < T:
        t += 1
        state = torch.where(det.active(t), torch.tensor([float(t % 2)]), state)
        if det.observe(t, (state,)):
            break
    assert t < 10 and int(det.target[0]) % 2 == T % 2 and float(state[0]) == T % 2


@settings(max_examples=120, deadline=None)
@given(
    L=st.integers(1, 3),
    r=st.integers(1, 4),
    d_in=st.integers(1, 12),
    d_out=st.integers(1, 12),
    T=st.integers(1, 30),
    log_lam=st.floats(-1.5, 1.0),
    lam2_mul=st.sampled_from([0.0, 0.2, 1.0]),
    lr_mul=st.sampled_from([0.5, 1.0, 2.5]),
    tilt=st.sampled_from([1.0, 0.2, 5.0]),
    max_pieces=st.sampled_from([1, 2, 3]),
    fp32=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_ista_property_with_few_pieces(L, r, d_in, d_out, T, log_lam, lam2_mul, lr_mul, tilt, max_pieces, fp32, seed):
    """Few piece slots and a small λ2 (B̂ grows, entries of Â revive): units overflow their
    slots or their step sizes (1 − lr·β̂ < 0 or 1 − lr·â < 0; A and B of unequal scales make
    one go without the other), now and then only for a while, and each such adapter must be
    the dense loop's; fp32 weights too."""
    dtype = torch.float32 if fp32 else torch.float64
    A, B = _adapter(L, r, d_in, d_out, dtype=dtype, seed=seed)
    A, B = A * tilt, B / tilt
    lam1, lam2 = _lams(L, dtype, 10.0**log_lam)
    lam2 = lam2 * lam2_mul
    lr = solver.safe_lr(A, B) * lr_mul
    want = _dense(A, B, lam1, lam2, lr, "ista", T)
    got = sorted_path.ista_sorted(A, B, lam1, lam2, lr, T, max_pieces=max_pieces)
    _assert_iterates(got, want, dtype, f"ista T={T} P={max_pieces}", (A, B))


# Cases where one safeguard of the sorted ISTA decides the result (found by searching random
# cases against variants of _ista_state that drop it): a step size far above safe_lr makes
# 1 − lr·β̂ or 1 − lr·â negative (A and B of unequal scales: one without the other), for a unit
# that holds one piece or one entry of B̂, or only for a few steps; few piece slots; a batch in
# which one unit's Â has no zero while another's has; a first piece that holds one entry.
@pytest.mark.parametrize(
    "seed, r, d_in, d_out, T, tilt, lr_mul, lam_s, lam2_mul, P",
    [
        (438, 4, 10, 1, 17, 0.05, 8.0, 0.5699527730303121, 0.0, 64),  # 1 − lr·β̂ < 0 alone
        (417, 3, 10, 4, 23, 5.0, 8.0, 0.918353454726899, 1.0, 16),  # 1 − lr·â < 0 alone
        (478, 1, 2, 4, 28, 0.05, 8.0, 0.06807053207752353, 1.0, 64),  # out of the sorted form for a while
        (498, 3, 1, 10, 29, 0.05, 8.0, 3.957125856756793, 0.0, 2),  # ... with one piece
        (457, 4, 7, 1, 15, 5.0, 8.0, 0.4770098261752602, 0.2, 64),  # ... with one entry of B̂
        (5, 3, 7, 6, 21, 1.0, 1.0, 3.967022537467794, 0.0, 1),  # units with and without zeros
        (375, 3, 4, 6, 37, 1.0, 1.0, 6.792907764747085, 0.0, 16),  # a first piece of one entry
    ],
)
def test_ista_safeguards_decide(seed, r, d_in, d_out, T, tilt, lr_mul, lam_s, lam2_mul, P):
    A, B = _adapter(2, r, d_in, d_out, seed=seed)
    A, B = A * tilt, B / tilt
    lam1 = torch.linspace(1.0, 0.5, 2, dtype=A.dtype) * lam_s
    lam2 = torch.linspace(0.7, 1.2, 2, dtype=A.dtype) * lam_s * lam2_mul
    lr = solver.safe_lr(A, B) * lr_mul
    want = _dense(A, B, lam1, lam2, lr, "ista", T)
    _assert_iterates(sorted_path.ista_sorted(A, B, lam1, lam2, lr, T, max_pieces=P), want, A.dtype, "ista", (A, B))


def test_bcd_without_early_exit_runs_every_sweep(monkeypatch):
    A, B = _adapter(2, 3, 6, 5, seed=14)
    lam = torch.tensor([0.5, 2.0], dtype=A.dtype)
    sweeps = []
    sweep = sorted_path._bcd_sweep_sorted
    monkeypatch.setattr(sorted_path, "_bcd_sweep_sorted", lambda *a: (sweeps.append(1), sweep(*a))[1])
    full = sorted_path.bcd_sorted(A, B, lam, lam, 50, early_exit=False)
    assert len(sweeps) == 50
    del sweeps[:]
    fast = sorted_path.bcd_sorted(A, B, lam, lam, 50)
    assert len(sweeps) < 50 and all(torch.equal(x, y) for x, y in zip(fast, full))


# --- the generator penalty on the sorted path ------------------------------------------------------
def _dense_gen(A, B, lam1, lam2, lr, method, T, lam_gen):
    return dense.dense_solve(closed_form.prox_step, A, B, lam1, lam2, lr, method, T, lam_gen, closed_form.prox_step_gen)


@pytest.mark.parametrize("method", ["bcd", "ista", "fista"])
def test_generator_penalty_per_adapter_with_zeros_and_small_weights(method):
    """lam_gen (L,) with a 0 in it (that adapter solves the unpenalised problem), on weights
    small enough that ‖S_λ1(sA_i)‖² < 1; FISTA goes through solve_sorted to the dense loop."""
    A, B = _adapter(3, 4, 10, 9, seed=15)
    A, B = A * 0.1, B * 0.3
    lam1, lam2 = _lams(3, A.dtype, 0.002)
    lg = torch.tensor([0.0, 0.05, 0.3], dtype=A.dtype)
    lr = solver.safe_lr(A, B)
    for T in [1, 3, 12]:
        want = _dense_gen(A, B, lam1, lam2, lr, method, T, lg)
        got = sorted_path.solve_sorted(A, B, lam1, lam2, lr, method, T, lam_gen=lg)
        _assert_iterates(got, want, A.dtype, f"{method} lam_gen T={T}", (A, B))
    assert not torch.equal(want[0][1], _dense(A, B, lam1, lam2, lr, method, 12)[0][1])  # the penalty acts


def test_ista_fallback_keeps_the_generator_penalty():
    """An adapter that leaves the sorted form is solved again densely, with its lam_gen."""
    A, B = _adapter(2, 4, 10, 1, seed=438)
    A, B = A * 0.05, B / 0.05
    lam1 = torch.linspace(1.0, 0.5, 2, dtype=A.dtype) * 0.57
    lam2 = torch.zeros(2, dtype=A.dtype)
    lr = solver.safe_lr(A, B) * 8.0
    lg = torch.tensor([0.2, 0.4], dtype=A.dtype)
    *_, bad = sorted_path._ista_state(A, B, lam1, lam2, lr, 17, 64, lam_gen=lg)
    assert bool(bad.any())
    want = _dense_gen(A, B, lam1, lam2, lr, "ista", 17, lg)
    _assert_iterates(sorted_path.ista_sorted(A, B, lam1, lam2, lr, 17, max_pieces=64, lam_gen=lg), want, A.dtype,
                     "ista fallback lam_gen", (A, B))


@pytest.mark.parametrize("lam_gen", [None, 0.2])
def test_every_tensor_follows_the_inputs_device_not_the_default_one(lam_gen):
    """With another default device (here meta), a CPU solve must run and give the same result:
    every tensor the sorted path creates lives on the device of the weights, so CUDA inputs
    under a CPU default (and the reverse) stay on their device."""
    A, B = _adapter(2, 5, 12, 9, seed=3)
    lam1, lam2 = _lams(2, A.dtype, 2.0)
    lg = None if lam_gen is None else torch.full((2,), lam_gen, dtype=A.dtype)
    lr = 0.5 * solver.safe_lr(A, B)
    want = [
        sorted_path.bcd_sorted(A, B, lam1, lam2, 40, lam_gen=lg),
        sorted_path.bcd_sorted(A, B, lam1, lam2, 40, early_exit=False, lam_gen=lg),
        sorted_path.solve_sorted(A, B, lam1, lam2, lr, "ista", 25, lam_gen=lg),
    ]
    with torch.device("meta"):
        got = [
            sorted_path.bcd_sorted(A, B, lam1, lam2, 40, lam_gen=lg),
            sorted_path.bcd_sorted(A, B, lam1, lam2, 40, early_exit=False, lam_gen=lg),
            sorted_path.solve_sorted(A, B, lam1, lam2, lr, "ista", 25, lam_gen=lg),
        ]
    for (gA, gB), (wA, wB) in zip(got, want):
        assert gA.device.type == gB.device.type == "cpu"
        assert torch.equal(gA, wA) and torch.equal(gB, wB)


@pytest.mark.parametrize("lam_gen", [None, 0.05])
@pytest.mark.parametrize("method", ["ista", "bcd"])
@pytest.mark.parametrize("shape", [(3, 0, 4, 5), (3, 2, 0, 5), (3, 2, 4, 0), (0, 2, 4, 5)])
def test_torch_solve_sorted_on_empty_shapes_is_the_dense_loop(shape, method, lam_gen):
    """The torch backend's solve_sorted hands empty shapes to the dense loop (nothing to
    sort); solve_fused on the same call gives the same outputs, stats included."""
    from tropfast.backends.torch.kernels import KERNELS

    A, B = _adapter(*shape)
    L = shape[0]
    lam1 = torch.full((L,), 0.05, dtype=torch.float64)
    lam2 = torch.full((L,), 0.2, dtype=torch.float64)
    lr = torch.full((L,), 0.1, dtype=torch.float64)
    extra = () if lam_gen is None else (torch.full((L,), lam_gen, dtype=torch.float64),)
    got = KERNELS.solve_sorted(A, B, lam1, lam2, lr, method, 3, *extra)
    want = KERNELS.solve_fused(A, B, lam1, lam2, lr, method, 3, *extra)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.equal(g, w)


@pytest.mark.parametrize("method", ["ista", "bcd"])
def test_torch_solve_sorted_with_zero_steps_and_prepared(method):
    """steps = 0 returns the weights themselves; a prepared solver (the units sorted once)
    gives exactly what solve_sorted gives, and refuses what it refuses, in the same words."""
    import re

    from tropfast.backends.torch.kernels import KERNELS, prepare_sorted

    A, B = _adapter(2, 3, 6, 5)
    p = torch.full((2,), 0.05, dtype=torch.float64)
    Ah, Bh, stats = KERNELS.solve_sorted(A, B, p, p, p, method, 0)
    assert torch.equal(Ah, A) and torch.equal(Bh, B) and torch.equal(stats[:, 0], stats[:, 1])
    prepared = prepare_sorted(A, B)
    assert prepared is not KERNELS.solve_sorted  # the units are sorted once, in advance
    for T in (1, 4):
        for g, w in zip(prepared(A, B, p, p, p, method, T), KERNELS.solve_sorted(A, B, p, p, p, method, T)):
            assert torch.equal(g, w)
    with pytest.raises(ValueError, match="^" + re.escape("solve_sorted: unknown method 'adam'; choose ista, fista or bcd") + "$"):
        prepared(A, B, p, p, p, "adam", 3)
    with pytest.raises(ValueError, match="^solve_sorted: steps must be >= 0, got -1$"):
        KERNELS.solve_sorted(A, B, p, p, p, method, -1)
    # from one step on, the sorted path itself runs (not the dense fallback)
    one = KERNELS.solve_sorted(A, B, p, p, p, method, 1)
    own = sorted_path.solve_sorted(A, B, p, p, p, method, 1)
    assert torch.equal(one[0], own[0]) and torch.equal(one[1], own[1])
    A0, B0 = _adapter(2, 0, 6, 5)
    assert prepare_sorted(A0, B0) is KERNELS.solve_sorted
    for shape in ((2, 3, 0, 5), (2, 3, 6, 0)):  # nothing to sort: the plain solve_sorted
        assert prepare_sorted(*_adapter(*shape)) is KERNELS.solve_sorted


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["solve_fused", "solve_sorted"])
def test_torch_whole_solves_of_half_weights_are_the_fp32_solves_rounded(op, dtype):
    """Half-precision weights are solved in fp32 (ops.compute_dtype): the iterates are the fp32
    solve of the upcast weights rounded once, and the stats are the fp32 solve's."""
    from tropfast.backends.torch.kernels import KERNELS

    A, B = _adapter(2, 3, 6, 5, dtype=dtype)
    p = torch.full((2,), 0.05, dtype=dtype)
    fn = getattr(KERNELS, op)
    Ah, Bh, stats = fn(A, B, p, p, p, "bcd", 4)
    Af, Bf, sf = fn(A.float(), B.float(), p.float(), p.float(), p.float(), "bcd", 4)
    assert Ah.dtype == Bh.dtype == dtype
    assert torch.equal(Ah, Af.to(dtype)) and torch.equal(Bh, Bf.to(dtype)) and torch.equal(stats, sf)


def test_torch_solve_fused_refusals_name_the_op():
    import re

    from tropfast.backends.torch.kernels import KERNELS

    A, B = _adapter(2, 3, 6, 5)
    p = torch.full((2,), 0.05, dtype=torch.float64)
    with pytest.raises(ValueError, match="^" + re.escape("solve_fused: unknown method 'adam'; choose ista, fista or bcd") + "$"):
        KERNELS.solve_fused(A, B, p, p, p, "adam", 3)
    with pytest.raises(ValueError, match="^solve_fused: steps must be >= 0, got -2$"):
        KERNELS.solve_fused(A, B, p, p, p, "bcd", -2)
