"""Summaries of the quality benchmark: CSV, markdown table, paired win counts, plots."""
from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from typing import Iterable, Sequence

__all__ = [
    "FIELDS",
    "aggregate",
    "large_sparse_table",
    "markdown",
    "replace_datasets",
    "plot",
    "win_counts",
    "write_csv",
    "write_all",
]

FIELDS = ["dataset", "adapter", "score", "allocation", "keep", "seed", "metric", "value", "kept_weights", "total_weights"]
REFERENCES = ("dense", "no_adapter")
PAIRS = (("tropical", "magnitude"), ("combined", "magnitude"), ("partner_norm", "magnitude"), ("tropical", "partner_norm"))


def _mean_std(xs: Sequence[float]) -> tuple[float, float, int]:
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(xs) / n
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, s, n


def aggregate(records: Iterable[dict]) -> dict[tuple, tuple[float, float, int]]:
    """(dataset, adapter, score, allocation, keep, metric) -> (mean, std, n seeds)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        key = (r["dataset"], r.get("adapter", "standard"), r["score"], r["allocation"], float(r["keep"]), r["metric"])
        groups[key].append(float(r["value"]))
    return {k: _mean_std(v) for k, v in groups.items()}


def replace_datasets(records: Sequence[dict], new: Sequence[dict], names: Iterable[str]) -> list[dict]:
    """``records`` with every record of the datasets ``names`` replaced by those of ``new``."""
    names = set(names)
    return [r for r in records if r["dataset"] not in names] + [r for r in new if r["dataset"] in names]


def write_csv(records: Sequence[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: r.get(k, "") for k in FIELDS})


def _ordered(values: Iterable, preferred: Sequence) -> list:
    vals = list(dict.fromkeys(values))
    return [v for v in preferred if v in vals] + [v for v in vals if v not in preferred]


def _fmt(ms: tuple[float, float, int] | None, scale: float = 100.0) -> str:
    if ms is None or ms[2] == 0:
        return "-"
    m, s, n = ms
    return f"{m * scale:.1f} ± {s * scale:.1f}" if n > 1 else f"{m * scale:.1f}"


def win_counts(records: Sequence[dict], metric: str = "accuracy", pairs=PAIRS) -> list[dict]:
    """Paired comparison of seed means over (dataset, keep), per allocation (standard adapter).

    For each pair (x, y) and allocation: how many (dataset, keep) settings x beats, ties,
    loses to y, and the mean difference x − y of the seed means.
    """
    agg = aggregate(r for r in records if r.get("adapter", "standard") == "standard" and r["metric"] == metric)
    allocs = _ordered((k[3] for k in agg if k[2] not in REFERENCES), ("layer", "global"))
    out = []
    for x, y in pairs:
        for a in allocs:
            w = t = lost = 0
            diffs = []
            per_ds: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
            for (ds, ad, sc, al, keep, met), (m, _, _n) in sorted(agg.items()):
                if sc != x or al != a:
                    continue
                other = agg.get((ds, ad, y, al, keep, met))
                if other is None or other[2] == 0:
                    continue
                d = m - other[0]
                diffs.append(d)
                if abs(d) < 1e-12:
                    t += 1
                    per_ds[ds][1] += 1
                elif d > 0:
                    w += 1
                    per_ds[ds][0] += 1
                else:
                    lost += 1
                    per_ds[ds][2] += 1
            if diffs:
                out.append(
                    {
                        "x": x, "y": y, "allocation": a, "metric": metric, "wins": w, "ties": t, "losses": lost,
                        "settings": len(diffs), "mean_diff": sum(diffs) / len(diffs), "per_dataset": dict(per_ds),
                    }
                )
    return out


def _table(agg, ds: str, adapter: str, allocation: str, metric: str, scores: list, keeps: list) -> list[str]:
    lines = ["| keep | " + " | ".join(scores) + " |", "|---|" + "---|" * len(scores)]
    for k in keeps:
        cells = [_fmt(agg.get((ds, adapter, s, allocation, k, metric))) for s in scores]
        lines.append(f"| {k:g} | " + " | ".join(cells) + " |")
    return lines


def markdown(records: Sequence[dict], meta: dict | None = None) -> str:
    """The full markdown report: settings, win counts, one table per dataset × allocation."""
    meta = meta or {}
    agg = aggregate(records)
    std = [r for r in records if r.get("adapter", "standard") == "standard"]
    datasets = _ordered((r["dataset"] for r in std), ("rt", "imdb", "trec", "meld", "snli"))
    scores = _ordered((r["score"] for r in std if r["score"] not in REFERENCES), ("magnitude", "tropical", "combined", "partner_norm", "snip", "random"))
    allocs = _ordered((r["allocation"] for r in std if r["score"] not in REFERENCES), ("layer", "global"))
    keeps = sorted({float(r["keep"]) for r in std if r["score"] not in REFERENCES}, reverse=True)
    seeds = sorted({int(r["seed"]) for r in records})
    L = ["# Adapter pruning quality: accuracy vs kept fraction", ""]
    L.append(
        "Held-out metric (×100, mean ± std over seeds "
        f"{', '.join(map(str, seeds))}) of a ReLU `seq_bn` adapter (AdapterHub, reduction factor "
        f"{meta.get('reduction_factor', 16)}) and classification head trained on the frozen pretrained MiniLM-L6 "
        "(all-MiniLM-L6-v2, hidden 384, 6 layers) and pruned without retraining. No RoBERTa ships in a "
        "package here, so MiniLM-L6 stands in for the paper's RoBERTa-base. `keep` is the kept fraction "
        "of the adapter weights (A and B; biases, LayerNorms and the head are never pruned)."
    )
    L.append("")
    if meta.get("datasets"):
        L += ["## Settings", "", "| dataset | classes | train | test | max_len | epochs | train (s, mean) | notes |", "|---|---|---|---|---|---|---|---|"]
        for name, d in meta["datasets"].items():
            L.append(
                f"| {name} | {d.get('classes', '')} | {d.get('train_used', '')} of {d.get('train_pool', '')} | "
                f"{d.get('test_used', '')} of {d.get('test_pool', '')} | {d.get('max_len', '')} | {d.get('epochs', '')} | "
                f"{d.get('train_time_s', float('nan')):.0f} | {d.get('notes', '')} |"
            )
        L.append("")
        for k in ("training", "evaluation", "tropical", "driver_check", "run_time"):
            if meta.get(k):
                L.append(f"- {k.replace('_', ' ')}: {meta[k]}")
        L.append("")
    wc = win_counts(records)
    if wc:
        L += [
            "## Paired win counts (accuracy, seed means, over dataset × keep settings)",
            "",
            "| comparison | allocation | wins | ties | losses | mean difference (points) |",
            "|---|---|---|---|---|---|",
        ]
        for w in wc:
            L.append(
                f"| {w['x']} vs {w['y']} | {w['allocation']} | {w['wins']} | {w['ties']} | {w['losses']} | {100 * w['mean_diff']:+.2f} |"
            )
        L.append("")
        L.append("Per dataset (wins-ties-losses): " + "; ".join(
            f"{w['x']} vs {w['y']} {w['allocation']}: "
            + ", ".join(f"{ds} {c[0]}-{c[1]}-{c[2]}" for ds, c in sorted(w["per_dataset"].items()))
            for w in wc if w["y"] == "magnitude" and w["x"] in ("tropical", "combined")
        ))
        L.append("")
    for ds in datasets:
        metrics = _ordered((r["metric"] for r in std if r["dataset"] == ds), ("accuracy", "weighted_f1"))
        for metric in metrics:
            dense = agg.get((ds, "standard", "dense", "none", 1.0, metric))
            floor = agg.get((ds, "standard", "no_adapter", "none", 0.0, metric))
            L.append(f"## {ds}: {metric.replace('_', ' ')}")
            L.append("")
            L.append(f"Dense adapter {_fmt(dense)}; adapter removed (keep 0) {_fmt(floor)}.")
            L.append("")
            for a in allocs:
                L.append(f"allocation `{a}`:")
                L.append("")
                L += _table(agg, ds, "standard", a, metric, scores, keeps)
                L.append("")
    ls = large_sparse_table(records)
    if ls:
        L += ls
    return "\n".join(L) + "\n"


def large_sparse_table(records: Sequence[dict]) -> list[str]:
    """Standard adapter vs a 2× wider adapter pruned to the same number of weights."""
    lsr = [r for r in records if r.get("adapter") == "large_sparse" and r["metric"] == "accuracy"]
    if not lsr:
        return []
    agg = aggregate(r for r in records if r["metric"] == "accuracy")
    out = []
    for ds in _ordered((r["dataset"] for r in lsr), ()):
        sub = [r for r in lsr if r["dataset"] == ds]
        scores = _ordered((r["score"] for r in sub if r["score"] not in REFERENCES), ("magnitude", "tropical", "combined", "partner_norm", "snip", "random"))
        allocs = _ordered((r["allocation"] for r in sub if r["score"] not in REFERENCES), ("layer", "global"))
        keeps = sorted({float(r["keep"]) for r in sub if r["score"] not in REFERENCES}, reverse=True)
        d_std = agg.get((ds, "standard", "dense", "none", 1.0, "accuracy"))
        d_ls = agg.get((ds, "large_sparse", "dense", "none", 1.0, "accuracy"))
        out += [
            f"## Large-Sparse on {ds} (accuracy)",
            "",
            "SparseAdapter's Large-Sparse setting: an adapter with twice the bottleneck (reduction factor 8) "
            "trained the same way, then pruned to the same number of weights as the standard adapter "
            "(its kept fraction is half of `keep`, which is measured against the standard adapter). "
            f"Dense: standard {_fmt(d_std)}, large {_fmt(d_ls)}. Cells: standard / large-sparse.",
            "",
        ]
        for a in allocs:
            out.append(f"allocation `{a}`:")
            out.append("")
            out.append("| keep (of standard) | " + " | ".join(scores) + " |")
            out.append("|---|" + "---|" * len(scores))
            wins = n = 0
            for k in keeps:
                cells = []
                for s in scores:
                    st = agg.get((ds, "standard", s, a, k, "accuracy"))
                    lg = agg.get((ds, "large_sparse", s, a, k, "accuracy"))
                    cells.append(f"{_fmt(st)} / {_fmt(lg)}")
                    if st and lg and st[2] and lg[2]:
                        n += 1
                        wins += lg[0] > st[0]
                out.append(f"| {k:g} | " + " | ".join(cells) + " |")
            out.append("")
            out.append(f"Large-sparse beats the standard adapter in {wins} of {n} (score, keep) settings.")
            out.append("")
    return out


def plot(records: Sequence[dict], out_dir: str) -> list[str]:
    """One PNG per dataset (accuracy vs kept fraction, a panel per allocation, a line per score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(records)
    paths = []
    std = [r for r in records if r.get("adapter", "standard") == "standard"]
    datasets = _ordered((r["dataset"] for r in std), ("rt", "imdb", "trec", "meld", "snli"))
    scores = _ordered((r["score"] for r in std if r["score"] not in REFERENCES), ("magnitude", "tropical", "combined", "partner_norm", "snip", "random"))
    allocs = _ordered((r["allocation"] for r in std if r["score"] not in REFERENCES), ("layer", "global"))
    styles = {"magnitude": ("tab:blue", "o"), "tropical": ("tab:red", "s"), "combined": ("tab:purple", "D"),
              "partner_norm": ("tab:orange", "^"), "snip": ("tab:green", "v"), "random": ("tab:gray", "x")}
    for ds in datasets:
        fig, axes = plt.subplots(1, len(allocs), figsize=(5.2 * len(allocs), 4), squeeze=False, sharey=True)
        for ax, a in zip(axes[0], allocs):
            for s in scores:
                pts = sorted((k[4], v) for k, v in agg.items()
                             if k[0] == ds and k[1] == "standard" and k[2] == s and k[3] == a and k[5] == "accuracy")
                if not pts:
                    continue
                c, mk = styles.get(s, (None, "."))
                ax.errorbar([p[0] for p in pts], [100 * p[1][0] for p in pts], yerr=[100 * p[1][1] for p in pts],
                            label=s, color=c, marker=mk, ms=4, capsize=2, lw=1.2)
            dense = agg.get((ds, "standard", "dense", "none", 1.0, "accuracy"))
            floor = agg.get((ds, "standard", "no_adapter", "none", 0.0, "accuracy"))
            if dense:
                ax.axhline(100 * dense[0], color="k", ls="--", lw=0.8, label="dense")
            if floor:
                ax.axhline(100 * floor[0], color="k", ls=":", lw=0.8, label="adapter removed")
            ax.set_xscale("log")
            ax.set_xlabel("kept fraction of adapter weights")
            ax.set_title(f"{ds}, allocation {a}")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("test accuracy (%)")
        axes[0][-1].legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        p = os.path.join(out_dir, f"accuracy_{ds}.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    lsr = [r for r in records if r.get("adapter") == "large_sparse"]
    for ds in _ordered((r["dataset"] for r in lsr), ()):
        allocs_ls = _ordered((r["allocation"] for r in lsr if r["dataset"] == ds and r["score"] not in REFERENCES), ("layer", "global"))
        sc_ls = _ordered((r["score"] for r in lsr if r["dataset"] == ds and r["score"] not in REFERENCES), scores)
        fig, axes = plt.subplots(1, len(allocs_ls), figsize=(5.2 * len(allocs_ls), 4), squeeze=False)
        for ax, a in zip(axes[0], allocs_ls):
            for s in sc_ls:
                c, mk = styles.get(s, (None, "."))
                for ad, ls in (("standard", "-"), ("large_sparse", "--")):
                    pts = sorted((k[4], v) for k, v in agg.items()
                                 if k[0] == ds and k[1] == ad and k[2] == s and k[3] == a and k[5] == "accuracy")
                    if pts:
                        ax.plot([p[0] for p in pts], [100 * p[1][0] for p in pts], color=c, marker=mk, ms=3, ls=ls,
                                label=f"{s} ({'r' if ad == 'standard' else '2r'})")
            ax.set_xscale("log")
            ax.set_xlabel("weights kept / standard adapter's weights")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{ds}: standard (solid) vs large-sparse (dashed), {a}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        p = os.path.join(out_dir, f"large_sparse_{ds}.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def write_all(records: Sequence[dict], out_dir: str, meta: dict | None = None, plots: bool = True) -> dict:
    """results.json, results.csv, table.md, wins.json and the PNG plots under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".results.json.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(list(records), f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "results.json"))
    write_csv(records, os.path.join(out_dir, "results.csv"))
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(markdown(records, meta))
    wins = win_counts(records)
    with open(os.path.join(out_dir, "wins.json"), "w") as f:
        json.dump(wins, f, indent=1)
    if meta is not None:
        with open(os.path.join(out_dir, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, default=str)
    paths = plot(records, out_dir) if plots and records else []
    return {"wins": wins, "plots": paths}
