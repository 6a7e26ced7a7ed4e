"""A tiny BERT with AdapterHub seq_bn adapters, built locally (no downloads)."""
from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("adapters")

from adapters import AutoAdapterModel, SeqBnConfig  # noqa: E402
from transformers import BertConfig  # noqa: E402

warnings.filterwarnings("ignore", message=".*adapters available but none are activated.*")

torch.set_num_threads(1)

HIDDEN = 32
VOCAB = 100


def tiny_config() -> BertConfig:
    return BertConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def tiny_model(
    seed: int = 0,
    name: str = "a",
    non_linearity: str = "relu",
    mh_adapter: bool = True,
    reduction_factor: float = 4,
    head: bool = True,
    scale: float = 5.0,
    **cfg,
):
    """Tiny BERT (hidden 32, 2 layers) + seq_bn adapter ``name`` (r = 32 / reduction_factor).

    Adapter weights are scaled by ``scale`` so the adapters visibly change the outputs.
    """
    torch.manual_seed(seed)
    model = AutoAdapterModel.from_config(tiny_config())
    model.add_adapter(
        name,
        config=SeqBnConfig(reduction_factor=reduction_factor, non_linearity=non_linearity, mh_adapter=mh_adapter, **cfg),
    )
    if head:
        model.add_classification_head(name, num_labels=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".adapters.{name}." in n:
                p.mul_(scale)
    model.set_active_adapters(name)
    model.eval()
    return model


def base_copy(model_seed: int = 0):
    """The same base weights as ``tiny_model(seed)`` with no adapter (for reload tests)."""
    torch.manual_seed(model_seed)
    return AutoAdapterModel.from_config(tiny_config())


def tokens(batch: int = 3, length: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
