"""Where adapters can sit in a BERT-style post-LayerNorm encoder (BERT, RoBERTa, MiniLM, ...).

Each of the L layers has two sublayers, attention and FFN.  Each sublayer ends in an output
module (``attention.output`` / ``output``) that computes ``LayerNorm(dropout(dense(z)) + x)``
where x is the sublayer's input (the residual stream).  An adapter's contribution is added to
that pre-LayerNorm sum, which is where AdapterHub's ``seq_bn`` and ``par_bn`` adapters add
theirs: this module calls it the sublayer's *insertion point*.  The hooks here add to the
output of the sublayer's ``dropout`` module, which is the same sum minus the residual x.

The residual-stream activations ("block outputs") are the embeddings' output (index -1) and
the output of each layer 0..L-1.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["LOCATIONS", "Sites", "UnsupportedModelError", "find_sites"]

LOCATIONS = ("attn", "ffn")


class UnsupportedModelError(ValueError):
    """The model is not a BERT-style encoder whose sublayers this module knows how to hook."""


def _sublayer_ok(m: nn.Module | None) -> bool:
    return m is not None and all(isinstance(getattr(m, a, None), nn.Module) for a in ("dense", "dropout", "LayerNorm"))


def _is_layer(m: nn.Module) -> bool:
    att = getattr(m, "attention", None)
    return _sublayer_ok(getattr(att, "output", None)) and _sublayer_ok(getattr(m, "output", None))


@dataclass
class Sites:
    """The hookable modules of an encoder; ``names`` are qualified module names for messages."""

    layers: list[nn.Module]
    embeddings: nn.Module
    encoder: nn.Module
    hidden: int
    prefix: str  # qualified name of the layer list, e.g. "bert.encoder.layer"

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def output_module(self, location: str, layer: int) -> nn.Module:
        """The sublayer output module: ``attention.output`` (attn) or ``output`` (ffn) of ``layer``."""
        m = self.layers[layer]
        return m.attention.output if location == "attn" else m.output

    def output_name(self, location: str, layer: int) -> str:
        return f"{self.prefix}.{layer}." + ("attention.output" if location == "attn" else "output")


def find_sites(model: nn.Module) -> Sites:
    """The encoder layers of ``model``; raises ``UnsupportedModelError`` naming what is missing."""
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and all(_is_layer(x) for x in mod):
            found.append((name, mod))
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no BERT-style encoder layer list (a ModuleList of layers with "
            "attention.output and output sublayers, each holding dense, dropout and LayerNorm); placement "
            "supports BERT, RoBERTa, MiniLM and other post-LayerNorm encoders of that layout"
        )
    if len(found) > 1:
        raise UnsupportedModelError(
            f"{type(model).__name__} holds several encoder layer lists ({', '.join(n for n, _ in found)}); "
            "placement needs exactly one"
        )
    name, layers = found[0]
    enc_name = name.rpartition(".")[0]
    base_name = enc_name.rpartition(".")[0]
    encoder = model.get_submodule(enc_name) if enc_name else model
    emb_name = f"{base_name}.embeddings" if base_name else "embeddings"
    try:
        embeddings = model.get_submodule(emb_name)
    except AttributeError:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no embeddings module at {emb_name!r} next to {enc_name!r}"
        ) from None
    dense = layers[0].output.dense
    hidden = int(getattr(dense, "out_features", 0) or dense.weight.shape[0])
    return Sites(list(layers), embeddings, encoder, hidden, name)
