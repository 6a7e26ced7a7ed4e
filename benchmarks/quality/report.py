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
    "paired",
    "paper_comparisons",
    "win_counts",
    "write_csv",
    "write_all",
    "write_results",
]

FIELDS = ["dataset", "adapter", "schedule", "score", "allocation", "keep", "seed", "metric", "value", "kept_weights",
          "total_weights"]
REFERENCES = ("dense", "no_adapter")
PAIRS = (("tropical", "magnitude"), ("combined", "magnitude"), ("partner_norm", "magnitude"), ("tropical", "partner_norm"))


def _mean_std(xs: Sequence[float]) -> tuple[float, float, int]:
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(xs) / n
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, s, n


def schedule_of(r: dict) -> str:
    """A record's schedule; records written before schedules existed are ``post``."""
    return r.get("schedule", "post")


def aggregate(records: Iterable[dict], schedule: str | None = "post") -> dict[tuple, tuple[float, float, int]]:
    """(dataset, adapter, score, allocation, keep, metric) -> (mean, std, n seeds), over the
    records of one ``schedule`` (the references dense / no_adapter are ``post`` records)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        if schedule is not None and schedule_of(r) != schedule:
            continue
        key = (r["dataset"], r.get("adapter", "standard"), r["score"], r["allocation"], float(r["keep"]), r["metric"])
        groups[key].append(float(r["value"]))
    return {k: _mean_std(v) for k, v in groups.items()}


def replace_datasets(records: Sequence[dict], new: Sequence[dict], names: Iterable[str]) -> list[dict]:
    """``records`` with every record of the datasets ``names`` replaced by those of ``new``."""
    names = set(names)
    return [r for r in records if r["dataset"] not in names] + [r for r in new if r["dataset"] in names]


def write_csv(records: Sequence[dict], path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: (schedule_of(r) if k == "schedule" else r.get(k, "")) for k in FIELDS})
    os.replace(tmp, path)


def _ordered(values: Iterable, preferred: Sequence) -> list:
    vals = list(dict.fromkeys(values))
    pref = list(dict.fromkeys(preferred))  # a name listed twice in the preferred order is one column
    return [v for v in pref if v in vals] + [v for v in vals if v not in pref]


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
    every = list(records)
    records = [r for r in every if schedule_of(r) == "post"]
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
    if any(schedule_of(r) != "post" for r in every) or any(
        r["allocation"] in ("structured", "class_distribution", "erdos_renyi") for r in every
    ):
        L += papers_markdown(every, meta)
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

    every = list(records)
    records = [r for r in every if schedule_of(r) == "post"]
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
        if not allocs_ls:  # only the dense reference after training (Large-Sparse run in the init schedule only)
            continue
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
    return paths + papers_plots(every, out_dir)


def write_all(records: Sequence[dict], out_dir: str, meta: dict | None = None, plots: bool = True) -> dict:
    """results.json, results.csv, table.md, wins.json and the PNG plots under ``out_dir``."""
    write_results(records, out_dir)
    _write_text(os.path.join(out_dir, "table.md"), markdown(records, meta))
    wins = win_counts(records)
    comparisons = paper_comparisons(records)
    _write_text(os.path.join(out_dir, "wins.json"), json.dumps(wins + comparisons, indent=1))
    if meta is not None:
        _write_text(os.path.join(out_dir, "meta.json"), json.dumps(meta, indent=1, default=str))
    paths = plot(records, out_dir) if plots and records else []
    return {"wins": wins, "plots": paths}


def _write_text(path: str, text: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_results(records: Sequence[dict], out_dir: str) -> None:
    """results.json (every record carries its ``schedule``) and results.csv, atomically."""
    os.makedirs(out_dir, exist_ok=True)
    recs = [dict(r, schedule=schedule_of(r)) for r in records]
    _write_text(os.path.join(out_dir, "results.json"), json.dumps(recs, indent=1))
    write_csv(recs, os.path.join(out_dir, "results.csv"))


# ---------------------------------------------------------------------------------------
# The papers' settings: schedules, SparseAdapter's scores and allocations, the l2,1 ranking,
# class-distribution allocation.  Every comparison is paired over (dataset, keep) settings.
# ---------------------------------------------------------------------------------------
KEYS = ("dataset", "adapter", "schedule", "score", "allocation", "keep", "metric")
INIT_SCORES = ("random", "magnitude", "snip", "grasp", "synflow", "tropical")
PAPER_ALLOCS = ("layer", "global", "erdos_renyi")
TIE = 1e-12


def aggregate_all(records: Iterable[dict]) -> dict[tuple, tuple[float, float, int]]:
    """KEYS -> (mean, std, n seeds) over every schedule."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        key = (r["dataset"], r.get("adapter", "standard"), schedule_of(r), r["score"], r["allocation"], float(r["keep"]),
               r["metric"])
        groups[key].append(float(r["value"]))
    return {k: _mean_std(v) for k, v in groups.items()}


