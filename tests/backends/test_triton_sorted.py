"""The ``triton`` backend's ``solve_sorted`` (kernels in _triton_sorted_path.py) against sorted_path.py and the dense loop.

Without a CUDA device the kernels run in the Triton interpreter on CPU tensors (the
variable is set before anything imports triton, see tests/conftest.py).  Shapes are small:
every interpreted operation has a fixed cost.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from tolerances import TOL, TORCH, assert_close, iterates  # noqa: E402

from tropfast import solver  # noqa: E402
from tropfast.backends.torch import sorted as sorted_path  # noqa: E402
from tropfast.backends.triton import launch as tb  # noqa: E402

# The interpreter runs the kernels on numpy: a threshold λ/s with s ~ 0 overflows to +inf
# there exactly as intended (torch divides silently).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F64 = torch.float64
# Relative to the largest entry of the expected iterate: fp64 paths differ by rounding only.
REL64 = 1e-12


def _adapter(L, r, d_in, d_out, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = () if L is None else (L,)
    A = torch.randn(*lead, r, d_in, generator=g, dtype=F64)
    B = torch.randn(*lead, d_out, r, generator=g, dtype=F64)
    return A.to(dtype).to(DEV), B.to(dtype).to(DEV)


def _ct(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _lams(scale, dtype):
    """Per-adapter λ for 3 adapters; λ2 = 0 in the last (BCD: no rescaling there)."""
    ct = _ct(dtype)
    lam1 = torch.tensor([1.0, 0.5, 0.8], dtype=ct, device=DEV) * scale
    lam2 = torch.tensor([0.7, 1.2, 0.0], dtype=ct, device=DEV) * scale
    return lam1, lam2


def _rel_close(got, want, what, rel=REL64):
    for name, g, w in zip(("A_hat", "B_hat"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what} {name}: {g.shape}/{g.dtype} vs {w.shape}/{w.dtype}"
        assert bool(torch.isfinite(g).all()), f"{what} {name}: non-finite values"
        err = float((g.double() - w.double()).abs().max()) if w.numel() else 0.0
        scale = float(w.double().abs().max()) if w.numel() else 0.0
        assert err <= rel * max(scale, 1e-300), f"{what} {name}: max |diff| {err:.3e} > {rel:g} · {scale:.3e}"


@pytest.fixture
def fallbacks(monkeypatch):
    """The adapters rerun densely, per call; and sorted.py's torch solvers made unusable to the kernels."""
    calls = []
    dense = tb._sorted_dense_fallback

    def counted(A3, B3, params, steps, adapters):
        calls.append(adapters.tolist())
        return dense(A3, B3, params, steps, adapters)

    monkeypatch.setattr(tb, "_sorted_dense_fallback", counted)
    return calls


def _triton(monkeypatch, *args, **kw):
    """The Triton solve with sorted_path.py's own solvers disabled: only its sort may be used."""

    def refuse(*a, **k):
        raise AssertionError("the triton backend ran sorted_path.py's torch solver")

    with monkeypatch.context() as m:
        for name in ("_bcd_state", "_ista_state", "_dense_adapters", "solve_sorted", "bcd_sorted", "ista_sorted"):
            m.setattr(sorted_path, name, refuse)
        return tb._solve_sorted(*args, **kw)[:2]


# ---------------------------------------------------------------------------------------
# fp64: the sorted path's iterates and the dense loop's, to rounding.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.3, 5.0, 30.0])
@pytest.mark.parametrize("method", ["bcd", "ista"])
def test_fp64_matches_sorted_and_dense(method, scale, fallbacks, monkeypatch):
    A, B = _adapter(3, 5, 24, 20, seed=int(scale * 10))
    lam1, lam2 = _lams(scale, F64)
    lr = solver.safe_lr(A, B)
    for T in (1, 7, 60) if scale > 1 else (1, 7):
        got = _triton(monkeypatch, A, B, lam1, lam2, lr, method, T)
        want = TORCH.solve_sorted(A, B, lam1, lam2, lr, method, T)
        _rel_close(got, want, f"{method} T={T} vs sorted")
        _rel_close(got, TORCH.solve_fused(A, B, lam1, lam2, lr, method, T), f"{method} T={T} vs dense")
        if scale == 30.0 and T == 60:
            dead = (want[0] == 0).all(-1) & (want[1] == 0).all(-2)
            assert bool(dead.any()), "the large λ should zero whole units"
            assert bool(((got[0] == 0).all(-1) & (got[1] == 0).all(-2))[dead].all())
    assert fallbacks == [], "no unit left the sorted form here: the kernel path must be the one that ran"


