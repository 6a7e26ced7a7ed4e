"""Where the time of ``tropfast.solve`` goes outside its kernel, and why it moves.

    python benchmarks/wrapper_cost.py [--model minilm-l6] [--method bcd] [--calls 500]
                                      [--json benchmarks/results/wrapper-cost-<name>.json]

Two measurements, one torch thread:

1. **The public solve around its kernel.**  ``tropfast.solve`` (native CPU backend, dense
   path) is timed in three parts per call: before the kernel (the plan's lookup, the λ
   tensors), the kernel, and after it (the NaN/Inf check on the kernel's sums, the
   ``Solution``).  Once with the real kernel, and once with the kernel replaced by a stub
   that returns the same outputs at once, so the wrapper runs back to back.  The kernel is
   wrapped in the plan ``solve`` keeps for this plain call (docs/design.md §3).
2. **A fixed piece of small-op work after a pause.**  Four small torch ops (two ``full``, an
   add, a ``tolist``), as the wrapper does, timed right after the thread spent 0 to 5 ms
   busy in a Python loop, or asleep.  On a dedicated machine the work costs the same
   whatever came before; where other tenants share the caches, code and data that were
   not touched for a millisecond have to be fetched again, and the work slows with the
   length of the pause.

(1) with the stub gives the wrapper's own cost; the difference to (1) with the real kernel
is what the same Python costs after a millisecond of kernel, and (2) says whether that is
the kernel's doing or the machine's: a pause that touches nothing slows the work as much.
Medians of ``--calls`` calls.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import machine_info  # noqa: E402
from test_bench_solve import LAM, LR, MODELS, _problem  # noqa: E402

import tropfast  # noqa: E402
from tropfast import solver  # noqa: E402

PAUSES_MS = (0.0, 0.5, 1.5, 5.0)


def _median_us(xs: list[float]) -> float:
    return statistics.median(xs) * 1e6


def split_public(A, B, method: str, calls: int, stub: bool) -> dict:
    """Median µs before, in and after the kernel of ``tropfast.solve``; ``stub``: a kernel that
    returns precomputed outputs."""
    kern = tropfast.backends.kernels("cpu")
    L = A.shape[0]
    lam = torch.full((L,), LAM)
    ready = kern.solve_fused(A, B, lam, lam, torch.full((L,), LR), method, 100)
    marks: dict[str, float] = {}
    lr = LR if method != "bcd" else None

    def call():
        return tropfast.solve(A, B, LAM, LAM, method=method, steps=100, lr=lr, backend="cpu", path="dense")

    plans = solver._PLANS
    solver._PLANS = {}
    try:
        call()  # the plain call's plan, which holds the kernel it calls
        (key, plan), = solver._PLANS.items()
        whole = plan.whole

        def timed(*a):
            marks["k0"] = time.perf_counter()
            out = ready if stub else whole(*a)
            marks["k1"] = time.perf_counter()
            return out

        solver._PLANS[key] = plan._replace(whole=timed)
        parts: dict[str, list[float]] = {"before kernel": [], "kernel": [], "after kernel": []}
        for i in range(calls + 50):
            t0 = time.perf_counter()
            call()
            t1 = time.perf_counter()
            if i >= 50:  # warm-up
                parts["before kernel"].append(marks["k0"] - t0)
                parts["kernel"].append(marks["k1"] - marks["k0"])
                parts["after kernel"].append(t1 - marks["k1"])
    finally:
        solver._PLANS = plans
    return {k: _median_us(v) for k, v in parts.items()}


def _small_ops() -> float:
    a = torch.full((6,), 1.0)
    b = torch.full((6,), 2.0)
    return sum((a + b).tolist())


def after_pause(calls: int) -> dict:
    """Median µs of ``_small_ops`` right after a busy or sleeping pause of each length."""
    out: dict[str, dict[str, float]] = {}
    for how in ("busy", "sleep"):
        out[how] = {}
        for ms in PAUSES_MS:
            ts = []
            for _ in range(calls):
                if how == "sleep":
                    time.sleep(ms / 1e3)
                else:
                    t = time.perf_counter()
                    while time.perf_counter() - t < ms / 1e3:
                        pass
                t0 = time.perf_counter()
                _small_ops()
                ts.append(time.perf_counter() - t0)
            out[how][f"{ms:g} ms"] = _median_us(ts)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm-l6", help="a model of test_bench_solve.MODELS (its first word)")
    p.add_argument("--method", default="bcd", choices=("ista", "bcd"))
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    if a.calls < 1:
        p.error("--calls must be at least 1")
    if not tropfast.backends.available()["cpu"].available:
        p.error("the native CPU backend is not built here (make install)")
    names = {n.split()[0]: n for n in MODELS}
    if a.model not in names:
        p.error(f"--model must be one of {', '.join(names)}")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        A, B, _, _ = _problem(MODELS[names[a.model]], "cpu", a.method)
        res = {
            "model": names[a.model],
            "method": a.method,
            "calls": a.calls,
            "public solve, real kernel (us)": split_public(A, B, a.method, a.calls, stub=False),
            "public solve, stub kernel (us)": split_public(A, B, a.method, a.calls, stub=True),
            "four small torch ops after a pause (us)": after_pause(a.calls),
            "machine": machine_info(),
        }
    finally:
        torch.set_num_threads(before)
    for k in ("public solve, real kernel (us)", "public solve, stub kernel (us)"):
        print(f"{k}: " + ", ".join(f"{n} {v:.1f}" for n, v in res[k].items()))
    for how, row in res["four small torch ops after a pause (us)"].items():
        print(f"four small torch ops after a {how} pause of " + ", ".join(f"{n}: {v:.1f} us" for n, v in row.items()))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