def values_by_seed(records: Iterable[dict]) -> dict[tuple, dict[int, float]]:
    """KEYS -> {seed: value} over every schedule."""
    out: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in records:
        key = (r["dataset"], r.get("adapter", "standard"), schedule_of(r), r["score"], r["allocation"], float(r["keep"]),
               r["metric"])
        out[key][int(r.get("seed", 0))] = float(r["value"])
    return dict(out)


def paired(
    agg: dict,
    x: dict,
    y: dict,
    metric: str = "accuracy",
    keeps: Iterable[float] | None = None,
    by_seed: dict[tuple, dict[int, float]] | None = None,
) -> dict | None:
    """x against y over every (dataset, keep) where both have seed means.

    x, y: fixed values of some of KEYS (adapter defaults to "standard"); the remaining keys
    vary and must match.  With ``by_seed`` (``values_by_seed``) both sides are averaged over
    the seeds they share only, and a setting without a shared seed is left out.  Returns
    wins / ties / losses of x, the mean difference x − y, the number of settings and the
    counts per dataset; None when no setting pairs up.
    """
    x = dict({"adapter": "standard"}, **x)
    y = dict({"adapter": "standard"}, **y)
    keep_set = None if keeps is None else {float(k) for k in keeps}
    w = t = lost = 0
    diffs: list[float] = []
    per_ds: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for k, (m, _, n) in sorted(agg.items()):
        d = dict(zip(KEYS, k))
        if d["metric"] != metric or n == 0 or any(d[f] != v for f, v in x.items()):
            continue
        if keep_set is not None and d["keep"] not in keep_set:
            continue
        ykey = tuple(dict(d, **y)[f] for f in KEYS)
        other = agg.get(ykey)
        if other is None or other[2] == 0:
            continue
        if by_seed is not None:
            sx, sy = by_seed.get(k, {}), by_seed.get(ykey, {})
            common = sorted(set(sx) & set(sy))
            if not common:
                continue
            diff = sum(sx[q] - sy[q] for q in common) / len(common)
        else:
            diff = m - other[0]
        diffs.append(diff)
        i = 1 if abs(diff) < TIE else (0 if diff > 0 else 2)
        w, t, lost = w + (i == 0), t + (i == 1), lost + (i == 2)
        per_ds[d["dataset"]][i] += 1
    if not diffs:
        return None
    return {"wins": w, "ties": t, "losses": lost, "settings": len(diffs), "mean_diff": sum(diffs) / len(diffs),
            "per_dataset": dict(per_ds), "metric": metric}


def _label(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items() if k != "adapter" or v != "standard")


