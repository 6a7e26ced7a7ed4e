"""When pruning happens: the three schedules of the quality benchmark.

* ``post``     prune the trained adapter, evaluate without retraining (the tropical paper's
               setting, and the benchmark's original one);
* ``post-ft``  prune the trained adapter, then a short masked fine-tune of the adapter and
               head (``ft_fraction`` of one epoch: a seeded subset of that share of the
               training set, one pass, the training's learning-rate schedule), evaluate;
* ``init``     SparseAdapter's setting (He et al. 2022): prune the freshly initialised
               adapter, scoring on a prune set drawn from the training data, then train the
               adapter and head with the masks fixed, exactly as the dense adapter is
               trained (same seed, batches and schedule), and evaluate.

The training loop is ``train.train_adapter`` for all of them; masks are tropfast's own
(``tropfast.pruning.masks``), which keep pruned weights at zero through every optimizer step.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from .train import Encoded, TrainConfig, train_adapter

__all__ = [
    "SCHEDULES",
    "canonical_schedule",
    "dense_cache_path",
    "ft_subset",
    "load_trainable",
    "masked",
    "restore_trainable",
    "save_trainable",
    "snapshot_trainable",
    "train_masked",
]

SCHEDULES = ("post", "post-ft", "init")
_ALIASES = {"post_ft": "post-ft", "postft": "post-ft", "post-hoc": "post", "at-init": "init"}


def canonical_schedule(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is not a schedule; choose one of {', '.join(SCHEDULES)}")
    return key


def snapshot_trainable(model: nn.Module) -> dict[str, Tensor]:
    """Copies of every trainable parameter (adapter and head)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore_trainable(model: nn.Module, state: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise KeyError(f"the model has no parameter {missing[0]!r}")
    for n, t in state.items():
        params[n].copy_(t)


@contextmanager
def masked(model: nn.Module, infos, masks_A: list[Tensor], masks_B: list[Tensor]) -> Iterator[None]:
    """Attach pruning masks to the adapters' Linear modules for the duration of the block."""
    from tropfast.pruning import remove_masks
    from tropfast.pruning.masks import attach_mask

    try:
        for i, ma, mb in zip(infos, masks_A, masks_B):
            attach_mask(i.down, ma)
            attach_mask(i.up, mb)
        yield
    finally:
        remove_masks(model)


def ft_subset(enc: Encoded, fraction: float, seed: int) -> Encoded:
    """A seeded subset of ceil(fraction·n) training examples (the post-ft data)."""
    n = len(enc)
    k = max(1, min(n, math.ceil(fraction * n)))
    idx = list(range(n))
    random.Random(seed + 104729).shuffle(idx)
    idx = sorted(idx[:k])
    return Encoded([enc.ids[i] for i in idx], [enc.types[i] for i in idx], enc.labels[idx])


def train_masked(model: nn.Module, infos, masks_A, masks_B, enc: Encoded, cfg: TrainConfig, seed: int) -> dict:
    """``train_adapter`` with the masks attached; the pruned weights stay exactly zero."""
    with masked(model, infos, masks_A, masks_B):
        info = train_adapter(model, enc, cfg, seed)
        kept = sum(int((i.down.weight != 0).sum()) + int((i.up.weight != 0).sum()) for i in infos)
    info["nonzero_after"] = kept
    return info


def dense_cache_path(cache_dir: str, key: dict) -> str:
    """Where the trained dense adapter of ``key`` (every setting that changes it) is cached."""
    h = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"dense-{key.get('dataset', 'x')}-{h}.pt")


def save_trainable(path: str, state: dict[str, Tensor], info: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"state": state, "info": info}, tmp)
    os.replace(tmp, path)


def load_trainable(path: str) -> tuple[dict[str, Tensor], dict] | None:
    if not os.path.exists(path):
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return d["state"], d["info"]
