"""Summaries of the placement benchmark: markdown tables, Spearman correlation, plots."""
from __future__ import annotations

import json
import math
import os
import random
from collections import defaultdict
from fractions import Fraction
from typing import Iterable, Sequence

__all__ = ["spearman", "permutation_p", "aggregate", "markdown", "plot", "write_all", "rank_at"]

ORDER = ("every_layer", "gradient_rank", "random", "random_standard")
LABEL = {"every_layer": "every layer (r = f·24)", "gradient_rank": "top-k gradient rank", "random": "random-k extended",
         "random_standard": "random-k standard"}
RTOLS = (None, 1e-4, 1e-3, 1e-2, 1e-1)


def _ranks(xs: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties given their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def _pearson(a: Sequence[float], b: Sequence[float]) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    sa = math.sqrt(sum((x - ma) ** 2 for x in a))
    sb = math.sqrt(sum((y - mb) ** 2 for y in b))
    if sa == 0 or sb == 0:
        return math.nan
    return sum((x - ma) * (y - mb) for x, y in zip(a, b)) / (sa * sb)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of the tie-averaged ranks)."""
    if len(x) != len(y) or len(x) < 3:
        return math.nan
    return _pearson(_ranks(x), _ranks(y))


def permutation_p(x: Sequence[float], y: Sequence[float], n: int = 20000, seed: int = 0) -> float:
    """Two-sided permutation p-value of Spearman's rho (y shuffled n times)."""
    rho = spearman(x, y)
    if math.isnan(rho):
        return math.nan
    rx, ry = _ranks(x), list(_ranks(y))
    rng = random.Random(seed)
    hits = 0
    for _ in range(n):
        rng.shuffle(ry)
        if abs(_pearson(rx, ry)) >= abs(rho) - 1e-12:
            hits += 1
    return (hits + 1) / (n + 1)


def rank_at(sv: Sequence[float], rtol: float | None, shape: tuple[int, int]) -> int:
    """Numerical rank from singular values, as torch.linalg.matrix_rank (rtol None: eps·max(m, n), float64)."""
    if not sv:
        return 0
    if rtol is None:
        rtol = 2.220446049250313e-16 * max(shape)
    top = max(sv)
    return sum(1 for s in sv if s > rtol * top)


def _mean_std(xs: Sequence[float]) -> tuple[float, float, int]:
    n = len(xs)
    if not n:
        return math.nan, math.nan, 0
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0), n


def _fmt(ms, scale: float = 100.0) -> str:
    if ms is None or ms[2] == 0:
        return "-"
    m, s, n = ms
    return f"{m * scale:.1f} ± {s * scale:.1f}" if n > 1 else f"{m * scale:.1f}"


def _budget_label(b: float) -> str:
    if b in (0.0, 1.0):
        return f"{b:g}"
    return str(Fraction(b).limit_denominator(100))


def aggregate(records: Iterable[dict], phase: str = "compare") -> dict[tuple, tuple[float, float, int]]:
    """(dataset, placement, budget, metric) -> (mean, std, n seeds)."""
    g: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        if r.get("phase") == phase:
            g[(r["dataset"], r["placement"], round(float(r["budget"]), 6), r["metric"])].append(float(r["value"]))
    return {k: _mean_std(v) for k, v in g.items()}


def _datasets(records) -> list[str]:
    seen = list(dict.fromkeys(r["dataset"] for r in records))
    pref = ["trec", "rt", "meld"]
    return [d for d in pref if d in seen] + [d for d in seen if d not in pref]


def paired(records: Sequence[dict], x: str, y: str, metric: str = "accuracy") -> dict:
    """x vs y over matching (dataset, budget, seed) runs: wins, ties, losses and mean difference."""
    by = {}
    for r in records:
        if r.get("phase") == "compare" and r["metric"] == metric:
            by[(r["placement"], r["dataset"], round(float(r["budget"]), 6), r["seed"])] = float(r["value"])
    w = t = lo = 0
    diffs = []
    for (p, ds, b, s), v in by.items():
        if p != x or (y, ds, b, s) not in by:
            continue
        d = v - by[(y, ds, b, s)]
        diffs.append(d)
        if abs(d) < 1e-12:
            t += 1
        elif d > 0:
            w += 1
        else:
            lo += 1
    return {"x": x, "y": y, "wins": w, "ties": t, "losses": lo, "n": len(diffs),
            "mean_diff": sum(diffs) / len(diffs) if diffs else math.nan}


