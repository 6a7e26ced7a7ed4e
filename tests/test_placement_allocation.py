"""allocation="gradient_rank": kept weights per adapter proportional to the normalised gradient rank."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tropfast  # noqa: E402
from tropfast.pruning.allocation import allocate, gradient_rank_counts  # noqa: E402
from tropfast.pruning.scores import compute_scores  # noqa: E402


@pytest.mark.parametrize(
    "ranks, max_ranks, numels, keep, want",
    [
        # w = (.5, .25, 0); c = 90 / (50 + 25) = 1.2; fractions .6, .3, 0
        ([4, 2, 0], [8, 8, 8], [100, 100, 100], 0.3, [60, 30, 0]),
        # normalisation by the maximum rank: w = (.5, .5)
        ([4, 8], [8, 16], [100, 100], 0.5, [50, 50]),
        # w = (1, .125): adapter 0 would need 2.44 > 1, so it keeps all 10; the other keeps 45
        ([8, 1], [8, 8], [10, 100], 0.5, [10, 45]),
        # round(4.5) = 4 weights; quotas 4/3 each; the remainder goes to the first adapter
        ([1, 1, 1], [4, 4, 4], [3, 3, 3], 0.5, [2, 1, 1]),
        # the rank-1 adapter is full; the rest of the budget spills to the rank-0 one
        ([1, 0], [4, 4], [10, 30], 0.5, [10, 10]),
        # every rank 0: one fraction for all
        ([0, 0], [4, 4], [10, 30], 0.5, [5, 15]),
        ([3, 1], [4, 4], [10, 30], 0.0, [0, 0]),
        ([3, 1], [4, 4], [10, 30], 1.0, [10, 30]),
    ],
)
def test_counts_by_hand(ranks, max_ranks, numels, keep, want):
    assert gradient_rank_counts(ranks, max_ranks, numels, keep) == want


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(1, 40), st.integers(0, 500)), min_size=1, max_size=8),
    st.floats(0, 1),
)
def test_counts_total_is_exact(rows, keep):
    ranks = [min(r, m) for r, m, _ in rows]
    maxr = [m for _, m, _ in rows]
    numels = [n for _, _, n in rows]
    counts = gradient_rank_counts(ranks, maxr, numels, keep)
    assert sum(counts) == round(keep * sum(numels))
    assert all(0 <= c <= n for c, n in zip(counts, numels))
    # each count is its real quota min(N_k, c·w_k·N_k) rounded down or up, with the one c that
    # spends the budget (found here by bisection, not by the code's water-filling)
    w = [r / m for r, m in zip(ranks, maxr)]
    if all(x == 0 for x in w):
        w = [1.0] * len(w)
    total = round(keep * sum(numels))
    if any(x == 0 for x in w) and total > sum(n for x, n in zip(w, numels) if x > 0):
        return  # the rest of the budget then goes to the rank-0 adapters: another rule
    lo, hi = 0.0, 1e9
    for _ in range(200):
        c = (lo + hi) / 2
        lo, hi = (c, hi) if sum(min(n, c * x * n) for x, n in zip(w, numels)) < total else (lo, c)
    for k, (x, n) in enumerate(zip(w, numels)):
        quota = min(n, hi * x * n)
        assert math.floor(quota - 1e-9) <= counts[k] <= math.ceil(quota + 1e-9), (k, quota, counts)


def test_counts_bad_input():
    with pytest.raises(ValueError, match="must match"):
        gradient_rank_counts([1], [2, 2], [3, 3], 0.5)
    with pytest.raises(ValueError, match="rank"):
        gradient_rank_counts([3], [2], [3], 0.5)


def _tiny():
    from pruning_fixtures import tiny_model

    return tiny_model(seed=1, mh_adapter=True)  # 4 seq_bn adapters (attn and ffn of 2 layers), 2 labels


def _data(n=2):
    from placement_fixtures import batches

    return batches(n=n, num_labels=2)


def _reference_ranks(model, infos, data, rtol):
    """rank of ∂L/∂W_k for a real zero map W_k added to each adapter's output (autograd, no tropfast code)."""
    Ws = [torch.zeros(i.d_out, i.d_in, requires_grad=True) for i in infos]

    def hook_for(W):
        def hook(mod, args, out):
            extra = args[0] @ W.T
            return (out[0] + extra,) + tuple(out[1:]) if isinstance(out, tuple) else out + extra

        return hook

    hs = [i.module.register_forward_hook(hook_for(W)) for i, W in zip(infos, Ws)]
    try:
        loss = sum(model(**b).loss for b in data)
        Gs = torch.autograd.grad(loss, Ws)
    finally:
        for h in hs:
            h.remove()
    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    ranks = [int(torch.linalg.matrix_rank(G.double(), rtol=rtol)) for G in Gs]
    return ranks, [min(i.d_out, i.d_in, tokens) for i in infos]


