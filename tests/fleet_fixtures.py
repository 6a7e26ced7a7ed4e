"""Saved adapters on disk for the prune_saved tests: AdapterHub folders, checkpoints, plain files."""

from __future__ import annotations

import hashlib
import os

import torch
from pruning_fixtures import base_copy, tiny_model  # noqa: F401  (re-exported for the tests)
from safetensors.torch import save_file


def save_hub(path: str, seed: int, name: str, safetensors: bool = False, **kw) -> str:
    """A tiny AdapterHub seq_bn adapter (hidden 32, r 8, mh + output, 2 layers) saved with save_adapter."""
    m = tiny_model(seed=seed, name=name, **kw)
    os.makedirs(path, exist_ok=True)
    m.save_adapter(path, name, use_safetensors=safetensors)
    return path


def make_fleet(root: str, n: int = 3, prefix: str = "t") -> str:
    """root/fleet/<prefix><k>: n adapters, every other one saved as adapter.safetensors."""
    d = os.path.join(root, "fleet")
    os.makedirs(d, exist_ok=True)
    for k in range(n):
        save_hub(os.path.join(d, f"{prefix}{k}"), seed=k, name=f"{prefix}{k}", safetensors=bool(k % 2))
    return d


def make_checkpoint(path: str, seed: int = 3, shard: str = "20KB") -> str:
    """The tiny BERT with adapter 'a' saved with save_pretrained, sharded (model.safetensors.index.json)."""
    m = tiny_model(seed=seed, name="a", head=False)
    m.save_pretrained(path, max_shard_size=shard)
    return path


def tied_state(seed: int, layers: int = 3, d: int = 12, r: int = 4, levels: int = 3) -> dict:
    """A plain state dict of bottleneck pairs with few distinct values (many exact ties) and backbone tensors."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(layers):
        sd[f"model.layers.{i}.mlp.weight"] = torch.randn(d, d, generator=g)
        for loc in ("attn_adapter", "ffn_adapter"):
            sd[f"model.layers.{i}.{loc}.down.weight"] = (
                torch.randint(-levels, levels + 1, (r, d), generator=g).float() * 0.5
            )
            sd[f"model.layers.{i}.{loc}.down.bias"] = torch.randn(r, generator=g)
            sd[f"model.layers.{i}.{loc}.up.weight"] = (
                torch.randint(-levels, levels + 1, (d, r), generator=g).float() * 0.5
            )
            sd[f"model.layers.{i}.{loc}.up.bias"] = torch.randn(d, generator=g)
    sd["model.norm.weight"] = torch.ones(d)
    return sd


def save_sharded(path: str, sd: dict, shards: int = 2) -> str:
    """sd as an HF-style sharded checkpoint: model-0000k-of-0000n.safetensors + model.safetensors.index.json."""
    import json

    os.makedirs(path, exist_ok=True)
    keys = list(sd)
    per = -(-len(keys) // shards)
    wm = {}
    for s in range(shards):
        fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[s * per : (s + 1) * per]}
        save_file(part, os.path.join(path, fn), metadata={"format": "pt"})
        wm.update({k: fn for k in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "toy"}, f)
    return path


def tree_hashes(d: str, skip: tuple[str, ...] = ("summary.json",)) -> dict[str, str]:
    """sha1 of every file under d (relative paths), ignoring the names in skip."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            if f in skip:
                continue
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def hub_params(model, name: str) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if f".adapters.{name}." in k}
