"""Adapter placement on MiniLM-L6: gradient rank vs every-layer vs random, at equal budgets.

    python -m benchmarks.placement.run --smoke --out /tmp/p          # CI: tiny, seconds
    python -m benchmarks.placement.run                                 # the full run, resumable
    python -m benchmarks.placement.run --phases speed                  # only the speed ratio

Phases (each job's records are written to results.json as soon as it finishes; a rerun with
the same --out skips the jobs already there):

* ``compare``      per dataset and seed: the every-layer reference (seq_bn after every FFN,
                   width --r-ref), a head-only model, and at each budget fraction f of the
                   reference's weights: every-layer at width f·r_ref; the top-k candidates by
                   gradient rank, k random candidates from the extended space and k from
                   the standard space, all at width --r (k = f·L·r_ref / r).  The reference
                   model is then pruned post hoc (phase ``posthoc``).
* ``posthoc``      the reference adapters pruned without retraining at --keeps with
                   magnitude and tropical scores and allocations gradient_rank, layer, global.
* ``correlation``  every candidate trained alone (width --r-corr) on --corr-dataset: its
                   accuracy against its gradient rank.
* ``speed``        scoring every candidate on 4 batches vs one training step (4 batches) of
                   the every-layer adapter, repeated, median ratio.

Training and evaluation are benchmarks/quality's (dataset loaders, tokenisation, AdamW with
warm-up, bf16 evaluation); only the adapters differ.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from typing import Sequence

import torch

from ..quality.datasets import PROJECT_ROOT, DataUnavailable, default_data_dir, load_dataset, parse_dataset_specs
from ..quality.run import PROFILES
from ..quality.train import (
    EvalPlan,
    TrainConfig,
    encode,
    evaluate,
    load_tokenizer,
    model_path,
    snip_batches,
    train_adapter,
)

__all__ = ["main", "build_parser", "SMOKE"]

HEAD = "placement_head"
STRATEGIES = ("every_layer", "gradient_rank", "random", "random_standard")
SMOKE = {"train": 32, "test": 16, "max_len": 16, "epochs": 1}


def _fractions(s: str) -> list[Fraction]:
    try:
        vals = [Fraction(x.strip()) for x in s.split(",") if x.strip()]
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected fractions like 1/4,1/12, got {s!r}") from None
    if not vals or any(not 0 < v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"budget fractions must lie in (0, 1), got {s!r}")
    return vals


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.placement.run",
                                description="Adapter placement by gradient rank on MiniLM-L6 (CPU).")
    p.add_argument("--out", default=None,
                   help="output folder (default benchmarks/results/placement; smoke: a temp folder)")
    p.add_argument("--phases", type=_names, default=["compare", "posthoc", "correlation", "speed"])
    p.add_argument("--datasets", type=_names, default=["trec", "rt", "meld"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budgets", type=_fractions, default=[Fraction(1, 4), Fraction(1, 12)],
                   help="fractions of the every-layer reference's adapter weights")
    p.add_argument("--r-ref", type=int, default=24, help="width of the every-layer reference (384/16)")
    p.add_argument("--r", type=int, default=6, help="width of each adapter of the k-adapter placements")
    p.add_argument("--r-corr", type=int, default=24, help="width of the single adapters of the correlation phase")
    p.add_argument("--corr-dataset", default="trec")
    p.add_argument("--corr-seeds", type=int, default=1)
    p.add_argument("--rtol", type=float, default=1e-2, help="relative tolerance of the gradient rank")
    p.add_argument("--score-batches", type=int, default=4)
    p.add_argument("--keeps", type=_floats, default=[0.3, 0.1, 0.05])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--speed-reps", type=int, default=5)
    # one thread: on the shared 2-core machine two MKL/OpenMP threads made a training step 3-5x slower
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--model", default=None, help="local model directory (default: the MiniLM-L6 package)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: one dataset, one seed, one budget, 2 candidates")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


class _Log:
    def __init__(self, quiet: bool):
        self.quiet, self.t0 = quiet, time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)


def _write_json(obj, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", dir=d)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


class Store:
    """results.json (a list of records) plus the keys of the finished jobs, rewritten after every job."""

    def __init__(self, out_dir: str, config: dict):
        self.path = os.path.join(out_dir, "results.json")
        self.meta_path = os.path.join(out_dir, "meta.json")
        self.records: list[dict] = []
        self.done: set[str] = set()
        self.meta: dict = {}
        if os.path.exists(self.path) and os.path.exists(self.meta_path):
            with open(self.meta_path) as f:
                old = json.load(f)
            if old.get("config") != config:
                raise SystemExit(
                    f"{out_dir} holds results of other settings (meta.json config differs); use another --out "
                    "or remove them to start over"
                )
            with open(self.path) as f:
                self.records = json.load(f)
            self.meta = old
            self.done = set(old.get("done", []))
        self.meta["config"] = config

    def has(self, key: str) -> bool:
        return key in self.done

    def add(self, key: str, records: list[dict]) -> None:
        self.records += records
        self.done.add(key)
        self.meta["done"] = sorted(self.done)
        _write_json(self.records, self.path)
        _write_json(self.meta, self.meta_path)

    def save_meta(self) -> None:
        _write_json(self.meta, self.meta_path)


def _profile(name: str, smoke: bool) -> dict:
    prof = dict(PROFILES[name])
    if smoke:
        prof.update(SMOKE)
    return prof


def _load_base(mp: str):
    from adapters import AutoAdapterModel

    model = AutoAdapterModel.from_pretrained(mp)
    model.eval()
    return model


def _fresh(base, num_labels: int, seed: int):
    """A copy of the pretrained encoder with a new seeded classification head (same head for every strategy)."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    model.add_classification_head(HEAD, num_labels=num_labels)
    model.active_head = HEAD
    return model


