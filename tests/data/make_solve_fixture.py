"""Writes solve_before_lam_gen.pt: tropfast.solve's outputs on small fixed problems, computed by
the code from before the generator penalty existed (run it with PYTHONPATH at such a checkout,
with its compiled extension).  tests/test_solver.py checks that lam_gen = 0 reproduces them.

    PYTHONPATH=<old checkout> python tests/data/make_solve_fixture.py tests/data/solve_before_lam_gen.pt
"""
from __future__ import annotations

import subprocess
import sys

import torch


def cases():
    """(name, kwargs) of every solve; the inputs are stored with the outputs."""
    g = torch.Generator().manual_seed(1234)
    A = torch.randn(3, 5, 12, generator=g, dtype=torch.float64) * 0.3
    B = torch.randn(3, 9, 5, generator=g, dtype=torch.float64) * 0.3
    lam = torch.tensor([0.02, 0.05, 0.01], dtype=torch.float64)
    out = []
    for dt in (torch.float64, torch.float32):
        for backend in ("torch", "cpu"):
            for method in ("ista", "fista", "bcd"):
                for path in ("dense", "sorted"):
                    if method == "fista" and path == "sorted":
                        continue
                    kw = dict(A=A.to(dt), B=B.to(dt), lam1=lam.to(dt), lam2=0.03, method=method, steps=25,
                              backend=backend, path=path)
                    out.append((f"{dt}-{backend}-{method}-{path}", kw))
            # the λ search and the step loop
            out.append((f"{dt}-{backend}-ista-target", dict(A=A.to(dt), B=B.to(dt), lam1=0.02, lam2=0.02, method="ista",
                                                             steps=20, backend=backend, target_keep=0.4, path="dense")))
            out.append((f"{dt}-{backend}-bcd-steploop", dict(A=A.to(dt), B=B.to(dt), lam1=0.02, lam2=0.02, method="bcd",
                                                             steps=15, backend=backend, record_every=3)))
    return out


def main(path: str) -> None:
    import tropfast

    res, inputs = {}, {}
    for name, kw in cases():
        sol = tropfast.solve(**kw)
        dt = str(kw["A"].dtype)
        inputs[dt] = {"A": kw["A"], "B": kw["B"]}
        kw = dict(kw, A=dt, B=dt)  # the inputs of that dtype, stored once
        res[name] = {"kwargs": kw, "A_hat": sol.A_hat, "B_hat": sol.B_hat, "objective": sol.objective,
                     "kept_fraction": sol.kept_fraction, "lam1": sol.lam1, "lam2": sol.lam2, "backend": sol.backend}
    try:
        commit = subprocess.run(["git", "-C", tropfast.__path__[0], "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    meta = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "commit": commit}
    torch.save({"meta": meta, "cases": res, "inputs": inputs}, path)
    print(meta, len(res), "cases")


if __name__ == "__main__":
    main(sys.argv[1])