@pytest.mark.parametrize("method", ["bcd", "ista"])
def test_fp64_single_adapter_scalar_params(method, fallbacks):
    A, B = _adapter(None, 4, 13, 9, seed=3)
    lr = solver.safe_lr(A[None], B[None])[0]  # ()
    lam1, lam2 = torch.tensor(2.0, dtype=F64, device=DEV), torch.tensor(1.5, dtype=F64, device=DEV)
    for T in (1, 7, 25):
        got = iterates(tb.KERNELS).solve_sorted(A, B, lam1, lam2, lr, method, T)
        assert got[0].shape == A.shape and got[1].shape == B.shape
        _rel_close(got, TORCH.solve_sorted(A, B, lam1, lam2, lr, method, T), f"{method} 2-D T={T} vs sorted")
        _rel_close(got, TORCH.solve_fused(A, B, lam1, lam2, lr, method, T), f"{method} 2-D T={T} vs dense")
    # mixed: one λ for all adapters, the other per adapter
    A, B = _adapter(2, 3, 7, 5, seed=4)
    lam2 = torch.tensor([0.4, 1.1], dtype=F64, device=DEV)
    lr = solver.safe_lr(A, B)
    got = iterates(tb.KERNELS).solve_sorted(A, B, lam1, lam2, lr, method, 9)
    _rel_close(got, TORCH.solve_fused(A, B, lam1, lam2, lr, method, 9), f"{method} mixed params vs dense")
    assert fallbacks == []


@pytest.mark.parametrize("method", ["bcd", "ista"])
def test_fp64_ties_zeros_and_one_entry(method):
    # Ties in |A| and |B| (small integers), exact zeros, a unit without A, a unit without B,
    # a unit whose |A| all tie, and λ1 = s·2 on BCD's first step (s = β, an exact integer)
    # so entries with |A| = 2 sit exactly on the threshold.  Then d_in = 1, where one kept
    # entry sits just above its threshold.
    g = torch.Generator().manual_seed(7)
    A = torch.randint(-3, 4, (2, 4, 11), generator=g).to(F64)
    B = torch.randint(-2, 3, (2, 6, 4), generator=g).to(F64)
    A[0, 1] = 0.0
    B[1, :, 2] = 0.0
    A[1, 3] = 2.0
    B[0, :, 3] = -1.0
    A, B = A.to(DEV), B.to(DEV)
    beta = (B * B).sum(-2)
    lam1 = torch.stack([beta[0, 3] * 2.0, beta[1, 3] * 2.0])
    lam2 = torch.tensor([3.0, 5.0], dtype=F64, device=DEV)
    lr = solver.safe_lr(A, B)
    params = tb._params((lam1, lam2, lr), 2, A)
    for T in (1, 5):
        got = iterates(tb.KERNELS).solve_sorted(A, B, lam1, lam2, lr, method, T)
        _rel_close(got, TORCH.solve_fused(A, B, lam1, lam2, lr, method, T), f"{method} ties T={T}")
        assert bool((got[0][A == 0] == 0).all()) and bool((got[1][B == 0] == 0).all())
        # The per-unit state, ties included: sorted_path.py's counts and boundaries exactly.
        st = tb._sorted_state(A, B, params, method, T)
        if method == "bcd":
            SA, SB, _, _, jA, _, _, jB = sorted_path._bcd_state(A, B, lam1, lam2, T, False)
            assert torch.equal(st["lowA"], SA.smallest_kept(jA)) and torch.equal(st["lowB"], SB.smallest_kept(jB))
        else:
            SA, SB, hi, _, _, cnt, _, _, jB, bad = sorted_path._ista_state(A, B, lam1, lam2, lr, T, tb._MAX_PIECES)
            assert torch.equal(st["cnt"].long(), cnt) and torch.equal(st["bad"].bool(), bad)
            valid = torch.arange(hi.shape[1], device=DEV) < cnt.unsqueeze(-1)
            low = -SA.neg.gather(1, (hi - 1).clamp_min(0))
            assert torch.equal(st["lowP"][:, : hi.shape[1]][valid], low[valid])
            assert torch.equal(st["lowB"], SB.smallest_kept(jB))
    if method == "bcd":
        assert bool((got[0][1, 3] == 0).all())
    A, B = _adapter(2, 3, 1, 4, seed=2)
    lam1, lam2 = torch.tensor([1.0, 0.5], dtype=F64, device=DEV), torch.tensor([0.7, 0.0], dtype=F64, device=DEV)
    lr = solver.safe_lr(A, B)
    got = iterates(tb.KERNELS).solve_sorted(A, B, lam1, lam2, lr, method, 1)
    _rel_close(got, TORCH.solve_fused(A, B, lam1, lam2, lr, method, 1), f"{method} d_in = 1", rel=1e-12)