def _train_eval(base, placement, ds, enc, prof, seed, args, bf16=True, keep_model=False):
    """Install ``placement`` (None: head only), train adapters + head, evaluate."""
    from tropfast import placement as P

    tr, te, plan = enc
    model = _fresh(base, ds.num_labels, seed)
    if placement is not None and placement.connections:
        inst = P.apply(model, placement, name="pl", seed=seed, head=HEAD)
        inst.train_only(head=HEAD)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.heads[HEAD].parameters():
            p.requires_grad_(True)
    cfg = TrainConfig(epochs=prof["epochs"], batch_size=args.batch_size, lr=args.lr)
    info = train_adapter(model, tr, cfg, seed)
    t0 = time.perf_counter()
    vals = evaluate(model, plan, ds.num_labels, ds.metrics, bf16)
    info["eval_time_s"] = time.perf_counter() - t0
    return vals, info, (model if keep_model else None)


def _records(base: dict, values: dict) -> list[dict]:
    return [dict(base, metric=m, value=v) for m, v in values.items()]


def _scores(base, ds, enc, seed, args, out_dir, log):
    """Gradient-rank scores of every candidate for (dataset, seed), written to scores/.

    For the correlation's dataset and seeds the singular values are kept too (4 significant
    digits), so the report can read the ranks at other tolerances.
    """
    from tropfast import placement as P

    path = os.path.join(out_dir, "scores", f"{ds.name}-seed{seed}.json")
    model = _fresh(base, ds.num_labels, seed)
    batches = snip_batches(enc[0], args.score_batches, args.batch_size, seed)
    sc = P.score(model, batches, rtol=args.rtol)
    d = sc.to_dict()
    # singular values, so the correlation can be read at other tolerances
    if ds.name == args.corr_dataset and seed < args.corr_seeds:
        d["singular_values"] = {s.candidate.id: [float(f"{x:.4g}") for x in s.singular_values.tolist()] for s in sc}
    _write_json(d, path)
    log(f"  scored {len(sc)} candidates in {sc.time_s:.1f} s; top 6: "
        + ", ".join(f"{s.candidate.id} ({s.rank})" for s in sc.ranked()[:6]))
    return sc


