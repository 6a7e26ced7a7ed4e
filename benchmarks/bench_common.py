"""Shapes, weights, devices and the baselines shared by the speed benchmarks.

Models (adapters, bottleneck r, width d = d_in = d_out):
    roberta-base  24 x 64 x 768   (12 layers, adapters after attention and FFN, r = 64)
    minilm-l6      6 x 24 x 384   (AdapterHub's default reduction factor 16)
    llm           32 x 64 x 4096

The baselines are what a user would write without tropfast's kernels: the closed form
stepped from Python with plain PyTorch ops (the torch backend's prox_step / BCD sweep,
"eager loop"), and that same step under ``torch.compile`` ("compiled loop").
"""
from __future__ import annotations

import math
import os
import platform
import time

import torch

import tropfast
from tropfast.backends.torch import closed_form, dense

MODELS = {
    "roberta-base 24x768x64": (24, 64, 768, 768),
    "minilm-l6 6x384x24": (6, 24, 384, 384),
}
LLM = {"llm 32x4096x64": (32, 64, 4096, 4096)}
LAM = 1e-3
LR = 0.05
GPU = torch.cuda.is_available()


def weights(L, r, d_in, d_out, dtype=torch.float32, device="cpu", std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(L, r, d_in, generator=g, dtype=dtype) * std
    B = torch.randn(L, d_out, r, generator=g, dtype=dtype) * std
    return A.to(device), B.to(device)


def _only(var: str, names: list[str]) -> list[str]:
    """``names`` restricted to the comma list in environment variable ``var``, if set."""
    want = [x.strip() for x in os.environ.get(var, "").split(",") if x.strip()]
    return [n for n in names if n in want] if want else names


def speed_backends() -> list[str]:
    """Backends that run at speed here (Triton on CPU is the interpreter: correctness only).

    TROPFAST_BENCH_BACKENDS=cuda,triton restricts them (the GPU check leaves out the CPU).
    """
    status = tropfast.backends.available()
    names = [b for b in ("cpu", "cuda") if status[b].available]
    if GPU and status["triton"].available:
        names.append("triton")
    return _only("TROPFAST_BENCH_BACKENDS", names)


def baseline_devices() -> list[str]:
    """Where the eager and compiled loops run: cpu, and cuda with a GPU (TROPFAST_BENCH_WHERE restricts)."""
    return _only("TROPFAST_BENCH_WHERE", ["cpu"] + (["cuda"] if GPU else []))


def device_of(backend: str) -> torch.device:
    if backend in ("cuda", "triton", "torch-cuda"):
        return torch.device("cuda")
    return torch.device("cpu")


def sync(out):
    if GPU:
        torch.cuda.synchronize()
    return out


def machine_info() -> dict:
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    if GPU:
        info["device"] = torch.cuda.get_device_name()
    return info


def eager_step(method: str):
    """One iteration of the plain-PyTorch closed form: (A, B, Ah, Bh, lr, lam) -> (Ah, Bh)."""
    if method == "ista":
        return lambda A, B, Ah, Bh, lr, lam: closed_form.prox_step(A, B, Ah, Bh, lr, lam, lam)
    return lambda A, B, Ah, Bh, lr, lam: dense.bcd_sweep(A, B, Ah, Bh, lam, lam)


def loop(step, A, B, lr, lam, steps: int):
    """A user's loop: T calls of ``step`` from (A, B)."""
    Ah, Bh = A, B
    for _ in range(steps):
        Ah, Bh = step(A, B, Ah, Bh, lr, lam)
    return sync((Ah, Bh))


ROUND_S = 0.005
"""Calls of a fast function are timed in rounds of about this many seconds (``calls_per_round``)."""


def calls_per_round(fn, target_s: float = ROUND_S, most: int = 100, probes: int = 4) -> int:
    """How many back-to-back calls of ``fn`` make a round of about ``target_s`` seconds.

    A sub-millisecond call timed alone is mostly the timer and whatever the machine did just
    before it (the same public solve differed by 28 % between two 15-round runs); a round of
    several calls measures the call as a loop runs it.  Both sides of a ratio use it, so each
    side's rounds last about as long: what the first call of a round pays for whatever ran
    before it is then spread over the same time on both sides, and the ratio of the per-call
    times is not tilted by it.  The count comes from ``probes`` warm calls timed back to back
    (one call timed alone varied 2× here, which gave one side rounds of half the length);
    a call that takes ``target_s`` or more is timed once.  At least 1, at most ``most``.
    """
    fn()
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    if dt < target_s:
        t = time.perf_counter()
        for _ in range(probes):
            fn()
        dt = (time.perf_counter() - t) / probes
    return max(1, min(most, math.ceil(target_s / max(dt, 1e-9))))

