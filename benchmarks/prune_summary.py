"""Ratios and growth exponents from a run of ``benchmarks/test_bench_prune.py``.

    python benchmarks/prune_summary.py benchmarks/results/prune-cpu-2core.json --out benchmarks/results/prune-cpu-2core

Writes ``OUT.csv`` (one row per benchmark) and ``OUT-summary.json``, and prints a Markdown
table.  Every ratio is between two entries of the same run: ``tropfast.prune`` time over
the ``global_unstructured`` time on the same model, from the best of the rounds (the
issue's "best of 3") and from the medians.  The growth exponent is
log(t_big / t_small) / log(n_big / n_small) between the 2.36 M and 16.8 M weight models
(1.0 = linear).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys

SMALL, BIG = "roberta-base 24x768x64", "llm 32x4096x64"
_RATIO_KEYS = ("model", "weights", "score", "allocation", "min_s", "median_s", "ratio_best", "ratio_median")


def load(path: str) -> tuple[dict, list[dict]]:
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        e, s = b["extra_info"], b["stats"]
        rows.append({
            "model": e["model"],
            "weights": e["weights"],
            "impl": e["impl"],
            "score": e.get("score", ""),
            "allocation": e.get("allocation", ""),
            "min_s": s["min"],
            "median_s": s["median"],
            "rounds": s["rounds"],
            "threads": e.get("threads"),
            **{f"phase_{k}": v for k, v in (e.get("timings") or {}).items()},
        })
    return data, rows


def summarise(rows: list[dict]) -> dict:
    peer = {r["model"]: r for r in rows if r["impl"] != "tropfast.prune"}
    ours = [r for r in rows if r["impl"] == "tropfast.prune"]
    for r in ours:
        p = peer.get(r["model"])
        if p:
            r["ratio_best"] = r["min_s"] / p["min_s"]
            r["ratio_median"] = r["median_s"] / p["median_s"]
    growth = {}
    for key in sorted({(r["impl"], r["score"], r["allocation"]) for r in rows}):
        by = {r["model"]: r for r in rows if (r["impl"], r["score"], r["allocation"]) == key}
        if SMALL in by and BIG in by:
            a, b = by[SMALL], by[BIG]
            growth["/".join(k for k in key if k)] = {
                "exponent_best": math.log(b["min_s"] / a["min_s"]) / math.log(b["weights"] / a["weights"]),
                "exponent_median": math.log(b["median_s"] / a["median_s"]) / math.log(b["weights"] / a["weights"]),
            }
    return {
        "ratios": [{k: r[k] for k in _RATIO_KEYS if k in r} for r in ours],
        "peer": [{k: p[k] for k in ("model", "weights", "min_s", "median_s")} for p in peer.values()],
        "growth_2.36M_to_16.8M": growth,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--out", help="write OUT.csv and OUT-summary.json")
    args = ap.parse_args(argv)
    data, rows = load(args.json)
    summary = summarise(rows)
    mi = data.get("machine_info", {})
    summary["machine"] = {
        "cpu": mi.get("cpu", {}).get("brand_raw", mi.get("processor", "?")),
        "cores": mi.get("cpu", {}).get("count"),
        "python": mi.get("python_version"),
        "commit": data.get("commit_info", {}).get("id"),
        "datetime": data.get("datetime"),
        "timer": (data["benchmarks"][0].get("options") or {}).get("timer") if data["benchmarks"] else None,
        "torch_threads": rows[0].get("threads") if rows else None,
    }
    print("| model | call | best ms | median ms | best / peer | median / peer |")
    print("|---|---|---|---|---|---|")
    for p in summary["peer"]:
        best, med = p["min_s"] * 1e3, p["median_s"] * 1e3
        print(f"| {p['model']} | global_unstructured (peer) | {best:.1f} | {med:.1f} | 1 | 1 |")
        for r in (x for x in summary["ratios"] if x["model"] == p["model"]):
            print(
                f"| {r['model']} | {r['score']}/{r['allocation']} "
                f"| {r['min_s'] * 1e3:.1f} | {r['median_s'] * 1e3:.1f} "
                f"| {r['ratio_best']:.2f}x | {r['ratio_median']:.2f}x |"
            )
    print()
    for k, g in summary["growth_2.36M_to_16.8M"].items():
        print(f"growth exponent {k}: {g['exponent_best']:.2f} (best), {g['exponent_median']:.2f} (median)")
    if args.out:
        from tropfast.pruning.export import atomic_write_text

        keys = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(args.out + ".csv", buf.getvalue())
        atomic_write_text(args.out + "-summary.json", json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
