"""The solvers: ISTA is exactly Algorithm 1, FISTA/BCD reach the same optimum, batching is exact."""
import pytest
import torch
from tolerances import TORCH, random_adapter

import tropfast
from tropfast import reference, solver
from tropfast.backends.torch import closed_form, dense


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
    """Two search iterations try μ = 1, then μ = 100 (two decades up: both adapters keep more
    than the target at μ = 1).  Adapter 0 is closest to the target at μ = 1, adapter 1 at μ = 100;
    the kept fractions at each λ come from plain fixed-λ solves."""
    A, B = _adapter(L=1, r=8, d_in=48, d_out=40, scale=1.0)
    A, B = torch.cat([A, A]), torch.cat([B, B])
    lam = torch.tensor([10.0, 0.1], dtype=torch.float64)
    kept = {mu: tropfast.solve(A, B, lam * mu, lam * mu, method="bcd", steps=30).kept_fraction for mu in (1.0, 100.0)}
    target = 0.7
    assert bool((kept[1.0] > target).all())  # the search moves up from μ = 1
    err = {mu: (k - target).abs() for mu, k in kept.items()}
    assert float(err[1.0][0]) < float(err[100.0][0]) and float(err[100.0][1]) < float(err[1.0][1])
    sol = tropfast.solve(A, B, lam, lam, method="bcd", steps=30, target_keep=target, search_iters=2, search_tol=1e-6)
    assert len(sol.search) == 2
    torch.testing.assert_close(sol.lam1, torch.tensor([10.0, 10.0], dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(sol.kept_fraction, torch.stack([kept[1.0][0], kept[100.0][1]]))


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
    # dense costs T sweeps; sorted a fixed SORT_COST plus a per-step fraction of a sweep
    assert not solver.prefers_sorted("cpu", "bcd", 1, 768, 768)
    assert solver.prefers_sorted("cpu", "bcd", 1000, 768, 768)
    assert not solver.prefers_sorted("cpu", "fista", 1000, 768, 768)  # no sorted form
    T = next(t for t in range(1, 10_000) if solver.prefers_sorted("cpu", "ista", t, 768, 768))
    assert solver.SORT_COST["cpu"] < T <= solver.SORT_COST["cpu"] * 2  # the crossover sits just past the sort cost
    assert not solver.prefers_sorted("torch", "ista", 50, 8, 8)  # tiny units: a step is as cheap as a search


@pytest.mark.parametrize("method", ["bcd", "ista"])
def test_auto_path_runs_the_cheaper_path_with_the_same_answer(method):
    A, B = _adapter(L=2, r=4, d_in=64, d_out=48)
    short = tropfast.solve(A, B, 0.05, 0.05, method=method, steps=2)
    long = tropfast.solve(A, B, 0.05, 0.05, method=method, steps=600)
    assert short.path == "dense" and long.path == "sorted"
    for T, sol in ((2, short), (600, long)):
        other = tropfast.solve(A, B, 0.05, 0.05, method=method, steps=T, path="sorted" if sol.path == "dense" else "dense")
        torch.testing.assert_close(sol.A_hat, other.A_hat, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sol.B_hat, other.B_hat, rtol=1e-9, atol=1e-12)
    assert tropfast.solve(A, B, 0.05, 0.05, method=method, steps=600, tol=1e-9).path == "dense"  # the step loop


def test_validation_reads_the_weights_once():
    # Before the kernel, solve makes one pass over each of A and B (their unit norms: the
    # safe step and the NaN/Inf check); nothing else of their size is computed around it.
    from torch.utils._python_dispatch import TorchDispatchMode

    A, B = _adapter(L=4, r=6, d_in=50, d_out=40)
    big = {A.numel(), B.numel()}
    free = {"detach", "view", "alias", "unsqueeze", "expand", "_to_copy", "to", "slice", "select", "as_strided", "t"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in free and any(isinstance(a, torch.Tensor) and a.numel() in big for a in args):
                self.ops.append(name)
            return func(*args, **(kwargs or {}))

    for method, lr in (("ista", None), ("bcd", None), ("ista", 0.01)):
        with Count() as c:
            tropfast.solve(A, B, 0.05, 0.05, method=method, steps=5, lr=lr, path="dense")
        assert sorted(c.ops) == ["linalg_vector_norm", "linalg_vector_norm", "solve_fused"], (method, c.ops)


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

    # The dense path: its time grows with the steps (BCD on the sorted path stops once every
    # unit cycles).  Every solve counts as long here, whatever this machine's speed.
    monkeypatch.setattr(solver, "_LONG_SOLVE", 0)
    A, B = _adapter(L=4, r=16, d_in=256, d_out=256)
    t0 = time.perf_counter()
    tropfast.solve(A, B, 1e-3, 1e-3, method="bcd", steps=200, backend="cpu", path="dense")
    per_step = (time.perf_counter() - t0) / 200
    steps = max(400, int(2.0 / max(per_step, 1e-7)))  # about 2 s in one native call
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    t0 = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        tropfast.solve(A, B, 1e-3, 1e-3, method="bcd", steps=steps, backend="cpu", path="dense")
    waited = time.perf_counter() - t0
    timer.join()
    assert waited < 1.0, f"the interrupt took {waited:.2f} s to arrive"


@pytest.mark.skipif(not _native_cpu(), reason="the native CPU backend is not built")
@pytest.mark.parametrize("path", ["dense", "sorted"])
def test_native_whole_solves_run_off_the_main_thread(monkeypatch, path):
    """Both whole-solve kernels run on a worker thread, and give the iterates of one direct call."""
    import threading

    from tropfast.backends import _registry

    seen = []

    def spy(fn):
        def call(*a):
            seen.append(threading.current_thread().name)
            return fn(*a)

        return call

    cpu = _registry._BACKENDS["cpu"]
    k = cpu.kernels._replace(solve_fused=spy(cpu.kernels.solve_fused), solve_sorted=spy(cpu.kernels.solve_sorted))
    monkeypatch.setitem(_registry._BACKENDS, "cpu", _registry.Backend("cpu", k))
    monkeypatch.setattr(solver, "_LONG_SOLVE", 0)  # a long solve: these sizes run on the worker thread
    A, B = _adapter(L=3, r=8, d_in=40, d_out=30)
    sol = tropfast.solve(A, B, 1e-3, 1e-3, method="bcd", steps=7, backend="cpu", path=path)
    assert seen == ["tropfast-solve"]
    lam = torch.full((3,), 1e-3, dtype=A.dtype)
    op = torch.ops.tropfast.solve_sorted if path == "sorted" else torch.ops.tropfast.solve_fused
    Ah, Bh, _ = op(A, B, lam, lam, torch.ones(3, dtype=A.dtype), "bcd", 7)
    assert torch.equal(sol.A_hat, Ah) and torch.equal(sol.B_hat, Bh)