def paper_comparisons(records: Sequence[dict], metric: str = "accuracy") -> list[dict]:
    """Every new comparison the records allow, as rows {group, x, y, wins, ties, losses, ...}."""
    agg = aggregate_all(records)
    by_seed = values_by_seed(records)
    have = {(k[1], k[2], k[3], k[4]) for k in agg}  # (adapter, schedule, score, allocation)

    def has(schedule: str, score: str, alloc: str, adapter: str = "standard") -> bool:
        return (adapter, schedule, score, alloc) in have

    rows: list[dict] = []

    def add(group: str, x: dict, y: dict, keeps=None) -> None:
        res = paired(agg, x, y, metric, keeps, by_seed)
        if res is not None:
            rows.append(dict(res, group=group, x=_label(x), y=_label(y)))

    scores = sorted({k[3] for k in agg if k[3] not in REFERENCES})
    allocs = sorted({k[4] for k in agg if k[4] != "none"})
    init_keeps = sorted({k[5] for k in agg if k[2] == "init"})
    # 1. pruning at initialisation against post-hoc pruning, per score and allocation
    for sc in scores:
        for al in allocs:
            if has("init", sc, al) and has("post", sc, al):
                add("init vs post", {"schedule": "init", "score": sc, "allocation": al},
                    {"schedule": "post"}, keeps=init_keeps)
    # 2. scores against magnitude (and random) within each schedule
    for sch in ("init", "post", "post-ft"):
        for al in allocs:
            for x in ("snip", "grasp", "synflow", "tropical", "combined", "random"):
                for y in ("magnitude", "random"):
                    if x != y and has(sch, x, al) and has(sch, y, al) and (sch != "post" or x in ("snip", "grasp", "synflow")):
                        add(f"scores ({sch})", {"schedule": sch, "score": x, "allocation": al}, {"score": y})
    # 3. does fine-tuning erase the gap: the same pairs, post and post-ft, at the post-ft keeps
    ft_keeps = sorted({k[5] for k in agg if k[2] == "post-ft"})
    for al in allocs:
        for x in ("tropical", "combined"):
            for sch in ("post", "post-ft"):
                if has("post-ft", x, al) and has(sch, x, al) and has(sch, "magnitude", al):
                    add("fine-tuning and the score gap", {"schedule": sch, "score": x, "allocation": al},
                        {"score": "magnitude"}, keeps=ft_keeps)
        for x in ("magnitude", "tropical", "combined"):
            if has("post-ft", x, al) and has("post", x, al):
                add("fine-tuning gain", {"schedule": "post-ft", "score": x, "allocation": al}, {"schedule": "post"},
                    keeps=ft_keeps)
    # 4. allocations: Erdős–Rényi and class-distribution against layer and global
    for sch in ("init", "post"):
        for sc in scores:
            for x, ys in (("erdos_renyi", ("layer", "global")), ("class_distribution", ("global", "layer"))):
                for yal in ys:
                    if has(sch, sc, x) and has(sch, sc, yal):
                        add(f"allocations ({sch})", {"schedule": sch, "score": sc, "allocation": x}, {"allocation": yal})
    # 5. structured: the l2,1 ranking against the norm rankings
    for x, y in (("tropical_l21", "tropical"), ("tropical_l21", "magnitude"), ("tropical", "magnitude")):
        if has("post", x, "structured") and has("post", y, "structured"):
            add("structured unit ranking", {"schedule": "post", "score": x, "allocation": "structured"}, {"score": y})
    # 6. Large-Sparse against the standard adapter, per schedule
    for sch in ("init", "post"):
        for sc in scores:
            for al in allocs:
                if has(sch, sc, al, "large_sparse") and has(sch, sc, al):
                    add(f"Large-Sparse ({sch})", {"adapter": "large_sparse", "schedule": sch, "score": sc, "allocation": al},
                        {"adapter": "standard"})
    return rows


def _grid_table(agg: dict, ds: str, adapter: str, schedule: str, allocation: str, metric: str, scores, keeps) -> list[str]:
    lines = ["| keep | " + " | ".join(scores) + " |", "|---|" + "---|" * len(scores)]
    for k in keeps:
        cells = [_fmt(agg.get((ds, adapter, schedule, s, allocation, k, metric))) for s in scores]
        lines.append(f"| {k:g} | " + " | ".join(cells) + " |")
    return lines


