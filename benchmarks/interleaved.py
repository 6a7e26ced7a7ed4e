"""Eager loop vs public ``solve`` vs raw kernel, timed alternately in one process.

    python benchmarks/interleaved.py [--model minilm-l6] [--method ista] [--rounds 25]
                                     [--threads 1] [--compiled]

pytest-benchmark times one benchmark after another, so a ratio between two of them also
measures whatever the machine did in between: on a shared machine the PyTorch loops (which
stream their tensors through memory every step) and the native kernels (which keep a unit in
L1) are slowed by different amounts at different times.  Here every round runs one eager
loop, then ``--repeat`` timings of the public solves and the raw kernel, so all three see the
same machine; the ratios are between the medians of their CPU times (``time.process_time``,
one torch thread by default).  ``--threads N`` runs every call on N torch threads, as a user
whose machine has N cores does, and times wall-clock (``time.perf_counter``): the CPU time of
N threads would add them up.  ``--compiled`` adds the loop under ``torch.compile``.  After
each loop every call runs once untimed (the loop leaves the caches cold), and the calls take
turns in first place.  A fast call is timed as a round of back-to-back calls of about 5 ms
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


def _timer(clock):
    def timed(f, n: int = 1) -> float:
        t = clock()
        for _ in range(n):
            f()
        return (clock() - t) / n

    return timed


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm-l6", help="a model of test_bench_solve.MODELS (its first word)")
    p.add_argument("--method", default="ista", choices=("ista", "bcd"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--repeat", type=int, default=3, help="public solves and raw calls per eager loop")
    p.add_argument("--threads", type=int, default=1, help="torch threads; above 1 the times are wall-clock")
    p.add_argument("--compiled", action="store_true", help="also time the loop under torch.compile")
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error("--threads must be at least 1")
    names = {n.split()[0]: n for n in MODELS}
    if a.model not in names:
        p.error(f"--model must be one of {', '.join(names)}")
    before = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        return _run(a, names[a.model])
    finally:
        torch.set_num_threads(before)


def _run(a: argparse.Namespace, model: str) -> dict:
    timed = _timer(time.process_time if a.threads == 1 else time.perf_counter)
    shape = MODELS[model]
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
    loops = {"eager loop": lambda: loop(step, At, Bt, lrt, lamt, a.steps)}
    if a.compiled:
        cstep = torch.compile(step)
        loops["compiled loop"] = lambda: loop(cstep, At, Bt, lrt, lamt, a.steps)
    for f in loops.values():
        f()  # warm-up (and compilation)
    per_round = {k: calls_per_round(f) for k, f in calls.items()}
    times: dict[str, list[float]] = {**{k: [] for k in loops}, **{k: [] for k in calls}}
    names_ = list(calls)
    for r in range(a.rounds):
        for k, f in loops.items():
            times[k].append(timed(f))
        for f in calls.values():  # untimed: the eager loop leaves the caches cold for whatever runs next
            f()
        for i in range(a.repeat):
            shift = (r + i) % len(names_)  # each call takes every place in the order in turn
            for k in names_[shift:] + names_[:shift]:
                times[k].append(timed(calls[k], per_round[k]))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    out = {
        "model": model,
        "method": a.method,
        "steps": a.steps,
        "threads": a.threads,
        "clock": "process_time" if a.threads == 1 else "perf_counter",
        "median_ms": med,
        "eager / public": med["eager loop"] / med["public"],
        "eager / public (default path)": med["eager loop"] / med["public (default path)"],
        "public / raw": med["public"] / med["raw"],
    }
    if a.compiled:
        out["compiled / public"] = med["compiled loop"] / med["public"]
        out["compiled / public (default path)"] = med["compiled loop"] / med["public (default path)"]
    for k, v in med.items():
        calls_note = f", rounds of {per_round[k]} calls" if k in per_round else ""
        print(f"{k:>24}: {v:9.3f} ms (median of {len(times[k])}{calls_note})")
    for k in [k for k in out if " / " in k]:
        print(f"{k:>34}: {out[k]:.2f}")
    return out


if __name__ == "__main__":
    main()