def correlation(records: Sequence[dict], out_dir: str | None) -> list[dict]:
    """Spearman rho between each candidate's gradient rank (several tolerances) and its accuracy alone."""
    corr = [r for r in records if r.get("phase") == "correlation" and r["metric"] == "accuracy"]
    out = []
    for (ds, seed) in sorted({(r["dataset"], r["seed"]) for r in corr}):
        rs = [r for r in corr if r["dataset"] == ds and r["seed"] == seed]
        acc = [float(r["value"]) for r in rs]
        row = {"dataset": ds, "seed": seed, "n": len(rs), "rtol": rs[0].get("rtol"),
               "rho_rank": spearman([r["rank"] for r in rs], acc),
               "p_rank": permutation_p([r["rank"] for r in rs], acc),
               "rho_fro": spearman([r["fro"] for r in rs], acc),
               "p_fro": permutation_p([r["fro"] for r in rs], acc),
               "rho_layer": spearman([r["layer"] for r in rs], acc),
               "p_layer": permutation_p([r["layer"] for r in rs], acc)}
        # the last layer's candidates: the loss reads only the [CLS] token there, so their gradients
        # have a tiny rank; the correlation without them shows what the rest contributes
        last = max(r["layer"] for r in rs)
        rest = [r for r in rs if r["layer"] < last]
        row.update({"last_layer": last, "n_without_last": len(rest),
                    "rho_rank_without_last": spearman([r["rank"] for r in rest], [float(r["value"]) for r in rest]),
                    "p_rank_without_last": permutation_p([r["rank"] for r in rest], [float(r["value"]) for r in rest])})
        path = os.path.join(out_dir, "scores", f"{ds}-seed{seed}.json") if out_dir else None
        if path and os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            sv = saved["singular_values"]
            hidden = len(next(iter(sv.values())))
            row["by_rtol"] = {}
            for rt in RTOLS:
                ranks = [rank_at(sv[r["candidate"]], rt, (hidden, hidden)) for r in rs]
                row["by_rtol"]["torch default" if rt is None else f"{rt:g}"] = {
                    "rho": spearman(ranks, acc), "p": permutation_p(ranks, acc),
                    "distinct_ranks": len(set(ranks))}
        per_kind = {}
        for kind in ("seq", "par", "long"):
            sub = [r for r in rs if r["kind"] == kind]
            if len(sub) >= 3:
                per_kind[kind] = {"n": len(sub), "mean_accuracy": sum(float(r["value"]) for r in sub) / len(sub),
                                  "rho_rank": spearman([r["rank"] for r in sub], [float(r["value"]) for r in sub])}
        row["per_kind"] = per_kind
        out.append(row)
    return out


