"""T-scaling of whole solves: the dense kernel, the sorted path, and ``path="auto"``.

    pytest benchmarks/test_bench_sorted.py --benchmark-only --benchmark-json benchmarks/results/<name>.json

* ``test_public_paths``: ``tropfast.solve(A, B, λ, λ, method, steps=T)`` with ``path`` =
  auto (the default), dense and sorted, T = 10, 100, 1000, at two λ: 1e-3 keeps ~86 % of
  the weights of these 768 x 64 adapters (std 0.02), 3e-3 ~8 %.  The target of the cost
  model: auto BCD at T = 1000 within 2x of T = 10.
* ``test_crossover``: the raw ``solve_fused`` / ``solve_sorted`` kernels at T = 1 ... 1000
  on two sizes; the data behind solver.SORT_COST / REC_COST (docs/design.md §4).
* ``test_torch_sorted``: the PyTorch form of the sorted path (backends/torch/sorted.py),
  with and without the cycle detector: what the detector saves.
"""
from __future__ import annotations

import pytest
import torch
from bench_common import machine_info, speed_backends, sync, weights

import tropfast
from tropfast.backends.torch import sorted as sorted_path

SHAPE = (24, 64, 768, 768)
STEPS = [10, 100, 1000]
LAMS = [1e-3, 3e-3]
BACKENDS = speed_backends()


@pytest.fixture(scope="module")
def model():
    return weights(*SHAPE, std=0.02)


def _info(benchmark, group, **kw):
    benchmark.group = group
    benchmark.extra_info.update(**kw, **machine_info())


@pytest.mark.parametrize("method", ["bcd", "ista"])
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("T", STEPS)
@pytest.mark.parametrize("path", ["auto", "dense", "sorted"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_public_paths(benchmark, model, backend, path, T, lam, method):
    A, B = (x.to("cuda" if backend in ("cuda", "triton") else "cpu") for x in model)
    _info(benchmark, f"{method} lam={lam:g} T={T}", method=method, lam=lam, T=T, backend=backend, path=path, impl="public solve")
    rounds = 3 if (path == "dense" and T == 1000) else 7

    def run():
        return sync(tropfast.solve(A, B, lam, lam, method=method, steps=T, backend=backend, path=path))

    sol = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["ran"] = sol.path
    benchmark.extra_info["kept"] = float(sol.kept_fraction.mean())


@pytest.mark.parametrize("method", ["bcd", "ista"])
@pytest.mark.parametrize("T", [1, 3, 10, 30, 100, 300, 1000])
@pytest.mark.parametrize("shape", [SHAPE, (6, 24, 384, 384)], ids=["24x768x64", "6x384x24"])
@pytest.mark.parametrize("op", ["solve_fused", "solve_sorted"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_crossover(benchmark, backend, op, shape, T, method):
    A, B = weights(*shape, std=0.02, device="cuda" if backend in ("cuda", "triton") else "cpu")
    L = A.shape[0]
    lam = torch.full((L,), 1e-3, device=A.device)
    lr = tropfast.safe_lr(A, B)
    fn = getattr(tropfast.backends.kernels(backend), op)
    _info(benchmark, f"crossover {backend} {method} {'x'.join(map(str, shape))} T={T}", backend=backend, op=op,
          method=method, T=T, L=L, r=shape[1], d_in=shape[2], d_out=shape[3], impl="raw " + op)
    rounds = 3 if (op == "solve_fused" and T >= 300) else 7
    benchmark.pedantic(lambda: sync(fn(A, B, lam, lam, lr, method, T)), rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("T", STEPS)
@pytest.mark.parametrize("detector", [True, False], ids=["cycle-detector", "every-sweep"])
def test_torch_sorted(benchmark, model, T, detector):
    A, B = model
    lam = torch.full((SHAPE[0],), LAMS[0])
    _info(benchmark, f"torch sorted bcd T={T}", T=T, backend="torch", impl="sorted.bcd_sorted", detector=detector)
    rounds = 1 if (T == 1000 and not detector) else 3
    benchmark.pedantic(sorted_path.bcd_sorted, args=(A, B, lam, lam, T), kwargs=dict(early_exit=detector),
                       rounds=rounds, iterations=1, warmup_rounds=0)