def papers_markdown(records: Sequence[dict], meta: dict | None = None) -> list[str]:
    """The sections of the schedules, new scores and allocations (appended to table.md)."""
    meta = meta or {}
    agg = aggregate_all(records)
    L = ["# Schedules, SparseAdapter's scores and allocations, the l2,1 ranking, class distribution", ""]
    st = meta.get("schedule_settings") or {}
    for k in ("post", "post-ft", "init", "prune_set"):
        if st.get(k):
            L.append(f"- {k}: {st[k]}")
    if st:
        L.append("")
    rows = paper_comparisons(records)
    if rows:
        L += ["## Paired comparisons (accuracy, seed means, over dataset × keep settings)", "",
              "| group | x | y | wins | ties | losses | settings | mean x − y (points) |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            L.append(f"| {r['group']} | {r['x']} | {r['y']} | {r['wins']} | {r['ties']} | {r['losses']} | "
                     f"{r['settings']} | {100 * r['mean_diff']:+.2f} |")
        L.append("")
    std = [r for r in records if r.get("adapter", "standard") == "standard"]
    datasets = _ordered((r["dataset"] for r in std), ("rt", "imdb", "trec", "meld", "snli"))
    sections = (
        ("init", "init", ("layer", "global", "erdos_renyi", "matrix")),
        ("post-ft", "post-ft", ("layer", "global")),
        ("post (structured)", "post", ("structured",)),
        ("post (class_distribution, global, layer)", "post", ("class_distribution",)),
    )
    for title, sch, want in sections:
        for ds in datasets:
            sub = [r for r in std if r["dataset"] == ds and schedule_of(r) == sch and r["allocation"] in want]
            if not sub:
                continue
            scores = _ordered((r["score"] for r in sub), ("magnitude", "tropical", "combined", "tropical_l21") + INIT_SCORES)
            allocs = _ordered((r["allocation"] for r in sub), want)
            if sch == "post" and "class_distribution" in want:
                allocs = ["class_distribution", "global", "layer"]
                keeps = sorted({float(r["keep"]) for r in sub}, reverse=True)
            else:
                keeps = sorted({float(r["keep"]) for r in sub}, reverse=True)
            dense = agg.get((ds, "standard", "post", "dense", "none", 1.0, "accuracy"))
            L += [f"## {ds}: {title} (accuracy)", "", f"Dense adapter {_fmt(dense)}.", ""]
            for a in allocs:
                L += [f"allocation `{a}`" + (" (post)" if sch == "post" and a != want[0] else "") + ":", ""]
                L += _grid_table(agg, ds, "standard", sch, a, "accuracy", scores, keeps)
                L.append("")
    lsr = [r for r in records if r.get("adapter") == "large_sparse" and schedule_of(r) == "init"]
    for ds in _ordered((r["dataset"] for r in lsr), ()):
        sub = [r for r in lsr if r["dataset"] == ds]
        scores = _ordered((r["score"] for r in sub), ("magnitude", "tropical", "combined") + INIT_SCORES)
        keeps = sorted({float(r["keep"]) for r in sub}, reverse=True)
        d_std = agg.get((ds, "standard", "post", "dense", "none", 1.0, "accuracy"))
        d_ls = agg.get((ds, "large_sparse", "post", "dense", "none", 1.0, "accuracy"))
        L += [f"## Large-Sparse at initialisation on {ds} (accuracy)", "",
              "A 2× bottleneck adapter pruned at initialisation to the same number of weights as the standard "
              "adapter (its kept fraction is half of `keep`), then trained with the masks fixed. "
              f"Dense: standard {_fmt(d_std)}, large {_fmt(d_ls)}. Cells: standard (init) / large-sparse (init).", ""]
        for a in _ordered((r["allocation"] for r in sub), ("layer", "global")):
            L += [f"allocation `{a}`:", "", "| keep (of standard) | " + " | ".join(scores) + " |",
                  "|---|" + "---|" * len(scores)]
            for k in keeps:
                cells = [f"{_fmt(agg.get((ds, 'standard', 'init', s, a, k, 'accuracy')))} / "
                         f"{_fmt(agg.get((ds, 'large_sparse', 'init', s, a, k, 'accuracy')))}" for s in scores]
                L.append(f"| {k:g} | " + " | ".join(cells) + " |")
            L.append("")
    return L


_STYLES = {"magnitude": ("tab:blue", "o"), "tropical": ("tab:red", "s"), "combined": ("tab:purple", "D"),
           "partner_norm": ("tab:orange", "^"), "snip": ("tab:green", "v"), "random": ("tab:gray", "x"),
           "grasp": ("tab:brown", "P"), "synflow": ("tab:cyan", "*"), "tropical_l21": ("darkred", "h")}


def _curve(ax, agg, ds, adapter, schedule, score, alloc, **kw) -> None:
    pts = sorted((k[5], v) for k, v in agg.items() if k[0] == ds and k[1] == adapter and k[2] == schedule
                 and k[3] == score and k[4] == alloc and k[6] == "accuracy")
    if pts:
        c, mk = _STYLES.get(score, (None, "."))
        ax.errorbar([p[0] for p in pts], [100 * p[1][0] for p in pts], yerr=[100 * p[1][1] for p in pts],
                    color=kw.pop("color", c), marker=mk, ms=4, capsize=2, lw=1.2, **kw)


