"""Write synthetic adapter fleets for the prune_saved benchmark (seeded, nothing downloaded).

    python benchmarks/fleet/generate.py fleet DIR --count 500
        DIR/task0000 ... : RoBERTa-base-sized seq_bn adapters (12 layers, d = 768, r = 48, ReLU),
        written by stock ``model.save_adapter(..., use_safetensors=True)`` from a RoBERTa built from
        a config (random weights; the backbone is shrunk where the adapters do not see it).
    python benchmarks/fleet/generate.py llm DIR
        DIR: an LLM-style sharded checkpoint (model.safetensors.index.json + shards, bf16):
        32 layers, hidden 4096, AdapterHub bottleneck adapters r = 64 after attention
        (``attention_adapters``) and after the FFN (``output_adapters``), plus backbone tensors
        (embeddings, norms, a slice of every attention/MLP projection) that pruning must skip.

Weights are N(0, σ²) with a per-adapter σ and a few larger units, so adapters differ the
way trained ones do; every adapter is reproducible from (--seed, its index).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch


def _adapter_weights(params: dict, g: torch.Generator) -> None:
    sigma = 0.02 + 0.06 * torch.rand(1, generator=g).item()
    for _, p in sorted(params.items()):
        w = torch.randn(p.shape, generator=g) * sigma
        if p.dim() == 2:  # a few strong hidden units
            r = min(p.shape)
            scale = torch.ones(r)
            scale[torch.randperm(r, generator=g)[: max(1, r // 8)]] = 3.0
            w = w * (scale[:, None] if p.shape[0] == r else scale[None, :])
        p.data = w


def make_fleet(root: str, count: int, seed: int = 0, start: int = 0, quiet: bool = False) -> list[str]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("adapters").setLevel(logging.ERROR)
    from adapters import AutoAdapterModel, SeqBnConfig
    from transformers import RobertaConfig

    cfg = RobertaConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=64,  # the adapters never see the FFN width
        vocab_size=64,
        max_position_embeddings=34,
    )
    torch.manual_seed(seed)
    model = AutoAdapterModel.from_config(cfg)
    os.makedirs(root, exist_ok=True)
    paths = []
    t0 = time.perf_counter()
    for k in range(start, start + count):
        name = f"task{k:04d}"
        model.add_adapter(name, config=SeqBnConfig(reduction_factor=16, non_linearity="relu"))  # r = 768 / 16 = 48
        params = {n: p for n, p in model.named_parameters() if f".adapters.{name}." in n}
        _adapter_weights(params, torch.Generator().manual_seed(seed * 1_000_003 + k))
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        model.save_adapter(d, name, use_safetensors=True)
        model.delete_adapter(name)
        paths.append(d)
        if not quiet and (k + 1 - start) % 50 == 0:
            print(f"  {k + 1 - start}/{count} adapters, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return paths


def make_llm(
    root: str,
    layers: int = 32,
    hidden: int = 4096,
    r: int = 64,
    seed: int = 0,
    shard_mb: int = 64,
    backbone_rows: int = 64,
    vocab: int = 2048,
) -> str:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16
    name = "task"
    tensors: list[tuple[str, torch.Tensor]] = [
        ("model.embed_tokens.weight", torch.randn(vocab, hidden, generator=g).to(dt))
    ]
    for i in range(layers):
        pre = f"model.layers.{i}"
        tensors.append((f"{pre}.input_layernorm.weight", torch.ones(hidden, dtype=dt)))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors.append(
                (f"{pre}.self_attn.{proj}.weight", (torch.randn(backbone_rows, hidden, generator=g) * 0.02).to(dt))
            )
        for loc in ("attention_adapters", "output_adapters"):
            ad = f"{pre}.{loc}.adapters.{name}"
            sigma = 0.02 + 0.06 * torch.rand(1, generator=g).item()
            tensors.append((f"{ad}.adapter_down.0.weight", (torch.randn(r, hidden, generator=g) * sigma).to(dt)))
            tensors.append((f"{ad}.adapter_down.0.bias", torch.zeros(r, dtype=dt)))
            tensors.append((f"{ad}.adapter_up.weight", (torch.randn(hidden, r, generator=g) * sigma).to(dt)))
            tensors.append((f"{ad}.adapter_up.bias", torch.zeros(hidden, dtype=dt)))
        tensors.append((f"{pre}.post_attention_layernorm.weight", torch.ones(hidden, dtype=dt)))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            tensors.append(
                (f"{pre}.mlp.{proj}.weight", (torch.randn(backbone_rows, hidden, generator=g) * 0.02).to(dt))
            )
    tensors.append(("model.norm.weight", torch.ones(hidden, dtype=dt)))
    tensors.append(("lm_head.weight", (torch.randn(vocab, hidden, generator=g) * 0.02).to(dt)))
    os.makedirs(root, exist_ok=True)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for k, t in tensors:
        nb = t.numel() * t.element_size()
        if shards[-1] and size + nb > shard_mb * 2**20:
            shards.append([])
            size = 0
        shards[-1].append((k, t))
        size += nb
    wm = {}
    for s, part in enumerate(shards):
        fn = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(dict(part), os.path.join(root, fn), metadata={"format": "pt"})
        wm.update({k: fn for k, _ in part})
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f, indent=2)
    hub_cfg = {
        "architecture": "bottleneck",
        "mh_adapter": True,
        "output_adapter": True,
        "reduction_factor": hidden // r,
        "non_linearity": "relu",
        "phm_layer": False,
        "original_ln_before": True,
        "original_ln_after": True,
        "residual_before_ln": True,
        "ln_before": False,
        "ln_after": False,
        "scaling": 1.0,
        "is_parallel": False,
    }
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "torch_dtype": "bfloat16",
        "note": "synthetic: backbone projections are slices, for the prune_saved benchmark",
        "adapters": {
            "adapters": {name: "cfg0"},
            "config_map": {"cfg0": hub_cfg},
            "fusion_config_map": {},
            "fusions": {},
        },
    }
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("fleet", "llm"))
    p.add_argument("dir")
    p.add_argument("--count", type=int, default=500, help="fleet: number of adapters")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=32, help="llm: layers")
    p.add_argument("--hidden", type=int, default=4096, help="llm: hidden size")
    p.add_argument("--rank", type=int, default=64, help="llm: adapter bottleneck r")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # small tensor ops: thread hand-offs cost more than they save
    t0 = time.perf_counter()
    if a.what == "fleet":
        make_fleet(a.dir, a.count, a.seed)
    else:
        make_llm(a.dir, a.layers, a.hidden, a.rank, a.seed)
    print(f"wrote {a.dir} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