def markdown(records: Sequence[dict], meta: dict, out_dir: str | None = None) -> str:
    agg = aggregate(records)
    cmp_recs = [r for r in records if r.get("phase") == "compare"]
    datasets = _datasets(cmp_recs)
    seeds = sorted({r["seed"] for r in cmp_recs})
    budgets = sorted({round(float(r["budget"]), 6) for r in cmp_recs if 0 < float(r["budget"]) < 1}, reverse=True)
    cfg = meta.get("config", {})
    L = ["# Adapter placement by gradient rank: MiniLM-L6", ""]
    L.append(
        "Held-out metric (×100, mean ± std over seeds " + ", ".join(map(str, seeds)) + ") of adapters trained on the "
        "frozen pretrained MiniLM-L6 (all-MiniLM-L6-v2: 6 layers, hidden 384) with a new classification head. "
        f"Budgets are fractions of the adapter weights of the every-layer reference (AdapterHub's default: a "
        f"`seq_bn` adapter after the FFN of every layer, r = {cfg.get('r_ref', 24)}: "
        f"{6 * cfg.get('r_ref', 24) * 768} weights). At each budget every strategy has exactly the same number "
        f"of adapter weights: every-layer at a smaller r, or k adapters of r = {cfg.get('r', 6)} chosen by "
        "gradient rank (top-k), at random from the extended space (seq, par, long-range: 45 candidates) or at random "
        "from the standard space (seq, par: 24 candidates). Gradient ranks: rtol "
        f"{cfg.get('rtol', 0.01):g}, {cfg.get('score_batches', 4)} training batches of {cfg.get('batch_size', 32)}, "
        "taken at the frozen backbone with the seed's fresh head."
    )
    L.append("")
    if meta.get("datasets"):
        L += ["| dataset | classes | train | test | max_len | epochs |", "|---|---|---|---|---|---|"]
        for name, d in meta["datasets"].items():
            L.append(f"| {name} | {d.get('classes')} | {d.get('train_used')} of {d.get('train_pool')} | "
                     f"{d.get('test_used')} of {d.get('test_pool')} | {d.get('max_len')} | {d.get('epochs')} |")
        L.append("")
    for k in ("training", "evaluation"):
        if meta.get(k):
            L.append(f"- {k}: {meta[k]}")
    if meta.get("run_time_s"):
        threads = meta.get("threads") or (meta.get("speed") or {}).get("threads") or "?"
        L.append(f"- run time: {meta['run_time_s'] / 60:.0f} min, torch on {threads} thread(s) of a shared 2-core CPU")
    L.append("")
    for metric in ("accuracy", "weighted_f1"):
        if not any(r["metric"] == metric for r in cmp_recs):
            continue
        L += [f"## Equal-budget comparison: {metric.replace('_', ' ')}", ""]
        L.append("| dataset | budget | " + " | ".join(LABEL[p] for p in ORDER) + " |")
        L.append("|---|---|" + "---|" * len(ORDER))
        for ds in datasets:
            if not any((ds, p, b, metric) in agg for p in ORDER for b in budgets):
                continue
            for b in budgets:
                cells = [_fmt(agg.get((ds, p, b, metric))) for p in ORDER]
                best = max((agg[(ds, p, b, metric)][0], p) for p in ORDER if (ds, p, b, metric) in agg)[1]
                cells = [f"**{c}**" if p == best else c for c, p in zip(cells, ORDER)]
                L.append(f"| {ds} | {_budget_label(b)} | " + " | ".join(cells) + " |")
            ref = agg.get((ds, "every_layer", 1.0, metric))
            head = agg.get((ds, "head_only", 0.0, metric))
            L.append(f"| {ds} | 1 (reference) | {_fmt(ref)} | | | |")
            L.append(f"| {ds} | 0 (head only) | {_fmt(head)} | | | |")
        L.append("")
    pairs = [paired(records, "gradient_rank", y) for y in ("every_layer", "random", "random_standard")]
    pairs += [paired(records, "random", "random_standard"), paired(records, "random", "every_layer"),
              paired(records, "random_standard", "every_layer")]
    pairs = [p for p in pairs if p["n"]]
    if pairs:
        L += ["## Paired comparison (accuracy; every dataset × budget × seed)", "",
              "| x vs y | wins | ties | losses | mean difference (points) |", "|---|---|---|---|---|"]
        for p in pairs:
            L.append(f"| {p['x']} vs {p['y']} | {p['wins']} | {p['ties']} | {p['losses']} | "
                     f"{100 * p['mean_diff']:+.2f} |")
        L.append("")
    chosen = [r for r in cmp_recs if r["placement"] == "gradient_rank" and r["metric"] == "accuracy"]
    if chosen:
        L += ["## Placements chosen by gradient rank", "", "| dataset | budget | seed | connections (rank) |",
              "|---|---|---|---|"]
        for r in sorted(chosen, key=lambda r: (datasets.index(r["dataset"]) if r["dataset"] in datasets else 99,
                                               -r["budget"], r["seed"])):
            conns = ", ".join(f"{c} ({k})" for c, k in zip(r["connections"], r.get("ranks", [])))
            L.append(f"| {r['dataset']} | {_budget_label(r['budget'])} | {r['seed']} | {conns} |")
        L.append("")
    cor = correlation(records, out_dir)
    for c in cor:
        L += [f"## Gradient rank vs accuracy of a single adapter ({c['dataset']}, seed {c['seed']}, "
              f"{c['n']} candidates)", ""]
        L.append(f"Spearman ρ(gradient rank at rtol {c['rtol']:g}, accuracy) = {c['rho_rank']:+.3f} "
                 f"(permutation p = {c['p_rank']:.3g}); ρ(‖G‖_F, accuracy) = {c['rho_fro']:+.3f} "
                 f"(p = {c['p_fro']:.3g}); ρ(target layer, accuracy) = {c['rho_layer']:+.3f} (p = {c['p_layer']:.3g}).")
        L.append(f"Without the {c['n'] - c['n_without_last']} candidates that target the last layer "
                 f"(L{c['last_layer']}, where the loss reads only the [CLS] token, so their gradient ranks are "
                 f"tiny): ρ(gradient rank, accuracy) = {c['rho_rank_without_last']:+.3f} "
                 f"(p = {c['p_rank_without_last']:.3g}, "
                 f"n = {c['n_without_last']}).")
        L.append("")
        if c.get("by_rtol"):
            L += ["| rank tolerance | distinct ranks | Spearman ρ | p |", "|---|---|---|---|"]
            for k, v in c["by_rtol"].items():
                L.append(f"| {k} | {v['distinct_ranks']} | {v['rho']:+.3f} | {v['p']:.3g} |")
            L.append("")
        if c["per_kind"]:
            L.append("By kind: " + "; ".join(
                f"{k}: mean accuracy {100 * v['mean_accuracy']:.1f} (n {v['n']}), ρ within {v['rho_rank']:+.2f}"
                for k, v in c["per_kind"].items()) + ".")
            L.append("")
        rs = sorted((r for r in records if r.get("phase") == "correlation" and r["metric"] == "accuracy"
                     and r["dataset"] == c["dataset"] and r["seed"] == c["seed"]), key=lambda r: -float(r["value"]))
        L += ["| candidate | gradient rank | ‖G‖_F | accuracy |", "|---|---|---|---|"]
        for r in rs:
            L.append(f"| {r['candidate']} | {r['rank']} | {r['fro']:.3g} | {100 * float(r['value']):.1f} |")
        L.append("")
    ph = [r for r in records if r.get("phase") == "posthoc" and r["metric"] == "accuracy"]
    if ph:
        L += ["## Post-hoc pruning of the every-layer reference: allocation gradient_rank vs layer vs global", ""]
        L.append("The reference adapters (6 × r = 24) pruned without retraining; `keep` = kept fraction of their "
                 "weights.")
        L.append("")
        g: dict[tuple, list[float]] = defaultdict(list)
        for r in ph:
            g[(r["dataset"], r["keep"], r["score"], r["allocation"])].append(float(r["value"]))
        combos = [(s, a) for s in ("magnitude", "tropical") for a in ("gradient_rank", "layer", "global")]
        L.append("| dataset | keep | " + " | ".join(f"{s} / {a}" for s, a in combos) + " |")
        L.append("|---|---|" + "---|" * len(combos))
        for ds in _datasets(ph):
            for k in sorted({r["keep"] for r in ph}, reverse=True):
                cells = [_fmt(_mean_std(g.get((ds, k, s, a), []))) for s, a in combos]
                L.append(f"| {ds} | {k:g} | " + " | ".join(cells) + " |")
        L.append("")
        for s in ("magnitude", "tropical"):
            for other in ("layer", "global"):
                w = t = lo = 0
                diffs = []
                for (ds, k, sc, a), v in g.items():
                    if sc != s or a != "gradient_rank" or (ds, k, s, other) not in g:
                        continue
                    d = _mean_std(v)[0] - _mean_std(g[(ds, k, s, other)])[0]
                    diffs.append(d)
                    w, t, lo = w + (d > 1e-12), t + (abs(d) <= 1e-12), lo + (d < -1e-12)
                if diffs:
                    L.append(f"- {s}: gradient_rank vs {other}: {w} wins, {t} ties, {lo} losses over dataset × keep "
                             f"(seed means); mean {100 * sum(diffs) / len(diffs):+.2f} points")
        ranks = [r for r in ph if r.get("adapter_ranks")]
        if ranks:
            ex = {}
            for r in ranks:
                ex.setdefault(r["dataset"], r)
            L.append("")
            L.append("Adapter gradient ranks of the trained reference (layers 0..5, seed 0, of at most 384): "
                     + "; ".join(f"{ds} {r['adapter_ranks']}" for ds, r in ex.items()))
        L.append("")
    sp = meta.get("speed")
    if sp:
        L += ["## Speed", "",
              f"Scoring all {sp['candidates']} candidates on {sp['batches']} batches of {sp['batch_size']} "
              f"({sp['tokens']} tokens, {sp['dataset']}): median {sp['score_s_median']:.2f} s; one training step "
              f"on the same batches ({sp['train_step']}): median {sp['train_step_s_median']:.2f} s. "
              f"Ratio {sp['ratio_median']:.2f} (median of {sp['reps']} interleaved repetitions; all: "
              + ", ".join(f"{x:.2f}" for x in sp["ratios"]) + ").", ""]
    return "\n".join(L) + "\n"


