"""Whole-model solves on every available backend, against the PyTorch closed-form loop.

    pytest benchmarks/test_bench_solve.py --benchmark-only --benchmark-json benchmarks/results/solve-<machine>.json
    python benchmarks/report.py benchmarks/results/solve-<machine>.json

Shapes: 24 adapters of 768x64 (RoBERTa-base with r = 64), 6 adapters of 384x24 (MiniLM-L6
with AdapterHub's default reduction factor 16) and 32 adapters of 4096x64 (LLM scale).
Baselines in every group: the closed form stepped from Python (eager) and the same step
under ``torch.compile``.
"""
from __future__ import annotations

import pytest
import torch

import tropfast
from tropfast import ops, solver

MODELS = {
    "roberta-base 24x768x64": (24, 64, 768, 768),
    "minilm-l6 6x384x24": (6, 24, 384, 384),
}
LLM = {"llm 32x4096x64": (32, 64, 4096, 4096)}
LAM = 1e-3


def _weights(L, r, d_in, d_out, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(L, r, d_in, generator=g, dtype=dtype) * 0.05
    B = torch.randn(L, d_out, r, generator=g, dtype=dtype) * 0.05
    return A, B


def _fused_backends():
    status = tropfast.backends.available()
    return [b for b in ("torch", "cpu", "triton", "cuda") if status[b].available]


def _device_for(backend):
    return torch.device("cuda") if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else torch.device("cpu")


def _solve_args(shape, backend, method, steps):
    A, B = _weights(*shape)
    dev = _device_for(backend)
    A, B = A.to(dev), B.to(dev)
    L = A.shape[0]
    lam = torch.full((L,), LAM, dtype=A.dtype, device=dev)
    lr = solver.safe_lr(A, B)
    return A, B, lam, lam, lr, method, steps


_DENSE: dict = {}


def _dense_reference(args):
    """The closed-form loop's answer on CPU, computed once per problem for the checks."""
    key = (tuple(args[0].shape), args[5], args[6])
    if key not in _DENSE:
        _DENSE[key] = solver.dense_solve(ops.CLOSED_FORM, *[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    return _DENSE[key]


def _run_fused(kern, args):
    out = kern.solve_fused(*args)
    if out[0].is_cuda:
        torch.cuda.synchronize()
    return out


CASES = [(name, shape, method) for name, shape in MODELS.items() for method in ("ista", "bcd")]


@pytest.mark.parametrize("name, shape, method", CASES, ids=[f"{n}-{m}" for n, _, m in CASES])
@pytest.mark.parametrize("backend", _fused_backends())
def test_solve_T100(benchmark, name, shape, method, backend):
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("Triton on CPU runs in the interpreter: correctness only, not speed")
    kern = tropfast.backends.kernels(backend)
    args = _solve_args(shape, backend, method, 100)
    benchmark.group = f"{name} {method} T=100"
    benchmark.extra_info.update(model=name, method=method, T=100, backend=backend, impl="solve_fused")
    rounds = 3 if backend == "torch" else 10
    Ah, Bh = benchmark.pedantic(_run_fused, args=(kern, args), rounds=rounds, iterations=1, warmup_rounds=1)
    torch.testing.assert_close(Ah.cpu(), _dense_reference(args)[0], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name, shape, method", [c for c in CASES if c[2] == "ista"], ids=[n for n in MODELS])
def test_closed_form_loop_compiled(benchmark, name, shape, method):
    A, B, lam, _, lr, _, steps = _solve_args(shape, "torch", method, 100)
    step = torch.compile(ops.cf_prox_step)
    step(A, B, A, B, lr, lam, lam)  # compile outside the timing

    def loop():
        Ah, Bh = A, B
        for _ in range(steps):
            Ah, Bh = step(A, B, Ah, Bh, lr, lam, lam)
        return Ah, Bh

    benchmark.group = f"{name} {method} T=100"
    benchmark.extra_info.update(model=name, method=method, T=100, backend="torch.compile", impl="step loop")
    benchmark.pedantic(loop, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("name, shape", list(LLM.items()), ids=list(LLM))
@pytest.mark.parametrize("backend", _fused_backends())
def test_llm_scale_T100(benchmark, name, shape, backend):
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("Triton on CPU runs in the interpreter: correctness only, not speed")
    kern = tropfast.backends.kernels(backend)
    args = _solve_args(shape, backend, "ista", 100)
    benchmark.group = f"{name} ista T=100"
    benchmark.extra_info.update(model=name, method="ista", T=100, backend=backend, impl="solve_fused")
    benchmark.pedantic(_run_fused, args=(kern, args), rounds=1 if backend == "torch" else 3, iterations=1)


# ---------------------------------------------------------------------------------------
# BCD to convergence.  The PyTorch loop stops each adapter once its largest relative change
# in a sweep is <= 1e-6; the fused kernels run that many sweeps (the most any adapter
# needed); the sorted family runs up to 1000 sweeps and stops each unit once its state
# repeats exactly (converged to the last bit, or cycling between roundings).
# ---------------------------------------------------------------------------------------
TOL = 1e-6
_CONVERGED: dict = {}


def _sweeps_to_converge(name, shape):
    if name not in _CONVERGED:
        A, B = _weights(*shape)
        sol = tropfast.solve(A, B, LAM, LAM, method="bcd", steps=1000, tol=TOL, backend="torch", record_every=0)
        _CONVERGED[name] = int(sol.steps.max())
    return _CONVERGED[name]


def _bcd_converged_impls():
    impls = [("torch", "dense-tol"), ("torch", "sorted")]
    for b in _fused_backends():
        if b != "torch" and not (b == "triton" and not torch.cuda.is_available()):
            impls += [(b, "fused"), (b, "sorted")]
    return impls


@pytest.mark.parametrize("name, shape", list(MODELS.items()), ids=list(MODELS))
@pytest.mark.parametrize("backend, impl", _bcd_converged_impls(), ids=[f"{b}-{i}" for b, i in _bcd_converged_impls()])
def test_bcd_to_convergence(benchmark, name, shape, backend, impl):
    T = _sweeps_to_converge(name, shape)
    A, B, lam, _, lr, _, _ = _solve_args(shape, backend, "bcd", T)
    kern = tropfast.backends.kernels(backend)
    if impl == "dense-tol":
        def run():
            sol = tropfast.solve(A, B, LAM, LAM, method="bcd", steps=1000, tol=TOL, backend="torch", record_every=0)
            return sol.A_hat, sol.B_hat
    elif impl == "fused":
        def run():
            return _run_fused(kern, (A, B, lam, lam, lr, "bcd", T))
    else:
        def run():
            out = kern.solve_sorted(A, B, lam, lam, lr, "bcd", 1000)
            if out[0].is_cuda:
                torch.cuda.synchronize()
            return out
    benchmark.group = f"{name} bcd to tol ({T} sweeps)"
    benchmark.extra_info.update(model=name, method="bcd", T=T, backend=backend, impl=impl, tol=TOL)
    Ah, Bh = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    ref = tropfast.solve(*_weights(*shape), LAM, LAM, method="bcd", steps=1000, tol=TOL, backend="torch", record_every=0)
    torch.testing.assert_close(Ah.cpu(), ref.A_hat, rtol=1e-3, atol=1e-5)
