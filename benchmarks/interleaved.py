"""Eager loop vs public ``solve`` vs raw kernel, timed alternately in one process.

    python benchmarks/interleaved.py [--model minilm-l6] [--method ista] [--rounds 25]

pytest-benchmark times one benchmark after another, so a ratio between two of them also
measures whatever the machine did in between: on a shared machine the PyTorch loops (which
stream their tensors through memory every step) and the native kernels (which keep a unit in
L1) are slowed by different amounts at different times.  Here every round runs one eager
loop, then ``--repeat`` timings of the public solves and the raw kernel, so all three see the
same machine; the ratios are between the medians of their CPU times (``time.process_time``,
one torch thread).  After each eager loop every call runs once untimed (the loop leaves the
caches cold), and the calls take turns in first place.  A fast call is timed as a round of back-to-back calls of about 5 ms
(``bench_common.calls_per_round``, as in the benchmarks), divided by their number.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import calls_per_round, eager_step, loop  # noqa: E402
from test_bench_solve import LAM, LR, MODELS, _problem  # noqa: E402

import tropfast  # noqa: E402


def _cpu_time(f, n: int = 1) -> float:
    t = time.process_time()
    for _ in range(n):
        f()
    return (time.process_time() - t) / n


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm-l6", help="a model of test_bench_solve.MODELS (its first word)")
    p.add_argument("--method", default="ista", choices=("ista", "bcd"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--repeat", type=int, default=3, help="public solves and raw calls per eager loop")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    names = {n.split()[0]: n for n in MODELS}
    if a.model not in names:
        p.error(f"--model must be one of {', '.join(names)}")
    shape = MODELS[names[a.model]]
    A, B, lam, lr = _problem(shape, "cpu", a.method)
    At, Bt, lamt, lrt = _problem(shape, "torch", a.method)
    kern = tropfast.backends.kernels("cpu")
    lr_pub = LR if a.method != "bcd" else None
    step = eager_step(a.method)
    calls = {
        "public": lambda: tropfast.solve(A, B, LAM, LAM, method=a.method, steps=a.steps, lr=lr_pub, backend="cpu", path="dense"),
        "public (default path)": lambda: tropfast.solve(A, B, LAM, LAM, method=a.method, steps=a.steps, lr=lr_pub, backend="cpu"),
        "raw": lambda: kern.solve_fused(A, B, lam, lam, lr, a.method, a.steps),
    }
    eager = lambda: loop(step, At, Bt, lrt, lamt, a.steps)  # noqa: E731
    eager()  # warm-up
    per_round = {k: calls_per_round(f) for k, f in calls.items()}
    times: dict[str, list[float]] = {"eager loop": [], **{k: [] for k in calls}}
    names_ = list(calls)
    for r in range(a.rounds):
        times["eager loop"].append(_cpu_time(eager))
        for f in calls.values():  # untimed: the eager loop leaves the caches cold for whatever runs next
            f()
        for i in range(a.repeat):
            shift = (r + i) % len(names_)  # each call takes every place in the order in turn
            for k in names_[shift:] + names_[:shift]:
                times[k].append(_cpu_time(calls[k], per_round[k]))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    out = {
        "model": names[a.model],
        "method": a.method,
        "steps": a.steps,
        "median_ms": med,
        "eager / public": med["eager loop"] / med["public"],
        "eager / public (default path)": med["eager loop"] / med["public (default path)"],
        "public / raw": med["public"] / med["raw"],
    }
    for k, v in med.items():
        calls_note = f", rounds of {per_round[k]} calls" if k in per_round else ""
        print(f"{k:>24}: {v:9.3f} ms (median of {len(times[k])}{calls_note})")
    for k in ("eager / public", "eager / public (default path)", "public / raw"):
        print(f"{k:>30}: {out[k]:.2f}")
    return out


if __name__ == "__main__":
    main()