# ---------------------------------------------------------------------------------------
# Half and single precision.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["bcd", "ista"])
def test_lower_precision_matches_closed_form(method, dtype, fallbacks):
    A, B = _adapter(3, 5, 24, 20, dtype=dtype, seed=11)
    lam1, lam2 = _lams(5.0, dtype)
    lr = solver.safe_lr(A.to(_ct(dtype)), B.to(_ct(dtype)))
    for T in (1, 12):
        got = iterates(tb.KERNELS).solve_sorted(A, B, lam1, lam2, lr, method, T)
        assert got[0].dtype == got[1].dtype == dtype
        for name, g, w in zip(("A_hat", "B_hat"), got, TORCH.solve_sorted(A, B, lam1, lam2, lr, method, T)):
            assert_close(g, w, dtype, f"{method} {name} T={T} vs sorted")
        for name, g, w in zip(("A_hat", "B_hat"), got, TORCH.solve_fused(A, B, lam1, lam2, lr, method, T)):
            assert_close(g, w, dtype, f"{method} {name} T={T} vs dense")
    assert fallbacks == []


# ---------------------------------------------------------------------------------------
# ISTA's dense fallback.
# ---------------------------------------------------------------------------------------
def test_ista_fallback_huge_step(fallbacks, monkeypatch):
    # lr = 50/L: 1 − lr·β̂ < 0 on the first step, every unit leaves the sorted_path.
    A, B = _adapter(3, 5, 24, 20, seed=12)
    lam1, lam2 = _lams(5.0, F64)
    lr = solver.safe_lr(A, B) * 50
    got = _triton(monkeypatch, A, B, lam1, lam2, lr, "ista", 3)
    assert fallbacks == [[0, 1, 2]]
    _rel_close(got, TORCH.solve_fused(A, B, lam1, lam2, lr, "ista", 3), "ista huge lr vs dense")


def test_ista_fallback_too_many_pieces(fallbacks, monkeypatch):
    # One piece allowed: an adapter where entries at zero revive needs a second one and is
    # rerun densely; the others stay in the kernel path.
    A, B = _adapter(3, 5, 24, 20, seed=1)
    lam1 = torch.tensor([30.0, 15.0, 5.0], dtype=F64, device=DEV)
    lam2 = torch.tensor([30.0, 0.0, 2.0], dtype=F64, device=DEV)
    lr = solver.safe_lr(A, B)
    T = 30
    st = tb._sorted_state(A, B, tb._params((lam1, lam2, lr), 3, A), "ista", T, max_pieces=1)
    *_, cnt, _, _, _, bad = sorted_path._ista_state(A, B, lam1, lam2, lr, T, 1)
    assert torch.equal(st["bad"].bool().cpu(), bad.cpu()) and torch.equal(st["cnt"].long().cpu(), cnt.cpu())
    got = _triton(monkeypatch, A, B, lam1, lam2, lr, "ista", T, max_pieces=1)
    assert fallbacks == [[1]]
    _rel_close(got, TORCH.solve_fused(A, B, lam1, lam2, lr, "ista", T), "ista max_pieces=1 vs dense")
    _rel_close(got, sorted_path.ista_sorted(A, B, lam1, lam2, lr, T, max_pieces=1), "ista max_pieces=1 vs sorted")


