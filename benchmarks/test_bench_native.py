"""solve_fused on the native CPU kernels against the closed-form loop (backend torch).

24 adapters of d = 768, r = 64 (a BERT-base model's worth), T = 100 ISTA steps, fp32.
The speed claim is the ratio of the two medians of one run:

    pytest benchmarks/test_bench_native.py --benchmark-json benchmarks/results/native_cpu.json
"""
import platform

import pytest
import torch

import tropfast
from tropfast import ops, solver
from tropfast.backends import native

L, D, R, T = 24, 768, 64, 100

pytestmark = pytest.mark.skipif(native.load() is None, reason="tropfast._C is not built")


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(L, R, D, generator=g) / D**0.5
    B = torch.randn(L, D, R, generator=g) / R**0.5
    lr = solver.safe_lr(A, B)
    lam = torch.full((L,), 1e-3)
    return A, B, lam, lr


def _info(benchmark, backend):
    benchmark.extra_info.update(
        backend=backend,
        shape=f"L={L} d={D} r={R} T={T} fp32 ista",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(),
        tropfast=tropfast.__version__,
    )


@pytest.mark.benchmark(group="solve_fused ista 24x768x64 T=100")
def test_solve_fused_native_cpu(benchmark, problem):
    A, B, lam, lr = problem
    _info(benchmark, "cpu")
    benchmark.pedantic(ops.DISPATCHED.solve_fused, args=(A, B, lam, lam, lr, "ista", T), rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="solve_fused ista 24x768x64 T=100")
def test_solve_fused_closed_form_loop(benchmark, problem):
    A, B, lam, lr = problem
    _info(benchmark, "torch")
    benchmark.pedantic(ops.CLOSED_FORM.solve_fused, args=(A, B, lam, lam, lr, "ista", T), rounds=5, warmup_rounds=1)


def test_native_and_closed_form_agree(problem):
    A, B, lam, lr = problem
    nA, nB = ops.DISPATCHED.solve_fused(A, B, lam, lam, lr, "ista", T)
    cA, cB = ops.CLOSED_FORM.solve_fused(A, B, lam, lam, lr, "ista", T)
    scale = max(float(A.abs().max()), float(B.abs().max()))
    assert float((nA - cA).abs().max()) <= 1e-4 * scale
    assert float((nB - cB).abs().max()) <= 1e-4 * scale
