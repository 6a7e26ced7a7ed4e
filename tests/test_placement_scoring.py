"""tropfast.placement: candidates and the gradient-rank score against a direct autograd G_c."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("adapters")

import pruning_fixtures  # noqa: E402,F401  (offline settings, warning filters)
from placement_fixtures import batches, model_with_head, reference_grads  # noqa: E402

from tropfast import placement as P  # noqa: E402


def test_candidates_count_and_order():
    m = model_with_head()
    cands = P.candidates(m)
    # 2 layers: seq and par at attn and ffn of each layer (8), long-range emb->L0, emb->L1, L0->L1 (3)
    assert [c.id for c in cands] == [
        "seq@L0.attn", "par@L0.attn", "seq@L0.ffn", "par@L0.ffn", "long@emb->L0.ffn",
        "seq@L1.attn", "par@L1.attn", "seq@L1.ffn", "par@L1.ffn", "long@emb->L1.ffn", "long@L0->L1.ffn",
    ]
    assert all(c.d_in == c.d_out == 32 for c in cands)
    six = P.candidates(model_with_head(layers=6))
    assert len(six) == 24 + 21  # MiniLM-L6's space: 24 standard + 6·7/2 long-range
    assert sum(c.kind == "long" for c in six) == 21
    assert [c.id for c in P.candidates(m, kinds=("seq",))] == ["seq@L0.attn", "seq@L0.ffn", "seq@L1.attn", "seq@L1.ffn"]


def test_candidate_ids_round_trip_and_sizes():
    for c in P.candidates(model_with_head(layers=3)):
        assert P.parse_id(c.id, 32) == c
        assert P.Candidate.from_dict(c.to_dict()) == c
    c = P.parse_id("long@L1->L4.ffn", 384)
    assert (c.kind, c.source, c.layer, c.location) == ("long", 1, 4, "ffn")
    assert c.weights(8) == 8 * 768 and c.params(8) == 8 * 768 + 8 + 384
    for bad in ("long@L4->L1.ffn", "long@L0->L2.attn", "seq@L1.mlp", "rec@L1.ffn"):
        with pytest.raises(ValueError):
            P.parse_id(bad)
    with pytest.raises(ValueError, match="recurrent"):
        P.candidates(model_with_head(), kinds=("seq", "rec"))


def test_unsupported_model():
    with pytest.raises(P.UnsupportedModelError, match="BERT-style"):
        P.find_sites(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.parametrize("rtol", [1e-2, 1e-1])
def test_score_matches_autograd_of_zero_maps(rtol):
    m = model_with_head()
    data = batches(n=2)
    cands = P.candidates(m)
    sc = P.score(m, data, rtol=rtol, keep_grads=True)
    ref = reference_grads(m, data, cands)
    assert [s.candidate.id for s in sc] == [c.id for c in cands]
    ranks = []
    for s in sc:
        G = ref[s.candidate.id]
        scale = float(G.abs().max())
        assert scale > 0
        torch.testing.assert_close(s.grad, G, rtol=1e-4, atol=1e-5 * scale)
        assert s.rank == int(torch.linalg.matrix_rank(G, rtol=rtol))
        assert s.fro == pytest.approx(float(torch.linalg.matrix_norm(G)), rel=1e-4)
        ranks.append(s.rank)
    assert len(set(ranks)) > 1  # the case discriminates between candidates
    # tokens: the non-padding tokens of both batches, the same count for every candidate
    assert sc.tokens == sum(int(b["attention_mask"].sum()) for b in data)
    assert all(s.max_rank == min(32, sc.tokens) for s in sc)


def test_padding_tokens_add_nothing():
    m = model_with_head()
    data = batches(n=1)
    sc = P.score(m, data, keep_grads=True)
    # The same batch wrapped in a tuple: the scorer sees no attention_mask and sums every position.
    wrapped = P.score(m, [(b,) for b in data], loss_fn=lambda model, t: model(**t[0]).loss, keep_grads=True)
    assert wrapped.tokens == data[0]["input_ids"].numel() > sc.tokens
    for a, b in zip(sc, wrapped):
        torch.testing.assert_close(a.grad, b.grad)


def test_one_forward_and_backward_per_batch_for_all_candidates():
    m = model_with_head()
    data = batches(n=3)
    calls = {"loss": 0, "layer0": 0}
    h = m.bert.encoder.layer[0].register_forward_hook(lambda *a: calls.__setitem__("layer0", calls["layer0"] + 1))

    def loss_fn(model, b):
        calls["loss"] += 1
        return model(**b).loss

    grads = []
    orig = torch.autograd.grad

    def counting_grad(*a, **k):
        grads.append(1)
        return orig(*a, **k)

    try:
        torch.autograd.grad = counting_grad
        sc = P.score(m, data, loss_fn=loss_fn, batches=2)
    finally:
        torch.autograd.grad = orig
        h.remove()
    assert len(sc) == 11 and sc.batches == 2
    assert calls == {"loss": 2, "layer0": 2} and len(grads) == 2


def test_model_state_is_restored():
    m = model_with_head()
    m.train()
    frozen = [n for n, p in m.named_parameters() if "word_embeddings" in n]
    for n, p in m.named_parameters():
        p.requires_grad_(n not in frozen)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    P.score(m, batches(n=1))
    assert m.training
    assert all(p.requires_grad == (n not in frozen) for n, p in m.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    assert all(p.grad is None for p in m.parameters())
    dropouts = [mod for mod in m.modules() if isinstance(mod, torch.nn.Dropout)]
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in dropouts)


def test_ranked_order_and_rerank():
    m = model_with_head()
    sc = P.score(m, batches(n=2), rtol=1e-2)
    ranked = sc.ranked()
    keys = [(-s.rank, -s.fro) for s in ranked]
    assert keys == sorted(keys)
    for rtol in (1e-1, None):
        again = P.score(m, batches(n=2), rtol=rtol)
        assert [s.rank for s in sc.rerank(rtol)] == [s.rank for s in again]
    assert all(s.rank == int((s.singular_values > 0).sum()) for s in sc.rerank(0.0))
    d = sc.to_dict()
    back = P.Scores.from_dict(d)
    assert [(s.candidate, s.rank, s.fro) for s in back] == [(s.candidate, s.rank, s.fro) for s in sc]
    text = sc.table(top=3, selected=[ranked[0].candidate.id])
    assert ranked[0].candidate.id in text and "*" in text and "rtol 0.01" in text


def test_torch_default_tolerance_and_threads_restored():
    m = model_with_head()
    threads = torch.get_num_threads()
    sc = P.score(m, batches(n=2), rtol=None, keep_grads=True)
    assert torch.get_num_threads() == threads
    for s in sc:
        torch.testing.assert_close(s.singular_values, torch.linalg.svdvals(s.grad))
        assert s.rank == int(torch.linalg.matrix_rank(s.grad))  # torch's default tolerance


def test_score_input_errors():
    m = model_with_head()
    with pytest.raises(ValueError, match="rtol"):
        P.score(m, batches(), rtol=1.5)
    with pytest.raises(ValueError, match="batches"):
        P.score(m, batches(), batches=0)
    with pytest.raises(ValueError, match="no batch"):
        P.score(m, [])
    with pytest.raises(ValueError, match="scalar"):
        P.score(m, batches(), loss_fn=lambda model, b: model(**b).logits)
    bad = batches(n=1)
    with pytest.raises(FloatingPointError):
        P.score(m, bad, loss_fn=lambda model, b: model(**b).loss * float("nan"))