@pytest.mark.parametrize("score", ["magnitude", "tropical"])
def test_prune_gradient_rank(score):
    m = _tiny()
    data = _data()
    infos = tropfast.find_adapters(m)
    orig = [(i.down.weight.detach().clone(), i.up.weight.detach().clone()) for i in infos]
    ranks, maxr = _reference_ranks(m, infos, data, 1e-2)
    assert len(set(ranks)) > 1
    rep = tropfast.prune(m, keep=0.3, score=score, allocation="gradient_rank", data=data, gradient_rank={"rtol": 1e-2})
    assert rep.allocation == "gradient_rank"
    assert rep.options["gradient_rank"]["rank"] == ranks
    assert rep.options["gradient_rank"]["max_rank"] == maxr
    want = gradient_rank_counts(ranks, maxr, [i.numel for i in infos], 0.3)
    assert [a.kept_A + a.kept_B for a in rep.adapters] == want
    assert rep.kept == round(0.3 * rep.total)
    if score == "magnitude":
        # inside each adapter: its largest |W| over A and B together
        for (A, B), i, n in zip(orig, infos, want):
            flat = torch.cat([A.flatten(), B.flatten()]).abs()
            top = set(torch.topk(flat, n).indices.tolist())
            kept = torch.cat([i.down.weight.flatten(), i.up.weight.flatten()]) != 0
            assert set(kept.nonzero().squeeze(1).tolist()) == top


def test_gradient_rank_with_a_one_shot_iterator_and_snip():
    m = _tiny()
    data = _data(n=2)
    a = tropfast.prune(m, keep=0.5, score="snip", allocation="gradient_rank", data=iter(data), inplace=False,
                       gradient_rank={"batches": 2}, snip_batches=2)
    b = tropfast.prune(m, keep=0.5, score="snip", allocation="gradient_rank", data=data, inplace=False,
                       gradient_rank={"batches": 2}, snip_batches=2)
    assert a.options["gradient_rank"]["rank"] == b.options["gradient_rank"]["rank"]
    assert [x.kept_A for x in a.adapters] == [x.kept_A for x in b.adapters]


def test_gradient_rank_errors_leave_the_model_alone():
    m = _tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="needs data"):
        tropfast.prune(m, keep=0.3, allocation="gradient_rank")
    with pytest.raises(ValueError, match="unknown gradient_rank option"):
        tropfast.prune(m, keep=0.3, allocation="gradient-rank", data=_data(), gradient_rank={"tol": 1})
    with pytest.raises(ValueError, match="rtol"):
        tropfast.prune(m, keep=0.3, allocation="gradient_rank", data=_data(), gradient_rank={"rtol": 2.0})
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    As = [torch.ones(2, 3, dtype=torch.float64)]
    Bs = [torch.ones(3, 2, dtype=torch.float64)]
    with pytest.raises(ValueError, match="allocate_gradient_rank"):
        allocate(compute_scores("magnitude", As, Bs, 0.5), 0.5, "gradient_rank")
