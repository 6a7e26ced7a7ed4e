"""The ``cuda`` backend (csrc/cuda, built into tropfast._C) against the oracle and the torch backend.

Skipped where no CUDA build and device exist; ``make gpu-check`` runs it on a GPU machine.
Every op and both whole-solve ops, fp64 / fp32 / half, single and batched adapters,
per-adapter parameters, and the public ``solve`` with ragged lists, tol and target_keep.
"""
import pytest
import torch
from tolerances import SHAPES, TOL, TORCH, assert_close, iterates, random_adapter

import tropfast
from tropfast import ops, reference

pytestmark = pytest.mark.skipif(
    not tropfast.backends.available()["cuda"].available, reason=tropfast.backends.available()["cuda"].reason
)

CUDA = iterates(tropfast.backends.kernels("cuda"))
DEV = torch.device("cuda")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _cuda(xs):
    return [x.to(DEV) for x in xs]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("L", [None, 3])
def test_ops_match_the_oracle(shape, dtype, L):
    xs = random_adapter(L, *shape, dtype=dtype, seed=sum(shape))
    ref = [x.double() for x in xs]
    loss, gA, gB = CUDA.hsd_grad(*_cuda(xs))
    rl, rA, rB = reference.hsd_grad_ref(*ref)
    assert_close(loss.cpu(), rl, dtype, "loss")
    assert_close(gA.cpu(), rA, dtype, "grad A_hat")
    assert_close(gB.cpu(), rB, dtype, "grad B_hat")
    assert_close(CUDA.hsd_loss(*_cuda(xs)).cpu(), rl, dtype, "hsd_loss")
    G1, G2 = CUDA.generators(*_cuda(xs[:2]))
    R1, R2 = reference.generators_ref(*ref[:2])
    assert_close(G1.cpu(), R1, dtype, "G1")
    assert_close(G2.cpu(), R2, dtype, "G2")
    lr, lam = 0.05, 0.3
    nA, nB = CUDA.prox_step(*_cuda(xs), *(torch.tensor(v, device=DEV) for v in (lr, lam, lam)))
    eA, eB = reference.prox_step_ref(*ref, lr, lam, lam)
    assert_close(nA.cpu(), eA, dtype, "prox A_hat")
    assert_close(nB.cpu(), eB, dtype, "prox B_hat")
    tau = torch.tensor(0.4, device=DEV)
    assert_close(CUDA.soft_threshold(xs[0].to(DEV), tau).cpu(), reference.soft_threshold_ref(ref[0], 0.4), dtype, "st")