def test_ista_pieces_in_use():
    # λ2 well below λ1: B̂ grows, entries of Â at zero revive, Â needs several pieces (the
    # piece table and its materialisation are exercised, not just one affine piece).
    A, B = _adapter(2, 4, 24, 40, seed=3)
    lam1 = torch.tensor([30.0, 18.0], dtype=F64, device=DEV)
    lam2 = torch.tensor([0.0, 7.2], dtype=F64, device=DEV)
    lr = solver.safe_lr(A, B)
    T = 40
    st = tb._sorted_state(A, B, tb._params((lam1, lam2, lr), 2, A), "ista", T)
    assert not bool(st["bad"].any()) and int(st["cnt"].max()) >= 3
    got = iterates(tb.KERNELS).solve_sorted(A, B, lam1, lam2, lr, "ista", T)
    _rel_close(got, TORCH.solve_fused(A, B, lam1, lam2, lr, "ista", T), "ista pieces vs dense")


# ---------------------------------------------------------------------------------------
# BCD's cycle shortcut, launch tiling.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,seed,adapters", [(torch.float32, 0, [26, 39]), (F64, 1, [1, 7])], ids=["fp32", "fp64"])
def test_bcd_early_exit_is_bit_exact(dtype, seed, adapters):
    # Units whose state ends in a cycle of period 2 or 3 (found by a search over random
    # adapters), detected within ~16 sweeps: stopping there must leave every unit bit for bit
    # where all T sweeps would, and T = 20, 31 sit at different phases of those cycles.
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(64, 4, 12, generator=g, dtype=F64)[adapters].to(dtype).to(DEV)
    B = torch.randn(64, 9, 4, generator=g, dtype=F64)[adapters].to(dtype).to(DEV)
    lam = torch.logspace(-2, 1.5, 64, dtype=F64)[adapters].to(DEV)
    lam1, lam2 = lam.to(dtype), (lam * 0.7).to(dtype)
    params = tb._params((lam1, lam2, torch.ones(2, dtype=dtype, device=DEV)), 2, A)
    full = {}
    for T in (20, 31):
        fast = tb._sorted_state(A, B, params, "bcd", T)
        full[T] = tb._sorted_state(A, B, params, "bcd", T, early_exit=False)
        assert int(full[T]["sweeps"].min()) == T
        assert int(fast["sweeps"].max()) < T, f"the units did not stop early: {fast['sweeps'].tolist()}"
        for name in ("kA", "mA", "lowA", "kB", "mB", "lowB"):
            assert torch.equal(fast[name], full[T][name]), f"T={T} {name}"
    assert not torch.equal(full[20]["mB"], full[31]["mB"]), "no cycle of period > 1: the phase went untested"
    got = iterates(tb.KERNELS).solve_sorted(A, B, lam1, lam2, lam1, "bcd", 31)
    _rel_close(got, sorted_path.bcd_sorted(A, B, lam1, lam2, 31), "bcd vs sorted", rel=REL64 if dtype == F64 else 1e-5)


