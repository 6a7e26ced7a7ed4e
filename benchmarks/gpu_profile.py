"""The whole-solve kernels once each, for a profiler (ncu) to time and count: run by gpu_check.py.

    python benchmarks/gpu_profile.py [--device cuda] [--backends cuda,triton] [--size 24,64,768]

Launches, per backend: ``solve_fused`` at T = 1 (one pass over the weights: the bandwidth
figure) and T = 100, and ``solve_sorted`` (BCD) at T = 100, after one warm-up call of each
(so Triton compiles outside the profiled launches).  Prints one line per call with its
wall time and the bytes it must move (read A, B; write Â, B̂), so a run without a
profiler still gives an effective bandwidth.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--size", default="24,64,768", help="L,r,d")
    ap.add_argument("--json", default=None, help="write the timings here")
    args = ap.parse_args(argv)

    import tropfast

    L, r, d = (int(x) for x in args.size.split(","))
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(L, r, d, generator=g) * 0.02).to(dev)
    B = (torch.randn(L, d, r, generator=g) * 0.02).to(dev)
    lam = torch.full((L,), 1e-3, device=dev)
    lr = tropfast.safe_lr(A, B)
    moved = 2 * (A.numel() + B.numel()) * A.element_size()
    status = tropfast.backends.available()
    rows = []
    for name in args.backends.split(","):
        if not status[name].available:
            print(f"{name}: not available ({status[name].reason})")
            continue
        kern = tropfast.backends.kernels(name)
        for op, method, T in (("solve_fused", "ista", 1), ("solve_fused", "ista", 100), ("solve_fused", "bcd", 100),
                              ("solve_sorted", "bcd", 100)):
            fn = getattr(kern, op)
            fn(A, B, lam, lam, lr, method, T)  # warm-up (Triton compiles here)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(A, B, lam, lam, lr, method, T)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            row = dict(backend=name, op=op, method=method, T=T, L=L, r=r, d=d, seconds=dt, bytes=moved,
                       GBps=moved / dt / 1e9)
            rows.append(row)
            print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
