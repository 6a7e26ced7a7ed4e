"""Whole-model solves: the dense loop against the sorted family, T = 10, 100, 1000.

24 adapters of 768x64 (A: (24, 64, 768), B: (24, 768, 64), fp32), one batch, weights of
std 0.02.  The dense loop costs O(L·r·d) per iteration; the sorted family sorts once and
then costs O(L·r·log d) per iteration (BCD: nothing more once every unit's state cycles),
so its time should barely grow with T.

    pytest benchmarks/test_bench_family.py --benchmark-only            # everything (dense T=1000 is slow)
    pytest benchmarks/test_bench_family.py --benchmark-only -k sorted  # the sorted family only

Groups: one per (method, T, λ), so each group compares the paths at the same T.  Paths:
``dense`` / ``sorted`` on the PyTorch backend (the closed-form loop; family.py), and
``dense-<backend>`` / ``sorted-<backend>`` for every compiled backend present (one
``solve_fused`` / ``solve_sorted`` call).  ``sorted-nocycle`` runs every sweep of the
PyTorch form (no cycle shortcut): the cost of the sweeps alone.
"""
import platform

import pytest
import torch

import tropfast
from tropfast import family, ops, solver

L, R, D = 24, 64, 768
STEPS = [10, 100, 1000]
# 1e-3 keeps ~86% of the weights (every unit's state cycles by sweep 16); 3e-3 keeps ~8%
# and needs ~176 sweeps to cycle.
LAMS = [1e-3, 3e-3]
DENSE_ROUNDS = {10: 3, 100: 1, 1000: 1}  # the dense T = 1000 solve takes minutes on a CPU
SWEEP_ROUNDS = {10: 3, 100: 3, 1000: 1}  # every step run: T = 1000 takes seconds


def _compiled_backends():
    """Compiled backends that run at speed here (Triton on CPU is the interpreter: skipped)."""
    status = tropfast.backends.available()
    names = ["cpu"] if status["cpu"].available else []
    if torch.cuda.is_available():
        names += [b for b in ("cuda", "triton") if status[b].available]
    return names


COMPILED = _compiled_backends()


def _device(backend):
    return torch.device("cuda") if backend in ("cuda", "triton") else torch.device("cpu")


def _sync(fn):
    def run(*args):
        out = fn(*args)
        if out[0].is_cuda:
            torch.cuda.synchronize()
        return out

    return run


@pytest.fixture(scope="module")
def model():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(L, R, D, generator=g) * 0.02
    B = torch.randn(L, D, R, generator=g) * 0.02
    return A, B, solver.safe_lr(A, B)


def _run(benchmark, fn, args, *, path, method, T, lam, A, B, rounds):
    benchmark.group = f"{method} T={T} lam={lam:g}"
    benchmark.extra_info.update(
        {
            "path": path,
            "method": method,
            "T": T,
            "lam": lam,
            "A_shape": list(A.shape),
            "B_shape": list(B.shape),
            "dtype": str(A.dtype),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
        }
    )
    Ah, Bh = benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1, warmup_rounds=1 if rounds > 1 else 0)
    benchmark.extra_info["kept"] = float(((Ah != 0).sum() + (Bh != 0).sum()) / (A.numel() + B.numel()))


@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("T", STEPS)
def test_bcd_sorted(benchmark, model, T, lam):
    A, B, _ = model
    lam_t = torch.full((L,), lam)
    args = (A, B, lam_t, lam_t, T)
    _run(benchmark, family.bcd_sorted, args, path="sorted", method="bcd", T=T, lam=lam, A=A, B=B, rounds=5)


@pytest.mark.parametrize("T", STEPS)
def test_bcd_sorted_nocycle(benchmark, model, T):
    A, B, _ = model
    lam_t = torch.full((L,), LAMS[0])

    def run(*args):
        return family.bcd_sorted(*args, check_every=0)

    args = (A, B, lam_t, lam_t, T)
    rounds = SWEEP_ROUNDS[T]
    _run(benchmark, run, args, path="sorted-nocycle", method="bcd", T=T, lam=LAMS[0], A=A, B=B, rounds=rounds)


@pytest.mark.parametrize("T", STEPS)
def test_bcd_dense(benchmark, model, T):
    A, B, _ = model
    lam_t = torch.full((L,), LAMS[0])
    args = (ops.CLOSED_FORM, A, B, lam_t, lam_t, None, "bcd", T)
    rounds = DENSE_ROUNDS[T]
    _run(benchmark, solver.dense_solve, args, path="dense", method="bcd", T=T, lam=LAMS[0], A=A, B=B, rounds=rounds)


@pytest.mark.parametrize("T", STEPS)
def test_ista_sorted(benchmark, model, T):
    A, B, lr = model
    lam_t = torch.full((L,), LAMS[0])
    args = (A, B, lam_t, lam_t, lr, T)
    rounds = SWEEP_ROUNDS[T]
    _run(benchmark, family.ista_sorted, args, path="sorted", method="ista", T=T, lam=LAMS[0], A=A, B=B, rounds=rounds)


@pytest.mark.parametrize("T", STEPS[:2])
def test_ista_dense(benchmark, model, T):
    A, B, lr = model
    lam_t = torch.full((L,), LAMS[0])
    args = (ops.CLOSED_FORM, A, B, lam_t, lam_t, lr, "ista", T)
    rounds = DENSE_ROUNDS[T]
    _run(benchmark, solver.dense_solve, args, path="dense", method="ista", T=T, lam=LAMS[0], A=A, B=B, rounds=rounds)


@pytest.mark.parametrize("method", ["bcd", "ista"])
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("T", STEPS)
@pytest.mark.parametrize("path", ["sorted", "dense"])
@pytest.mark.parametrize("backend", COMPILED)
def test_compiled(benchmark, model, backend, path, method, T, lam):
    """One solve_sorted / solve_fused call of a compiled backend."""
    A, B, lr = (x.to(_device(backend)) for x in model)
    lam_t = torch.full((L,), lam, device=A.device)
    kern = tropfast.backends.kernels(backend)
    run = _sync(kern.solve_sorted if path == "sorted" else kern.solve_fused)
    rounds = 5 if path == "sorted" else SWEEP_ROUNDS[T]
    args = (A, B, lam_t, lam_t, lr, method, T)
    _run(benchmark, run, args, path=f"{path}-{backend}", method=method, T=T, lam=lam, A=A, B=B, rounds=rounds)
