"""A user's training step that calls the public ops, compiled against eager.

    pytest benchmarks/test_bench_compile.py --benchmark-only

The step (20 iterations of ``hsd_grad`` then ``prox_step`` on 24 adapters of 768 x 64) under
``torch.compile(fullgraph=True)`` must not be slower than eager; its graph-break count,
from ``torch._dynamo.explain``, is recorded in the results (target: 0).
"""
from __future__ import annotations

import pytest
import torch
from bench_common import device_of, machine_info, speed_backends, sync, weights

import tropfast

STEPS = 20


def user_step(A, B, Ah, Bh):
    loss = None
    for _ in range(STEPS):
        loss, gA, gB = tropfast.hsd_grad(A, B, Ah, Bh)
        Ah, Bh = tropfast.prox_step(A, B, Ah, Bh, 0.05, 1e-3, 1e-3)
    return loss, Ah, Bh


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("backend", ["torch"] + speed_backends())
def test_user_step(benchmark, backend, mode):
    dev = device_of(backend if backend != "torch" else "torch")
    A, B = weights(24, 64, 768, 768, device=dev)
    xs = (A, B, A * 0.9, B * 0.9)
    prev = tropfast.backends.ENV_VAR
    import os

    old = os.environ.get(prev)
    os.environ[prev] = backend
    tropfast.backends.clear_cache()
    try:
        torch._dynamo.reset()
        breaks = torch._dynamo.explain(user_step)(*xs).graph_break_count
        fn = torch.compile(user_step, fullgraph=True) if mode == "compiled" else user_step
        fn(*xs)  # compile outside the timing
        benchmark.group = f"user step x{STEPS}: hsd_grad + prox_step, 24x768x64, backend {backend}"
        benchmark.extra_info.update(backend=backend, mode=mode, graph_breaks=breaks, impl=f"user step {mode}", **machine_info())
        benchmark.pedantic(lambda: sync(fn(*xs)), rounds=7, iterations=1, warmup_rounds=1)
        assert breaks == 0
    finally:
        if old is None:
            os.environ.pop(prev, None)
        else:
            os.environ[prev] = old
        tropfast.backends.clear_cache()