def papers_plots(records: Sequence[dict], out_dir: str) -> list[str]:
    """init_<ds>.png (scores × allocations at initialisation), schedules_<ds>.png (post, post-ft,
    init for magnitude / tropical / combined), structured.png, class_distribution.png and
    large_sparse_init_<ds>.png, for whatever the records hold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate_all(records)
    paths: list[str] = []
    std = [r for r in records if r.get("adapter", "standard") == "standard"]
    datasets = _ordered((r["dataset"] for r in std), ("rt", "imdb", "trec", "meld", "snli"))

    def ref(ax, ds):
        dense = agg.get((ds, "standard", "post", "dense", "none", 1.0, "accuracy"))
        if dense:
            ax.axhline(100 * dense[0], color="k", ls="--", lw=0.8, label="dense")

    def save(fig, name):
        fig.tight_layout()
        p = os.path.join(out_dir, name)
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    for ds in datasets:
        init = [r for r in std if r["dataset"] == ds and schedule_of(r) == "init"]
        if init:
            allocs = _ordered((r["allocation"] for r in init), PAPER_ALLOCS)
            scores = _ordered((r["score"] for r in init), INIT_SCORES)
            fig, axes = plt.subplots(1, len(allocs), figsize=(5.2 * len(allocs), 4), squeeze=False, sharey=True)
            for ax, a in zip(axes[0], allocs):
                for sc in scores:
                    _curve(ax, agg, ds, "standard", "init", sc, a, label=sc)
                ref(ax, ds)
                ax.set_xscale("log")
                ax.set_xlabel("kept fraction")
                ax.set_title(f"{ds}: pruned at init, trained masked ({a})")
                ax.grid(alpha=0.3)
            axes[0][0].set_ylabel("test accuracy (%)")
            axes[0][-1].legend(fontsize=7, loc="lower right")
            save(fig, f"init_{ds}.png")
        sch_recs = [r for r in std if r["dataset"] == ds and r["allocation"] == "layer"
                    and r["score"] in ("magnitude", "tropical", "combined")]
        if {schedule_of(r) for r in sch_recs} & {"post-ft", "init"}:
            fig, ax = plt.subplots(figsize=(6.2, 4.2))
            for sch, ls in (("post", ":"), ("post-ft", "-"), ("init", "--")):
                for sc in ("magnitude", "tropical", "combined"):
                    _curve(ax, agg, ds, "standard", sch, sc, "layer", ls=ls, label=f"{sc} ({sch})")
            ref(ax, ds)
            ax.set_xscale("log")
            ax.set_xlabel("kept fraction")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{ds}, layer: post (dotted), post-ft (solid), init (dashed)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
            save(fig, f"schedules_{ds}.png")
    for alloc, fname, title, scores in (
        ("structured", "structured.png", "structured (whole units)", ("magnitude", "tropical", "tropical_l21")),
        ("class_distribution", "class_distribution.png", "class_distribution (solid) / global (dashed) / layer (dotted)",
         ("magnitude", "tropical")),
    ):
        dss = [ds for ds in datasets if any(r["dataset"] == ds and r["allocation"] == alloc for r in std)]
        if not dss:
            continue
        fig, axes = plt.subplots(1, len(dss), figsize=(5.0 * len(dss), 4), squeeze=False)
        for ax, ds in zip(axes[0], dss):
            for sc in scores:
                _curve(ax, agg, ds, "standard", "post", sc, alloc, label=f"{sc}")
                if alloc == "class_distribution":
                    _curve(ax, agg, ds, "standard", "post", sc, "global", ls="--", label=f"{sc} (global)")
                    _curve(ax, agg, ds, "standard", "post", sc, "layer", ls=":", label=f"{sc} (layer)")
            ref(ax, ds)
            ax.set_xscale("log")
            ax.set_xlabel("kept fraction")
            ax.set_title(f"{ds}: {title}", fontsize=8)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("test accuracy (%)")
        axes[0][-1].legend(fontsize=6)
        save(fig, fname)
    lsr = [r for r in records if r.get("adapter") == "large_sparse" and schedule_of(r) == "init"]
    for ds in _ordered((r["dataset"] for r in lsr), ()):
        sc_ls = _ordered((r["score"] for r in lsr if r["dataset"] == ds), INIT_SCORES)
        fig, ax = plt.subplots(figsize=(6.2, 4.2))
        for sc in sc_ls:
            c, _ = _STYLES.get(sc, (None, "."))
            _curve(ax, agg, ds, "standard", "init", sc, "layer", label=f"{sc} (r)")
            _curve(ax, agg, ds, "large_sparse", "init", sc, "layer", ls="--", label=f"{sc} (2r)")
        ref(ax, ds)
        ax.set_xscale("log")
        ax.set_xlabel("weights kept / standard adapter's weights")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{ds}, pruned at init: standard (solid) vs large-sparse (dashed)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        save(fig, f"large_sparse_init_{ds}.png")
    return paths
