"""Summarise a pytest-benchmark JSON: median/IQR per benchmark and speed-up ratios per group.

    python benchmarks/report.py benchmarks/results/ops-cpu.json [--csv out.csv]
Within each group the slowest entry is the baseline; the ratio says how much faster each
entry is than it, all measured in the same run.  Then the ratios the targets are stated in
(public solve / raw kernel, eager and compiled loops / public solve, auto T-scaling, each
op / a clone of its inputs), with the target and whether it was met.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict


def rows(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    out = []
    for b in data["benchmarks"]:
        s = b["stats"]
        out.append({
            "group": b.get("group") or "",
            "name": b["name"],
            "median_s": s["median"],
            "iqr_s": s["iqr"],
            "rounds": s["rounds"],
            **{k: v for k, v in b.get("extra_info", {}).items()},
        })
    groups = defaultdict(list)
    for r in out:
        groups[r["group"]].append(r)
    for g in groups.values():
        slowest = max(r["median_s"] for r in g)
        for r in g:
            r["speedup_vs_slowest"] = slowest / r["median_s"]
    return out


def _median(table, **match):
    for r in table:
        if all(r.get(k) == v for k, v in match.items()):
            return r["median_s"]
    return None


def ratios(table: list[dict]) -> list[dict]:
    """The ratios the speed targets are stated in (docs/design.md §8), each from one run."""
    out = []

    def add(what, num, den, target, ok):
        if num is not None and den is not None:
            value = num / den
            out.append({"ratio": what, "value": value, "target": target, "met": ok(value)})

    for g in sorted({r["group"] for r in table if r.get("impl") == "public solve" and r.get("model")}):
        rows = [r for r in table if r["group"] == g]
        for be in sorted({r["backend"] for r in rows if r.get("impl") == "public solve"}):
            pub = _median(rows, impl="public solve", backend=be)
            raw = _median(rows, impl="raw solve_fused", backend=be)
            add(f"{g} [{be}] public / raw", pub, raw, "<= 1.15", lambda v: v <= 1.15)
            eager_be = "torch-cuda" if be in ("cuda", "triton") else "torch"
            comp_be = "torch.compile-cuda" if be in ("cuda", "triton") else "torch.compile"
            add(f"{g} [{be}] eager loop / public", _median(rows, impl="eager loop", backend=eager_be), pub,
                ">= 20 (CPU) / >= 10 (GPU)", lambda v, gpu=be != "cpu": v >= (10 if gpu else 20))
            add(f"{g} [{be}] compiled loop / public", _median(rows, impl="compiled loop", backend=comp_be), pub,
                ">= 5 (CPU)", lambda v: v >= 5)
            auto = _median(rows, impl="public solve (default path)", backend=be)
            add(f"{g} [{be}] eager loop / public (default path)", _median(rows, impl="eager loop", backend=eager_be),
                auto, ">= 20 (CPU) / >= 10 (GPU)", lambda v, gpu=be != "cpu": v >= (10 if gpu else 20))
            add(f"{g} [{be}] compiled loop / public (default path)", _median(rows, impl="compiled loop", backend=comp_be),
                auto, ">= 5 (CPU)", lambda v: v >= 5)
    for r10 in [r for r in table if r.get("impl") == "public solve" and r.get("path") == "auto" and r.get("T") == 10]:
        r1000 = _median(table, impl="public solve", path="auto", T=1000, method=r10["method"], lam=r10["lam"],
                        backend=r10["backend"])
        add(f"auto {r10['method']} lam={r10['lam']:g} [{r10['backend']}] T=1000 / T=10", r1000, r10["median_s"],
            "< 2 (bcd)", lambda v, m=r10["method"]: v < 2 if m == "bcd" else True)
    for r in [r for r in table if r.get("op") and r.get("model") and r.get("backend") not in (None, "clone")]:
        add(f"{r['op']} {r['model']} [{r['backend']}] / clone of its inputs", r["median_s"],
            _median(table, op=r["op"], model=r["model"], backend="clone"), "<= 3", lambda v: v <= 3)
        if r["op"] == "hsd_loss":
            add(f"hsd_loss / hsd_grad {r['model']} [{r['backend']}]", r["median_s"],
                _median(table, op="hsd_grad", model=r["model"], backend=r["backend"]), "<= 1", lambda v: v <= 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--csv", help="also write the table as CSV")
    ap.add_argument("--ratios-csv", help="also write the target ratios as CSV")
    args = ap.parse_args(argv)
    table = rows(args.json)
    with open(args.json) as f:
        meta = json.load(f)
    mi = meta.get("machine_info", {})
    print(f"machine: {mi.get('cpu', {}).get('brand_raw', mi.get('processor', '?'))}, "
          f"python {mi.get('python_version', '?')}, commit {meta.get('commit_info', {}).get('id', '?')[:10]}")
    print(f"{'group':45s} {'name':55s} {'median':>12s} {'IQR':>10s} {'x faster':>9s}")
    for r in sorted(table, key=lambda r: (r["group"], r["median_s"])):
        print(f"{r['group'][:45]:45s} {r['name'][:55]:55s} {r['median_s'] * 1e3:10.3f}ms "
              f"{r['iqr_s'] * 1e3:8.3f}ms {r['speedup_vs_slowest']:9.1f}")
    found = ratios(table)
    if found:
        print(f"\n{'ratio':90s} {'value':>8s}  target")
        for q in found:
            print(f"{q['ratio'][:90]:90s} {q['value']:8.3f}  {q['target']}{'' if q['met'] else '  (missed)'}")
    if args.ratios_csv:
        with open(args.ratios_csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["ratio", "value", "target", "met"])
            w.writeheader()
            w.writerows(found)
    if args.csv:
        keys = sorted({k for r in table for k in r})
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
