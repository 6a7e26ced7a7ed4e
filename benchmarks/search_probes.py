"""Probes per adapter of the λ search (``solver.MuSearch``) against a plain doubling search.

    python benchmarks/search_probes.py [--targets 0.05,0.1,0.3,0.5,0.7,0.9] [--out benchmarks/results]

Every probe of ``solve(..., target_keep=t)`` is one whole solve of the adapters still
searching, so the probes per adapter are the search's cost (the fleet path's tropical time is
almost all solver).  The adapters are those of the fleet benchmark's generator
(``benchmarks/fleet/generate.py``, seeded): 4 RoBERTa-base-sized adapters (12 layers,
768 x 48, a few strong hidden units) and 16 layers of the LLM-style checkpoint (4096 x 64,
plain Gaussian weights), with the pruning defaults (ISTA, T = 100, λ scale 0.5, search
tolerance 0.02, float32).  The baseline is the rule the search replaced: from μ = 1, moves
of log 2, 4, 16, ... until bracketed, then regula falsi on the kept fraction itself in log μ,
a bisection after two slow interpolations.  The counts are deterministic (no timing).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "fleet"))

import generate  # noqa: E402

from tropfast import solver  # noqa: E402
from tropfast.pruning.scores import TROPICAL_DEFAULTS, tropical_lambdas  # noqa: E402


class DoublingSearch(solver.MuSearch):
    """The baseline: doubling moves, then regula falsi on the kept fraction (not its logit)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.step = np.full(self.log_mu.shape, math.log(2))

    def _next(self, sel, lm, kept, dense, width, lo, hi, k_lo, k_hi):
        bracketed = np.isfinite(lo) & np.isfinite(hi)
        share = np.clip((k_lo - self.target) / np.maximum(k_lo - k_hi, 1e-300), self.GUARD, 1 - self.GUARD)
        with np.errstate(invalid="ignore"):
            slow = bracketed & np.isfinite(width) & ((hi - lo) > 0.5 * width) & ~self.bisect[sel]
            slow_run = np.where(slow, self.slow_run[sel] + 1, 0)
            bisect = slow_run >= 2
            inner = lo + np.where(bisect, 0.5, share) * (hi - lo)
        move = self.step[sel].copy()  # (a view while sel is a slice: step is updated below)
        self.step[sel] = np.where(bracketed, move, 2 * move)
        self.slow_run[sel], self.bisect[sel] = slow_run, bisect
        return np.where(np.isinf(hi), lm + move, np.where(np.isinf(lo), lm - move, inner))


def _fleet_problems(root: Path) -> list[tuple[list, list]]:
    from safetensors.torch import load_file

    out = []
    for d in generate.make_fleet(str(root / "fleet"), 4, quiet=True):
        sd = load_file(str(Path(d) / "adapter.safetensors"))
        downs = sorted(k for k in sd if "adapter_down" in k and k.endswith("weight"))
        out.append(([sd[k].float() for k in downs], [sd[k.replace("adapter_down.0", "adapter_up")].float() for k in downs]))
    return out


def _llm_problems(root: Path) -> list[tuple[list, list]]:
    from safetensors import safe_open

    path = Path(generate.make_llm(str(root / "llm"), layers=8))
    wm = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    downs = sorted(k for k in wm if "adapter_down" in k and k.endswith("weight"))
    As, Bs = [], []
    for k in downs:
        up = k.replace("adapter_down.0", "adapter_up")
        for name, dst in ((k, As), (up, Bs)):
            with safe_open(str(path / wm[name]), "pt") as f:
                dst.append(f.get_tensor(name).float())
    return [(As[i : i + 8], Bs[i : i + 8]) for i in range(0, len(As), 8)]


def probes_per_adapter(problems, target: float, search_cls) -> list[int]:
    o = TROPICAL_DEFAULTS
    saved, solver.MuSearch = solver.MuSearch, search_cls
    try:
        counts = []
        for As, Bs in problems:
            l1, l2 = tropical_lambdas(As, Bs, o["lam"], o["lam_ratio"])
            sol = solver.solve(As, Bs, l1, l2, method=o["method"], steps=o["steps"], target_keep=target,
                               search_tol=o["search_tol"], search_iters=o["search_iters"], record_every=0)
            n = [0] * len(As)
            for t in sol.search:
                for i in t["adapters"] if t["adapters"] is not None else range(len(As)):
                    n[i] += 1
            counts += n
        return counts
    finally:
        solver.MuSearch = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="0.05,0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    targets = [float(x) for x in a.targets.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"RoBERTa-base fleet (4 x 12 layers)": _fleet_problems(Path(tmp)),
                "LLM checkpoint (16 layers)": _llm_problems(Path(tmp))}
        for name, problems in sets.items():
            for t in targets:
                new = probes_per_adapter(problems, t, solver.MuSearch)
                old = probes_per_adapter(problems, t, DoublingSearch)
                rows.append({"adapters": name, "target": t, "probes": sum(new) / len(new), "max": max(new),
                             "doubling": sum(old) / len(old), "doubling_max": max(old)})
                print(f"{name:36s} keep {t:4.2f}: {rows[-1]['probes']:.2f} probes/adapter (max {max(new)}), "
                      f"doubling {rows[-1]['doubling']:.2f} (max {max(old)})", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search_probes.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# λ search: probes per adapter", "", f"`python benchmarks/search_probes.py` ({len(rows)} cases). "
             "Each probe is one whole solve; pruning defaults (ISTA, T = 100, tolerance 0.02).", "",
             "| adapters | keep | probes / adapter (max) | doubling baseline (max) | ratio |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['adapters']} | {r['target']:.2f} | {r['probes']:.2f} ({r['max']}) | "
                     f"{r['doubling']:.2f} ({r['doubling_max']}) | {r['probes'] / r['doubling']:.2f} |")
    for name in dict.fromkeys(r["adapters"] for r in rows):
        sub = [r for r in rows if r["adapters"] == name]
        new, old = sum(r["probes"] for r in sub) / len(sub), sum(r["doubling"] for r in sub) / len(sub)
        lines.append(f"| {name} | mean | {new:.2f} | {old:.2f} | {new / old:.2f} |")
    (out / "search_probes.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
