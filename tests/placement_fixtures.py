"""Tiny BERT models and batches for the placement tests, and an independent G_c reference.

``reference_grads`` inserts real zero-initialised linear maps W_c (nn.Parameter) by replacing
the forward of the sublayer output modules with a hand-written one, and lets autograd give
∂L/∂W_c: it shares no code with ``tropfast.placement.score``.
"""
from __future__ import annotations

import types

import torch
from pruning_fixtures import VOCAB

NUM_LABELS = 3


def model_with_head(seed: int = 0, head: str = "h", layers: int = 2):
    """A tiny BERT (hidden 32) with a 3-class head and no adapter.

    Weights are drawn with std 0.2 (BERT's 0.02 leaves a random tiny model's attention so
    flat that every gradient has about the same rank): the gradient ranks then differ by
    depth, as they do on the pretrained MiniLM.
    """
    from adapters import AutoAdapterModel
    from pruning_fixtures import tiny_config

    cfg = tiny_config()
    cfg.num_hidden_layers = layers
    cfg.initializer_range = 0.2
    torch.manual_seed(seed)
    m = AutoAdapterModel.from_config(cfg)
    m.add_classification_head(head, num_labels=NUM_LABELS)
    m.active_head = head
    m.eval()
    return m


def batches(n: int = 2, size: int = 6, length: int = 10, seed: int = 3, num_labels: int = NUM_LABELS) -> list[dict]:
    """Labelled batches with some padding (attention_mask 0 at the end of a few rows)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, VOCAB, (size, length), generator=g)
        ids[:, 0] = 1  # a fixed first token, as [CLS]
        am = torch.ones_like(ids)
        for row in range(0, size, 2):
            cut = int(torch.randint(4, length, (1,), generator=g))
            am[row, cut:] = 0
            ids[row, cut:] = 0
        y = torch.randint(0, num_labels, (size,), generator=g)
        out.append({"input_ids": ids, "attention_mask": am, "labels": y})
    return out


def _sublayer(model, location: str, layer: int):
    lay = model.bert.encoder.layer[layer]
    return lay.attention.output if location == "attn" else lay.output


def reference_grads(model, data, cands) -> dict[str, torch.Tensor]:
    """∂(Σ_batches loss)/∂W_c for zero maps W_c inserted at each candidate (float64 result)."""
    d = model.config.hidden_size
    Ws = {c.id: torch.zeros(d, d, requires_grad=True) for c in cands}
    blocks: dict[int, torch.Tensor] = {}
    hooks = [model.bert.embeddings.register_forward_hook(lambda m, a, o: blocks.__setitem__(-1, o))]
    for i, lay in enumerate(model.bert.encoder.layer):
        hooks.append(lay.register_forward_hook(lambda m, a, o, i=i: blocks.__setitem__(i, o[0])))
    patched = []
    for loc in ("attn", "ffn"):
        for layer in range(len(model.bert.encoder.layer)):
            here = [c for c in cands if (c.location, c.layer) == (loc, layer)]
            if not here:
                continue
            mod = _sublayer(model, loc, layer)

            def forward(self, hidden_states, input_tensor, here=here):
                h = self.dropout(self.dense(hidden_states))
                base = h + input_tensor
                extra = torch.zeros_like(base)
                for c in here:
                    if c.kind == "seq":
                        src = self.LayerNorm(base)  # what a sequential adapter reads: the sublayer's output
                    elif c.kind == "par":
                        src = input_tensor  # what a parallel adapter reads: the sublayer's input
                    else:
                        src = blocks[c.source]
                    extra = extra + src @ Ws[c.id].T
                return self.LayerNorm(base + extra)

            mod.forward = types.MethodType(forward, mod)
            patched.append(mod)
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        total = sum(model(**b).loss for b in data)
        grads = torch.autograd.grad(total, [Ws[c.id] for c in cands])
    finally:
        for h in hooks:
            h.remove()
        for mod in patched:
            del mod.forward
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return {c.id: g.double() for c, g in zip(cands, grads)}


def logits(model, data) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in data])


def hook_objects(model) -> int:
    """How many tropfast placement hooks are registered anywhere in ``model``."""
    from tropfast.placement import install

    n = 0
    for m in model.modules():
        for d in (m._forward_hooks, m._forward_pre_hooks):
            n += sum(isinstance(h, install._HOOK_TYPES) for h in d.values())
    return n