def plot(records: Sequence[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    agg = aggregate(records)
    cmp_recs = [r for r in records if r.get("phase") == "compare"]
    datasets = _datasets(cmp_recs)
    if datasets:
        styles = {"every_layer": ("k", "o"), "gradient_rank": ("tab:red", "s"), "random": ("tab:blue", "^"),
                  "random_standard": ("tab:green", "v")}
        fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 3.8), squeeze=False)
        for ax, ds in zip(axes[0], datasets):
            for p in ORDER:
                pts = sorted((k[2], v) for k, v in agg.items() if k[0] == ds and k[1] == p and k[3] == "accuracy")
                if not pts:
                    continue
                c, mk = styles[p]
                ax.errorbar([x for x, _ in pts], [100 * v[0] for _, v in pts], yerr=[100 * v[1] for _, v in pts],
                            color=c, marker=mk, ms=4, capsize=2, lw=1.2, label=LABEL[p])
            head = agg.get((ds, "head_only", 0.0, "accuracy"))
            if head:
                ax.axhline(100 * head[0], color="gray", ls=":", lw=1, label="head only")
            ax.set_xscale("log")
            bs = sorted({k[2] for k in agg if k[0] == ds and k[2] > 0})
            ax.set_xticks(bs)
            ax.set_xticklabels([_budget_label(b) for b in bs])
            ax.minorticks_off()
            ax.set_xlabel("adapter-weight budget (fraction of every-layer r=24)")
            ax.set_title(ds)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("test accuracy (%)")
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        p = os.path.join(out_dir, "accuracy_vs_budget.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    corr = [r for r in records if r.get("phase") == "correlation" and r["metric"] == "accuracy"]
    if corr:
        fig, ax = plt.subplots(figsize=(5.2, 4))
        colors = {"seq": "tab:blue", "par": "tab:orange", "long": "tab:purple"}
        for kind, c in colors.items():
            sub = [r for r in corr if r["kind"] == kind]
            if sub:
                ax.scatter([r["rank"] for r in sub], [100 * float(r["value"]) for r in sub], c=c, s=18, label=kind)
        ds = corr[0]["dataset"]
        ax.set_xlabel(f"gradient rank (rtol {corr[0].get('rtol', 0.01):g})")
        ax.set_ylabel("test accuracy of the adapter alone (%)")
        ax.set_title(f"{ds}: one adapter (r={corr[0]['r']}) per candidate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(out_dir, "correlation.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def write_all(records: Sequence[dict], out_dir: str, meta: dict, plots: bool = True) -> dict:
    text = markdown(records, meta, out_dir)
    tmp = os.path.join(out_dir, ".table.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out_dir, "table.md"))
    cor = correlation(records, out_dir)
    with open(os.path.join(out_dir, ".summary.tmp"), "w") as f:
        json.dump({"correlation": cor, "paired": [paired(records, "gradient_rank", y)
                                                  for y in ("every_layer", "random", "random_standard")]}, f, indent=1)
    os.replace(os.path.join(out_dir, ".summary.tmp"), os.path.join(out_dir, "summary.json"))
    paths = plot(records, out_dir) if plots else []
    return {"table": text, "plots": paths, "correlation": cor}