@pytest.mark.parametrize("method", ["bcd", "ista"])
def test_many_programs_and_tiles(method, monkeypatch):
    # The GPU launch shapes: several programs of units (a masked tail) and tiled materialisation.
    A, B = _adapter(3, 5, 24, 20, seed=13)
    lam1, lam2 = _lams(5.0, F64)
    lr = solver.safe_lr(A, B)
    want = iterates(tb.KERNELS).solve_sorted(A, B, lam1, lam2, lr, method, 6)
    monkeypatch.setattr(tb, "_sorted_config", lambda x, U, per_warp: (4, 1))
    monkeypatch.setattr(tb, "_materialise_config", lambda M, N: (2, 8, 1))
    got = iterates(tb.KERNELS).solve_sorted(A, B, lam1, lam2, lr, method, 6)
    assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_gpu_launch_config(monkeypatch):
    monkeypatch.setattr(tb, "interpreting", lambda: False)
    monkeypatch.setattr(tb, "_n_sm", lambda device: 132)
    x = torch.empty(1)
    for U in (1, 15, 1536, 100_000):
        for per_warp in (32, 8):
            bu, nw = tb._sorted_config(x, U, per_warp)
            assert nw in (1, 2, 4) and bu == per_warp * nw
    for M, N in ((64, 768), (3072, 64), (5, 3)):
        bm, bn, nw = tb._materialise_config(M, N)
        assert bm * bn <= 1024 and bn <= 256 and bm & (bm - 1) == 0 and bn & (bn - 1) == 0


# ---------------------------------------------------------------------------------------
# Op-level semantics.
# ---------------------------------------------------------------------------------------
def test_steps_zero_fista_and_errors(fallbacks):
    A, B = _adapter(2, 3, 6, 5, dtype=torch.float32, seed=14)
    lam = torch.tensor(0.5, device=DEV)
    lr = torch.tensor(0.05, device=DEV)
    for method in ("bcd", "ista", "fista"):
        Ah, Bh = iterates(tb.KERNELS).solve_sorted(A, B, lam, lam, lr, method, 0)
        assert torch.equal(Ah, A) and torch.equal(Bh, B)
        assert Ah.data_ptr() != A.data_ptr() and Bh.data_ptr() != B.data_ptr()
    got = iterates(tb.KERNELS).solve_sorted(A, B, lam, lam, lr, "fista", 8)
    want = TORCH.solve_fused(A, B, lam, lam, lr, "fista", 8)
    for name, g, w in zip(("A_hat", "B_hat"), got, want):
        assert_close(g, w, torch.float32, f"fista {name}")
    # an empty dimension has nothing to sort: the dense kernel's answer (ISTA still shrinks B̂)
    E = torch.zeros(2, 3, 0, device=DEV)
    for method in ("bcd", "ista"):
        got = iterates(tb.KERNELS).solve_sorted(E, B[:, :, :3], lam, lam, lr, method, 4)
        want = TORCH.solve_fused(E, B[:, :, :3], lam, lam, lr, method, 4)
        assert got[0].shape == (2, 3, 0) and torch.allclose(got[1], want[1])
    with pytest.raises(ValueError, match="unknown method"):
        iterates(tb.KERNELS).solve_sorted(A, B, lam, lam, lr, "newton", 3)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        iterates(tb.KERNELS).solve_sorted(A, B, lam, lam, lr, "bcd", -1)
    with pytest.raises(ValueError, match=r"shape \(\) or \(2,\)"):
        iterates(tb.KERNELS).solve_sorted(A, B, torch.ones(3, device=DEV), lam, lr, "bcd", 3)
    assert fallbacks == []
    assert set(TOL) >= {torch.float32, torch.float16, torch.bfloat16, F64}


def test_public_solve_sorted_path_on_triton(fallbacks):
    import tropfast

    A, B = _adapter(2, 4, 12, 9, seed=15)
    for method in ("bcd", "ista"):
        got = tropfast.solve(A, B, 0.3, 0.3, method=method, steps=20, path="sorted", backend="triton")
        want = tropfast.solve(A, B, 0.3, 0.3, method=method, steps=20, backend="torch")
        assert got.backend == "triton"
        for g, w in ((got.A_hat, want.A_hat), (got.B_hat, want.B_hat)):
            torch.testing.assert_close(g, w, rtol=REL64, atol=1e-12)
    assert fallbacks == []