@pytest.mark.parametrize("method", ops.METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("steps", [0, 1, 7, 60])
def test_solve_fused_matches_the_torch_loop(method, dtype, steps):
    A, B, _, _ = random_adapter(4, 9, 33, 17, dtype=dtype, seed=5)
    lam1 = torch.tensor([0.1, 0.5, 2.0, 0.0], dtype=dtype)
    lam2 = torch.tensor([0.2, 0.4, 1.0, 0.3], dtype=dtype)
    lr = tropfast.safe_lr(A.double(), B.double()).to(dtype)
    got = CUDA.solve_fused(*_cuda([A, B, lam1, lam2, lr]), method, steps)
    want = TORCH.solve_fused(A, B, lam1, lam2, lr, method, steps)
    for g, w, what in zip(got, want, ("A_hat", "B_hat")):
        assert_close(g.cpu(), w, dtype, f"{method} T={steps} {what}")


@pytest.mark.parametrize("method", ["bcd", "ista"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_solve_sorted_matches_the_dense_iterates(method, dtype):
    A, B, _, _ = random_adapter(3, 8, 48, 40, dtype=dtype, seed=6)
    lam = torch.tensor([0.5, 3.0, 12.0], dtype=dtype)
    lr = tropfast.safe_lr(A.double(), B.double()).to(dtype)
    for T in (1, 5, 30, 300):
        got = CUDA.solve_sorted(*_cuda([A, B, lam, lam, lr]), method, T)
        want = TORCH.solve_fused(A, B, lam, lam, lr, method, T)
        rel = 1e-10 if dtype == torch.float64 else 2e-4
        for g, w, what in zip(got, want, ("A_hat", "B_hat")):
            err = float((g.cpu().double() - w.double()).abs().max())
            assert err <= rel * max(1.0, float(w.abs().max())), f"{method} T={T} {what}: {err:.3e}"


def test_whole_solve_stats_match_the_oracle():
    A, B, _, _ = random_adapter(3, 6, 20, 15, seed=8)
    lam = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    lr = tropfast.safe_lr(A, B)
    for op in ("solve_fused", "solve_sorted"):
        Ah, Bh, stats = getattr(tropfast.backends.kernels("cuda"), op)(*_cuda([A, B, lam, lam, lr]), "bcd", 9)
        Ah, Bh, stats = Ah.cpu(), Bh.cpu(), stats.cpu()
        torch.testing.assert_close(stats[:, 0], reference.objective_ref(A, B, A, B, lam, lam))
        torch.testing.assert_close(stats[:, 1], reference.objective_ref(A, B, Ah, Bh, lam, lam))
        assert stats[:, 2].tolist() == ((Ah != 0).sum((1, 2)) + (Bh != 0).sum((1, 2))).double().tolist()


def test_wide_units_run_from_global_workspace():
    # a unit of d_in + d_out = 40000 fp64 numbers (x2 buffers) does not fit in shared memory
    A, B, _, _ = random_adapter(1, 2, 20000, 20000, seed=9)
    lam = torch.tensor([0.5], dtype=torch.float64)
    lr = tropfast.safe_lr(A, B)
    for method in ops.METHODS:
        got = CUDA.solve_fused(*_cuda([A, B, lam, lam, lr]), method, 3)
        want = TORCH.solve_fused(A, B, lam, lam, lr, method, 3)
        for g, w in zip(got, want):
            assert_close(g.cpu(), w, torch.float64, f"{method} wide")


def test_public_solve_on_cuda():
    As = [torch.randn(r, d, dtype=torch.float64) * 0.1 for r, d in ((6, 40), (4, 25), (8, 31))]
    Bs = [torch.randn(d, r, dtype=torch.float64) * 0.1 for r, d in ((6, 30), (4, 20), (8, 35))]
    for path in ("dense", "sorted", "auto"):
        for method in ("ista", "bcd"):
            ref = tropfast.solve(As, Bs, 0.01, 0.01, method=method, steps=40, path=path, backend="torch")
            got = tropfast.solve(_cuda(As), _cuda(Bs), 0.01, 0.01, method=method, steps=40, path=path, backend="cuda")
            assert got.backend == "cuda"
            for g, w in zip(got.A_hat + got.B_hat, ref.A_hat + ref.B_hat):
                torch.testing.assert_close(g.cpu(), w, rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(got.objective.cpu(), ref.objective, rtol=1e-9, atol=1e-11)
    tol = tropfast.solve(_cuda(As), _cuda(Bs), 0.01, 0.01, method="fista", steps=500, tol=1e-7, backend="cuda")
    assert bool(tol.converged.all()) and int(tol.steps.max()) < 500
    keep = tropfast.solve(_cuda(As), _cuda(Bs), 0.01, 0.01, method="bcd", steps=50, target_keep=0.3, backend="cuda")
    assert bool(((keep.kept_fraction.cpu() - 0.3).abs() < 0.02).all())


def test_half_precision_is_computed_in_fp32_on_cuda():
    A, B, _, _ = random_adapter(2, 5, 24, 16, dtype=torch.float32, seed=3)
    p = torch.tensor(0.2)
    for dtype in (torch.float16, torch.bfloat16):
        Ah, Bh = A.to(dtype), B.to(dtype)
        got = CUDA.solve_fused(*_cuda([Ah, Bh, p, p, p]), "bcd", 10)
        want = CUDA.solve_fused(*_cuda([Ah.float(), Bh.float(), p, p, p]), "bcd", 10)
        for g, w in zip(got, want):
            assert g.dtype == dtype and torch.equal(g, w.to(dtype))
    assert TOL[torch.float16]  # the table covers half precision