def _compare(base, ds, enc, prof, seed, args, store, out_dir, log, phases):
    from tropfast import placement as P

    sc = _scores(base, ds, enc, seed, args, out_dir, log)
    L, d = sc.n_layers, sc.hidden
    ref_weights = L * args.r_ref * 2 * d
    common = {"phase": "compare", "dataset": ds.name, "seed": seed}
    # the every-layer reference (and, on it, the post-hoc pruning)
    key = f"compare/{ds.name}/{seed}/reference"
    need_posthoc = "posthoc" in phases and not store.has(f"posthoc/{ds.name}/{seed}")
    if ("compare" in phases and not store.has(key)) or need_posthoc:
        pl = P.every_layer(sc, args.r_ref)
        vals, info, model = _train_eval(base, pl, ds, enc, prof, seed, args, keep_model=need_posthoc)
        rec = dict(common, placement="every_layer", budget=1.0, budget_weights=ref_weights, r=args.r_ref,
                   k=len(pl.connections), weights=pl.weights(), params=pl.params(), connections=pl.ids,
                   train_time_s=info["train_time_s"], reference=True)
        if not store.has(key):
            store.add(key, _records(rec, vals))
        log(f"  reference every-layer r={args.r_ref}: {vals} ({info['train_time_s']:.0f} s)")
        if need_posthoc:
            _posthoc(model, ds, enc, seed, args, store, log)
    if "compare" not in phases:
        return sc
    key = f"compare/{ds.name}/{seed}/head_only"
    if not store.has(key):
        vals, info, _ = _train_eval(base, None, ds, enc, prof, seed, args)
        store.add(key, _records(dict(common, placement="head_only", budget=0.0, budget_weights=0, r=0, k=0, weights=0,
                                     params=0, connections=[], train_time_s=info["train_time_s"]), vals))
        log(f"  head only: {vals}")
    for f in args.budgets:
        budget_w = int(f * ref_weights)
        r_every = f * args.r_ref
        k_unit = 2 * d * args.r
        if r_every.denominator != 1 or budget_w % k_unit:
            raise SystemExit(f"budget {f}: every-layer width {r_every} or k = {budget_w}/{k_unit} is not whole")
        plans = {
            "every_layer": P.every_layer(sc, int(r_every)),
            "gradient_rank": P.select(sc, budget_w, args.r, unit="weights"),
            "random": P.random(sc, budget_w, args.r, seed=seed, unit="weights"),
            "random_standard": P.random(sc, budget_w, args.r, seed=seed, space="standard", unit="weights"),
        }
        for strategy in STRATEGIES:
            key = f"compare/{ds.name}/{seed}/{f}/{strategy}"
            if store.has(key):
                continue
            pl = plans[strategy]
            assert pl.weights() == budget_w, (strategy, pl.weights(), budget_w)
            vals, info, _ = _train_eval(base, pl, ds, enc, prof, seed, args)
            ranks = {s.candidate.id: s.rank for s in sc}
            store.add(key, _records(dict(common, placement=strategy, budget=float(f), budget_label=str(f),
                                         budget_weights=budget_w, r=pl.r, k=len(pl.connections), weights=pl.weights(),
                                         params=pl.params(), connections=pl.ids,
                                         ranks=[ranks[i] for i in pl.ids], train_time_s=info["train_time_s"]), vals))
            log(f"  budget {f} {strategy}: {', '.join(pl.ids)} -> "
                + ", ".join(f"{m} {v:.4f}" for m, v in vals.items()) + f" ({info['train_time_s']:.0f} s)")
    return sc


def _posthoc(model, ds, enc, seed, args, store, log):
    """Prune the trained reference adapters at each keep with each score and allocation, no retraining."""
    import tropfast

    tr, te, plan = enc
    inst_pattern = "*.pl_*"
    infos = tropfast.find_adapters(model, pattern=inst_pattern)
    orig = [(i.down.weight.detach().clone(), i.up.weight.detach().clone()) for i in infos]
    data = snip_batches(tr, args.score_batches, args.batch_size, seed)
    recs = []
    for keep in args.keeps:
        row = []
        for score in ("magnitude", "tropical"):
            for alloc in ("gradient_rank", "layer", "global"):
                rep = tropfast.prune(model, keep=keep, score=score, allocation=alloc, pattern=inst_pattern,
                                     keep_masks=False, data=data if alloc == "gradient_rank" else None)
                vals = evaluate(model, plan, ds.num_labels, ds.metrics, True)
                with torch.no_grad():
                    for i, (a, b) in zip(infos, orig):
                        i.down.weight.copy_(a)
                        i.up.weight.copy_(b)
                extra = {}
                if alloc == "gradient_rank":
                    extra = {"adapter_ranks": rep.options["gradient_rank"]["rank"],
                             "adapter_kept": [a.kept_A + a.kept_B for a in rep.adapters]}
                recs += _records(dict(phase="posthoc", dataset=ds.name, seed=seed, placement="every_layer", budget=1.0,
                                      r=args.r_ref, score=score, allocation=alloc, keep=keep, kept_weights=rep.kept,
                                      total_weights=rep.total, **extra), vals)
                row.append(f"{score}/{alloc} {vals['accuracy']:.3f}")
        log(f"  post hoc keep {keep:g}: " + ", ".join(row))
    store.add(f"posthoc/{ds.name}/{seed}", recs)


