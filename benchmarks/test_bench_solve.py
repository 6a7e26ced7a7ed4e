"""Whole-model solves, T = 100: the public ``tropfast.solve`` against the raw whole-solve kernel
under it, a user's eager closed-form loop, and that loop under ``torch.compile``.  The public
solve runs twice: on the dense path (the kernel it wraps, for public / raw) and with the
default ``path="auto"`` (what a user's call runs, for the loops' ratios too).

    pytest benchmarks/test_bench_solve.py --benchmark-only --benchmark-json benchmarks/results/<name>.json
    python benchmarks/report.py benchmarks/results/<name>.json

One group per (model, method, T); every entry of a group solves the same problem, so the
ratios in a group (public / raw, eager / public, compiled / public) are measured in one run.
Shapes and baselines: bench_common.py.  With a GPU the same groups gain cuda, triton and
torch-on-cuda entries, and T = 1 and 1000.
"""
from __future__ import annotations

import pytest
import torch
from bench_common import (
    GPU,
    LAM,
    LLM,
    LR,
    MODELS,
    baseline_devices,
    calls_per_round,
    device_of,
    eager_step,
    loop,
    machine_info,
    speed_backends,
    sync,
    weights,
)

import tropfast

STEPS = [1, 100, 1000] if GPU else [100]


def _problem(shape, backend, method):
    A, B = weights(*shape, device=device_of(backend))
    L = A.shape[0]
    lam = torch.full((L,), LAM, device=A.device)
    lr = torch.full((L,), LR, device=A.device)
    return A, B, lam, lr


def _info(benchmark, name, method, T, backend, impl):
    benchmark.group = f"{name} {method} T={T}"
    benchmark.extra_info.update(model=name, method=method, T=T, backend=backend, impl=impl, **machine_info())


CASES = [(n, s, m, T) for n, s in MODELS.items() for m in ("ista", "bcd") for T in STEPS]
IDS = [f"{n.split()[0]}-{m}-T{T}" for n, _, m, T in CASES]


@pytest.mark.parametrize("name, shape, method, T", CASES, ids=IDS)
@pytest.mark.parametrize("backend", speed_backends())
@pytest.mark.parametrize("path", ["dense", None], ids=["dense", "default"])
def test_public_solve(benchmark, name, shape, method, T, backend, path):
    """path "dense": the kernel the raw entry runs (public / raw); None: the call as a user
    writes it (``path="auto"`` picks dense or sorted by its cost model)."""
    A, B, _, _ = _problem(shape, backend, method)
    lr = LR if method != "bcd" else None
    _info(benchmark, name, method, T, backend, "public solve" if path else "public solve (default path)")
    kw = {"path": path} if path else {}

    def run():
        return sync(tropfast.solve(A, B, LAM, LAM, method=method, steps=T, lr=lr, backend=backend, **kw))

    n = calls_per_round(run)
    sol = benchmark.pedantic(run, rounds=15, iterations=n, warmup_rounds=2)
    assert sol.backend == backend and (path is None or sol.path == path)
    benchmark.extra_info.update(ran=sol.path, calls_per_round=n)


@pytest.mark.parametrize("name, shape, method, T", CASES, ids=IDS)
@pytest.mark.parametrize("backend", speed_backends())
def test_raw_kernel(benchmark, name, shape, method, T, backend):
    A, B, lam, lr = _problem(shape, backend, method)
    kern = tropfast.backends.kernels(backend)
    _info(benchmark, name, method, T, backend, "raw solve_fused")
    def run():
        return sync(kern.solve_fused(A, B, lam, lam, lr, method, T))

    n = calls_per_round(run)
    benchmark.pedantic(run, rounds=15, iterations=n, warmup_rounds=2)
    benchmark.extra_info["calls_per_round"] = n


@pytest.mark.parametrize("name, shape, method, T", CASES, ids=IDS)
@pytest.mark.parametrize("where", baseline_devices())
def test_eager_loop(benchmark, name, shape, method, T, where):
    if where == "cpu" and T > 100:
        pytest.skip("the eager CPU loop at T = 1000 takes minutes")
    A, B, lam, lr = _problem(shape, "torch-cuda" if where == "cuda" else "torch", method)
    _info(benchmark, name, method, T, "torch" if where == "cpu" else "torch-cuda", "eager loop")
    benchmark.pedantic(loop, args=(eager_step(method), A, B, lr, lam, T), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("name, shape, method, T", [c for c in CASES if c[3] == 100], ids=[i for i, c in zip(IDS, CASES) if c[3] == 100])
@pytest.mark.parametrize("where", baseline_devices())
def test_compiled_loop(benchmark, name, shape, method, T, where):
    A, B, lam, lr = _problem(shape, "torch-cuda" if where == "cuda" else "torch", method)
    step = torch.compile(eager_step(method))
    loop(step, A, B, lr, lam, 2)  # compile outside the timing
    _info(benchmark, name, method, T, "torch.compile" if where == "cpu" else "torch.compile-cuda", "compiled loop")
    benchmark.pedantic(loop, args=(step, A, B, lr, lam, T), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("name, shape", list(LLM.items()), ids=["llm"])
@pytest.mark.parametrize("impl", ["public solve", "raw solve_fused", "eager loop"])
@pytest.mark.parametrize("backend", speed_backends())
def test_llm_scale_T100(benchmark, name, shape, impl, backend):
    A, B, lam, lr = _problem(shape, backend, "ista")
    _info(benchmark, name, "ista", 100, backend if impl != "eager loop" else f"torch-{A.device.type}", impl)
    if impl == "public solve":
        run = lambda: sync(tropfast.solve(A, B, LAM, LAM, steps=100, lr=LR, backend=backend, path="dense"))  # noqa: E731
    elif impl == "raw solve_fused":
        kern = tropfast.backends.kernels(backend)
        run = lambda: sync(kern.solve_fused(A, B, lam, lam, lr, "ista", 100))  # noqa: E731
    else:
        if backend == "triton" or (A.device.type == "cpu") != ("cpu" in baseline_devices()):
            pytest.skip("one eager loop per device")
        run = lambda: loop(eager_step("ista"), A, B, lr, lam, 100)  # noqa: E731
    benchmark.pedantic(run, rounds=1 if impl == "eager loop" and not GPU else 5, iterations=1, warmup_rounds=1)
