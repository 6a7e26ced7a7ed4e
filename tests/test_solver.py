"""The solvers: ISTA is exactly Algorithm 1, FISTA/BCD reach the same optimum, batching is exact."""
import dataclasses
import math
import warnings

import pytest
import torch
from tolerances import TORCH, random_adapter

import tropfast
from tropfast import ops, reference, solver
from tropfast.backends.torch import closed_form, dense

GEN_BACKENDS = [b for b in ("torch", "cpu", "triton") if tropfast.backends.available()[b].available]


def _adapter(L=2, r=6, d_in=20, d_out=14, seed=0, scale=0.5):
    A, B, _, _ = random_adapter(L, r, d_in, d_out, seed=seed, scale=1.0)
    return A * scale, B * scale


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_ista_is_a_loop_of_prox_step(backend):
    A, B = _adapter()
    sol = tropfast.solve(A, B, 0.03, 0.05, method="ista", steps=25, lr=0.2, backend=backend)
    Ah, Bh = A.clone(), B.clone()
    for _ in range(25):
        Ah, Bh = tropfast.prox_step(A, B, Ah, Bh, 0.2, 0.03, 0.05, backend=backend)
    # the same operations; a fused backend sums the per-unit statistics in another order
    tol = dict(rtol=0, atol=0) if sol.backend == "torch" else dict(rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(sol.A_hat, Ah, **tol)
    torch.testing.assert_close(sol.B_hat, Bh, **tol)
    assert sol.steps.tolist() == [25, 25] and sol.method == "ista" and sol.lr.tolist() == [0.2, 0.2]


def test_ista_matches_the_materialising_algorithm_1():
    A, B = _adapter(L=1, r=3, d_in=7, d_out=5)
    sol = tropfast.solve(A[0], B[0], 0.05, 0.05, method="ista", steps=10, lr=0.3)
    Ah, Bh = A[0].clone(), B[0].clone()
    for _ in range(10):
        Ah, Bh = reference.prox_step_ref(A[0], B[0], Ah, Bh, 0.3, 0.05, 0.05)
    torch.testing.assert_close(sol.A_hat, Ah, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sol.B_hat, Bh, rtol=1e-10, atol=1e-12)
    obj = reference.objective_ref(A[0], B[0], Ah, Bh, 0.05, 0.05)
    torch.testing.assert_close(sol.final_objective[0], obj)


@pytest.mark.parametrize("method", ["ista", "fista", "bcd"])
def test_fused_path_equals_the_step_loop(method):
    A, B = _adapter(L=3)
    a = tropfast.solve(A, B, 0.02, 0.04, method=method, steps=40, fused=False)
    b = tropfast.solve(A, B, 0.02, 0.04, method=method, steps=40, fused=True)
    torch.testing.assert_close(a.A_hat, b.A_hat, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.B_hat, b.B_hat, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.final_objective, b.final_objective)
    assert b.record_steps == [0, 40]


@pytest.mark.parametrize("seed", range(4))
def test_bcd_never_increases_the_objective(seed):
    A, B = _adapter(L=3, seed=seed, scale=[0.1, 1.0, 3.0][seed % 3])
    lam = torch.tensor([0.0, 0.05, 0.5], dtype=torch.float64)
    sol = tropfast.solve(A, B, lam, lam * 2, method="bcd", steps=60, record_every=1)
    d = sol.objective.diff(dim=1)
    assert bool((d <= 1e-12 * sol.objective[:, :1].abs() + 1e-20).all()), f"largest increase {float(d.max()):.3e}"


@pytest.mark.parametrize("seed", range(3))
def test_ista_with_the_safe_step_never_increases_the_objective(seed):
    A, B = _adapter(L=2, seed=seed, scale=[0.05, 1.0, 4.0][seed])
    sol = tropfast.solve(A, B, 0.01, 0.02, method="ista", steps=200, record_every=1)
    d = sol.objective.diff(dim=1)
    assert bool((d <= 1e-12 * sol.objective[:, :1].abs() + 1e-20).all()), f"largest increase {float(d.max()):.3e}"


def test_all_solvers_reach_the_same_optimum():
    A, B = _adapter(L=2, r=8, d_in=30, d_out=20, scale=0.3)
    ista = tropfast.solve(A, B, 0.02, 0.02, method="ista", steps=20000, record_every=0)
    fista = tropfast.solve(A, B, 0.02, 0.02, method="fista", steps=3000, record_every=0)
    bcd = tropfast.solve(A, B, 0.02, 0.02, method="bcd", steps=300, record_every=0)
    torch.testing.assert_close(fista.final_objective, ista.final_objective, rtol=1e-8, atol=0)
    torch.testing.assert_close(bcd.final_objective, ista.final_objective, rtol=1e-8, atol=0)
    assert bool((ista.final_objective < ista.objective[:, 0]).all())


def _fista_by_hand(A, B, lr, lam1, lam2, steps):
    """FISTA (Beck & Teboulle) on Algorithm 1's prox step, one momentum t per hidden unit, with
    the gradient restart of O'Donoghue & Candès (2015): a unit whose step points uphill,
    <y − x⁺, x⁺ − x> > 0, restarts with t = 1.  Written from the definitions on the oracle.
    Returns (Â, B̂, restarts, momentum steps)."""
    r = A.shape[0]
    x, x_prev = (A.clone(), B.clone()), (A.clone(), B.clone())
    t = [1.0] * r
    restarts = kept_momentum = 0
    for _ in range(steps):
        t_next = [(1 + (1 + 4 * ti * ti) ** 0.5) / 2 for ti in t]
        w = torch.tensor([(ti - 1) / tn for ti, tn in zip(t, t_next)], dtype=A.dtype)
        yA = x[0] + w[:, None] * (x[0] - x_prev[0])
        yB = x[1] + w[None, :] * (x[1] - x_prev[1])
        nA, nB = reference.prox_step_ref(A, B, yA, yB, lr, lam1, lam2)
        for i in range(r):
            uphill = float(((yA[i] - nA[i]) * (nA[i] - x[0][i])).sum() + ((yB[:, i] - nB[:, i]) * (nB[:, i] - x[1][:, i])).sum())
            if uphill > 0:
                t_next[i] = 1.0
                restarts += 1
            elif t_next[i] > 1:
                kept_momentum += 1
        x_prev, x, t = x, (nA, nB), t_next
    return x[0], x[1], restarts, kept_momentum


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_fista_is_the_accelerated_prox_step_with_gradient_restart(backend):
    A, B = _adapter(L=1, r=4, d_in=9, d_out=7, scale=0.3)  # lr 0.15 is below the safe step (0.168)
    Ah, Bh, restarts, momentum = _fista_by_hand(A[0], B[0], 0.15, 0.05, 0.08, 60)
    assert restarts > 0 and momentum > 0  # both branches of the restart are taken
    sol = tropfast.solve(A[0], B[0], 0.05, 0.08, method="fista", steps=60, lr=0.15, backend=backend)
    torch.testing.assert_close(sol.A_hat, Ah, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sol.B_hat, Bh, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_fista_converges_faster_than_ista(backend):
    """Acceleration: after 100 steps FISTA is within 1e-3 of ISTA's distance to the optimum
    (measured: about 3e-5 of it), the optimum being BCD's after 400 sweeps."""
    A, B = _adapter(L=2, r=8, d_in=30, d_out=20, scale=0.3)
    best = tropfast.solve(A, B, 0.02, 0.02, method="bcd", steps=400, record_every=0, backend=backend).final_objective
    gap = {
        m: tropfast.solve(A, B, 0.02, 0.02, method=m, steps=100, record_every=0, backend=backend).final_objective - best
        for m in ("ista", "fista")
    }
    assert bool((gap["ista"] > 1e-2).all()), gap
    assert bool((gap["fista"] < 1e-3 * gap["ista"]).all()), gap


def test_target_keep_returns_the_best_mu_not_the_last():
    """Two search iterations: μ = 1, then the first move up (both adapters keep more than the
    target at μ = 1) by |logit k − logit 0.72|/2 in log μ, at least 0.02.  Adapter 0 keeps
    just above the target at μ = 1 and its smallest move overshoots further below it, so its
    best is μ = 1; adapter 1 is closest at its second μ.  The kept fractions at each λ come
    from plain fixed-λ solves."""
    A, B = _adapter(L=1, r=8, d_in=48, d_out=40, scale=1.0)
    A, B = torch.cat([A, A]), torch.cat([B, B])
    lam = torch.tensor([12.0, 3.2], dtype=torch.float64)
    target = 0.72
    k1 = tropfast.solve(A, B, lam, lam, method="bcd", steps=30).kept_fraction
    assert bool((k1 > target).all())  # the search moves up from μ = 1
    z = lambda k: math.log(k / (1 - k))  # noqa: E731 (no clipping: 0.072 < k < 0.928 here)
    mu2 = torch.tensor([math.exp(min(max(abs(z(float(k)) - z(target)) / 2, 0.02), math.log(4))) for k in k1], dtype=torch.float64)
    k2 = tropfast.solve(A, B, lam * mu2, lam * mu2, method="bcd", steps=30).kept_fraction
    err1, err2 = (k1 - target).abs(), (k2 - target).abs()
    assert float(err1[0]) < float(err2[0]) and float(err2[1]) < float(err1[1])
    sol = tropfast.solve(A, B, lam, lam, method="bcd", steps=30, target_keep=target, search_iters=2, search_tol=1e-6)
    assert len(sol.search) == 2
    assert sol.search[0]["mu"] == [1.0, 1.0] and sol.search[1]["mu"] == pytest.approx(mu2.tolist(), rel=1e-12)
    torch.testing.assert_close(sol.lam1, torch.stack([lam[0], lam[1] * mu2[1]]), rtol=1e-12, atol=0)
    torch.testing.assert_close(sol.kept_fraction, torch.stack([k1[0], k2[1]]))


def test_solutions_are_sparse_and_keep_the_largest_weights_per_unit():
    A, B = _adapter(L=1, r=8, d_in=40, d_out=30, scale=1.0)
    sol = tropfast.solve(A, B, 0.5, 0.5, method="bcd", steps=50)
    assert 0 < float(sol.kept_fraction[0]) < 1
    nnz = int((sol.A_hat != 0).sum() + (sol.B_hat != 0).sum())
    assert abs(float(sol.kept_fraction[0]) - nnz / (8 * 70)) < 1e-12
    for i in range(8):  # docs/design.md §4: within a unit the kept entries are the largest |A_ik|
        kept = sol.A_hat[0, i] != 0
        if kept.any() and (~kept).any():
            assert float(A[0, i][kept].abs().min()) >= float(A[0, i][~kept].abs().max())


@pytest.mark.parametrize("method", ["bcd", "ista"])
def test_target_keep_finds_lambda(method):
    A, B = _adapter(L=3, r=8, d_in=48, d_out=40, scale=1.0)
    sol = tropfast.solve(A, B, 1e-3, 2e-3, method=method, steps=60, target_keep=0.3)
    assert bool(((sol.kept_fraction - 0.3).abs() < 0.03).all()), sol.kept_fraction
    torch.testing.assert_close(sol.lam2 / sol.lam1, torch.full((3,), 2.0, dtype=torch.float64))
    assert sol.search and len(sol.search) <= 24
    again = tropfast.solve(A, B, sol.lam1, sol.lam2, method=method, steps=60)
    torch.testing.assert_close(again.A_hat, sol.A_hat)


def test_search_tol_stops_the_search_early():
    A, B = _adapter(L=2, r=8, d_in=48, d_out=40, scale=1.0)
    loose = tropfast.solve(A, B, 1e-3, 1e-3, method="bcd", steps=30, target_keep=0.5, search_tol=0.05)
    tight = tropfast.solve(A, B, 1e-3, 1e-3, method="bcd", steps=30, target_keep=0.5)
    assert bool(((loose.kept_fraction - 0.5).abs() <= 0.05).all())
    assert len(loose.search) < len(tight.search)
    with pytest.raises(ValueError, match="search_tol"):
        tropfast.solve(A, B, target_keep=0.5, search_tol=2.0)


def _probe_search(kept_of, target: float, tol: float, iters: int = 40):
    """MuSearch driven by a kept-fraction function of log μ; returns (search, probed log μ)."""
    L = len(kept_of)
    search = solver.MuSearch(L, target, tol, torch.float64, "cpu")
    probed = []
    for _ in range(iters):
        idx = (~search.done()).nonzero().squeeze(1)
        if not idx.numel():
            break
        lm = torch.log(search.mu(idx))
        probed.append((idx.tolist(), lm.tolist()))
        search.update(idx, torch.tensor([kept_of[i](float(x)) for i, x in zip(idx.tolist(), lm)], dtype=torch.float64))
    return search, probed


def _logit(k: float, target: float) -> float:
    """The search's z of a kept fraction: logit, clipped to [ε, 1 − ε], ε = min(t, 1 − t)/10."""
    eps = max(min(target, 1 - target) / 10, 1e-6)
    k = min(max(k, eps), 1 - eps)
    return math.log(k / (1 - k))


def test_mu_search_moves_then_interpolates_by_hand():
    """kept(log μ) = 0.7 at log μ <= 0, linear to 0 at log 2, 0 beyond: from μ = 1 (0.7 > 0.5)
    the first move is logit(0.7)/2 (the gap in z over the assumed slope 2); then regula falsi
    on z between that probe and log μ = 0."""
    ln2 = math.log(2)

    def kept(x):
        return 0.7 if x <= 0 else max(0.0, 0.7 * (1 - x / ln2))

    search, probed = _probe_search([kept], 0.5, 1e-12)
    x1 = math.log(0.7 / 0.3) / 2
    z0, z1 = math.log(0.7 / 0.3), _logit(kept(x1), 0.5)
    x2 = x1 * z0 / (z0 - z1)
    assert [p[1][0] for p in probed[:3]] == pytest.approx([0.0, x1, x2], abs=1e-12)
    assert bool(search.done()[0]) and float(search.best_mu[0]) == pytest.approx(2 ** (2 / 7), rel=1e-9)


def test_mu_search_moves_double_on_a_plateau():
    """Needing μ = 1000 (kept 1 until log μ = log 1000): the first move is the largest one
    allowed (log 4: z of a kept 1, clipped at 0.95, is far from the target's), and a flat
    kept fraction gives the secant no slope, so every later move doubles: μ = 1, 4, 64, 16384."""
    root = math.log(1000.0)
    search, probed = _probe_search([lambda x: 1.0 if x < root else 0.0], 0.5, 0.25)
    assert [math.exp(p[1][0]) for p in probed[:4]] == pytest.approx([1, 4, 64, 16384])
    down, probed = _probe_search([lambda x: 1.0 if x < -root else 0.0], 0.5, 0.25)
    assert [math.exp(p[1][0]) for p in probed[:4]] == pytest.approx([1, 1 / 4, 1 / 64, 1 / 16384])


def test_mu_search_secant_move_by_hand():
    """Two probes on one side: the next move is 1.5 times the secant's distance to the root.
    With logit(kept) = 2.4 − x (slope 1, the root of 0.5 at 2.4) the first move, 2.4/2, falls
    short; the secant is exact, so the next probe lands at 1.2 + 1.5·1.2.  A tiny gap still
    moves by at least 0.02."""
    probes = _probes_of(lambda x: 1 / (1 + math.exp(x - 2.4)), 0.5, 3)
    assert probes == pytest.approx([0.0, 1.2, 3.0], abs=1e-12)
    probes = _probes_of(lambda x: 0.5001 if x <= 0 else 0.0, 0.5, 2)
    assert probes[1] == pytest.approx(0.02, abs=1e-15)


@pytest.mark.parametrize("high, low", [(0.99, 0.49), (0.51, 0.01), (0.9, 0.1)])
def test_mu_search_halves_the_bracket_at_least_every_four_probes(high, low):
    """A step function defeats interpolation: the kept fractions at the bracket's ends never
    point at the root.  Lopsided (0.99 / 0.49 puts interpolations near hi, 0.51 / 0.01 near
    lo) or even, the bracket must still halve at least every fourth probe (a bisection after
    three slow interpolations), so pinning the root to 1e-6 in log μ takes at most about
    4·log2(width/1e-6) probes."""
    root = 0.3
    search = solver.MuSearch(1, 0.5, 0.0, torch.float64, "cpu")
    widths = []
    for _ in range(90):
        x = float(torch.log(search.mu()))
        search.update(None, torch.tensor([high if x < root else low], dtype=torch.float64))
        widths.append(float(search.hi[0] - search.lo[0]))
        assert search.lo[0] < root <= search.hi[0]
    first = next(i for i, w in enumerate(widths) if math.isfinite(w))  # the probe that brackets
    for i in range(first, len(widths) - 4):
        assert widths[i + 4] <= 0.5 * widths[i] + 1e-15, (i, widths[i : i + 5])
    assert next(i for i, w in enumerate(widths) if w < 1e-6) <= first + 4 * 20
    assert int(search.probes[0]) == 90 and search.probes.dtype == torch.long


def _probes_of(kept_of, target: float, n: int) -> list[float]:
    """The log μ of the first n probes of one adapter whose kept fraction is kept_of(log μ)."""
    search = solver.MuSearch(1, target, 0.0, torch.float64, "cpu")
    out = []
    for _ in range(n):
        x = float(torch.log(search.mu()))
        out.append(x)
        search.update(None, torch.tensor([kept_of(x)], dtype=torch.float64))
    return out


def test_mu_search_interpolation_by_hand():
    """Regula falsi on z between kept fractions that are not 0 at hi: kept 0.7 at log μ = 0
    and 0.3 beyond put the root of 0.5 half way (z = ±logit 0.7); shares outside [0.05, 0.95]
    are clamped to it (kept 0.5001 or 1.0 at lo, 0 or 0.4999 at hi)."""
    x1 = math.log(0.7 / 0.3) / 2
    probes = _probes_of(lambda x: 0.7 if x <= 0 else 0.3, 0.5, 3)
    assert probes[:2] == [0.0, pytest.approx(x1, abs=1e-15)] and probes[2] == pytest.approx(0.5 * x1, abs=1e-12)
    probes = _probes_of(lambda x: 0.5001 if x <= 0 else 0.0, 0.5, 3)
    assert probes[2] == pytest.approx(0.05 * 0.02, abs=1e-12)
    probes = _probes_of(lambda x: 1.0 if x <= 0 else 0.4999, 0.5, 3)
    assert probes[2] == pytest.approx(0.95 * math.log(4), abs=1e-12)


def _reference_probes(kept_of, target: float, n: int) -> list[float]:
    """The documented search of one adapter in plain floats (an independent oracle): z is
    logit(kept) clipped to [ε, 1 − ε]; from log μ = 0 while unbracketed, the first move is
    |z − z_t|/2 in [0.02, log 4], later ones 1.5·|z − z_t| over the secant slope of the last two
    probes, in [0.02, twice the last move]; once bracketed, regula falsi on z with the share
    clamped to [0.05, 0.95], the kept end's gap halved each time a probe replaces the same end
    again (Illinois), and a bisection after three interpolations in a row that did not halve
    the bracket."""
    zt = _logit(target, target)
    x = 0.0
    lo = hi = k_lo = k_hi = prev = k_prev = last = None
    side, weight, slow_run, bisect, out = 0, 1.0, 0, False, []
    for _ in range(n):
        out.append(x)
        k = kept_of(x)
        z = _logit(k, target)
        width = None if lo is None or hi is None else hi - lo
        dense = k > target
        if dense:
            lo, k_lo = x, k
        else:
            hi, k_hi = x, k
        if lo is None or hi is None:
            gap = abs(z - zt)
            if last is None:
                move = min(max(gap / 2, 0.02), math.log(4))
            else:
                slope = abs(_logit(k_prev, target) - z) / abs(x - prev)
                move = min(max(math.inf if slope == 0 else 1.5 * gap / slope, 0.02), 2 * last)
            last, prev, k_prev = move, x, k
            x = x + move if hi is None else x - move
            continue
        s = 1 if dense else -1
        weight = 0.5 * weight if width is not None and s == side else 1.0
        side = s
        g_lo = (_logit(k_lo, target) - zt) * (1.0 if dense else weight)
        g_hi = (zt - _logit(k_hi, target)) * (weight if dense else 1.0)
        slow = width is not None and (hi - lo) > 0.5 * width and not bisect
        slow_run = slow_run + 1 if slow else 0
        bisect = slow_run >= 3
        if bisect:
            weight = 1.0
        share = 0.5 if bisect else min(max(g_lo / (g_lo + g_hi), 0.05), 0.95)
        prev, k_prev = x, k
        x = lo + share * (hi - lo)
    return out


@pytest.mark.parametrize(
    "kept_of, other",
    [
        (lambda x: 1 / (1 + math.exp(6 * (x - 0.37))), 0.1),  # a smooth sigmoid
        (lambda x: 0.99 if x < 0.3 else 0.49, 0.7),  # a lopsided step
        (lambda x: max(0.0, min(1.0, 0.9 - 0.8 * (x / 1.7) ** 2)) if x > 0 else 0.9, 0.2),  # concave
        (lambda x: 0.2 if x > -2.5 else 0.95, 0.3),  # root below μ = 1: moves down
        (lambda x: 0.6 if x < 1.2 else (0.55 if x < 1.25 else 0.02), 0.1),  # a plateau, then a cliff
    ],
    ids=["sigmoid", "step", "concave", "down", "cliff"],
)
def test_mu_search_probes_follow_the_documented_rule(kept_of, other):
    for target in (0.5, other):  # another target: another ε, a lopsided z
        got = _probes_of(kept_of, target, 14)
        assert got == pytest.approx(_reference_probes(kept_of, target, 14), abs=1e-12), target


def test_mu_search_keeps_the_first_of_equally_good_probes_and_stops_on_an_exact_hit():
    search = solver.MuSearch(1, 0.5, 0.0, torch.float64, "cpu")
    for kept in (0.75, 0.25):  # at μ = 1, then one move up: both exactly 0.25 away
        search.update(None, torch.tensor([kept], dtype=torch.float64))
    assert float(search.best_mu[0]) == 1.0 and not bool(search.done()[0])
    search = solver.MuSearch(1, 0.5, 0.0, torch.float64, "cpu")
    x1 = math.log(0.7 / 0.3) / 2
    for x in (0.0, x1):  # 0.7 at μ = 1, then exactly the target: done with tol 0
        search.update(None, torch.tensor([0.7 if x <= 0 else 0.5], dtype=torch.float64))
    assert bool(search.done()[0]) and float(search.best_mu[0]) == pytest.approx(math.exp(x1), rel=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mu_search_tolerance_is_float64_whatever_the_dtype(dtype):
    """|0.28 − 0.3| is just under 0.02 in float64 but not in float32 (of either operand): the
    comparison is made in float64, with float32 kept fractions converted first, as the fleet
    path does with its own tolerance."""
    search = solver.MuSearch(1, 0.3, 0.02, dtype, "cpu")
    search.update(None, torch.tensor([0.28], dtype=torch.float64).to(dtype))
    want = abs(float(torch.tensor(0.28, dtype=dtype)) - 0.3) <= 0.02
    assert bool(search.done()[0]) == want
    assert search.mu().dtype == dtype and search.best_mu.dtype == dtype


def test_mu_search_takes_a_tolerance_per_adapter():
    """A list of differently shaped adapters has a half-weight tolerance per adapter."""
    # seeded: for some weights (about 1 draw in 30) several weights reach zero at the same μ
    # and no μ keeps 40 % to within half a weight; these are not such weights
    g = torch.Generator().manual_seed(0)
    A = [torch.randn(4, 30, dtype=torch.float64, generator=g), torch.randn(6, 20, dtype=torch.float64, generator=g)]
    B = [torch.randn(25, 4, dtype=torch.float64, generator=g), torch.randn(10, 6, dtype=torch.float64, generator=g)]
    sol = tropfast.solve(A, B, 0.05, 0.05, method="bcd", steps=20, target_keep=0.4, search_iters=30)
    numel = torch.tensor([4 * 55, 6 * 30], dtype=torch.float64)
    assert bool(((sol.kept_fraction - 0.4).abs() <= 0.5 / numel + 1e-12).all()), sol.kept_fraction


def test_keep_rows_merges_the_best_rows_of_probes_that_line_up():
    L = 4
    def probe(vals, rec=(0, 5), steps=True, width=2):
        v = torch.tensor(vals, dtype=torch.float64)
        n = v.shape[0]
        return (v[:, None, None] * torch.ones(n, 2, 3), v[:, None, None] * torch.ones(n, 3, 2), v[:, None] * torch.ones(n, width),
                list(rec), torch.full((n,), 7) if steps else None, torch.zeros(n, dtype=torch.bool), v)
    best, ok = solver._keep_rows(None, probe([1.0, 2.0, 3.0, 4.0]), None, torch.ones(4, dtype=torch.bool), L)
    assert ok and best[6].tolist() == [1.0, 2.0, 3.0, 4.0] and best[3] == [0, 5]
    # a probe of adapters 1 and 3 that improves adapter 3 only
    best, ok = solver._keep_rows(best, probe([9.0, 8.0]), torch.tensor([1, 3]), torch.tensor([False, True]), L)
    assert ok and best[6].tolist() == [1.0, 2.0, 3.0, 8.0]
    assert best[0][3].eq(8.0).all() and best[1][3].eq(8.0).all() and best[2][3].eq(8.0).all() and best[0][1].eq(2.0).all()
    for other in (probe([5.0], rec=(0, 4)), probe([5.0], width=3), probe([5.0], steps=False)):
        assert solver._keep_rows(best, other, torch.tensor([0]), torch.tensor([True]), L) == (None, False)


def test_mu_search_of_each_adapter_ignores_the_others():
    """Three adapters with roots at different μ, probed together (each until done) or alone,
    see the same probes: the μ of one never depends on the values of another."""
    roots = [0.1, 2.0, -1.5]
    fns = [lambda x, r=r: 1 / (1 + math.exp(4 * (x - r))) for r in roots]
    together, _ = _probe_search(fns, 0.3, 1e-3)
    for k, f in enumerate(fns):
        alone, _ = _probe_search([f], 0.3, 1e-3)
        assert float(alone.best_mu[0]) == float(together.best_mu[k])
        assert int(alone.probes[0]) == int(together.probes[k])
    assert bool(together.done().all())


_SEARCH_KW = [dict(method="ista", steps=40), dict(method="bcd", steps=30, path="sorted"), dict(method="fista", steps=30, record_every=5)]


@pytest.mark.parametrize(
    "backend, kw",
    [(b, kw) for b in GEN_BACKENDS if b != "triton" for kw in _SEARCH_KW]
    # the Triton interpreter is slow on CPU: the fused solve only (one program per adapter)
    + [("triton", dict(method="ista", steps=10))] * ("triton" in GEN_BACKENDS),
)
def test_target_keep_equals_each_adapter_alone_and_a_solve_at_its_lambda(backend, kw):
    """Each adapter's search depends on its own solves only (probes solve the adapters still
    searching): the batch gives every adapter the λ and solution of a search on it alone.  The
    result is the search's own probe at that λ, so a plain solve at the returned λ equals it
    bit for bit (no second solve is run)."""
    A, B = _adapter(L=3, r=8, d_in=48, d_out=40, scale=1.0)
    lam = torch.tensor([0.02, 0.5, 0.001], dtype=A.dtype)  # starts of different distance: done at different probes
    sol = tropfast.solve(A, B, lam, lam, target_keep=0.35, search_tol=0.01, backend=backend, **kw)
    assert any(t["adapters"] is not None for t in sol.search) or (kw.get("path") == "sorted" and backend == "torch")
    again = tropfast.solve(A, B, sol.lam1, sol.lam2, backend=backend, **kw)
    for key in ("A_hat", "B_hat", "objective", "kept_fraction", "steps"):
        assert torch.equal(getattr(again, key), getattr(sol, key)), key
    for k in range(3):
        one = tropfast.solve(A[k : k + 1], B[k : k + 1], lam[k], lam[k], target_keep=0.35, search_tol=0.01, backend=backend, **kw)
        assert torch.equal(one.lam1, sol.lam1[k : k + 1])
        assert torch.equal(one.A_hat[0], sol.A_hat[k]) and torch.equal(one.B_hat[0], sol.B_hat[k])


def test_target_keep_with_tol_equals_a_solve_at_its_lambda():
    """With tol, adapters stop at different steps, so the probes' objective records differ in
    length and cannot be merged row by row: the search then solves once more at the found λ,
    and the result is that solve's."""
    A, B = _adapter(L=3, r=8, d_in=48, d_out=40, scale=1.0)
    lam = torch.tensor([0.02, 0.5, 0.001], dtype=A.dtype)
    kw = dict(method="ista", steps=200, tol=3e-3)
    merged = []
    keep_rows = solver._keep_rows

    def spy(*args):
        out = keep_rows(*args)
        merged.append(out[1])
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(solver, "_keep_rows", spy)
        sol = tropfast.solve(A, B, lam, lam, target_keep=0.35, search_tol=0.01, **kw)
    assert merged[0] and not merged[-1]  # the records stopped lining up: the search solved again
    again = tropfast.solve(A, B, sol.lam1, sol.lam2, **kw)
    for key in ("A_hat", "B_hat", "objective", "kept_fraction", "steps", "converged"):
        assert torch.equal(getattr(again, key), getattr(sol, key)), key
    assert sol.record_steps == again.record_steps


def _spy_batch_sizes(monkeypatch, name: str) -> list:
    """The number of adapters of every call of ``solver.<name>`` (a solve's runner: its second
    argument is the batch of A), recorded into the returned list."""
    sizes = []
    real = getattr(solver, name)

    def spy(first, A3, *args):
        sizes.append(A3.shape[0])
        return real(first, A3, *args)

    monkeypatch.setattr(solver, name, spy)
    return sizes


def test_target_keep_probes_only_the_adapters_still_searching(monkeypatch):
    """Once an adapter is within tolerance it is not solved again: the probes' batches shrink
    (the torch backend's prepared sorted path is the exception, it solves every adapter)."""
    A, B = _adapter(L=3, r=8, d_in=48, d_out=40, scale=1.0)
    lam = torch.tensor([0.02, 0.5, 0.001], dtype=A.dtype)
    sizes = _spy_batch_sizes(monkeypatch, "_run_whole")
    sol = tropfast.solve(A, B, lam, lam, method="ista", steps=40, target_keep=0.35, search_tol=0.01)
    assert sizes[0] == 3 and sizes[-1] < 3 and sizes == sorted(sizes, reverse=True), sizes
    assert len(sizes) == len(sol.search)  # the result is a probe's: no solve after the search
    assert sizes == [3 if t["adapters"] is None else len(t["adapters"]) for t in sol.search]
    assert [t["iter"] for t in sol.search] == list(range(len(sizes)))
    assert [len(t["kept"]) for t in sol.search] == sizes == [len(t["mu"]) for t in sol.search]
    last = {}  # each adapter's kept fraction at its last probe: its result (its last probe is its best)
    for t in sol.search:
        for k, kept in zip(t["adapters"] or range(3), t["kept"]):
            last[k] = kept
    assert all(abs(last[k] - 0.35) <= 0.01 for k in range(3)) and [last[k] for k in range(3)] == sol.kept_fraction.tolist()


def test_target_keep_searches_mu_in_the_compute_dtype():
    """A float64 problem's μ keeps float64 precision: after the interpolations of the search
    it is not a float32 number, and the solution is that of a solve at the returned λ."""
    A, B = _adapter(L=2, r=8, d_in=48, d_out=40, scale=1.0)
    sol = tropfast.solve(A, B, 1.0, 1.0, method="bcd", steps=20, target_keep=0.37, search_tol=0.0, search_iters=8)
    mu = sol.lam1  # lam1 = 1: the λ is μ itself
    assert mu.dtype == torch.float64
    assert bool((mu.to(torch.float32).to(torch.float64) != mu).all()), mu.tolist()
    again = tropfast.solve(A, B, sol.lam1, sol.lam2, method="bcd", steps=20)
    assert torch.equal(again.A_hat, sol.A_hat)


def test_target_keep_progress_bar(monkeypatch):
    """One bar for the search: "tropfast lambda search", counted in solves out of
    search_iters, one step per probe, cleared when the search ends."""
    import tqdm.auto

    bars = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            bars.append(self)
            self.kwargs = kwargs
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    A, B = _adapter(L=2, r=8, d_in=48, d_out=40, scale=1.0)
    sol = tropfast.solve(A, B, 1.0, 1.0, method="bcd", steps=20, target_keep=0.37, search_tol=0.0, search_iters=3, progress=True)
    assert len(bars) == 1 and len(sol.search) == 3
    assert bars[0].kwargs == {"total": 3, "desc": "tropfast lambda search", "unit": "solve", "leave": False}
    assert bars[0].n == 3


@pytest.mark.parametrize("backend, path, method", [("cpu", "auto", "ista"), ("torch", "sorted", "bcd"), ("torch", "dense", "bcd")])
def test_target_keep_with_lam_gen_equals_a_solve_at_its_lambda(backend, path, method):
    """The search scales the generator penalty with λ1, λ2 in every probe (the probes of the
    adapters still searching, and the torch backend's sorted probes of all adapters): the
    result is the solve at the returned (λ1, λ2, lam_gen)."""
    A, B = _adapter(L=3, r=8, d_in=48, d_out=40, scale=1.0)
    lam = torch.tensor([0.02, 0.5, 0.001], dtype=A.dtype)
    kw = dict(method=method, steps=30, backend=backend, path=path)
    sol = tropfast.solve(A, B, lam, lam, lam_gen=0.5 * lam, target_keep=0.5, search_tol=0.01, **kw)
    assert any(t["adapters"] is not None for t in sol.search)
    torch.testing.assert_close(sol.lam_gen, 0.5 * sol.lam1, rtol=1e-12, atol=0)
    again = tropfast.solve(A, B, sol.lam1, sol.lam2, lam_gen=sol.lam_gen, **kw)
    plain = tropfast.solve(A, B, sol.lam1, sol.lam2, **kw)
    for key in ("A_hat", "B_hat", "objective", "kept_fraction"):
        assert torch.equal(getattr(again, key), getattr(sol, key)), key
    assert not torch.equal(plain.A_hat, sol.A_hat)  # the penalty changed the solution
    for t in sol.search:  # every probe, the last ones of a few adapters too, solved with the penalty
        for k, mu, kept in zip(t["adapters"] or range(3), t["mu"], t["kept"]):
            one = tropfast.solve(A[k : k + 1], B[k : k + 1], lam[k] * mu, lam[k] * mu, lam_gen=0.5 * lam[k] * mu, **kw)
            assert float(one.kept_fraction[0]) == kept, (t["iter"], k)


def test_list_of_mixed_shapes_equals_one_by_one():
    shapes = [(6, 20, 20), (3, 11, 7), (1, 5, 9)]
    As, Bs = [], []
    for k, (r, di, do) in enumerate(shapes):
        A, B = _adapter(L=1, r=r, d_in=di, d_out=do, seed=k)
        As.append(A[0])
        Bs.append(B[0])
    for method in ("ista", "fista", "bcd"):
        sol = tropfast.solve(As, Bs, 0.05, 0.05, method=method, steps=30)
        assert isinstance(sol.A_hat, list) and [a.shape for a in sol.A_hat] == [a.shape for a in As]
        for k in range(3):
            one = tropfast.solve(As[k], Bs[k], 0.05, 0.05, method=method, steps=30, lr=float(sol.lr[k]) if sol.lr is not None else None)
            torch.testing.assert_close(sol.A_hat[k], one.A_hat, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(sol.B_hat[k], one.B_hat, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(sol.kept_fraction[k], one.kept_fraction[0])
            torch.testing.assert_close(sol.final_objective[k], one.final_objective[0])


def test_batched_equals_one_by_one():
    A, B = _adapter(L=4)
    sol = tropfast.solve(A, B, 0.05, 0.02, method="fista", steps=50)
    for k in range(4):
        one = tropfast.solve(A[k], B[k], 0.05, 0.02, method="fista", steps=50)
        assert not one.batched and one.A_hat.shape == A[k].shape
        torch.testing.assert_close(sol.A_hat[k], one.A_hat, rtol=1e-12, atol=1e-14)


def test_tol_stops_and_freezes_converged_adapters():
    A, B = _adapter(L=2, scale=0.5)
    sol = tropfast.solve(A, B, 0.05, 0.05, method="bcd", steps=2000, tol=1e-10)
    assert bool(sol.converged.all()) and int(sol.steps.max()) < 2000
    full = tropfast.solve(A, B, 0.05, 0.05, method="bcd", steps=int(sol.steps.max()))
    k = int(sol.steps.argmin())
    short = tropfast.solve(A[k], B[k], 0.05, 0.05, method="bcd", steps=int(sol.steps[k]))
    torch.testing.assert_close(sol.A_hat[k], short.A_hat)
    assert full.steps.tolist() == [int(sol.steps.max())] * 2


def test_half_precision_solve_returns_input_dtype():
    A, B = _adapter(L=2)
    sol = tropfast.solve(A.half(), B.half(), 0.02, 0.02, method="bcd", steps=20)
    ref = tropfast.solve(A.float(), B.float(), 0.02, 0.02, method="bcd", steps=20)
    assert sol.A_hat.dtype == torch.float16
    torch.testing.assert_close(sol.A_hat.float(), ref.A_hat, rtol=2e-2, atol=2e-2)


def test_safe_lr_is_per_adapter_and_scale_aware():
    A, B = _adapter(L=2)
    A2 = torch.stack([A[0], 10 * A[1]])
    lr = solver.safe_lr(A2, B)
    assert lr.shape == (2,) and float(lr[1]) < float(lr[0])


def test_summary_and_padding_helper():
    A, B = _adapter(L=2)
    text = tropfast.solve(A, B, 0.05, 0.05, method="bcd", steps=5).summary()
    assert "bcd" in text and len(text.splitlines()) == 4
    PA, PB = tropfast.pad_adapters([A[0], A[1][:3]], [B[0], B[1][:, :3]])
    assert PA.shape == (2, 6, 20) and not PA[1, 3:].any() and not PB[1, :, 3:].any()
    assert torch.equal(PA[0], A[0]) and torch.equal(PA[1, :3], A[1][:3]) and torch.equal(PB[1, :, :3], B[1][:, :3])
    SA, SB = tropfast.pad_adapters([A[0], A[1].t().contiguous().t()], [B[0], B[1]])  # equal shapes, one strided
    assert torch.equal(SA, A) and torch.equal(SB, B) and SA.is_contiguous()


def test_solve_fused_op_default_kernel_is_the_dense_loop():
    A, B = _adapter(L=2)
    p = torch.tensor(0.05, dtype=torch.float64)
    lr = solver.safe_lr(A, B)
    Ah, Bh = TORCH.solve_fused(A, B, p, p, lr, "fista", 12)
    eA, eB = dense.dense_solve(closed_form.prox_step, A, B, p.expand(2), p.expand(2), lr, "fista", 12)
    torch.testing.assert_close(Ah, eA, rtol=0, atol=0)
    torch.testing.assert_close(Bh, eB, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(method="adam"), ValueError, "method='adam' is not a solver"),
        (dict(steps=0), ValueError, "steps must be a positive integer"),
        (dict(steps=2.5), ValueError, "steps must be a positive integer"),
        (dict(tol=-1.0), ValueError, "tol must be"),
        (dict(target_keep=1.5), ValueError, "target_keep must be in"),
        (dict(target_keep=0.0), ValueError, "target_keep must be in"),
        (dict(lam1=-0.1), ValueError, "lam1 must be >= 0"),
        (dict(lr=0.0), ValueError, "lr must be > 0"),
        (dict(method="bcd", lr=0.1), ValueError, "bcd takes no step size"),
        (dict(lam1=0.0, lam2=0.0, target_keep=0.5), ValueError, "give lam1 or lam2 > 0"),
        (dict(fused=True, tol=1e-6), ValueError, "cannot stop early"),
        (dict(backend="gpu"), ValueError, "not a backend"),
        (dict(record_every=-1), ValueError, "record_every"),
    ],
)
def test_bad_solver_arguments(kwargs, exc, match):
    A, B = _adapter()
    with pytest.raises(exc, match=match):
        tropfast.solve(A, B, **kwargs)


def test_bad_lists():
    A, B = _adapter()
    with pytest.raises(ValueError, match="got 2 down-projections A but 1"):
        tropfast.solve([A[0], A[1]], [B[0]])
    with pytest.raises(TypeError, match="both be lists"):
        tropfast.solve([A[0]], B[0])
    with pytest.raises(ValueError, match="list of adapters is empty"):
        tropfast.solve([], [])
    with pytest.raises(ValueError, match=r"bottleneck mismatch: A\[1\]"):
        tropfast.solve([A[0], A[1][:3]], [B[0], B[1]])
    with pytest.raises(ValueError, match=r"A\[0\] contains non-finite"):
        tropfast.solve([A[0].index_fill(0, torch.tensor([0]), float("nan"))], [B[0]])


def test_one_sided_lambda_warns_for_gradient_methods():
    A, B = _adapter()
    with pytest.warns(RuntimeWarning, match="exactly one of lam1, lam2 equal to 0"):
        tropfast.solve(A, B, 0.0, 0.1, method="fista", steps=3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tropfast.solve(A, B, 0.0, 0.1, method="bcd", steps=3)
        tropfast.solve(A, B, 0.0, 0.0, method="ista", steps=3)


def test_torch_compile_over_solve():
    A, B = _adapter(L=2, r=3, d_in=8, d_out=5)
    compiled = torch.compile(lambda a, b: tropfast.solve(a, b, 0.05, 0.05, method="ista", steps=3).A_hat)
    torch.testing.assert_close(compiled(A, B), tropfast.solve(A, B, 0.05, 0.05, method="ista", steps=3).A_hat)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("method", ["bcd", "ista"])
def test_sorted_path_matches_dense(method, backend):
    A, B = _adapter(L=3, r=6, d_in=40, d_out=30, scale=1.0)
    dense = tropfast.solve(A, B, 0.05, 0.08, method=method, steps=40, backend="torch", path="dense")
    fam = tropfast.solve(A, B, 0.05, 0.08, method=method, steps=40, path="sorted", backend=backend)
    torch.testing.assert_close(fam.A_hat, dense.A_hat, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fam.B_hat, dense.B_hat, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fam.final_objective, dense.final_objective)
    assert fam.backend == tropfast.backends.resolve(backend, A.device) and fam.record_steps == [0, 40]
    keep = tropfast.solve(A, B, 1e-3, 1e-3, method=method, steps=40, path="sorted", target_keep=0.4, backend=backend)
    assert bool(((keep.kept_fraction - 0.4).abs() < 0.03).all())


def test_sorted_path_refuses_what_it_cannot_do():
    A, B = _adapter()
    with pytest.raises(ValueError, match="fista has no sorted form"):
        tropfast.solve(A, B, method="fista", path="sorted")
    with pytest.raises(ValueError, match="leave tol, record_every and fused unset"):
        tropfast.solve(A, B, method="bcd", path="sorted", tol=1e-6)
    with pytest.raises(ValueError, match="leave tol, record_every and fused unset"):
        tropfast.solve(A, B, method="bcd", path="sorted", record_every=5)
    with pytest.raises(ValueError, match="path='fast'"):
        tropfast.solve(A, B, path="fast")


# ---------------------------------------------------------------------------------------
# The generator l2,1 penalty lam_gen·Σ_i ‖Â_i‖₂‖B̂_{:,i}‖₁ (ops.GENERATOR_PENALTY)
# ---------------------------------------------------------------------------------------
FIXTURE = __import__("os").path.join(__import__("os").path.dirname(__file__), "data", "solve_before_lam_gen.pt")


def _fixture_cases():
    return torch.load(FIXTURE, weights_only=False)


def test_lam_gen_zero_reproduces_the_solutions_from_before_the_penalty():
    """tests/data/solve_before_lam_gen.pt holds tropfast.solve's outputs computed by the code from
    before lam_gen existed (tests/data/make_solve_fixture.py); lam_gen absent, 0 or zero per
    adapter must give them again to a few ulps, and agree with each other bit for bit.  The
    fixture is not compared bit for bit: vectorised sums round differently on another SIMD
    width and even on another CPU of the same ATen capability (an AMD EPYC with AVX-512 differs
    from the machine that wrote the fixture in the torch backend's FISTA), the native
    ``hsd_loss`` behind the step loop's records sums in SIMD-width order, and the native ISTA
    and FISTA loops take the gradient step in its affine form with sums per vector lane
    (csrc/cpu/solve_simd.h).  The λ search changed since (``MuSearch``), so a ``target_keep``
    case is solved at the λ its search found then; that its search with lam_gen 0 is the
    search without is checked on the side."""
    d = _fixture_cases()
    n = 0
    for name, c in d["cases"].items():
        kw = dict(c["kwargs"])
        if kw["backend"] not in GEN_BACKENDS:
            continue
        dt = kw["A"]
        kw["A"], kw["B"] = d["inputs"][dt]["A"], d["inputs"][dt]["B"]
        zeros = torch.zeros(3, dtype=kw["A"].dtype)
        if kw.pop("target_keep", None) is not None:
            searched = [tropfast.solve(**kw, target_keep=0.4, **extra) for extra in ({}, {"lam_gen": 0.0}, {"lam_gen": zeros})]
            for other in searched[1:]:
                for key in ("A_hat", "B_hat", "objective", "kept_fraction", "lam1", "lam2"):
                    assert torch.equal(getattr(other, key), getattr(searched[0], key)), (name, key)
            kw["lam1"], kw["lam2"] = c["lam1"], c["lam2"]
        first = None
        for extra in ({}, {"lam_gen": 0.0}, {"lam_gen": zeros}):
            sol = tropfast.solve(**kw, **extra)
            for key in ("A_hat", "B_hat", "objective", "kept_fraction", "lam1", "lam2"):
                got, want = getattr(sol, key), c[key]
                if key == "objective":  # F is float64 on every path since (the step loop's records widened)
                    want = want.to(torch.float64)
                tol = 1e-12 if kw["A"].dtype == torch.float64 else 1e-5  # the precision the solve ran in
                torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=f"{name} {extra} {key}")
                if first is not None:
                    assert torch.equal(got, getattr(first, key)), (name, extra, key)
            assert sol.lam_gen is None
            first = first or sol
            n += 1
    assert n >= 3 * 14, n  # every case of the torch backend at least


def _gen_problem(seed=0, L=3, r=8, d_in=24, d_out=18):
    A, B, _, _ = random_adapter(L, r, d_in, d_out, seed=seed, scale=1.0)
    # units of very different strengths, so that the penalty removes some and keeps others
    s = torch.linspace(0.2, 2.0, r, dtype=A.dtype)
    return A * s[:, None], B * s[None, :]


@pytest.mark.parametrize("backend", [b for b in GEN_BACKENDS if b != "triton"])  # triton: in the agreement test below
@pytest.mark.parametrize("path", ["dense", "sorted"])
def test_bcd_with_lam_gen_never_increases_F_and_zeroes_whole_units(backend, path):
    A, B = _gen_problem()
    lam = 0.05
    zero_units = []
    for lg in (0.0, 1.0, 4.0):
        kw = dict(method="bcd", steps=30, lam_gen=lg, backend=backend)
        if path == "dense":
            sol = tropfast.solve(A, B, lam, lam, record_every=1, **kw)
            obj = sol.objective
            # F never increases along the sweeps (to rounding)
            assert bool((obj.diff(dim=1) <= 1e-12 * obj[:, :1].abs()).all()), (lg, obj.diff(dim=1).max())
            assert bool((obj[:, -1] < obj[:, 0]).all())
        else:
            sol = tropfast.solve(A, B, lam, lam, path="sorted", **kw)
            assert sol.path == "sorted"
            assert bool((sol.objective[:, 1] <= sol.objective[:, 0]).all())
        Ah, Bh = sol.A_hat, sol.B_hat
        a_zero = (Ah == 0).all(-1)  # (L, r)
        b_zero = (Bh == 0).all(-2)
        # a unit whose row of Â is zero has its column of B̂ zero too: the whole unit is gone
        assert bool((b_zero | ~a_zero).all())
        # F reported is the materialised objective with the penalty
        ref = reference.objective_ref(A, B, Ah, Bh, lam, lam, lg)
        torch.testing.assert_close(sol.final_objective, ref, rtol=1e-11, atol=1e-11)
        zero_units.append(int(a_zero.sum()))
    assert zero_units[0] == 0 < zero_units[1] < zero_units[2] < A.shape[0] * A.shape[1], zero_units


def test_the_l21_identity_on_materialised_generators():
    """Σ_j ‖Ĝ1_j‖_{2,1} + ‖Ĝ2_j‖_{2,1} = Σ_i ‖Â_i‖₂ ‖B̂_{:,i}‖₁ (the penalty's closed form)."""
    A, B = _gen_problem(seed=4, L=2, r=4, d_in=6, d_out=5)
    want = (torch.linalg.vector_norm(A, dim=-1) * B.abs().sum(-2)).sum(-1)
    torch.testing.assert_close(reference.generator_l21_ref(A, B), want)
    assert float(want.min()) > 0


def _perturbed_min(f, x, n=200, seed=0, eps=(1e-3, 1e-6)):
    """max over random and coordinate perturbations δ of f(x) − f(x + δ): <= 0 at a minimiser."""
    g = torch.Generator().manual_seed(seed)
    f0 = f(x)
    worst = -float("inf")
    for e in eps:
        for _ in range(n):
            d = torch.randn(x.shape, generator=g, dtype=x.dtype) * e
            worst = max(worst, float(f0 - f(x + d)))
        for k in range(x.numel()):
            for sgn in (1, -1):
                d = torch.zeros_like(x).flatten()
                d[k] = sgn * e
                worst = max(worst, float(f0 - f(x + d.view_as(x))))
    return worst


def test_bcd_block_updates_with_lam_gen_are_exact_minimisers():
    """One BCD sweep with λ2 = 0 (no rescaling): Â minimises F(·, B) and then B̂ minimises
    F(Â, ·), F the materialised objective with the penalty (reference.objective_ref)."""
    A, B = _gen_problem(seed=2, L=1, r=4, d_in=6, d_out=5)
    A, B = A[0], B[0]
    l1, l2, lg = 0.1, 0.0, 0.6
    sol = tropfast.solve(A, B, l1, l2, method="bcd", steps=1, lam_gen=lg, backend="torch", path="dense")
    Ah, Bh = sol.A_hat, sol.B_hat
    assert bool((Ah == 0).any()) and bool((Ah != 0).any())
    fA = lambda X: reference.objective_ref(A, B, X, B, l1, l2, lg)  # noqa: E731
    fB = lambda Y: reference.objective_ref(A, B, Ah, Y, l1, l2, lg)  # noqa: E731
    assert _perturbed_min(fA, Ah) <= 1e-12
    assert _perturbed_min(fB, Bh) <= 1e-12


def test_ista_step_with_lam_gen_is_the_proximal_map_of_each_block():
    """One ISTA step: Â_new minimises ½‖X − (Â − η∇_Â)‖² + η(λ1‖X‖₁ + lam_gen Σ_i ‖B̂_{:,i}‖₁‖X_i‖₂),
    B̂_new minimises ½‖Y − (B̂ − η∇_B̂)‖² + η Σ_i (λ2 + lam_gen‖Â_i‖₂)‖Y_{:,i}‖₁, gradients by
    autograd on the materialised generators, (Â, B̂) the current point."""
    A, B = _gen_problem(seed=3, L=1, r=4, d_in=6, d_out=5)
    A, B = A[0], B[0]
    l1, l2, lg, eta = 0.05, 0.04, 0.8, 0.05
    g = torch.Generator().manual_seed(9)
    Ah0 = A * (1 + 0.3 * torch.rand(A.shape, generator=g, dtype=A.dtype))
    Bh0 = B * (1 + 0.3 * torch.rand(B.shape, generator=g, dtype=B.dtype))
    _, gA, gB = reference.hsd_grad_ref(A, B, Ah0, Bh0)
    lg_t = torch.tensor([lg], dtype=A.dtype)
    nA, nB = closed_form.prox_step_gen(A[None], B[None], Ah0[None], Bh0[None], eta, l1, l2, lg_t)
    nA, nB = nA[0], nB[0]
    VA, VB = Ah0 - eta * gA, Bh0 - eta * gB
    wB = Bh0.abs().sum(0)  # ‖B̂_{:,i}‖₁ at the current point
    wA = torch.linalg.vector_norm(Ah0, dim=1)
    def fA(X):
        group = (wB * torch.linalg.vector_norm(X, dim=1)).sum()
        return 0.5 * ((X - VA) ** 2).sum() + eta * (l1 * X.abs().sum() + lg * group)

    def fB(Y):
        return 0.5 * ((Y - VB) ** 2).sum() + eta * ((l2 + lg * wA)[None, :] * Y.abs()).sum()

    assert _perturbed_min(fA, nA) <= 1e-13 and _perturbed_min(fB, nB) <= 1e-13
    # and tropfast.solve's first ISTA step from (A, B) is this map at (A, B)
    sol = tropfast.solve(A, B, l1, l2, method="ista", steps=1, lr=eta, lam_gen=lg, backend="torch", path="dense")
    want = closed_form.prox_step_gen(A[None], B[None], A[None], B[None], eta, l1, l2, lg_t)
    torch.testing.assert_close(sol.A_hat, want[0][0], rtol=0, atol=0)
    torch.testing.assert_close(sol.B_hat, want[1][0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", GEN_BACKENDS)
@pytest.mark.parametrize("method", ops.METHODS)
def test_lam_gen_every_method_backend_and_path_agree(backend, method):
    A, B = _gen_problem(seed=5)
    lam_gen = torch.tensor([0.0, 0.8, 2.0], dtype=A.dtype)  # per adapter, one without the penalty
    lr = 0.5 * tropfast.safe_lr(A, B)
    want = tropfast.solve(A, B, 0.03, 0.04, method=method, steps=25, lr=None if method == "bcd" else lr,
                          lam_gen=lam_gen, backend="torch", path="dense")
    paths = ["dense"] if method == "fista" else ["dense", "sorted"]
    for path in paths:
        got = tropfast.solve(A, B, 0.03, 0.04, method=method, steps=25, lr=None if method == "bcd" else lr,
                             lam_gen=lam_gen, backend=backend, path=path)
        torch.testing.assert_close(got.A_hat, want.A_hat, rtol=1e-10, atol=1e-12, msg=f"{backend} {path}")
        torch.testing.assert_close(got.B_hat, want.B_hat, rtol=1e-10, atol=1e-12, msg=f"{backend} {path}")
        torch.testing.assert_close(got.objective, want.objective, rtol=1e-10, atol=1e-10)
    # the adapter without the penalty is exactly the solve without it
    plain = tropfast.solve(A[:1], B[:1], 0.03, 0.04, method=method, steps=25, lr=None if method == "bcd" else lr[:1],
                           backend="torch", path="dense")
    torch.testing.assert_close(want.A_hat[:1], plain.A_hat, rtol=0, atol=0)
    # the step loop (tol / record_every) runs the same iteration with the backend's gradients
    loop = tropfast.solve(A, B, 0.03, 0.04, method=method, steps=25, lr=None if method == "bcd" else lr,
                          lam_gen=lam_gen, backend=backend, record_every=5)
    torch.testing.assert_close(loop.A_hat, want.A_hat, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loop.objective[:, -1], want.objective[:, -1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", GEN_BACKENDS)
def test_lam_gen_ista_on_the_sorted_path_where_units_die(backend):
    """ISTA: the group prox empties rows of Â (the unit's zero region is then offered as a new
    piece at every later step); fp32 and fp64; the sorted path equals the dense loop."""
    A, B = _gen_problem(seed=7, L=2, r=10, d_in=40, d_out=30)
    dead = []
    # the Triton interpreter is slow: fp64 only there
    dtypes = ((torch.float64, 1e-10),) if backend == "triton" else ((torch.float64, 1e-10), (torch.float32, 2e-4))
    for dt, tol in dtypes:
        for lg in (3.0, 50.0, 200.0):
            kw = dict(method="ista", steps=60, lam_gen=lg)
            d = tropfast.solve(A.to(dt), B.to(dt), 0.01, 0.01, path="dense", backend="torch", **kw)
            s = tropfast.solve(A.to(dt), B.to(dt), 0.01, 0.01, path="sorted", backend=backend, **kw)
            torch.testing.assert_close(s.A_hat, d.A_hat, rtol=tol, atol=tol)
            torch.testing.assert_close(s.B_hat, d.B_hat, rtol=tol, atol=tol)
            dead.append(int((s.A_hat == 0).all(-1).sum()))
    # none at the smallest weight, some, then more (2 adapters x 10 units)
    assert dead[0] == 0 < dead[1] < dead[2] < 20, dead


def test_lam_gen_target_keep_scales_all_three_and_validation():
    A, B = _gen_problem(seed=8)
    sol = tropfast.solve(A, B, 0.02, 0.03, method="bcd", steps=20, lam_gen=0.5, target_keep=0.4)
    mu = sol.lam1 / 0.02
    torch.testing.assert_close(sol.lam2, 0.03 * mu)
    torch.testing.assert_close(sol.lam_gen, 0.5 * mu)
    assert bool(((sol.kept_fraction - 0.4).abs() < 0.05).all())
    # only the penalty: the search scales it alone
    only = tropfast.solve(A, B, 0.0, 0.0, method="bcd", steps=20, lam_gen=0.5, target_keep=0.5)
    assert bool((only.lam_gen > 0).all()) and bool((only.lam1 == 0).all())
    bads = ((-1.0, ValueError, "lam_gen must be >= 0"), (float("nan"), ValueError, "lam_gen must be finite"),
            (torch.ones(2), ValueError, "lam_gen must be a scalar or have one value per adapter"),
            ("1", TypeError, "lam_gen must be a number or a tensor"))
    for bad, exc, msg in bads:
        with pytest.raises(exc, match=msg):
            tropfast.solve(A, B, 0.1, 0.1, lam_gen=bad)


# --- the whole-solve path: stats, path choice, passes over the weights -----------------------
@pytest.mark.parametrize("method", ["ista", "fista", "bcd"])
def test_whole_solve_records_match_the_step_loop(method):
    A, B = _adapter(L=3, r=5, d_in=20, d_out=16)
    lr = None if method == "bcd" else 0.02
    whole = tropfast.solve(A, B, 0.05, 0.08, method=method, steps=25, lr=lr, path="dense")
    loop = tropfast.solve(A, B, 0.05, 0.08, method=method, steps=25, lr=lr, fused=False, record_every=25)
    assert whole.record_steps == loop.record_steps == [0, 25]
    torch.testing.assert_close(whole.objective, loop.objective, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(whole.kept_fraction, loop.kept_fraction)
    torch.testing.assert_close(whole.A_hat, loop.A_hat, rtol=1e-10, atol=1e-12)
    assert whole.path == "dense" and whole.steps.tolist() == [25] * 3 and not bool(whole.converged.any())


def test_prefers_sorted_cost_model():
    # dense costs T sweeps (BCD on the native CPU loop: at most DENSE_EXIT, it stops once units
    # cycle); sorted a fixed SORT_COST plus a per-step fraction of a sweep
    assert not solver.prefers_sorted("cpu", "bcd", 1, 768, 768)
    # measured: the native dense BCD loop's early exit beats the sort at every T
    assert not any(solver.prefers_sorted("cpu", "bcd", T, 768, 768) for T in (10, 32, 100, 1000, 10**6))
    assert not solver.prefers_sorted("cpu", "fista", 1000, 768, 768)  # no sorted form
    T = next(t for t in range(1, 10_000) if solver.prefers_sorted("cpu", "ista", t, 768, 768))
    # the crossover sits past the sort cost: between the measured 100 (dense faster) and 300 (sorted faster)
    assert solver.SORT_COST["cpu"]["ista"] < T <= 300 and 100 <= T
    # backends whose dense BCD runs every sweep: sorted from a crossover on
    Tb = next(t for t in range(1, 10_000) if solver.prefers_sorted("cuda", "bcd", t, 768, 768))
    assert 30 <= Tb <= 100  # the CPU's sort cost: dense faster at T = 30, sorted at T = 100
    assert solver.prefers_sorted("torch", "bcd", 1000, 768, 768)
    assert not solver.prefers_sorted("torch", "ista", 50, 8, 8)  # tiny units: a step is as cheap as a search


@pytest.mark.parametrize("method", ["bcd", "ista"])
def test_auto_path_runs_the_cheaper_path_with_the_same_answer(method):
    A, B = _adapter(L=2, r=4, d_in=256, d_out=192)  # wide enough for ISTA's crossover to sit below 600 steps
    short = tropfast.solve(A, B, 0.05, 0.05, method=method, steps=2)
    long = tropfast.solve(A, B, 0.05, 0.05, method=method, steps=600)
    # the native CPU dense BCD loop stops once units cycle: dense at every T there
    long_path = "dense" if method == "bcd" and long.backend == "cpu" else "sorted"
    assert short.path == "dense" and long.path == long_path
    for T, sol in ((2, short), (600, long)):
        other = tropfast.solve(A, B, 0.05, 0.05, method=method, steps=T, path="sorted" if sol.path == "dense" else "dense")
        torch.testing.assert_close(sol.A_hat, other.A_hat, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sol.B_hat, other.B_hat, rtol=1e-9, atol=1e-12)
    assert tropfast.solve(A, B, 0.05, 0.05, method=method, steps=600, tol=1e-9).path == "dense"  # the step loop


class _CountBigOps:
    """Names of the ops run on tensors of ``big`` sizes (views and copies left out), in order."""

    FREE = {"detach", "view", "alias", "unsqueeze", "expand", "_to_copy", "to", "slice", "select", "as_strided", "t"}

    def __init__(self, big):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self
        self.ops = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name not in outer.FREE and any(isinstance(a, torch.Tensor) and a.numel() in big for a in args):
                    outer.ops.append(name)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def test_validation_reads_the_weights_once():
    # Around the kernel, solve makes at most one pass over each of A and B: their unit norms
    # (the safe step and the NaN/Inf check) when it computes the safe step; otherwise none,
    # as the check reads the kernel's start objective.  A long solve sums each first instead,
    # so that a bad input fails before the work.
    A, B = _adapter(L=4, r=6, d_in=50, d_out=40)
    big = {A.numel(), B.numel()}
    norms = ["linalg_vector_norm", "linalg_vector_norm", "solve_fused"]
    for method, lr, want in (("ista", None, norms), ("fista", None, norms), ("bcd", None, ["solve_fused"]), ("ista", 0.01, ["solve_fused"])):
        with _CountBigOps(big) as c:
            tropfast.solve(A, B, 0.05, 0.05, method=method, steps=5, lr=lr, path="dense")
        assert sorted(c.ops) == want, (method, c.ops)


def test_a_long_solve_checks_the_weights_before_the_work(monkeypatch):
    A, B = _adapter(L=4, r=6, d_in=50, d_out=40)
    big = {A.numel(), B.numel()}
    monkeypatch.setattr(solver, "_LONG_SOLVE", 0)  # every solve is long
    monkeypatch.setattr(solver, "_interruptible", lambda fn: fn)  # on this thread, where the ops are counted
    monkeypatch.setattr(solver, "_PLANS", {})  # plans hold the callables they were made with
    for method, lr in (("bcd", None), ("ista", 0.01)):
        with _CountBigOps(big) as c:
            tropfast.solve(A, B, 0.05, 0.05, method=method, steps=5, lr=lr, path="dense")
        assert c.ops == ["sum", "sum", "solve_fused"], (method, c.ops)
        bad = B.clone()
        bad[2, 3, 1] = float("inf")
        with _CountBigOps(big) as c, pytest.raises(ValueError, match=r"^B contains non-finite values \(0 NaN, 1 Inf\)$"):
            tropfast.solve(A, bad, 0.05, 0.05, method=method, steps=5, lr=lr)
        assert "solve_fused" not in c.ops and "solve_sorted" not in c.ops, c.ops


# --- input checks found by fault injection (issue 10, defects 6, 7, 11) --------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_keep=0.1, search_iters=0), "search_iters must be a positive integer"),
        (dict(steps=2**63), r"steps must be a positive integer below 2\*\*63, got 9223372036854775808"),
        (dict(steps=-(2**70)), "steps must be a positive integer"),
        (dict(record_every=2**64), "record_every must be an integer >= 0 below 2"),
        (dict(target_keep=True), "target_keep must be in"),
        (dict(steps=True), "steps must be a positive integer"),
    ],
)
def test_out_of_range_and_bool_arguments(kwargs, match):
    A, B = _adapter()
    with pytest.raises(ValueError, match=match):
        tropfast.solve(A, B, **kwargs)


def test_numpy_and_tensor_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    A, B = _adapter()
    ref = tropfast.solve(A, B, 0.05, 0.05, steps=np.int64(5), target_keep=0.5, search_iters=3)
    for tk in (np.float32(0.5), torch.tensor(0.5)):
        sol = tropfast.solve(A, B, 0.05, 0.05, steps=5, target_keep=tk, search_iters=np.int32(3))
        assert torch.equal(sol.A_hat, ref.A_hat) and torch.equal(sol.lam1, ref.lam1)


def _native_cpu() -> bool:
    st = tropfast.backends.available()
    return "cpu" in st and st["cpu"].available


@pytest.mark.skipif(not _native_cpu(), reason="the native CPU backend is not built")
def test_native_solve_is_interruptible(monkeypatch):
    """Ctrl-C during one long native call raises KeyboardInterrupt at once, not when the call ends."""
    import os
    import signal
    import threading
    import time

    # Dense ISTA: its time grows with the steps (BCD stops once every unit cycles).  Every
    # solve counts as long here, whatever this machine's speed.
    monkeypatch.setattr(solver, "_LONG_SOLVE", 0)
    A, B = _adapter(L=4, r=16, d_in=256, d_out=256)

    def timed(steps):
        t0 = time.perf_counter()
        tropfast.solve(A, B, 1e-3, 1e-3, method="ista", steps=steps, lr=1e-3, backend="cpu", path="dense")
        return time.perf_counter() - t0

    per_step = timed(2200) / 2200  # with the call's fixed cost: it errs towards a shorter call
    steps = max(400, int(2.0 / per_step))  # about 2 s in one native call
    # a test run started in the background by a non-interactive shell inherits SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    try:
        t0 = time.perf_counter()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            tropfast.solve(A, B, 1e-3, 1e-3, method="ista", steps=steps, lr=1e-3, backend="cpu", path="dense")
        waited = time.perf_counter() - t0
    finally:
        timer.join()
        signal.signal(signal.SIGINT, previous)
        # the interrupted kernel runs to its end on its worker thread; let it finish here, so that
        # no native call is still running when the interpreter shuts down
        deadline = time.monotonic() + 60
        while solver.solving_in_background() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert waited < 1.0, f"the interrupt took {waited:.2f} s to arrive"
    assert not solver.solving_in_background()


@pytest.mark.skipif(not _native_cpu(), reason="the native CPU backend is not built")
@pytest.mark.parametrize("path", ["dense", "sorted"])
def test_native_whole_solves_run_off_the_main_thread(monkeypatch, path):
    """Both whole-solve kernels run on a worker thread when long, and give the iterates of one
    direct call; short ones run on the calling thread."""
    import dataclasses
    import threading

    from tropfast.backends import _registry

    seen = []

    def spy(fn):
        def call(*a):
            seen.append(threading.current_thread().name)
            return fn(*a)

        return call

    real = _registry._BACKENDS["cpu"]
    k = real.kernels._replace(solve_fused=spy(real.kernels.solve_fused), solve_sorted=spy(real.kernels.solve_sorted))
    monkeypatch.setitem(_registry._BACKENDS, "cpu", dataclasses.replace(real, kernels=k))
    monkeypatch.setattr(solver, "_PLANS", {})  # plans hold the kernels they were made with
    A, B = _adapter(L=3, r=8, d_in=40, d_out=30)
    tropfast.solve(A, B, 1e-3, 1e-3, method="bcd", steps=7, backend="cpu", path=path)
    assert seen == ["MainThread"]  # 3·8·70·max(sweeps, 16) unit entries x sweeps: far below solver._LONG_SOLVE
    seen.clear()
    monkeypatch.setattr(solver, "_LONG_SOLVE", 1)
    sol = tropfast.solve(A, B, 1e-3, 1e-3, method="bcd", steps=7, backend="cpu", path=path)
    assert seen == ["tropfast-solve"]
    lam = torch.full((3,), 1e-3, dtype=A.dtype)
    op = torch.ops.tropfast.solve_sorted if path == "sorted" else torch.ops.tropfast.solve_fused
    Ah, Bh, _ = op(A, B, lam, lam, torch.ones(3, dtype=A.dtype), "bcd", 7)
    assert torch.equal(sol.A_hat, Ah) and torch.equal(sol.B_hat, Bh)


def test_solution_summary_in_full():
    t = torch.tensor
    sol = solver.Solution(
        A_hat=None, B_hat=None, objective=t([[2.5, 1.25, 1.0], [10.0, 9.0, 8.125]]), record_steps=[0, 5, 9],
        kept_fraction=t([0.5, 0.25]), steps=t([9, 4]), converged=t([False, True]), lam1=t([0.001, 0.02]),
        lam2=t([0.003, 0.04]), lr=None, method="bcd", backend="torch", batched=True, path="sorted",
    )
    assert sol.summary() == "\n".join([
        "method=bcd path=sorted backend=torch adapters=2",
        "   #     F(start)       F(end)    kept  steps  conv      lam1      lam2",
        "   0          2.5            1   0.500      9    no     0.001     0.003",
        "   1           10        8.125   0.250      4   yes      0.02      0.04",
    ])


def test_prefers_sorted_at_the_edges(monkeypatch):
    """No sorted path for FISTA or for no steps; otherwise strictly cheaper than the dense loop."""
    assert solver.prefers_sorted("cpu", "fista", 10_000, 768, 768) is False
    assert solver.prefers_sorted("cpu", "bcd", 0, 768, 768) is False
    costs = {"cpu": {"bcd": 4.0, "ista": 4.0}, "torch": {"bcd": 40.0, "ista": 40.0}, "cheap": {"bcd": 0.5, "ista": 0.5}}
    monkeypatch.setattr(solver, "SORT_COST", costs)
    zero = {"bcd": 0.0, "ista": 0.0}
    monkeypatch.setattr(solver, "REC_COST", {"cpu": zero, "torch": zero, "cheap": zero})
    assert solver.prefers_sorted("cheap", "ista", 1, 8, 8) is True  # one step, if sorting costs half a sweep
    assert solver.sorted_sweeps("cpu", "bcd", 7, 8, 8) == 4.0
    assert solver.prefers_sorted("cpu", "bcd", 1, 8, 8) is False
    assert solver.prefers_sorted("cpu", "bcd", 4, 8, 8) is False  # equal cost: the dense loop
    assert solver.prefers_sorted("cpu", "bcd", 5, 8, 8) is True
    assert solver.prefers_sorted("torch", "bcd", 5, 8, 8) is False  # the backend's own costs
    # a dense loop that stops early costs at most its DENSE_EXIT sweeps, whatever T
    monkeypatch.setattr(solver, "DENSE_EXIT", {"cpu": {"bcd": 4.0}})
    assert solver.dense_sweeps("cpu", "bcd", 3) == 3.0 and solver.dense_sweeps("cpu", "bcd", 10**6) == 4.0
    assert solver.dense_sweeps("cpu", "ista", 10**6) == 10**6 and solver.dense_sweeps("cuda", "bcd", 9) == 9.0
    assert solver.prefers_sorted("cpu", "bcd", 10**6, 8, 8) is False  # sorting costs as much: dense
    monkeypatch.setattr(solver, "DENSE_EXIT", {"cpu": {"bcd": 4.5}})
    assert solver.prefers_sorted("cpu", "bcd", 10**6, 8, 8) is True
    assert solver.prefers_sorted("cpu", "bcd", 4, 8, 8) is False


@pytest.mark.parametrize("backend", [n for n, st in tropfast.backends.available().items() if st.available and n != "cuda"])
def test_non_finite_weights_are_refused_by_every_backend_and_path(backend):
    # one solve checks NaN/Inf from the kernel's start objective; the message counts them
    # exactly, names the input, and an overflow of finite entries is not taken for one
    A, B = _adapter(L=3, r=4, d_in=12, d_out=10)
    cases = []
    for bad in (float("nan"), float("inf"), -float("inf")):
        for name in ("A", "B"):
            Ab, Bb = A.clone(), B.clone()
            X = Ab if name == "A" else Bb
            X[1, 2, 3] = bad
            X[2, 0, 0] = bad
            n_nan, n_inf = (2, 0) if math.isnan(bad) else (0, 2)
            first = f"^{name}\\[1\\] contains non-finite values \\({n_nan // 2} NaN, {n_inf // 2} Inf\\)$"
            cases.append((Ab, Bb, f"^{name} contains non-finite values \\({n_nan} NaN, {n_inf} Inf\\)$", first))
    for Ab, Bb, match, first in cases:
        for method, lr, path in (("bcd", None, "dense"), ("bcd", None, "sorted"), ("ista", 0.01, "dense"), ("ista", 0.01, "sorted"), ("ista", None, "dense")):
            for lam in (0.05, 0.0):
                with pytest.raises(ValueError, match=match):
                    tropfast.solve(Ab, Bb, lam, lam, method=method, steps=4, lr=lr, path=path, backend=backend)
        with pytest.raises(ValueError, match=first):  # a list: the first adapter with one, counted alone
            tropfast.solve(list(Ab), list(Bb), 0.05, 0.05, method="bcd", steps=4, backend=backend)
    # finite weights whose sum overflows float32: F at the start is Inf, and nothing is refused
    big = A.float().clone()
    big[:, 0, :] = 3e38
    sol = tropfast.solve(big, B.float(), 0.05, 0.05, method="bcd", steps=2, backend=backend)
    assert math.isinf(float(sol.objective[0, 0]))


# --- the Solution's fields: devices, dtypes, defaults, progress, argument rules ----------------
def _solution_tensors(sol):
    out = [sol.objective, sol.kept_fraction, sol.steps, sol.converged, sol.lam1, sol.lam2]
    out += [t for t in (sol.lr, sol.lam_gen) if t is not None]
    for X in (sol.A_hat, sol.B_hat):
        out += list(X) if isinstance(X, list) else [X]
    return out


def _same_solution(a, b):
    """Every field of two results equal: tensors (and lists of them) bit for bit, on the same
    device and in the same dtype."""
    for f in dataclasses.fields(solver.Solution):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            assert isinstance(y, list) and len(x) == len(y), f.name
        else:
            x, y = [x], [y]
        for u, v in zip(x, y):
            if isinstance(u, torch.Tensor):
                assert isinstance(v, torch.Tensor) and u.device == v.device and u.dtype == v.dtype, f.name
                assert torch.equal(u, v), f.name
            else:
                assert u == v, f.name


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="ista", steps=20),
        dict(method="bcd", steps=30, tol=1e-6),
        dict(method="fista", steps=20, record_every=5),
        dict(method="bcd", steps=20, path="sorted"),
        dict(method="bcd", steps=20, target_keep=0.5),
        dict(method="ista", steps=20, target_keep=0.5, tol=1e-5),
        dict(method="bcd", steps=20, target_keep=0.4, path="sorted", lam_gen=0.01),
        dict(method="ista", steps=10, lr=torch.tensor([0.05, 0.1, 0.2]), lam_gen=torch.tensor([0.0, 0.01, 0.02])),
        dict(method="ista", steps=10, lr=0.05),
    ],
)
@pytest.mark.parametrize("layout", ["batch", "list"])
def test_solve_ignores_the_default_device(kw, layout):
    """Every tensor solve makes lives on the weights' device: a default device set by the
    caller (torch.set_default_device, ``with torch.device(...)``) changes nothing."""
    A, B = _adapter(L=3, r=4, d_in=8, d_out=6)
    if layout == "list":  # mixed shapes: the per-adapter weight counts are a tensor
        A, B = [A[0], A[1][:3, :5], A[2][:2]], [B[0], B[1][:4, :3], B[2][:, :2]]
    ref = tropfast.solve(A, B, 0.05, 0.05, **kw)
    with torch.device("meta"):
        got = tropfast.solve(A, B, 0.05, 0.05, **kw)
    _same_solution(got, ref)
    assert all(t.device.type == "cpu" for t in _solution_tensors(got))


@pytest.mark.parametrize("kw", [dict(method="ista", steps=5), dict(method="bcd", steps=5, tol=1e-9), dict(method="ista", steps=6, record_every=2)])
def test_solution_dtypes(kw):
    """lam1, lam2, lr and lam_gen in the compute dtype whatever the type of the numbers given
    (int, NumPy, a float32 tensor); F and the kept fractions float64; steps int64; converged bool."""
    np = pytest.importorskip("numpy")
    A, B = _adapter(L=2)
    ref = tropfast.solve(A, B, 1.0, 0.25, lam_gen=0.5, **kw)
    extra = {} if kw["method"] == "bcd" else {"lr": np.float32(ref.lr[0].item())}
    sols = [
        tropfast.solve(A, B, 1, np.float32(0.25), lam_gen=np.float64(0.5), **kw),
        tropfast.solve(A, B, torch.tensor([1.0, 1.0]), torch.tensor(0.25, dtype=torch.float32), lam_gen=torch.tensor([0.5, 0.5]), **kw),
        tropfast.solve(A, B, 1.0, 0.25, lam_gen=0.5, **kw, **extra),
    ]
    for sol in sols + [ref]:
        assert sol.lam1.tolist() == [1.0, 1.0] and sol.lam2.tolist() == [0.25, 0.25] and sol.lam_gen.tolist() == [0.5, 0.5]
        assert sol.lam1.dtype == sol.lam2.dtype == sol.lam_gen.dtype == sol.objective.dtype == torch.float64
        assert sol.steps.dtype == torch.int64 and sol.converged.dtype == torch.bool
        assert sol.kept_fraction.dtype == torch.float64
        if sol.lr is not None:
            assert sol.lr.dtype == torch.float64
        assert torch.equal(sol.A_hat, ref.A_hat) or extra  # the float32 lr is rounded
    h = tropfast.solve(A.half(), B.half(), 1, np.float64(0.25), **kw)  # fp16 weights are solved in fp32
    assert h.lam1.dtype == torch.float32 and h.objective.dtype == torch.float64 and h.A_hat.dtype == torch.float16


def test_solve_defaults():
    A, B = _adapter(L=2)
    sol = tropfast.solve(A, B)
    ref = tropfast.solve(A, B, 1e-3, 1e-3, method="ista", steps=100, lr=solver.safe_lr(A, B))
    assert sol.lam1.tolist() == [1e-3, 1e-3] and sol.lam2.tolist() == [1e-3, 1e-3] and sol.lam_gen is None
    assert sol.steps.tolist() == [100, 100] and sol.method == "ista" and sol.record_steps == [0, 100] and sol.search == []
    torch.testing.assert_close(sol.A_hat, ref.A_hat, rtol=0, atol=0)
    # search_iters: at most 24 solves by default; 0 is allowed without a target
    far = tropfast.solve(A, B, 1e-3, 1e-3, method="bcd", steps=3, target_keep=0.37, search_tol=0.0)
    assert len(far.search) == 24
    assert tropfast.solve(A, B, method="bcd", steps=3, search_iters=0).search == []
    with pytest.raises(ValueError, match="^search_iters must be a positive integer, got 0$"):
        tropfast.solve(A, B, method="bcd", steps=3, search_iters=0, target_keep=0.5)


def test_solve_shows_no_progress_unless_asked(capsys):
    A, B = _adapter(L=2)
    tropfast.solve(A, B, 0.05, 0.05, method="bcd", steps=20, tol=1e-9, target_keep=0.5)
    tropfast.solve(A, B, 0.05, 0.05, method="bcd", steps=30, tol=1e-9)  # the step loop alone
    tropfast.solve(A, B, 0.05, 0.05, method="ista", steps=30, record_every=3)
    assert capsys.readouterr() == ("", "")


def test_step_loop_progress_bar(monkeypatch):
    """The step loop's bar: "tropfast <method>", counted in steps out of ``steps``, one update
    per step run (fewer when tol stops every adapter), cleared at the end."""
    import tqdm.auto

    bars = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            bars.append(self)
            self.kwargs, self.updates, self.closed = kwargs, [], False
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            self.updates.append(n)
            return super().update(n)

        def close(self):
            self.closed = True
            return super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    A, B = _adapter(L=2)
    sol = tropfast.solve(A, B, 0.05, 0.05, method="bcd", steps=500, tol=1e-3, progress=True)
    stopped = int(sol.steps.max())
    assert 1 < stopped < 500 and bool(sol.converged.all())
    assert [b.kwargs for b in bars] == [{"total": 500, "desc": "tropfast bcd", "unit": "step", "leave": False}]
    assert bars[0].updates == [1] * stopped and bars[0].closed
    tropfast.solve(A, B, 0.05, 0.05, method="ista", steps=7, record_every=3, progress=True)
    assert bars[1].kwargs["desc"] == "tropfast ista" and bars[1].updates == [1] * 7 and bars[1].closed


def test_step_loop_fields_by_hand():
    """tol: an adapter stops at the first step whose largest change, relative to its largest
    weight before the step, is <= tol; its weights and records freeze there."""
    A, B = _adapter(L=2)
    A = A * torch.tensor([0.5, 1.0], dtype=A.dtype).view(-1, 1, 1)  # the scale is per adapter
    full = tropfast.solve(A, B, 0.05, 0.05, method="ista", steps=60, lr=0.05, record_every=1)
    tol = 1e-3
    sol = tropfast.solve(A, B, 0.05, 0.05, method="ista", steps=60, lr=0.05, tol=tol)
    Ah, Bh = A.clone(), B.clone()
    want_steps = []
    for k in range(2):
        a, b = A[k].clone(), B[k].clone()
        n = 0
        while n < 60:
            na, nb = tropfast.prox_step(A[k], B[k], a, b, 0.05, 0.05, 0.05)
            scale = max(a.abs().max(), b.abs().max())
            change = max((na - a).abs().max(), (nb - b).abs().max()) / scale
            a, b, n = na, nb, n + 1
            if change <= tol:
                break
        want_steps.append(n)
        Ah[k], Bh[k] = a, b
    assert sol.steps.tolist() == want_steps == [18, 6] and sol.converged.tolist() == [True, True]
    torch.testing.assert_close(sol.A_hat, Ah, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sol.B_hat, Bh, rtol=1e-12, atol=1e-14)
    last = max(want_steps)
    assert sol.record_steps[-1] == last
    for k in range(2):  # F frozen at the adapter's own stop
        torch.testing.assert_close(sol.objective[k, -1], full.objective[k, want_steps[k]])
    # record_every=0 with tol: only the start and the end are recorded
    zero = tropfast.solve(A, B, 0.05, 0.05, method="ista", steps=60, lr=0.05, tol=tol, record_every=0)
    assert zero.record_steps == [0, last] and torch.equal(zero.A_hat, sol.A_hat)
    # without tol nothing converges: converged is False everywhere
    assert full.converged.tolist() == [False, False] and full.steps.tolist() == [60, 60]
    assert full.record_steps == list(range(61))
    # tol=0 stops an adapter once a step changes nothing.  Whether BCD lands exactly on a
    # fixed point of nonzero weights depends on the last bits of the machine's arithmetic;
    # the first adapter's λ zero it outright (a fixed point on any machine), the others'
    # keep changing in the last bits
    A3, B3 = _adapter(L=3, seed=1)
    lam = torch.tensor([50.0, 0.05, 0.05], dtype=A3.dtype)
    fixed = tropfast.solve(A3, B3, lam, lam, method="bcd", steps=500, tol=0.0)
    assert fixed.steps.tolist()[0] < 500 and fixed.converged.tolist() == [True, False, False]
    assert not bool(fixed.A_hat[0].any())
    again = tropfast.solve(A3[:1], B3[:1], lam[:1], lam[:1], method="bcd", steps=500, fused=False)  # the same loop, to the end
    assert torch.equal(fixed.A_hat[0], again.A_hat[0]) and torch.equal(fixed.B_hat[0], again.B_hat[0])


def test_one_sided_lambdas_warn_naming_the_adapters():
    import re
    import warnings

    A, B = _adapter(L=4)
    lam1 = torch.tensor([0.1, 0.0, 0.0, 0.2], dtype=torch.float64)
    lam2 = torch.tensor([0.1, 0.2, 0.0, 0.0], dtype=torch.float64)
    msg = (
        "adapters {} have exactly one of lam1, lam2 equal to 0: F then has no minimiser (rescaling "
        "a unit lowers it forever) and the {} iterates drift; use both > 0, or method='bcd', which skips the rescaling"
    )
    for l1, l2, method, which in ((lam1, lam2, "fista", "[1, 3]"), (0.1, 0.0, "ista", "[0, 1, 2, 3]"), (0.0, 0.1, "ista", "[0, 1, 2, 3]")):
        with pytest.warns(RuntimeWarning, match="^" + re.escape(msg.format(which, method)) + "$") as rec:
            tropfast.solve(A, B, l1, l2, method=method, steps=2)
        assert len(rec) == 1 and rec[0].filename != solver.__file__  # points at the caller of solve, not inside it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tropfast.solve(A, B, 0.1, 0.1, method="ista", steps=2)
        tropfast.solve(A, B, torch.full((4,), 0.1, dtype=torch.float64), lam2 + 0.1, method="ista", steps=2)
        # a λ search needs something to scale in every adapter, not both λ of each
        tropfast.solve(A, B, lam1, lam2 + lam2.flip(0), method="bcd", steps=3, target_keep=0.5, search_iters=2)
        tropfast.solve(A, B, 0.0, 0.3, method="bcd", steps=3, target_keep=0.5, search_iters=2)
        tropfast.solve(A, B, lam1, lam2, method="bcd", steps=3, target_keep=0.5, search_iters=2, lam_gen=torch.tensor([0.0, 0.0, 0.1, 0.0]))
    refusal = "^" + re.escape("target_keep scales (lam1, lam2, lam_gen) to reach the kept fraction: give lam1 or lam2 > 0 (or lam_gen > 0)") + "$"
    for kw in (dict(lam1=lam1, lam2=lam2), dict(lam1=lam1, lam2=lam2, lam_gen=torch.tensor([0.0, 0.0, 0.0, 0.1])), dict(lam1=0.0, lam2=0.0)):
        with pytest.raises(ValueError, match=refusal):
            tropfast.solve(A, B, method="bcd", steps=3, target_keep=0.5, **kw)


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        (dict(method="adam"), ValueError, "method='adam' is not a solver; choose one of ista, fista, bcd"),
        (dict(tol=True), ValueError, "tol must be a finite number >= 0 or None, got True"),
        (dict(tol="0.1"), ValueError, "tol must be a finite number >= 0 or None, got '0.1'"),
        (dict(tol=float("inf")), ValueError, "tol must be a finite number >= 0 or None, got inf"),
        (dict(method="fista", path="sorted"), ValueError, "fista has no sorted form (its extrapolation mixes two thresholds): use path='dense'"),
        (dict(path="sorted", tol=1e-6), ValueError, "path='sorted' runs exactly `steps` iterations in one call: leave tol, record_every and fused unset"),
        (dict(method="bcd", lr=0.1), ValueError, "bcd takes no step size: leave lr=None"),
        (dict(fused=True, tol=1e-6), ValueError, "fused=True runs exactly `steps` iterations: it cannot stop early on tol"),
        (dict(lam2=-0.5), ValueError, "lam2 must be >= 0, got -0.5"),
        (dict(lr=-0.5), ValueError, "lr must be > 0, got -0.5"),
        (dict(lam_gen=False), TypeError, "lam_gen must be a number or a tensor, got bool"),
        (dict(search_tol=1.0, target_keep=0.5), ValueError, "search_tol must be in [0, 1), got 1.0"),
        (dict(search_tol=1.5, target_keep=0.5), ValueError, "search_tol must be in [0, 1), got 1.5"),
    ],
)
def test_solver_argument_messages_in_full(kwargs, exc, message):
    import re

    A, B = _adapter()
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        tropfast.solve(A, B, **kwargs)


def test_integer_arguments_at_their_bounds():
    np = pytest.importorskip("numpy")
    A, B = _adapter()
    one = tropfast.solve(A, B, 0.05, 0.05, method="bcd", steps=np.int64(1))
    assert one.steps.tolist() == [1, 1]
    big = tropfast.solve(A, B, 0.05, 0.05, method="bcd", steps=3, record_every=np.int64(2**63 - 1))
    assert big.record_steps == [0, 3]
    assert tropfast.solve(A, B, 0.05, 0.05, method="bcd", steps=3, tol=0.0).steps.tolist() == [3, 3]  # tol=0 is allowed


def test_list_layout_fields():
    import re

    A, B = _adapter(L=2)
    with pytest.raises(TypeError, match="^" + re.escape("A and B must both be tensors or both be lists of tensors") + "$"):
        tropfast.solve(A[0], [B[0]])
    with pytest.raises(ValueError, match="^the list of adapters is empty$"):
        tropfast.solve([], [])
    with pytest.raises(ValueError, match=r"^list entries must be single adapters; A\[1\] has shape \(2, 6, 20\)$"):
        tropfast.solve([A[0], A], [B[0], B])
    with pytest.raises(TypeError, match=r"^A\[1\] is torch.float32 on cpu; every adapter must share A\[0\]'s dtype and device$"):
        tropfast.solve([A[0], A[1].float()], [B[0], B[1].float()])
    # half-precision entries come back in half precision, each in its own shape
    sol = tropfast.solve([A[0].half(), A[1][:3].half()], [B[0].half(), B[1][:, :3].half()], 0.05, 0.05, method="bcd", steps=4)
    assert [a.dtype for a in sol.A_hat + sol.B_hat] == [torch.float16] * 4
    assert [tuple(a.shape) for a in sol.A_hat] == [(6, 20), (3, 20)]


def test_weights_that_require_grad_are_not_differentiated_through():
    A, B = _adapter(L=2)
    ref = tropfast.solve(A, B, 0.05, 0.05, method="bcd", steps=5)
    for a, b in ((A.clone().requires_grad_(), B), (A, B.clone().requires_grad_()), (A.clone().requires_grad_(), B.clone().requires_grad_())):
        sol = tropfast.solve(a, b, 0.05, 0.05, method="bcd", steps=5)
        assert not sol.A_hat.requires_grad and not sol.B_hat.requires_grad and not sol.objective.requires_grad
        assert torch.equal(sol.A_hat, ref.A_hat)


def test_mu_search_tensors_live_on_its_device():
    s = solver.MuSearch(3, 0.5, 0.01, torch.float32, None)
    assert s.mu().device.type == "cpu" and s.mu().dtype == torch.float32 and s.probes.dtype == torch.int64
    with torch.device("meta"):
        assert solver.MuSearch(3, 0.5, 0.01, torch.float64, None).best_mu.device.type == "cpu"
    m = solver.MuSearch(3, 0.5, torch.tensor([0.01, 0.02, 0.03]), torch.float64, "meta")
    assert m.mu().device.type == m.done().device.type == m.best_mu.device.type == "meta"
    assert m.tol.dtype.name == "float64" and m.tol.tolist() == pytest.approx([0.01, 0.02, 0.03], rel=1e-7)


def test_list_entries_are_read_once_into_the_padded_batch():
    """A list's entries are copied into the padded batch and not read again (their NaN/Inf
    check reads the kernel's sums, as for a batch); the kept fractions are each adapter's
    nonzeros over its own weights, in float64."""
    A, B = _adapter(L=2, r=6, d_in=20, d_out=14)
    As, Bs = [A[0][:5, :17], A[1]], [B[0][:11, :5], B[1]]
    sizes = {a.numel() for a in As} | {b.numel() for b in Bs}
    with _CountBigOps(sizes) as c:
        sol = tropfast.solve(As, Bs, 0.05, 0.05, method="bcd", steps=5, path="dense")
    # new_zeros takes an entry as its prototype, the copies read each entry once, and the
    # clones are the unpadded results (of the same sizes): no sum or isfinite pass
    assert c.ops == ["new_zeros"] * 2 + ["copy_"] * 4 + ["clone"] * 4, c.ops
    want = [(int((a != 0).sum()) + int((b != 0).sum())) / (a.numel() + b.numel()) for a, b in zip(sol.A_hat, sol.B_hat)]
    assert sol.kept_fraction.dtype == torch.float64 and sol.kept_fraction.tolist() == want


def test_step_loop_probes_only_the_adapters_still_searching(monkeypatch):
    """With tol the λ search runs the step loop, and it too probes only the adapters not yet
    within tolerance."""
    A, B = _adapter(L=3, r=8, d_in=48, d_out=40, scale=1.0)
    lam = torch.tensor([0.02, 0.5, 0.001], dtype=A.dtype)
    sizes = _spy_batch_sizes(monkeypatch, "_run_steps_eager")
    sol = tropfast.solve(A, B, lam, lam, method="ista", steps=40, tol=1e-9, target_keep=0.35, search_tol=0.01)
    assert sizes[0] == 3 and sizes[-1] < 3 and sizes == sorted(sizes, reverse=True), sizes
    assert sizes == [3 if t["adapters"] is None else len(t["adapters"]) for t in sol.search]


def test_step_loop_checks_the_weights_before_the_work(monkeypatch):
    A, B = _adapter(L=2)
    bad = B.clone()
    bad[1, 2, 3] = float("nan")

    def never(*args):
        raise AssertionError("the step loop ran on weights with a NaN")

    monkeypatch.setattr(solver, "_run_steps", never)
    monkeypatch.setattr(solver, "_run_steps_eager", never)
    for method, kw in (("bcd", dict(tol=1e-6)), ("bcd", dict(record_every=1)), ("ista", dict(lr=0.01, fused=False))):
        with pytest.raises(ValueError, match=r"^B contains non-finite values \(1 NaN, 0 Inf\)$"):
            tropfast.solve(A, bad, 0.05, 0.05, method=method, steps=5, **kw)


def test_step_loop_records_about_a_hundred_times_by_default():
    A, B = _adapter(L=1, r=3, d_in=6, d_out=5)
    for steps, every in ((50, 1), (200, 2), (250, 2)):
        sol = tropfast.solve(A, B, 0.05, 0.05, method="bcd", steps=steps, fused=False)
        assert sol.record_steps == list(range(0, steps + 1, every)), steps
        assert sol.batched is True and sol.objective.shape == (1, steps // every + 1)
    assert tropfast.solve(A[0], B[0], 0.05, 0.05, method="bcd", steps=3).batched is False


@pytest.mark.parametrize("path", ["dense", "sorted"])
def test_a_long_solve_is_one_of_at_least_the_threshold(monkeypatch, path):
    """A whole solve is 'long' (checked before the work, run on a worker thread) when its unit
    entries times its sweeps (at least 16; the sorted path's as counted by its cost model)
    reach _LONG_SOLVE, exactly."""
    A, B = _adapter(L=3, r=6, d_in=50, d_out=40)
    big = {A.numel(), B.numel()}
    L, r, d_in = A.shape
    d_out = B.shape[1]
    monkeypatch.setattr(solver, "_interruptible", lambda fn: fn)  # on this thread, where the ops are counted
    monkeypatch.setattr(solver, "_PLANS", {})  # plans hold the callables they were made with
    for steps in (5, 40):
        be = tropfast.backends.get(None, A.device, A.dtype)
        sweeps = solver.sorted_sweeps(be.name, "bcd", steps, d_in, d_out) if path == "sorted" else steps
        size = L * r * (d_in + d_out) * max(sweeps, 16)
        kernel = "solve_sorted" if path == "sorted" else "solve_fused"
        for threshold, checked in ((size, True), (size + 1, False)):
            monkeypatch.setattr(solver, "_LONG_SOLVE", threshold)
            with _CountBigOps(big) as c:
                tropfast.solve(A, B, 0.05, 0.05, method="bcd", steps=steps, path=path)
            pre = ["sum", "sum"] if checked else []
            assert [op for op in c.ops if op in ("sum", kernel)] == pre + [kernel], (steps, threshold, c.ops)


def test_bcd_step_size_is_one_cached_tensor_per_device_and_dtype(monkeypatch):
    """BCD's kernels take a step size they never read: a 0-d 1 made once per device and dtype
    for live tensors, and never cached for tensors without values (meta, fake), which a later
    call on real weights must not receive."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(solver, "_ONES", {})
    A, B = _adapter(L=2)
    with FakeTensorMode() as mode:
        fA, fB = mode.from_tensor(A), mode.from_tensor(B)
        assert tropfast.solve(fA, fB, 0.05, 0.05, method="bcd", steps=3).A_hat.shape == A.shape
    assert solver._ONES == {}  # nothing cached from the fake call
    sol = tropfast.solve(A, B, 0.05, 0.05, method="bcd", steps=3)
    assert torch.isfinite(sol.A_hat).all() and sol.A_hat.shape == A.shape
    x32, x64 = torch.zeros(3), torch.zeros(3, dtype=torch.float64)
    one = solver._unit_step(x32)
    assert one.shape == () and one.dtype == torch.float32 and one.device == x32.device and float(one) == 1.0
    assert solver._unit_step(x32) is one and solver._unit_step(x64) is not one
    assert solver._unit_step(x64).dtype == torch.float64 and solver._unit_step(x64) is solver._unit_step(x64)
    meta = solver._unit_step(torch.zeros(3, device="meta"))
    assert meta.device.type == "meta" and meta.shape == () and len(solver._ONES) == 2


@pytest.mark.parametrize("lam_gen", [0.0, 0.01])
def test_step_loop_search_of_each_adapter_is_its_search_alone(lam_gen):
    """With tol the probes run the step loop on the adapters still searching; each adapter's
    λ is the one its search finds alone (its stop on tol and its penalty included)."""
    A, B = _adapter(L=3, r=8, d_in=48, d_out=40, scale=1.0)
    lam = torch.tensor([0.02, 0.5, 0.001], dtype=A.dtype)
    kw = dict(method="ista", steps=150, tol=3e-3, target_keep=0.35, search_tol=0.01, lam_gen=lam_gen)
    sol = tropfast.solve(A, B, lam, lam, **kw)
    assert any(t["adapters"] is not None for t in sol.search)  # some probes solved a subset
    for k in range(3):
        alone = tropfast.solve(A[k : k + 1], B[k : k + 1], lam[k : k + 1], lam[k : k + 1], **kw)
        assert torch.equal(alone.lam1, sol.lam1[k : k + 1]) and torch.equal(alone.steps, sol.steps[k : k + 1]), k


def test_target_keep_one_is_allowed_and_float32_searches_in_float32():
    A, B = _adapter(L=2)
    assert tropfast.solve(A, B, 0.05, 0.05, method="bcd", steps=3, target_keep=1.0, search_iters=2).search
    sol = tropfast.solve(A.float(), B.float(), 0.05, 0.05, method="bcd", steps=5, target_keep=0.5, search_iters=3)
    assert sol.lam1.dtype == sol.lam2.dtype == torch.float32
    # λ search: an adapter may have λ2 = 0 where λ1 > 0 (something to scale)
    tropfast.solve(A, B, torch.tensor([0.1, 0.1]), torch.tensor([0.0, 0.1]), method="bcd", steps=3, target_keep=0.5, search_iters=2)


def test_half_weights_are_solved_in_fp32_and_rounded_once():
    A, B = _adapter(L=2)
    for dtype in (torch.float16, torch.bfloat16):
        Ah, Bh = A.to(dtype), B.to(dtype)
        for kw in (dict(method="bcd", steps=10), dict(method="ista", steps=10, lr=0.05), dict(method="ista", steps=10, lr=0.05, fused=False)):
            half = tropfast.solve(Ah, Bh, 0.05, 0.05, **kw)  # the step loop too keeps its iterates in fp32
            full = tropfast.solve(Ah.float(), Bh.float(), 0.05, 0.05, **kw)
            assert torch.equal(half.A_hat, full.A_hat.to(dtype)) and torch.equal(half.B_hat, full.B_hat.to(dtype))
            assert torch.equal(half.objective, full.objective) and half.lam1.dtype == torch.float32


def test_numbers_of_other_types_ignore_the_default_device():
    np = pytest.importorskip("numpy")
    A, B = _adapter(L=2)
    ref = tropfast.solve(A, B, 1, np.float32(0.5), method="ista", steps=5, lr=np.float64(0.05))
    with torch.device("meta"):
        got = tropfast.solve(A, B, 1, np.float32(0.5), method="ista", steps=5, lr=np.float64(0.05))
    _same_solution(got, ref)


def test_sorted_cost_model_by_hand():
    from math import log2

    for backend in ("cpu", "torch"):
        for method in ("bcd", "ista"):
            S, R = solver.SORT_COST[backend][method], solver.REC_COST[backend][method]
            assert solver.sorted_sweeps(backend, method, 100, 1, 1) == S + 100 * R * log2(2.0) / 2.0  # d at least 2
            assert solver.sorted_sweeps(backend, method, 100, 6, 6) == S + 100 * R * log2(6.0) / 6.0  # d = mean width
    assert solver.sorted_sweeps("cuda", "bcd", 50, 8, 4) == solver.sorted_sweeps("cpu", "bcd", 50, 8, 4)  # not measured yet


def test_mu_search_exact_halving_is_not_slow():
    """An interpolation that halves the bracket exactly is not slow: the next probe
    interpolates again (a third slow one in a row would bisect instead).  The second probe
    replaces the same end as the first, so the other end's gap counts half (Illinois)."""
    s = solver.MuSearch(1, 0.4, 0.0, torch.float64, None)
    s.lo[:], s.hi[:], s.k_lo[:], s.k_hi[:], s.log_mu[:] = 0.0, 1.0, 0.6, 0.2, 0.5
    z = lambda k: math.log(k / (1 - k))  # noqa: E731
    s.update(None, torch.tensor([0.45], dtype=torch.float64))  # bracket [0.5, 1]: exactly half of [0, 1]
    x = 0.5 + 0.5 * (z(0.45) - z(0.4)) / (z(0.45) - z(0.2))
    assert s.slow_run.tolist() == [0] and s.log_mu[0] == pytest.approx(x, abs=1e-12)
    s.update(None, torch.tensor([0.41], dtype=torch.float64))  # [x, 1]: not halved, the first slow one
    g_lo, g_hi = z(0.41) - z(0.4), 0.5 * (z(0.4) - z(0.2))
    assert s.slow_run.tolist() == [1] and s.log_mu[0] == pytest.approx(x + (1 - x) * max(g_lo / (g_lo + g_hi), 0.05), abs=1e-12)


# ---------------------------------------------------------------------------------------
# The plain call: planned once, its fields made from the kernel's stats (docs/design.md §3).
# ---------------------------------------------------------------------------------------
def _count_plans(monkeypatch) -> list:
    made = []
    real = solver._make_plan
    monkeypatch.setattr(solver, "_make_plan", lambda *a: made.append(a[3:7]) or real(*a))
    monkeypatch.setattr(solver, "_PLANS", {})
    return made


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize(
    "method, lr, path, single, dtype, grad",
    [
        ("bcd", None, "auto", False, torch.float64, False),
        ("bcd", None, "sorted", True, torch.float32, False),
        ("ista", None, "auto", False, torch.float32, True),
        ("ista", 0.05, "dense", False, torch.bfloat16, False),
        ("fista", None, "auto", True, torch.float64, False),
        ("ista", None, "sorted", False, torch.float64, False),
    ],
)
def test_a_plain_call_is_planned_once_and_equals_the_general_path(monkeypatch, backend, method, lr, path, single, dtype, grad):
    if not tropfast.backends.available()[backend].available:
        pytest.skip(f"{backend} not built")
    made = _count_plans(monkeypatch)
    A, B = _adapter(L=3, r=5, d_in=18, d_out=12)
    A, B = A.to(dtype), B.to(dtype)
    if single:
        A, B = A[1], B[1]
    A.requires_grad_(grad)
    B.requires_grad_(grad)
    kw = dict(method=method, steps=30, lr=lr, backend=backend, path=path)
    general = tropfast.solve(A, B, 0.02, 0.03, fused=True, **kw)  # fused=True: not a plain call
    assert made == []
    first = tropfast.solve(A, B, 0.02, 0.03, **kw)
    again = tropfast.solve(A.detach().clone().requires_grad_(grad), B.detach().clone().requires_grad_(grad), 0.02, 0.03, **kw)
    assert len(made) == 1 and len(solver._PLANS) == 1
    for sol in (first, again):
        assert "_stats" in sol.__dict__ and "kept_fraction" not in sol.__dict__  # made when read
        _same_solution(sol, general)
        assert sol.kept_fraction is sol.kept_fraction  # made once
        assert not sol.A_hat.requires_grad and sol.A_hat.dtype == dtype and sol.batched is not single
    # other λ, steps or shapes: the same plan, or a new one, never a wrong one
    other = tropfast.solve(A, B, 0.05, 0.01, **kw)
    _same_solution(other, tropfast.solve(A, B, 0.05, 0.01, fused=True, **kw))
    longer = tropfast.solve(A, B, 0.02, 0.03, **{**kw, "steps": 31})
    _same_solution(longer, tropfast.solve(A, B, 0.02, 0.03, fused=True, **{**kw, "steps": 31}))
    assert len(made) == 2


def test_a_plain_result_pickles_copies_and_replaces_like_any_other():
    import copy
    import pickle

    A, B = _adapter(L=2)
    sol = tropfast.solve(A, B, 0.02, 0.03, method="bcd", steps=20)
    general = tropfast.solve(A, B, 0.02, 0.03, method="bcd", steps=20, fused=True)
    assert "_stats" in sol.__dict__
    _same_solution(pickle.loads(pickle.dumps(sol)), general)  # fields not read yet travel as stats
    _same_solution(copy.deepcopy(sol), general)
    swapped = dataclasses.replace(sol, method="other")
    assert swapped.method == "other" and "_stats" not in swapped.__dict__
    torch.testing.assert_close(swapped.kept_fraction, general.kept_fraction, rtol=0, atol=0)
    assert "F(start)" in sol.summary() and "objective=tensor(" in repr(sol)
    with pytest.raises(AttributeError):
        _ = solver.Solution.objective  # a field without a default, as the dataclass sees it


@pytest.mark.parametrize("method", ["bcd", "ista"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("long", [False, True])
def test_a_planned_call_still_refuses_non_finite_weights(monkeypatch, method, bad, long):
    made = _count_plans(monkeypatch)
    if long:
        monkeypatch.setattr(solver, "_LONG_SOLVE", 0)  # the check before the kernel
    A, B = _adapter(L=3)
    tropfast.solve(A, B, 0.02, 0.03, method=method, steps=10)
    for which in ("A", "B"):
        A2, B2 = A.clone(), B.clone()
        (A2 if which == "A" else B2)[1, 2, 3] = bad
        with pytest.raises(ValueError, match=f"^{which} contains non-finite values"):
            tropfast.solve(A2, B2, 0.02, 0.03, method=method, steps=10)
    assert len(made) == 1  # the refused calls ran on the plan


def test_a_plan_follows_the_backend_request_the_cost_model_and_the_registry(monkeypatch):
    made = _count_plans(monkeypatch)
    A, B = _adapter(L=2)
    monkeypatch.setenv(tropfast.backends.ENV_VAR, "torch")
    assert tropfast.solve(A, B, 0.02, 0.03, method="bcd", steps=10).backend == "torch"
    monkeypatch.delenv(tropfast.backends.ENV_VAR)
    expected = tropfast.backends.resolve(None, A.device, A.dtype)
    assert tropfast.solve(A, B, 0.02, 0.03, method="bcd", steps=10).backend == expected
    assert len(made) == 2
    # the cost model's tables replaced: a new plan, which takes the new path
    assert tropfast.solve(A, B, 0.02, 0.03, method="bcd", steps=400).path == "dense"
    monkeypatch.setattr(solver, "DENSE_EXIT", {})
    monkeypatch.setattr(solver, "SORT_COST", {"cpu": {"bcd": 0.0, "ista": 0.0}, "torch": {"bcd": 0.0, "ista": 0.0}})
    assert tropfast.solve(A, B, 0.02, 0.03, method="bcd", steps=400).path == "sorted"
    n = len(made)
    tropfast.backends.clear_cache()
    tropfast.solve(A, B, 0.02, 0.03, method="bcd", steps=400)
    assert len(made) == n + 1


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda A, B: (A, B.to(torch.float32)), TypeError, r"^A is torch.float64 but B is torch.float32; use one dtype$"),
        (lambda A, B: (A, B[:, :, :-1]), ValueError, r"^bottleneck mismatch: A \(2, 6, 20\) has r=6 rows"),
        (lambda A, B: (A[0], B), ValueError, r"^B must have 2 dims to match A \(6, 20\)"),
    ],
)
def test_a_call_unlike_its_plan_meets_the_full_checks(monkeypatch, change, error, match):
    made = _count_plans(monkeypatch)
    A, B = _adapter(L=2)
    tropfast.solve(A, B, 0.02, 0.03, method="bcd", steps=10)
    with pytest.raises(error, match=match):
        tropfast.solve(*change(A, B), 0.02, 0.03, method="bcd", steps=10)
    assert len(made) == 1


@pytest.mark.parametrize(
    "kw",
    [
        dict(lam2=0.0),  # one-sided λ: warns
        dict(lam1=torch.tensor(0.02, dtype=torch.float64)),
        dict(lam_gen=0.01),
        dict(lr=torch.tensor(0.05)),
        dict(tol=1e-9),
        dict(record_every=5),
        dict(target_keep=0.5),
    ],
)
def test_calls_that_are_not_plain_are_never_planned(monkeypatch, kw):
    made = _count_plans(monkeypatch)
    A, B = _adapter(L=2)
    args = {**dict(lam1=0.02, lam2=0.03, method="ista", steps=10), **kw}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tropfast.solve(A, B, **args)
        tropfast.solve(A, B, **args)
    assert made == [] and solver._PLANS == {}
    if "lam2" in kw:
        assert sum("exactly one of lam1, lam2" in str(w.message) for w in seen) == 2  # every call warns


def test_parameters_are_plain_and_come_back_detached(monkeypatch):
    made = _count_plans(monkeypatch)
    A, B = _adapter(L=2)
    pA, pB = torch.nn.Parameter(A.clone()), torch.nn.Parameter(B.clone())
    for _ in range(2):
        sol = tropfast.solve(pA, pB, 0.02, 0.03, method="ista", steps=10)
        _same_solution(sol, tropfast.solve(A, B, 0.02, 0.03, method="ista", steps=10, fused=True))
        assert not sol.A_hat.requires_grad and type(sol.A_hat) is torch.Tensor
    assert len(made) == 1