def _correlation(base, ds, enc, prof, seed, sc, args, store, log):
    from tropfast import placement as P

    for s in sc.items:
        c = s.candidate
        key = f"correlation/{ds.name}/{seed}/{c.id}"
        if store.has(key):
            continue
        pl = P.Placement([c], args.r_corr, "manual", n_layers=sc.n_layers, hidden=sc.hidden)
        vals, info, _ = _train_eval(base, pl, ds, enc, prof, seed, args)
        ref_weights = sc.n_layers * args.r_ref * 2 * sc.hidden
        rec = dict(phase="correlation", dataset=ds.name, seed=seed, placement="single", candidate=c.id, kind=c.kind,
                   layer=c.layer, location=c.location, source=c.source, r=args.r_corr, rank=s.rank, fro=s.fro,
                   rtol=sc.rtol, budget=pl.weights() / ref_weights, budget_weights=pl.weights(),
                   train_time_s=info["train_time_s"])
        store.add(key, _records(rec, vals))
        log(f"  alone {c.id} (rank {s.rank}): {vals['accuracy']:.4f} ({info['train_time_s']:.0f} s)")


def _speed(base, ds, enc, args, log, reps: int) -> dict:
    """Median time of scoring every candidate on 4 batches vs 4 training steps of the every-layer adapter."""
    from tropfast import placement as P

    tr = enc[0]
    batches = snip_batches(tr, args.score_batches, args.batch_size, 0)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    m_score = _fresh(base, ds.num_labels, 0)
    m_train = _fresh(base, ds.num_labels, 0)
    inst = P.apply(m_train, P.every_layer(m_train, args.r_ref), name="pl", seed=0, head=HEAD)
    params = inst.train_only(head=HEAD)
    opt = torch.optim.AdamW(params, lr=args.lr)

    def score_once():
        t0 = time.perf_counter()
        sc = P.score(m_score, batches, rtol=args.rtol)
        return time.perf_counter() - t0, len(sc)

    def train_once():
        m_train.train()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for b in batches:  # one step on the 4 batches: gradients accumulated, one optimizer update
            (m_train(**b).loss / len(batches)).backward()
        opt.step()
        dt = time.perf_counter() - t0
        m_train.eval()
        return dt

    if reps > 1:  # warm-up
        score_once()
        train_once()
    ts, tt = [], []
    n_cands = 0
    for _ in range(reps):  # interleaved, so load changes on the shared machine hit both alike
        dt, n_cands = score_once()
        ts.append(dt)
        tt.append(train_once())
    ratios = [a / b for a, b in zip(ts, tt)]
    res = {"dataset": ds.name, "batches": len(batches), "batch_size": args.batch_size, "tokens": tokens,
           "candidates": n_cands, "score_s": ts, "train_step_s": tt, "score_s_median": statistics.median(ts),
           "train_step_s_median": statistics.median(tt), "ratio_median": statistics.median(ratios), "ratios": ratios,
           "reps": reps, "threads": torch.get_num_threads(), "rtol": args.rtol,
           "train_step": f"every-layer seq_bn r={args.r_ref} + head: forward/backward of the {len(batches)} batches, "
                         "one AdamW update"}
    log(f"speed: scoring {n_cands} candidates {res['score_s_median']:.2f} s, one training step "
        f"{res['train_step_s_median']:.2f} s, ratio {res['ratio_median']:.2f} (median of {reps})")
    return res


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = _Log(args.quiet)
    torch.set_num_threads(max(1, args.threads))
    bad = [p for p in args.phases if p not in ("compare", "posthoc", "correlation", "speed")]
    if bad:
        print(f"error: unknown phase(s) {bad}", file=sys.stderr)
        return 2
    if args.smoke:
        args.seeds, args.budgets, args.keeps, args.speed_reps = 1, [Fraction(1, 4)], [0.1], 1
        args.score_batches = 1
        args.batch_size = 16
        args.corr_seeds = 1
    if args.seeds < 1 or args.corr_seeds < 1:
        print("error: --seeds and --corr-seeds must be >= 1", file=sys.stderr)
        return 2
    out_dir = args.out or (tempfile.mkdtemp(prefix="tropfast-placement-smoke-") if args.smoke
                           else os.path.join(PROJECT_ROOT, "benchmarks", "results", "placement"))
    os.makedirs(out_dir, exist_ok=True)
    data_dir = default_data_dir(args.data_dir)
    names = list(args.datasets)
    if args.smoke:
        names = ["trec" if data_dir and os.path.isdir(os.path.join(data_dir, "trec")) else "rt"]
        args.corr_dataset = names[0]
    try:
        specs = parse_dataset_specs(names)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = {k: (str(v) if isinstance(v, Fraction) else [str(x) for x in v] if isinstance(v, list) else v)
              for k, v in vars(args).items() if k not in ("out", "phases", "quiet", "no_plots", "threads", "data_dir",
                                                            "speed_reps")}
    store = Store(out_dir, config)
    mp = model_path(args.model)
    tok = load_tokenizer(mp)
    base = _load_base(mp)
    loaded = []
    for spec in specs:
        prof = _profile(spec.name, args.smoke)
        try:
            full = load_dataset(spec, data_dir, n_test=prof["test"] or 500, seed=0)
        except DataUnavailable as e:
            log(f"skipping {spec.name}: {e}")
            continue
        ds = full.subsample(prof["train"], prof["test"], seed=0)
        tr = encode(tok, ds.train_x, ds.train_y, prof["max_len"])
        te = encode(tok, ds.test_x, ds.test_y, prof["max_len"])
        enc = (tr, te, EvalPlan(te, args.eval_batch_size, tok.pad_token_id or 0))
        loaded.append((ds, prof, enc))
        store.meta.setdefault("datasets", {})[ds.name] = dict(
            ds.info, classes=ds.num_labels, max_len=prof["max_len"], epochs=prof["epochs"],
            train_mean_tokens=round(tr.mean_len, 1), test_mean_tokens=round(te.mean_len, 1))
        log(f"{ds.name}: train {len(tr)}, test {len(te)}, {ds.num_labels} classes")
    if not loaded:
        log("no dataset available")
        return 1
    store.meta.update({
        "command": "python -m benchmarks.placement.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "model": mp, "started": store.meta.get("started") or time.strftime("%Y-%m-%d %H:%M:%S"),
        "training": f"AdamW lr {args.lr}, batch {args.batch_size}, 6% warm-up then linear decay, fp32, 1 epoch "
                    "(benchmarks/quality/train.py); backbone frozen, adapters + a new 2-layer classification head "
                    "trained",
        "evaluation": "bf16 autocast, length-sorted batches (benchmarks/quality/train.py)",
    })
    t_start = time.perf_counter()
    scores_by = {}
    if "compare" in args.phases or "posthoc" in args.phases:
        for seed in range(args.seeds):
            for ds, prof, enc in loaded:
                log(f"seed {seed} {ds.name}")
                scores_by[(ds.name, seed)] = _compare(base, ds, enc, prof, seed, args, store, out_dir, log, args.phases)
    if "correlation" in args.phases:
        hit = [x for x in loaded if x[0].name == args.corr_dataset]
        if not hit:
            log(f"correlation dataset {args.corr_dataset!r} not loaded; skipped")
        for ds, prof, enc in hit:
            for seed in range(args.corr_seeds):
                sc = scores_by.get((ds.name, seed)) or _scores(base, ds, enc, seed, args, out_dir, log)
                if args.smoke:
                    sc = type(sc)(sc.ranked()[:2], sc.rtol, sc.tokens, sc.batches, sc.n_layers, sc.hidden, sc.time_s)
                log(f"correlation: {len(sc)} candidates alone on {ds.name}, seed {seed}")
                _correlation(base, ds, enc, prof, seed, sc, args, store, log)
    if "speed" in args.phases:
        ds, prof, enc = loaded[0]
        store.meta["speed"] = _speed(base, ds, enc, args, log, args.speed_reps)
    elapsed = time.perf_counter() - t_start
    store.meta["run_time_s"] = store.meta.get("run_time_s", 0.0) + elapsed
    store.meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    store.save_meta()
    from . import report

    report.write_all(store.records, out_dir, store.meta, plots=not args.no_plots)
    log(f"done in {elapsed:.0f} s: {len(store.records)} records in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
