"""Summarise a pytest-benchmark JSON: median/IQR per benchmark and speed-up ratios per group.

    python benchmarks/report.py benchmarks/results/ops-cpu.json [--csv out.csv]
Within each group the slowest entry is the baseline; the ratio says how much faster each
entry is than it, all measured in the same run.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--csv", help="also write the table as CSV")
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
    if args.csv:
        keys = sorted({k for r in table for k in r})
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
