"""Speed of the closed form against the materialising reference, and one batched ISTA step.

    pytest benchmarks/test_bench_ops.py --benchmark-only --benchmark-json benchmarks/results/ops-<machine>.json
    python benchmarks/report.py benchmarks/results/ops-<machine>.json

``test_op_vs_clone``: each single op against a clone of the tensors it reads, on every backend.

The reference materialises four (d_out, r, d_in) generator tensors plus their autograd
buffers: about 4·d²·r·4 bytes ×3 in fp32.  It is skipped where that does not fit in memory.
"""
from __future__ import annotations

import pytest
import torch
from bench_common import GPU, device_of, machine_info, speed_backends, sync, weights

import tropfast
from tropfast import reference

SIZES = [(768, 64), (4096, 64)]


def _adapter(d: int, r: int, L: int | None = None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = () if L is None else (L,)
    A = torch.randn(*lead, r, d, generator=g, dtype=dtype) * 0.05
    B = torch.randn(*lead, d, r, generator=g, dtype=dtype) * 0.05
    return A, B, A * 0.9, B * 0.9


def _reference_bytes(d: int, r: int) -> int:
    return 3 * 4 * d * r * d * 4  # four generator tensors, ~3x for differences and autograd


def _free_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.parametrize("d, r", SIZES, ids=[f"d{d}-r{r}" for d, r in SIZES])
def test_hsd_grad_closed_form(benchmark, d, r):
    xs = _adapter(d, r)
    benchmark.group = f"hsd_grad d={d} r={r}"
    benchmark.extra_info.update(d=d, r=r, impl="closed_form", dtype="float32")
    loss, gA, gB = benchmark(tropfast.backends.kernels("torch").hsd_grad, *xs)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("d, r", SIZES, ids=[f"d{d}-r{r}" for d, r in SIZES])
def test_hsd_grad_reference(benchmark, d, r):
    need = _reference_bytes(d, r)
    if need > 0.6 * _free_bytes():
        pytest.skip(f"the materialising reference needs ~{need / 2**30:.0f} GiB at d={d}, r={r}; "
                    f"{_free_bytes() / 2**30:.0f} GiB available")
    xs = _adapter(d, r)
    benchmark.group = f"hsd_grad d={d} r={r}"
    benchmark.extra_info.update(d=d, r=r, impl="reference", dtype="float32")
    out = benchmark.pedantic(reference.hsd_grad_ref, args=xs, rounds=3, iterations=1, warmup_rounds=0)
    # same numbers as the closed form (checked here too, where both ran)
    torch.testing.assert_close(out[1], tropfast.backends.kernels("torch").hsd_grad(*xs)[1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch"] + [b for b in ("cpu",) if tropfast.backends.available()[b].available])
def test_ista_step_batch24(benchmark, backend):
    A, B, Ah, Bh = _adapter(768, 64, L=24)
    kern = tropfast.backends.kernels(backend)
    p = torch.tensor(0.01)
    benchmark.group = "one ISTA step, 24 adapters 768x64"
    benchmark.extra_info.update(L=24, d=768, r=64, backend=backend, dtype="float32")
    nA, nB = benchmark(kern.prox_step, A, B, Ah, Bh, torch.tensor(0.5), p, p)
    assert nA.shape == A.shape


# ---------------------------------------------------------------------------------------
# Each single op against a clone of the tensors it reads (the memory floor of the op).
# ---------------------------------------------------------------------------------------
OP_SHAPES = {"roberta-base 24x768x64": (24, 64, 768, 768), "llm 32x4096x64": (32, 64, 4096, 4096)}


def _op_calls(kern, xs, p):
    A, B, Ah, Bh = xs
    return {
        "hsd_grad": (lambda: kern.hsd_grad(A, B, Ah, Bh), (A, B, Ah, Bh)),
        "hsd_loss": (lambda: kern.hsd_loss(A, B, Ah, Bh), (A, B, Ah, Bh)),
        "prox_step": (lambda: kern.prox_step(A, B, Ah, Bh, p, p, p), (A, B, Ah, Bh)),
        "soft_threshold": (lambda: kern.soft_threshold(A, p), (A,)),
    }


@pytest.mark.parametrize("op", ["hsd_grad", "hsd_loss", "prox_step", "soft_threshold"])
@pytest.mark.parametrize("name", list(OP_SHAPES))
@pytest.mark.parametrize("backend", ["clone", "torch"] + speed_backends())
def test_op_vs_clone(benchmark, backend, name, op):
    L, r, d_in, d_out = OP_SHAPES[name]
    dev = device_of(backend if backend not in ("clone", "torch") else ("torch-cuda" if GPU else "torch"))
    A, B = weights(L, r, d_in, d_out, device=dev)
    xs = (A, B, A * 0.9, B * 0.8)
    p = torch.tensor(0.01, device=dev)
    kern = tropfast.backends.kernels("torch" if backend == "clone" else backend)
    call, reads = _op_calls(kern, xs, p)[op]
    if backend == "clone":
        call = lambda: [x.clone() for x in reads]  # noqa: E731
    benchmark.group = f"{op} {name}"
    benchmark.extra_info.update(op=op, model=name, backend=backend, impl="clone of the inputs" if backend == "clone" else op, **machine_info())
    benchmark.pedantic(lambda: sync(call()), rounds=15, iterations=1, warmup_rounds=2)
