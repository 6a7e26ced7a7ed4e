"""prune(): exact counts per group for every score x allocation, masks through training, atomicity."""
from __future__ import annotations

import json

import pytest
from allocation_reference import allocate_sorted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pruning_fixtures import logits, same_state, state, tiny_model, tokens, torch

import tropfast
from tropfast.pruning import PruneReport, find_adapters, prune, remove_masks
from tropfast.pruning import apply as apply_mod
from tropfast.pruning import masks as masks_mod
from tropfast.pruning.scores import ScoreResult, compute_scores

SCORES = ["magnitude", "tropical", "combined", "random", "snip", "partner_norm", "grasp", "synflow"]
ALLOCATIONS = ["global", "layer", "matrix", "node", "structured", "erdos_renyi", "class_distribution"]


def _snip_data(n=2):
    return [{"input_ids": tokens(4, 8, seed=s), "labels": torch.tensor([0, 1, 1, 0])} for s in range(n)]


def _masks_of(info):
    return info.down.weight != 0, info.up.weight != 0


@pytest.fixture(scope="module")
def model():
    return tiny_model()


# round(0.3·N) per group of the tiny model (4 adapters, A 8x32 and B 32x8 each), by hand:
# global N = 2048 -> 614; layer N = 512 -> 154; matrix N = 256 -> 77; node N = 32 + 32 -> 19;
# structured: r = 8 units -> 2.
# erdos_renyi and class_distribution: one budget over the model, like global.
KEPT_AT_0_3 = {"global": 614, "layer": 154, "matrix": 77, "node": 19, "structured": 2, "erdos_renyi": 614,
               "class_distribution": 614}


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("score", SCORES)
def test_exact_count_per_group(model, score, allocation):
    keep = 0.3
    extra = {"data": _snip_data()} if score in ("snip", "grasp") else {}
    rep = prune(model, keep=keep, score=score, allocation=allocation, inplace=False, **extra)
    pruned = rep.model
    infos = find_adapters(pruned)
    orig = find_adapters(model)
    assert all(i.down.weight.count_nonzero() == i.numel // 2 for i in orig)  # the original is untouched
    want = KEPT_AT_0_3[allocation]
    if allocation == "structured":
        for i in infos:
            assert i.r == want and i.down.weight.shape == (want, 32) and i.up.weight.shape == (32, want)
            assert i.down.bias.shape == (want,) and i.module.down_sample == want
        assert [a.r_after for a in rep.adapters] == [want] * 4
    else:
        mA = [_masks_of(i)[0] for i in infos]
        mB = [_masks_of(i)[1] for i in infos]
        if allocation in ("global", "class_distribution"):
            assert sum(int(a.sum()) + int(b.sum()) for a, b in zip(mA, mB)) == want
        elif allocation == "erdos_renyi":
            # 8 matrices of 256 weights, one Erdős–Rényi density (all shapes alike): 76.8 each,
            # floor 76, and the 6 weights left go to the first 6 matrices (equal remainders)
            counts = [int(m.sum()) for a, b in zip(mA, mB) for m in (a, b)]
            assert counts == [77] * 6 + [76] * 2 and sum(counts) == want
        elif allocation == "layer":
            assert [int(a.sum()) + int(b.sum()) for a, b in zip(mA, mB)] == [want] * 4
        elif allocation == "matrix":
            assert [(int(a.sum()), int(b.sum())) for a, b in zip(mA, mB)] == [(want, want)] * 4
        else:
            for a, b in zip(mA, mB):
                assert (a.sum(1) + b.sum(0)).tolist() == [want] * 8
        # the report counts what was written; masks are attached
        for a_rep, a, b in zip(rep.adapters, mA, mB):
            assert (a_rep.kept_A, a_rep.kept_B) == (int(a.sum()), int(b.sum()))
        assert rep.masks_attached and len(masks_mod.masked_modules(pruned)) == 8
    out = logits(pruned, tokens())
    assert out.shape == (3, 2) and torch.isfinite(out).all()


# --- which weights are kept: the top scores of each group, with the scores computed here from
# their definitions and the masks from the sort-based reference allocation (issue 16) ----------
FIXED = {"target": False, "dtype": "float64", "steps": 40}  # the paper's fixed-λ route, solved once


def _weights(model):
    infos = find_adapters(model)
    return [i.down.weight.detach().double() for i in infos], [i.up.weight.detach().double() for i in infos]


def _tropical_hat(As, Bs, lam=0.5, steps=40):
    """(Â, B̂) of the fixed-λ route by a direct tropfast.solve: λ1 = lam·mean(β)·mean|A|,
    λ2 = lam·mean(a)·mean|B| per adapter (scores.tropical_lambdas, whose values
    test_pruning_scores checks by hand), ISTA with the safe step."""
    from tropfast.pruning.scores import tropical_lambdas

    l1, l2 = tropical_lambdas([a.double() for a in As], [b.double() for b in Bs], lam)
    sol = tropfast.solve(As, Bs, l1, l2, method="ista", steps=steps, record_every=0)
    return sol.A_hat, sol.B_hat


def _expected_scores(score, As, Bs):
    """(S_A, S_B) per adapter from the definitions in docs/design.md §2 and §7."""
    if score == "magnitude":
        return [A.abs() for A in As], [B.abs() for B in Bs]
    if score == "partner_norm":  # |A_ik|·β_i and |B_ji|·a_i
        return ([A.abs() * (B * B).sum(0)[:, None] for A, B in zip(As, Bs)],
                [B.abs() * (A * A).sum(1)[None, :] for A, B in zip(As, Bs)])
    Ah, Bh = _tropical_hat(As, Bs)
    return [a.abs() for a in Ah], [b.abs() for b in Bh]


# the sorting reference (tests/allocation_reference.py) predates erdos_renyi and class_distribution;
# their kept sets are checked against hand-computed ones in test_pruning_allocation.py
@pytest.mark.parametrize("allocation", [a for a in ALLOCATIONS if a not in ("erdos_renyi", "class_distribution")])
@pytest.mark.parametrize("score", ["magnitude", "partner_norm", "tropical"])
def test_kept_weights_are_the_top_scores(model, score, allocation):
    keep = 0.5 if allocation == "node" else 0.7  # more than Â's nonzeros in some groups: ties at 0
    As, Bs = _weights(model)
    SA, SB = _expected_scores(score, As, Bs)
    want = allocate_sorted(ScoreResult(score, SA, SB, [A.abs() for A in As], [B.abs() for B in Bs]), keep, allocation)
    rep = prune(model, keep, score, allocation, tropical=FIXED, inplace=False)
    infos = find_adapters(rep.model)
    if allocation == "structured":
        for i, A, B, u in zip(infos, As, Bs, want.units):
            assert torch.equal(i.down.weight.double(), A[u]) and torch.equal(i.up.weight.double(), B[:, u])
        return
    for k, i in enumerate(infos):
        assert torch.equal(_masks_of(i)[0], want.masks_A[k]), f"adapter {k}: A"
        assert torch.equal(_masks_of(i)[1], want.masks_B[k]), f"adapter {k}: B"


def test_tropical_scores_are_the_magnitudes_of_the_solution(model):
    """S = |Â|, |B̂|: Â has negative entries among its largest, so a signed score would drop them."""
    As, Bs = _weights(model)
    Ah, Bh = _tropical_hat(As, Bs)
    res = compute_scores("tropical", As, Bs, 0.3, tropical=FIXED)
    for got, hat in zip(res.SA + res.SB, Ah + Bh):
        assert torch.equal(got, hat.abs())
    for a in Ah:
        top = a.abs().flatten().topk(20).indices
        assert bool((a.flatten()[top] < 0).any()) and bool((a.flatten()[top] > 0).any())


@pytest.mark.parametrize("keep, kept", [(0.0, 0), (0.07, 4 * 36), (0.5, 4 * 256), (1.0, 4 * 512)])
def test_extreme_fractions(model, keep, kept):
    rep = prune(model, keep=keep, score="tropical", allocation="layer", inplace=False)
    assert rep.kept == kept  # round(keep * 512) per adapter: 0, 36 (35.84), 256, 512
    assert torch.isfinite(logits(rep.model, tokens())).all()


def test_ties_break_by_index():
    m = tiny_model(mh_adapter=False)
    with torch.no_grad():
        for i in find_adapters(m):
            i.down.weight.fill_(0.5)
            i.up.weight.fill_(-0.5)
    prune(m, keep=0.5, score="magnitude", allocation="layer")
    for i in find_adapters(m):
        assert bool((i.down.weight != 0).all()) and bool((i.up.weight == 0).all())  # A's positions come first
    m = tiny_model(mh_adapter=False)
    with torch.no_grad():
        for i in find_adapters(m):
            i.down.weight.fill_(0.5)
    prune(m, keep=0.25, score="magnitude", allocation="matrix")
    for i in find_adapters(m):
        assert (i.down.weight != 0).nonzero()[:, 0].unique().tolist() == [0, 1]  # first rows, row-major


def test_global_is_one_threshold():
    m = tiny_model()
    scores = torch.cat([torch.cat([i.down.weight.abs().flatten(), i.up.weight.abs().flatten()]) for i in find_adapters(m)])
    prune(m, keep=0.3, score="magnitude", allocation="global")
    kept = torch.cat([torch.cat([(i.down.weight != 0).flatten(), (i.up.weight != 0).flatten()]) for i in find_adapters(m)])
    assert scores[kept].min() > scores[~kept].max()


def test_combined_q_interpolates(model):
    def masks(rep):
        return [torch.cat([(i.down.weight != 0).flatten(), (i.up.weight != 0).flatten()]) for i in find_adapters(rep.model)]

    trop = masks(prune(model, 0.3, "tropical", inplace=False))
    mag = masks(prune(model, 0.3, "magnitude", inplace=False))
    q1 = masks(prune(model, 0.3, "combined", combined_q=1.0, inplace=False))
    q0 = masks(prune(model, 0.3, "combined", combined_q=0.0, inplace=False))
    assert all(torch.equal(a, b) for a, b in zip(q1, trop))
    assert all(torch.equal(a, b) for a, b in zip(q0, mag))


def test_random_is_seeded(model):
    a = prune(model, 0.3, "random", seed=3, inplace=False).model
    b = prune(model, 0.3, "random", seed=3, inplace=False).model
    c = prune(model, 0.3, "random", seed=4, inplace=False).model
    wa, wb, wc = (find_adapters(x)[0].down.weight != 0 for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_partner_norm_matches_formula(model):
    (i,) = find_adapters(model)[:1]
    A, B = i.down.weight.double(), i.up.weight.double()
    sA = A.abs() * (B * B).sum(0)[:, None]
    rep = prune(model, 0.25, "partner_norm", allocation="matrix", inplace=False)
    kept = find_adapters(rep.model)[0].down.weight != 0
    assert sA[kept].min() > sA[~kept].max()


def _snip_expected(model, batches):
    """|Σ_batches ∂loss/∂W ⊙ W| per adapter weight, by autograd on model(**batch).loss."""
    infos = find_adapters(model)
    params = [p for i in infos for p in (i.down.weight, i.up.weight)]
    total = [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        for b in batches:
            for acc, g in zip(total, torch.autograd.grad(model(**b).loss, params)):
                acc += g
    return [(g * p.detach()).abs().double() for g, p in zip(total, params)]


def test_snip_works_under_no_grad():
    m = tiny_model()
    S = _snip_expected(tiny_model(), _snip_data())
    with torch.no_grad():
        report = prune(m, 0.5, "snip", snip_data=_snip_data(), snip_batches=2)
    assert [a.kept_A + a.kept_B for a in report.adapters] == [256] * 4  # round(0.5 * 512) per adapter
    for k, i in enumerate(find_adapters(m)):  # the kept weights are the top SNIP scores of each adapter
        kept = torch.cat([(i.down.weight != 0).flatten(), (i.up.weight != 0).flatten()])
        s = torch.cat([S[2 * k].flatten(), S[2 * k + 1].flatten()])
        assert float(s.sum()) > 0 and s[kept].min() >= s[~kept].max()


def test_snip_leaves_grads_and_flags_alone():
    m = tiny_model()
    m.train_adapter("a")  # a mixed pattern: the adapter trains, the rest is frozen
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    assert 0 < sum(flags.values()) < len(flags)
    was_training = m.training
    prune(m, 0.5, "snip", snip_data=_snip_data(), snip_batches=2)
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert all(p.grad is None for p in m.parameters()) and m.training == was_training
    for p in m.parameters():
        p.requires_grad_(False)
    m.eval()
    prune(m, 0.5, "snip", snip_data=_snip_data(), snip_batches=2)
    assert not any(p.requires_grad for p in m.parameters()) and all(p.grad is None for p in m.parameters())
    assert not m.training
    with pytest.raises(ValueError, match=r"needs data: pass data=.*alias snip_data"):
        prune(tiny_model(), 0.5, "snip")


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_masked_weights_stay_zero_through_optimizer_steps(opt_name):
    m = tiny_model()
    m.train_adapter("a")
    params = [p for p in m.parameters() if p.requires_grad]
    if opt_name == "sgd":
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
    else:
        opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    batch = _snip_data(1)[0]

    def step():
        opt.zero_grad()
        m(**batch).loss.backward()
        opt.step()

    for _ in range(2):  # optimizer state (momentum) built before pruning
        step()
    rep = prune(m, keep=0.3, score="tropical", allocation="layer")
    infos = find_adapters(m)
    masks = [_masks_of(i) for i in infos]
    before = [(i.down.weight.detach().clone(), i.up.weight.detach().clone()) for i in infos]
    for _ in range(3):
        step()
        for i, (ma, mb) in zip(infos, masks):
            assert bool((i.down.weight[~ma] == 0).all()) and bool((i.up.weight[~mb] == 0).all())
            assert i.down.weight.grad[~ma].abs().sum() == 0
    assert any(not torch.equal(i.down.weight, b[0]) for i, b in zip(infos, before))  # kept weights train
    assert rep.masks_attached
    assert remove_masks(m) == 8
    step()
    step()
    assert any(bool((i.down.weight[~ma] != 0).any()) for i, (ma, _) in zip(infos, masks))


def test_solver_values_option(model):
    """values="solver" writes Â, B̂ under the mask; "trained" the trained weights under the same mask."""
    As, Bs = _weights(model)
    Ah, Bh = _tropical_hat(As, Bs)
    want = allocate_sorted(
        ScoreResult("tropical", [a.abs() for a in Ah], [b.abs() for b in Bh], [A.abs() for A in As], [B.abs() for B in Bs]),
        0.3, "layer",
    )
    rep = prune(model, keep=0.3, score="tropical", values="solver", tropical=FIXED, inplace=False)
    rep_t = prune(model, keep=0.3, score="tropical", tropical=FIXED, inplace=False)
    for k, (i, it) in enumerate(zip(find_adapters(rep.model), find_adapters(rep_t.model))):
        for w, wt, hat, orig, mask in ((i.down.weight, it.down.weight, Ah[k], As[k], want.masks_A[k]),
                                       (i.up.weight, it.up.weight, Bh[k], Bs[k], want.masks_B[k])):
            assert torch.equal(w, torch.where(mask, hat, 0).to(w.dtype))
            assert torch.equal(wt, torch.where(mask, orig, 0).to(wt.dtype))
    # under the same mask the solver's values differ from the trained ones
    assert not torch.equal(find_adapters(rep.model)[0].down.weight, find_adapters(rep_t.model)[0].down.weight)
    with pytest.raises(ValueError, match="values='solver'"):
        prune(model, keep=0.3, score="magnitude", values="solver")


def _nan_safe_state(model):
    return {k: torch.nan_to_num(v, nan=12345.0) for k, v in state(model).items()}


def test_nan_weights_raise_and_leave_model_unchanged():
    m = tiny_model()
    with torch.no_grad():
        find_adapters(m)[2].up.weight[3, 1] = float("nan")
    before = _nan_safe_state(m)
    for alloc in ("layer", "structured"):
        with pytest.raises(ValueError, match="non-finite.*unchanged"):
            prune(m, keep=0.3, score="tropical", allocation=alloc)
        assert same_state(before, _nan_safe_state(m))
        assert not masks_mod.masked_modules(m)


@pytest.mark.parametrize("allocation", ["layer", "structured"])
def test_failure_while_writing_rolls_back(monkeypatch, allocation):
    m = tiny_model()
    prune(m, keep=0.6, score="magnitude")  # masks already attached must survive the rollback
    before = state(m)
    masked_before = [n for n, _ in masks_mod.masked_modules(m)]
    shapes = [(i.down.in_features, i.down.out_features, i.up.in_features) for i in find_adapters(m)]
    calls = {"n": 0}
    target = "_attach" if allocation == "layer" else "_new_param"
    real = getattr(masks_mod if target == "_attach" else apply_mod, target)

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(masks_mod if target == "_attach" else apply_mod, target, flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        prune(m, keep=0.3, score="magnitude", allocation=allocation)
    monkeypatch.undo()
    assert same_state(before, state(m))
    assert [n for n, _ in masks_mod.masked_modules(m)] == masked_before
    assert shapes == [(i.down.in_features, i.down.out_features, i.up.in_features) for i in find_adapters(m)]
    assert torch.isfinite(logits(m, tokens())).all()


def test_structured_keeps_units_exactly():
    m = tiny_model()
    x = torch.randn(5, 32)
    orig = [(i.down.weight.detach().clone(), i.down.bias.detach().clone(), i.up.weight.detach().clone(), i.up.bias.detach().clone()) for i in find_adapters(m)]
    ref = tiny_model()
    rep = prune(m, keep=0.5, score="tropical", allocation="structured", structured_scope="global")
    infos = find_adapters(m)
    assert sum(i.r for i in infos) == 16  # half of the 4 x 8 units
    zeroed = find_adapters(ref)
    for i, z, (A, a, B, _b) in zip(infos, zeroed, orig):
        # the kept units are rows of A / columns of B, in their original order
        rows = [int((A == row).all(1).nonzero()[0]) for row in i.down.weight]
        assert rows == sorted(rows)
        assert torch.equal(i.down.weight, A[rows]) and torch.equal(i.down.bias, a[rows]) and torch.equal(i.up.weight, B[:, rows])
        assert torch.allclose(torch.relu(i.down(x)), torch.relu(torch.nn.functional.linear(x, A, a))[:, rows], rtol=0, atol=1e-6)
        drop = [u for u in range(A.shape[0]) if u not in rows]
        with torch.no_grad():
            z.down.weight[drop] = 0
            z.down.bias[drop] = 0
            z.up.weight[:, drop] = 0
    assert torch.allclose(logits(m, tokens()), logits(ref, tokens()), rtol=1e-5, atol=1e-6)
    assert not rep.masks_attached


def test_inplace_false_keeps_original(model):
    before = state(model)
    rep = prune(model, keep=0.2, score="magnitude", inplace=False)
    assert same_state(before, state(model)) and rep.model is not model
    assert not masks_mod.masked_modules(model)


def test_report_table_and_json(model):
    rep = prune(model, keep=0.3, score="tropical", allocation="node", inplace=False)
    assert isinstance(rep, PruneReport)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["score"] == "tropical" and d["allocation"] == "node" and len(d["adapters"]) == 4
    assert d["adapters"][0]["shape_A"] == [8, 32] and d["solver"]["method"] == "ista"
    assert d["kept"] == rep.kept == sum(a["kept_A"] + a["kept_B"] for a in d["adapters"])
    t = rep.table()
    assert "a L0 mh" in t and "kept A" in t and "tropical" in t


def test_plain_pytorch_adapter_pattern():
    from test_pruning_discovery import Bottleneck

    torch.manual_seed(0)
    net = torch.nn.Sequential(Bottleneck(16, 4), Bottleneck(16, 6))
    rep = prune(net, keep=0.25, score="tropical", allocation="layer", pattern="[01]")
    assert [a.kept_A + a.kept_B for a in rep.adapters] == [32, 48]  # a quarter of 2·16·4 and 2·16·6
    assert torch.isfinite(net(torch.randn(2, 16))).all()


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="keep"):
        prune(model, keep=1.5)
    with pytest.raises(ValueError, match="score"):
        prune(model, score="nope")
    with pytest.raises(ValueError, match="allocation"):
        prune(model, allocation="nope")
    assert prune(model, 0.5, "magnitude", "class-blind", inplace=False).allocation == "global"
    assert prune(model, 0.5, "magnitude", "class-uniform", inplace=False).allocation == "layer"


def test_mask_gradient_hook_follows_unfreezing():
    m = tiny_model()
    for p in m.parameters():
        p.requires_grad_(False)
    prune(m, keep=0.3, score="magnitude")
    m.train_adapter("a")  # unfreezes the adapter after the masks were attached
    m(**_snip_data(1)[0]).loss.backward()
    for i in find_adapters(m):
        ma, mb = _masks_of(i)
        assert i.down.weight.grad is not None and i.down.weight.grad[~ma].abs().sum() == 0
        assert i.up.weight.grad[~mb].abs().sum() == 0 and i.up.weight.grad[mb].abs().sum() > 0


def test_structured_ranks_units_by_the_lam_gen_solution():
    """tropical={"lam_gen": x}: the tropical solve adds the generator l2,1 penalty, and structured
    keeps the units with the largest ‖Â_i‖₂‖B̂_{:,i}‖₂ of that solution.  The λ are computed here
    from their documented formulas."""
    model = tiny_model(seed=3)
    infos = find_adapters(model)
    As = [i.down.weight.detach().double() for i in infos]
    Bs = [i.up.weight.detach().double() for i in infos]
    lam, lam_gen = 0.3, 2.0
    l1 = torch.tensor([lam * float((B * B).sum(0).mean() * A.abs().mean()) for A, B in zip(As, Bs)], dtype=torch.float64)
    l2 = torch.tensor([lam * float((A * A).sum(1).mean() * B.abs().mean()) for A, B in zip(As, Bs)], dtype=torch.float64)
    lg = torch.tensor([lam_gen * lam * float(((B * B).sum(0) * A.norm(dim=1) / B.abs().sum(0)).mean())
                       for A, B in zip(As, Bs)], dtype=torch.float64)
    sol = tropfast.solve(As, Bs, l1, l2, method="bcd", steps=40, lam_gen=lg)
    plain = tropfast.solve(As, Bs, l1, l2, method="bcd", steps=40)
    dead = sum(int((a == 0).all(1).sum()) for a in sol.A_hat)
    assert dead > sum(int((a == 0).all(1).sum()) for a in plain.A_hat)
    opts = {"lam": lam, "lam_gen": lam_gen, "target": False, "method": "bcd", "steps": 40, "dtype": "float64"}
    keep = 0.5
    rep = prune(model, keep, "tropical", allocation="structured", tropical=opts, inplace=False)
    assert rep.solver["lam_gen"] == pytest.approx(lg.tolist(), rel=1e-12)
    alive = []
    for info, A, B, Ah, Bh in zip(find_adapters(rep.model), As, Bs, sol.A_hat, sol.B_hat):
        u = Ah.abs().norm(dim=1) * Bh.abs().norm(dim=0)
        m = A.norm(dim=1) * B.norm(dim=0)  # ties (units the penalty removed) go by the magnitudes' norms
        k = 4  # round(0.5 · 8) units
        assert info.r == k
        order = sorted(range(8), key=lambda i: (-float(u[i]), -float(m[i]), i))
        got = [int((A == row.double()).all(1).nonzero()[0]) for row in info.down.weight.detach()]
        assert got == sorted(order[:k])
        alive.append(int((u > 0).sum()))
    assert max(alive) < 4  # every surviving unit is kept, then the dead ones by magnitude
    with pytest.raises(ValueError, match="lam_gen must be a finite number >= 0"):
        prune(model, keep, "tropical", allocation="structured", tropical={"lam_gen": -1.0}, inplace=False)


def _weight_reads(net, fn) -> dict[str, list[str]]:
    """The aten ops that read or write each adapter weight's storage while fn() runs (views left out)."""
    from collections import defaultdict

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    ptrs = {m.weight.untyped_storage().data_ptr(): n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)}
    log: dict[str, list[str]] = defaultdict(list)

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for a in tree_leaves((args, kwargs or {})):
                if isinstance(a, torch.Tensor) and func not in (torch.ops.aten.detach.default,):
                    name = ptrs.get(a.untyped_storage().data_ptr())
                    if name is not None:
                        log[name].append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Spy():
        fn()
    return dict(log)


@pytest.mark.parametrize("values", ["trained", "solver"])
@pytest.mark.parametrize("allocation", ["global", "layer", "node"])
def test_prune_reads_each_weight_once_per_phase(allocation, values):
    """Finite check, score input, snapshot, write, report: one pass each over every weight."""
    from test_pruning_discovery import Bottleneck

    torch.manual_seed(0)
    net = torch.nn.Sequential(Bottleneck(16, 4), Bottleneck(16, 6))
    score = "tropical" if values == "solver" else "magnitude"
    reads = _weight_reads(net, lambda: prune(net, 0.3, score, allocation, pattern="[01]", values=values))
    write = "copy_.default" if values == "solver" else "masked_fill_.Scalar"
    want = ["sum.default", "_to_copy.default", "clone.default", write, "count_nonzero.default"]
    assert reads == {f"{k}.{p}": want for k in "01" for p in ("down", "up")}


def test_structured_prune_copies_no_weight():
    from test_pruning_discovery import Bottleneck

    torch.manual_seed(0)
    net = torch.nn.Sequential(Bottleneck(16, 4), Bottleneck(16, 6))
    reads = _weight_reads(net, lambda: prune(net, 0.5, "magnitude", "structured", pattern="[01]"))
    assert reads == {f"{k}.{p}": ["sum.default", "_to_copy.default"] for k in "01" for p in ("down", "up")}


def test_report_timings(model):
    rep = prune(model, 0.3, "magnitude", "global", inplace=False)
    assert set(rep.timings) == {"check_s", "scores_s", "allocate_s", "snapshot_s", "write_s"}
    assert all(v >= 0 for v in rep.timings.values()) and sum(rep.timings.values()) <= rep.time_s
    assert json.loads(rep.to_json())["timings"] == rep.timings


# --- iterative pruning and refused arguments (issue 10: defects 4, 10, 11, 13) --------------------
def _density(m) -> float:
    infos = find_adapters(m)
    nz = sum(int(i.down.weight.count_nonzero()) + int(i.up.weight.count_nonzero()) for i in infos)
    return nz / sum(i.numel for i in infos)


def _sgd_step(m, seed=0):
    """One SGD step on a loss whose gradient is random and nonzero for every adapter weight."""
    g = torch.Generator().manual_seed(seed)
    params = [p for i in find_adapters(m) for p in (i.down.weight, i.up.weight)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=0.1)
    loss = sum((p * torch.randn(p.shape, generator=g)).sum() for p in params)
    loss.backward()
    opt.step()


def test_second_prune_asking_for_more_than_survives_is_refused():
    m = tiny_model()
    prune(m, 0.5, "magnitude")
    before, masked = state(m), [n for n, _ in masks_mod.masked_modules(m)]
    with pytest.raises(ValueError, match=r"keep=0.7 asks for 358 of the 512 weights of adapter .* only 256 survive"):
        prune(m, 0.7, "magnitude")
    assert same_state(before, state(m)) and [n for n, _ in masks_mod.masked_modules(m)] == masked
    _sgd_step(m)
    assert _density(m) == 0.5  # no pruned weight regrew


@pytest.mark.parametrize("score, seeds", [("random", (0, 1)), ("magnitude", (0, 0)), ("tropical", (0, 0))])
@pytest.mark.parametrize("allocation", ["global", "layer", "matrix", "node"])
def test_second_prune_selects_among_survivors(score, seeds, allocation):
    m = tiny_model()
    first = prune(m, 0.5, score, allocation, seed=seeds[0])
    old = [(i.down.weight != 0).clone() for i in find_adapters(m)]
    rep = prune(m, 0.3, score, allocation, seed=seeds[1])
    new = [i.down.weight != 0 for i in find_adapters(m)]
    assert all(bool((n <= o).all()) for n, o in zip(new, old))  # nothing revived
    assert first.kept_fraction == 0.5
    groups = {"global": (1, 2048), "layer": (4, 512), "matrix": (8, 256), "node": (32, 64)}[allocation]
    assert rep.kept == groups[0] * round(0.3 * groups[1])  # keep counts all weights, pruned ones too
    assert rep.kept_fraction == _density(m)  # the report says what the model holds
    _sgd_step(m)
    assert rep.kept_fraction == _density(m)


def _nonzero(m) -> int:
    return sum(int(i.down.weight.count_nonzero()) + int(i.up.weight.count_nonzero()) for i in find_adapters(m))


def test_structured_after_unstructured_keeps_only_survivors():
    m = tiny_model()
    prune(m, 0.5, "magnitude", "layer")
    rep = prune(m, 0.5, "magnitude", "structured")
    assert all(i.r == 4 for i in find_adapters(m))
    # half the units, each with only the weights the first prune left (the masks stay attached)
    assert rep.masks_attached and rep.kept == _nonzero(m) < 1024
    assert rep.kept_fraction == rep.kept / 2048  # a fraction of the weights before pruning
    _sgd_step(m)
    assert rep.kept == _nonzero(m)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(score=None), TypeError, "score must be a string"),
        (dict(allocation=None), TypeError, "allocation must be a string"),
        (dict(keep=True), ValueError, "keep must be a fraction"),
        (dict(keep=float("nan")), ValueError, "keep must be a fraction"),
        (dict(keep="0.5"), ValueError, "keep must be a fraction"),
        (dict(structured_scope="foo"), ValueError, "structured_scope must be 'layer' or 'global'"),
        (dict(score="tropical", tropical={"lam": -1.0}), ValueError, "tropical option lam must be a finite number > 0"),
        (dict(score="tropical", tropical={"lam": 0}), ValueError, "tropical option lam must be"),
        (dict(score="tropical", tropical={"lam_ratio": -2}), ValueError, "tropical option lam_ratio"),
        (dict(score="tropical", tropical={"steps": 2**63}), ValueError, "tropical option steps"),
        (dict(score="tropical", tropical={"search_iters": 0}), ValueError, "tropical option search_iters"),
        (dict(score="tropical", tropical={"method": "bcd", "lr": 0.1}), ValueError, "tropical option lr"),
        (dict(score="tropical", tropical={"dtype": "float16"}), ValueError, "tropical option dtype"),
        (dict(score="tropical", tropical={"stepz": 3}), ValueError, "unknown tropical option"),
        (dict(score="random", seed=2**64), ValueError, "seed must be an integer"),
        (dict(score="random", seed=1.5), ValueError, "seed must be an integer"),
        (dict(combined_q=1.5), ValueError, "combined_q must be a fraction"),
        (dict(adapter=3), TypeError, "adapter must be a string"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(kwargs, exc, match):
    m = tiny_model()
    before = state(m)
    args = dict(keep=0.3, score="magnitude", allocation="layer")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        prune(m, **args)
    assert same_state(before, state(m)) and not masks_mod.masked_modules(m)


def test_numpy_and_tensor_fractions_are_accepted(model):
    np = pytest.importorskip("numpy")
    ref = prune(model, 0.3, "magnitude", "layer", inplace=False)
    for keep in (np.float32(0.3), np.float64(0.3), torch.tensor(0.3, dtype=torch.float64)):
        rep = prune(model, keep, "magnitude", "layer", inplace=False, combined_q=np.float32(0.5))
        assert rep.keep == pytest.approx(0.3) and rep.kept == ref.kept


def test_meta_device_model_is_refused():
    from test_pruning_discovery import Bottleneck

    with torch.device("meta"):
        net = torch.nn.Sequential(Bottleneck(16, 4))
    with pytest.raises(ValueError, match="meta device"):
        prune(net, 0.3, "magnitude", pattern="0")
    assert not masks_mod.masked_modules(net)


# --- the reported density survives training (issue 10) ----------------------------------------------
def _plain_net(seed=0):
    from test_pruning_discovery import Bottleneck

    torch.manual_seed(seed)
    return torch.nn.Sequential(Bottleneck(16, 4), Bottleneck(16, 6))


def _plain_weights(net):
    return [p for i in find_adapters(net, pattern="[01]") for p in (i.down.weight, i.up.weight)]


_SNIP = dict(snip_data=[torch.randn(4, 16, generator=torch.Generator().manual_seed(s)) for s in range(2)],
             snip_loss_fn=lambda model, x: model(x).pow(2).sum())
_OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05),
}


class _Trainer:
    """One optimizer over the adapter weights; rebuilt when pruning replaced them (structured)."""

    def __init__(self, net, kind, seed=0):
        self.net, self.kind, self.g = net, kind, torch.Generator().manual_seed(seed)
        self.params, self.opt = None, None

    def step(self):
        ps = _plain_weights(self.net)
        if self.params is None or any(a is not b for a, b in zip(ps, self.params)) or len(ps) != len(self.params):
            self.params, self.opt = ps, _OPTIMIZERS[self.kind](ps)
        for p in ps:
            p.requires_grad_(True)
        self.opt.zero_grad()
        # a random dense gradient: every weight that may move does
        sum((p * torch.randn(p.shape, generator=self.g)).sum() for p in ps).backward()
        self.opt.step()


def _check_density_kept(net, rep, trainer, pruned_before=None):
    trainer.step()
    ws = _plain_weights(net)
    nz = sum(int(p.count_nonzero()) for p in ws)
    assert nz == rep.kept, (rep.score, rep.allocation, nz, rep.kept)
    assert rep.kept_fraction == (rep.kept / rep.total if rep.total else 0.0)
    if pruned_before is not None:  # no pruned weight came back
        assert all(bool((w[p] == 0).all()) for w, p in zip(ws, pruned_before))


def _pruned(net) -> list:
    """Per adapter weight: where an attached mask holds it at zero (all False without a mask)."""
    out = []
    for i in find_adapters(net, pattern="[01]"):
        for m in (i.down, i.up):
            mask = m._buffers.get(masks_mod.MASK_BUFFER)
            out.append(torch.zeros_like(m.weight, dtype=torch.bool) if mask is None else ~mask)
    return out


def _prune_step(net, keep, score, allocation, **kw):
    """prune, and where earlier masks held weights at zero (None when the shapes change: structured)."""
    extra = dict(_SNIP) if score in ("snip", "grasp") else {}
    before = _pruned(net)
    rep = prune(net, keep, score, allocation, pattern="[01]", **extra, **kw)
    return rep, None if rep.allocation == "structured" else before


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("score", SCORES)
def test_density_survives_training_for_every_score_and_allocation(score, allocation):
    net = _plain_net()
    trainer = _Trainer(net, "sgd")
    trainer.step()  # momentum from before pruning
    for keep in (0.6, 0.3):  # then iteratively, among the survivors
        rep, before = _prune_step(net, keep, score, allocation, seed=int(keep * 10))
        _check_density_kept(net, rep, trainer, before)
        _check_density_kept(net, rep, trainer, before)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(SCORES),
            st.sampled_from(ALLOCATIONS),
            st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 1.0]),
            st.integers(0, 3),
            st.sampled_from(["layer", "global"]),
        ),
        min_size=1,
        max_size=3,
    ),
    optimizer=st.sampled_from(sorted(_OPTIMIZERS)),
)
def test_density_survives_training_through_iterative_pruning(steps, optimizer):
    net = _plain_net()
    trainer = _Trainer(net, optimizer)
    trainer.step()
    for score, allocation, keep, seed, scope in steps:
        before = [(n, t.detach().clone()) for n, t in net.state_dict().items()]
        masked = [n for n, _ in masks_mod.masked_modules(net)]
        try:
            rep, pruned_before = _prune_step(net, keep, score, allocation, seed=seed, structured_scope=scope)
        except ValueError as e:  # asked for more weights than an earlier prune left: nothing changed
            assert "survive an earlier prune" in str(e)
            after = net.state_dict()
            assert all(torch.equal(t, after[n]) for n, t in before) and masked == [
                n for n, _ in masks_mod.masked_modules(net)
            ]
            continue
        _check_density_kept(net, rep, trainer, pruned_before)


def test_scores_of_adapters_without_units():
    """Found by the property test: once structured pruning removed every unit, tropical had nothing to solve."""
    m = tiny_model()
    prune(m, 0.0, "magnitude", "structured")
    assert all(i.r == 0 for i in find_adapters(m))
    for score in ("tropical", "combined", "magnitude", "partner_norm", "random"):
        rep = prune(m, 0.0, score, "global")
        assert rep.kept == 0 and rep.total == 0
    net = _plain_net()
    with torch.no_grad():
        net[0].down.weight.mul_(1e-6)  # adapter 0 loses every unit, adapter 1 keeps some
    prune(net, 0.5, "magnitude", "structured", pattern="[01]", structured_scope="global")
    assert [i.r for i in find_adapters(net, pattern="[01]")] == [0, 5]
    rep = prune(net, 0.5, "tropical", "layer", pattern="[01]")
    assert rep.kept == round(0.5 * 160) and rep.solver["adapters_solved"] == [1]


# --- the report in full -----------------------------------------------------------------------
def test_report_in_full_for_a_hand_checked_prune():
    """Magnitude, layer allocation, keep 0.3: round(0.3·512) = 154 weights per adapter; with the
    second adapter's B scaled by 100 all 154 are in B there."""
    m = tiny_model()
    with torch.no_grad():
        find_adapters(m)[1].up.weight.mul_(100)
    rep = prune(m, keep=0.3, score="magnitude", allocation="layer")
    rep.time_s = 1.5
    assert rep.table() == str(rep) == "\n".join([
        "score=magnitude allocation=layer keep=0.3 values=trained: kept 616/2048 weights (0.3008) in 1.50 s",
        "adapter       act  A (r x d_in)  B (d_out x r)  r after  kept A  kept B    kept",
        "-----------  ----  ------------  -------------  -------  ------  ------  ------",
        "a L0 mh      relu          8x32           32x8        8  0.3125  0.2891  0.3008",
        "a L0 output  relu          8x32           32x8        8  0.0000  0.6016  0.3008",
        "a L1 mh      relu          8x32           32x8        8  0.2969  0.3047  0.3008",
        "a L1 output  relu          8x32           32x8        8  0.2734  0.3281  0.3008",
    ])
    d = rep.to_dict()
    assert d["adapters"][1] == {
        "name": "bert.encoder.layer.0.output.adapters.a", "adapter": "a", "layer": 0, "location": "output_adapter",
        "activation": "relu", "shape_A": [8, 32], "shape_B": [32, 8], "r_before": 8, "r_after": 8,
        "kept_A": 0, "kept_B": 154, "numel_A": 256, "numel_B": 256, "nonzero_A": 0, "nonzero_B": 154,
        "kept_fraction_A": 0.0, "kept_fraction_B": 154 / 256, "kept_fraction": 154 / 512,
    }
    assert [(a["kept_A"], a["kept_B"]) for a in d["adapters"]] == [(80, 74), (0, 154), (76, 78), (70, 84)]
    assert {k: v for k, v in d.items() if k not in ("adapters", "timings", "score_time_s", "options")} == {
        "keep": 0.3, "score": "magnitude", "allocation": "layer", "values": "trained", "masks_attached": True,
        "kept": 616, "total": 2048, "kept_fraction": 616 / 2048, "time_s": 1.5, "solver": None,
    }
    assert set(d["timings"]) == set(rep.timings) and d["timings"] is not rep.timings
    assert json.loads(rep.to_json(indent=2)) == json.loads(json.dumps(d)) and "\n" in rep.to_json(indent=2)


def test_report_labels_fractions_solver_line_and_options():
    from tropfast.pruning.apply import AdapterReport, PruneReport

    def ar(name="ad", adapter=None, layer=None, location=None, shape_A=(2, 3), shape_B=(4, 2), kA=1, kB=2):
        return AdapterReport(name, adapter, layer, location, "relu", shape_A, shape_B, shape_A[0], kA, kB, kA, kB)

    assert ar().label == "ad" and ar(adapter="a", layer=3).label == "a L3"
    assert ar(adapter="a", layer=1, location="output_adapter").label == "a L1 output"
    a = ar()
    assert (a.numel_A, a.numel_B, a.kept_fraction_A, a.kept_fraction_B, a.kept_fraction) == (6, 8, 1 / 6, 2 / 8, 3 / 14)
    empty = ar(shape_A=(0, 3), shape_B=(4, 0), kA=0, kB=0)
    assert (empty.kept_fraction_A, empty.kept_fraction_B, empty.kept_fraction) == (0.0, 0.0, 0.0)
    rep = PruneReport(0.5, "tropical", "global", [a], "solver", True,
                      {"method": "bcd", "backend": "torch", "steps": [3, 7], "search_iters": 2}, 2.0, 0.5,
                      options={"q": (1, 2), 3: torch.tensor(1.0), "n": None, "s": {"x": [0.5]}})
    assert rep.table().splitlines()[-1] == "solver: bcd on torch, steps 7, lambda search iterations 2"
    assert rep.to_dict()["options"] == {"q": [1, 2], "3": "tensor(1.)", "n": None, "s": {"x": [0.5]}}
    rep.solver = {"method": "ista", "backend": "cpu", "steps": [], "search_iters": 0}
    assert rep.table().splitlines()[-1] == "solver: ista on cpu, steps 0, lambda search iterations 0"
    assert PruneReport(0.5, "magnitude", "layer", [], "trained", False, None, 0.0, 0.0).kept_fraction == 0.0


# --- the scale an adapter applies, structured rewrites, and the rollback of a failed write --------
def test_adapter_scale_of_every_kind_of_scaling():
    from tropfast.pruning.apply import adapter_scale
    from tropfast.pruning.discovery import AdapterInfo

    m = tiny_model(mh_adapter=False, head=False)
    info = find_adapters(m)[0]
    assert adapter_scale(info) == 1.0  # AdapterHub's default

    def scaled(v):
        del info.module.scaling  # a Parameter and a plain value register differently
        info.module.scaling = v
        return adapter_scale(info)

    assert scaled(0.5) == 0.5 and isinstance(adapter_scale(info), float)
    assert scaled(3) == 3.0 and isinstance(adapter_scale(info), float)  # an int
    assert scaled(torch.nn.Parameter(torch.tensor([0.25]))) == 0.25  # learned, one value
    assert isinstance(adapter_scale(info), float)
    assert scaled(torch.tensor(0.75)) == 0.75  # 0-dim
    assert torch.equal(scaled(torch.tensor([0.5, 2.0])), torch.tensor([0.5, 2.0]))  # two values stay a tensor
    per_out = torch.linspace(0.5, 2.0, 32)
    got = scaled(torch.nn.Parameter(per_out.clone().reshape(1, 32)))  # learned, one per output
    assert isinstance(got, torch.Tensor) and got.shape == (32,) and torch.equal(got, per_out)
    assert not got.requires_grad
    assert scaled("channel") == 1.0  # not a number: no scaling known
    del info.module.scaling
    assert adapter_scale(info) == 1.0
    # a plain module is never scaled, whatever attribute it carries
    net = torch.nn.ModuleDict({"ad": torch.nn.Sequential(torch.nn.Linear(8, 2), torch.nn.ReLU(), torch.nn.Linear(2, 8))})
    net.ad.scaling = 5.0
    (plain,) = find_adapters(net, pattern="ad")
    assert isinstance(plain, AdapterInfo) and adapter_scale(plain) == 1.0


@pytest.mark.parametrize("values", ["trained", "solver"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_structured_rewrite_keeps_dtype_device_and_frozen_weights(dtype, values):
    m = tiny_model(mh_adapter=False, head=False).to(dtype)
    for i in find_adapters(m):
        i.down.weight.requires_grad_(False)  # a frozen down projection stays frozen
    # the solver's values are computed in fp32 for bf16 weights and written back in bf16
    prune(m, keep=0.5, score="tropical", allocation="structured", values=values)
    for i in find_adapters(m):
        assert i.r == 4
        for p in (i.down.weight, i.down.bias, i.up.weight):
            assert p.dtype == dtype and p.device.type == "cpu" and p.is_contiguous()
        assert i.down.weight.requires_grad is False
        assert i.down.bias.requires_grad is True and i.up.weight.requires_grad is True


def _fail_on_call(monkeypatch, owner, name: str, n: int) -> list[int]:
    """Patch owner.name to raise RuntimeError("injected") on its n-th call; returns the call count."""
    real, calls = getattr(owner, name), [0]

    def call(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError("injected")
        return real(*a, **k)

    monkeypatch.setattr(owner, name, call)
    return calls


def test_a_failed_write_restores_weights_and_the_same_mask_buffers(monkeypatch):
    from tropfast.pruning import masks as masks_mod

    m = tiny_model(mh_adapter=False, head=False)
    prune(m, keep=0.5, score="magnitude")  # masks attached
    infos = find_adapters(m)
    mask0 = infos[0].down._buffers[masks_mod.MASK_BUFFER]
    with torch.no_grad():  # a training step's write into a masked entry, before the step hook re-zeroes it
        infos[0].down.weight[tuple((~mask0).nonzero()[0])] = 0.25
    before = {k: v.clone() for k, v in m.state_dict().items()}
    buffers = [(i.down._buffers[masks_mod.MASK_BUFFER], i.up._buffers[masks_mod.MASK_BUFFER]) for i in infos]
    # the third attach is the second adapter's down projection: the first one is written already
    calls = _fail_on_call(monkeypatch, masks_mod, "_attach", 3)
    with pytest.raises(RuntimeError, match="injected"):
        prune(m, keep=0.25, score="magnitude")
    assert calls[0] > 3  # the restore re-attached the earlier masks
    after = m.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the 0.25 too: no re-zeroing
    for i, (bd, bu) in zip(find_adapters(m), buffers):
        assert i.down._buffers[masks_mod.MASK_BUFFER] is bd and i.up._buffers[masks_mod.MASK_BUFFER] is bu


@pytest.mark.parametrize("which", ["down", "up"])
def test_a_mask_of_another_shape_is_refused_in_full(which):
    from tropfast.pruning import masks as masks_mod

    m = tiny_model(mh_adapter=False, head=False)
    prune(m, keep=0.5, score="magnitude")
    info = find_adapters(m)[0]
    mod = info.down if which == "down" else info.up
    shape = tuple(mod.weight.shape)
    mod.weight = torch.nn.Parameter(torch.ones(shape[0] - 1, shape[1]))  # the mask stays (8, 32) / (32, 8)
    with pytest.raises(ValueError) as e:
        prune(m, keep=0.25, score="magnitude")
    assert str(e.value) == (
        f"adapter 'bert.encoder.layer.0.output.adapters.a': the {which}-projection carries a tropfast mask of "
        f"shape {shape} but its weight is {(shape[0] - 1, shape[1])}; call tropfast.pruning.remove_masks(model) first"
    )
    assert mod._buffers[masks_mod.MASK_BUFFER].shape == shape


def test_check_adapters_defaults_and_refusals_in_full():
    from tropfast.pruning import UnsupportedAdapterError
    from tropfast.pruning.apply import check_adapters

    gelu = find_adapters(tiny_model(non_linearity="gelu", mh_adapter=False, head=False))
    with pytest.raises(UnsupportedAdapterError, match=r"^2 adapter\(s\) use activation gelu \(first: "):
        check_adapters(gelu)  # ReLU only, by default
    check_adapters(gelu, allow_non_relu=True)
    phm = tiny_model(mh_adapter=False, head=False, scale=1.0, phm_layer=True, phm_dim=2)
    with pytest.raises(UnsupportedAdapterError) as e:
        prune(phm, keep=0.5, score="magnitude")
    assert str(e.value) == (
        "adapter 'bert.encoder.layer.0.output.adapters.a' cannot be pruned: PHM/Compacter layers (phm_layer=True) "
        "are Kronecker-factored; only dense Linear bottlenecks can be pruned"
    )


@pytest.mark.parametrize("where", ["down.weight", "up.bias"])
def test_non_finite_weights_refused_with_counts_in_full(where):
    m = tiny_model(mh_adapter=False, head=False)
    info = find_adapters(m)[1]
    mod_name, pname = where.split(".")
    p = getattr(getattr(info, mod_name), pname)
    with torch.no_grad():
        p.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    with pytest.raises(ValueError) as e:
        prune(m, keep=0.5, score="magnitude")
    assert str(e.value) == (
        f"adapter 'bert.encoder.layer.1.output.adapters.a': {mod_name}-projection {pname} has non-finite values "
        "(1 NaN, 2 Inf); the model was left unchanged"
    )


def test_keep_masks_false_removes_earlier_masks_and_structured_plain_modules_get_no_new_attribute():
    from tropfast.pruning import masks as masks_mod

    m = tiny_model(mh_adapter=False, head=False)
    prune(m, keep=0.5, score="magnitude")
    prune(m, keep=0.25, score="magnitude", keep_masks=False)
    for i in find_adapters(m):
        assert masks_mod.MASK_BUFFER not in i.down._buffers and masks_mod.MASK_BUFFER not in i.up._buffers
        assert int((i.down.weight != 0).sum()) + int((i.up.weight != 0).sum()) == 128  # a quarter of 2 x 256
    net = torch.nn.ModuleDict({"ad": torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 8))})
    prune(net, keep=0.5, score="magnitude", allocation="structured", pattern="ad")
    assert net.ad[0].out_features == 2 and not hasattr(net.ad, "down_sample")


def test_non_relu_refusal_in_full():
    from tropfast.pruning import UnsupportedAdapterError
    from tropfast.pruning.apply import check_adapters

    def block(act):
        return torch.nn.Sequential(torch.nn.Linear(6, 2), act, torch.nn.Linear(2, 6))

    net = torch.nn.ModuleDict({"a": block(torch.nn.ReLU()), "b": block(torch.nn.Tanh()), "c": block(torch.nn.GELU())})
    with pytest.raises(UnsupportedAdapterError) as e:
        check_adapters(find_adapters(net, pattern="[abc]"))
    assert str(e.value) == (
        "2 adapter(s) use activation gelu, tanh (first: 'b'); the tropical characterization is exact only for ReLU "
        "bottlenecks. Pass allow_non_relu=True (CLI: --allow-non-relu) to prune them anyway, treating the activation "
        "as if it were ReLU"
    )


def test_a_failed_structured_write_restores_shapes_and_down_sample(monkeypatch):
    m = tiny_model(mh_adapter=False, head=False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    # the fourth new parameter is the second adapter's down weight: the first adapter is rewritten already
    _fail_on_call(monkeypatch, apply_mod, "_new_param", 4)
    with pytest.raises(RuntimeError, match="injected"):
        prune(m, keep=0.5, score="magnitude", allocation="structured")
    for i in find_adapters(m):
        assert i.module.down_sample == 8 and i.r == 8
        assert (i.down.out_features, i.up.in_features) == (8, 8)
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_prune_argument_checks_in_full_and_the_batch_count():
    m = tiny_model(mh_adapter=False)
    with pytest.raises(TypeError) as e:
        prune(3)
    assert str(e.value) == "model must be a torch.nn.Module, got int"
    with pytest.raises(ValueError) as e:
        prune(m, values="fresh")
    assert str(e.value) == "values='fresh'; choose 'trained' or 'solver'"
    prune(m, 0.5, "combined", values="solver", inplace=False)  # the solver's values with the combined score
    for seed in (-(2**63), 2**64 - 1):
        prune(m, 0.5, "random", seed=seed, inplace=False)
    for seed in (-(2**63) - 1, 2**64):
        with pytest.raises(ValueError, match=r"^seed must be an integer in \[-2\*\*63, 2\*\*64\), got "):
            prune(m, 0.5, "random", seed=seed, inplace=False)
    with pytest.raises(ValueError) as e:
        prune(m, 0.5, "magnitude", data_batches=2, snip_batches=3)
    assert str(e.value) == "data_batches= and its alias snip_batches= were both given; pass one"
    for kw, name, bad in (("data_batches", "data_batches", 0), ("snip_batches", "snip_batches", 0),
                          ("data_batches", "data_batches", True), ("snip_batches", "snip_batches", 1.5)):
        with pytest.raises(ValueError) as e:
            prune(m, 0.5, "magnitude", **{kw: bad})
        assert str(e.value) == f"{name} must be a positive integer, got {bad!r}"
    with pytest.raises(ValueError, match=r"^data_batches must be a positive integer, got 0$"):
        prune(m, 0.5, "magnitude", data_batches=0, snip_batches=0)  # both, agreeing: the new name

    # batches taken from a one-shot iterator: 4 by default, else the count given (either name, or
    # both when they agree)
    def taken(**kw):
        fed = []

        def stream():
            for k in range(10):
                fed.append(k)
                yield tokens(seed=k)

        prune(m, 0.5, "snip", data=stream(), loss_fn=lambda model, x: model(x).logits.sum(), inplace=False, **kw)
        return len(fed)

    assert taken() == 4
    assert taken(data_batches=1) == 1
    assert taken(snip_batches=3) == 3
    assert taken(data_batches=2, snip_batches=2) == 2


def test_prune_defaults(capsys):
    from tropfast.pruning import UnsupportedAdapterError

    m = tiny_model(mh_adapter=False)
    a = prune(m, 0.5, "random", inplace=False).model
    b = prune(m, 0.5, "random", seed=0, inplace=False).model
    c = prune(m, 0.5, "random", seed=1, inplace=False).model
    assert all(torch.equal(x.down.weight, y.down.weight) for x, y in zip(find_adapters(a), find_adapters(b)))
    assert not all(torch.equal(x.down.weight, y.down.weight) for x, y in zip(find_adapters(a), find_adapters(c)))
    capsys.readouterr()
    rep = prune(m, inplace=False)  # keep 0.3, the tropical score, layer allocation, silent
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert (rep.score, rep.allocation) == ("tropical", "layer") and rep.kept_fraction == pytest.approx(0.3, abs=0.01)
    with pytest.raises(UnsupportedAdapterError, match="allow_non_relu=True"):
        prune(tiny_model(non_linearity="gelu", mh_adapter=False), 0.5, "magnitude")


def test_weights_without_values_or_of_an_integer_dtype_are_refused_in_full():
    m = tiny_model(mh_adapter=False, head=False)
    info = find_adapters(m)[1]
    keep = info.up.weight
    info.up.weight = torch.nn.Parameter(torch.empty(tuple(keep.shape), device="meta"))
    with pytest.raises(ValueError) as e:
        prune(m, 0.5, "magnitude")
    assert str(e.value) == (
        "adapter 'bert.encoder.layer.1.output.adapters.a': the up-projection weight is on the meta device and holds "
        "no values; load the weights (e.g. from_pretrained without a meta device_map) before pruning"
    )
    info.up.weight = keep
    info.down.weight = torch.nn.Parameter(torch.zeros(tuple(info.down.weight.shape), dtype=torch.int64), requires_grad=False)
    with pytest.raises(TypeError) as e:
        prune(m, 0.5, "magnitude")
    assert str(e.value) == (
        "adapter 'bert.encoder.layer.1.output.adapters.a': the down-projection weight is torch.int64; "
        "it must be floating point"
    )


def test_gradient_rank_options_and_what_reaches_discovery():
    m = tiny_model(mh_adapter=False)

    def loss(model, x):
        return model(x).logits.sum()

    with pytest.raises(ValueError) as e:
        prune(m, 0.5, "magnitude", allocation="gradient_rank", data=[tokens()], loss_fn=loss, gradient_rank={"zz": 1})
    assert str(e.value) == "unknown gradient_rank option(s) ['zz']; known: ['batches', 'rtol']"
    with pytest.raises(ValueError) as e:
        prune(m, 0.5, "magnitude", allocation="gradient_rank")
    assert str(e.value) == "allocation='gradient_rank' needs data=<a few batches> to measure the adapters' gradient ranks"
    # under gradient_rank, data= feeds the ranks and snip_data= the score: two different values are fine
    fed = []

    def stream():
        for k in range(10):
            fed.append(k)
            yield tokens(seed=k)

    rep = prune(m, 0.5, "snip", allocation="gradient_rank", data=stream(), loss_fn=loss, snip_data=[tokens()],
                gradient_rank={"batches": 6}, inplace=False)
    assert rep.allocation == "gradient_rank" and len(fed) == 6  # the larger of the score's 4 and the ranks' 6
    for arg in ("adapter", "pattern", "activation"):
        with pytest.raises(TypeError) as e:
            prune(m, 0.5, "magnitude", **{arg: 3})
        assert str(e.value) == f"{arg} must be a string or None, got 3"
    # adapter=, pattern= and activation= reach discovery
    from adapters import SeqBnConfig

    two = tiny_model(mh_adapter=False)
    two.add_adapter("b", config=SeqBnConfig(reduction_factor=8))
    rep = prune(two, 0.5, "magnitude", adapter="b")
    assert [a.adapter for a in rep.adapters] == ["b", "b"]
    net = torch.nn.ModuleDict({"ad": torch.nn.ModuleDict({"proj_in": torch.nn.Linear(6, 2), "proj_out": torch.nn.Linear(2, 6)})})
    rep = prune(net, 0.5, "magnitude", pattern="ad", activation="relu")
    assert [a.name for a in rep.adapters] == ["ad"] and rep.adapters[0].activation == "relu"


def test_data_aliases_refused_in_full_unless_the_same_object():
    m = tiny_model(mh_adapter=False)
    batches = [tokens(seed=k) for k in range(2)]

    def loss(model, x):
        return model(x).logits.sum()

    def other(model, x):
        return model(x).logits.mean()

    prune(m, 0.5, "snip", data=batches, snip_data=batches, loss_fn=loss, snip_loss_fn=loss, inplace=False)
    with pytest.raises(ValueError) as e:
        prune(m, 0.5, "snip", data=batches, snip_data=list(batches), loss_fn=loss)
    assert str(e.value) == "data= and its alias snip_data= were both given; pass one"
    with pytest.raises(ValueError) as e:
        prune(m, 0.5, "snip", data=batches, loss_fn=loss, snip_loss_fn=other)
    assert str(e.value) == "loss_fn= and its alias snip_loss_fn= were both given; pass one"


def test_inplace_false_on_a_masked_model_and_the_filters_reach_the_copy():
    from adapters import SeqBnConfig

    from tropfast.pruning import masks as masks_mod

    m = tiny_model(mh_adapter=False)
    m.add_adapter("b", config=SeqBnConfig(reduction_factor=8))
    prune(m, 0.5, "magnitude")  # masks on every adapter
    before = state(m)
    rep = prune(m, 0.25, "magnitude", adapter="b", inplace=False)
    assert same_state(state(m), before)  # the original is untouched
    assert [a.adapter for a in rep.adapters] == ["b", "b"]
    for i in find_adapters(rep.model):
        mask = i.down._buffers[masks_mod.MASK_BUFFER]
        assert bool((i.down.weight[~mask] == 0).all())
        if i.adapter == "a":  # not pruned again: half of each adapter's weights, as the first prune left them
            assert int((i.down.weight != 0).sum()) + int((i.up.weight != 0).sum()) == 256
    net = torch.nn.ModuleDict({"ad": torch.nn.ModuleDict({"proj_in": torch.nn.Linear(6, 2), "proj_out": torch.nn.Linear(2, 6)})})
    rep = prune(net, 0.5, "magnitude", pattern="ad", activation="relu", inplace=False)
    assert [a.name for a in rep.adapters] == ["ad"] and rep.model is not net


# --- what prune hands on: options in the report, the score's inputs, structured solver values -----
def test_report_options_in_full():
    m = tiny_model()
    base = {"combined_q": None, "structured_scope": None, "seed": None, "data_batches": None,
            "allow_non_relu": False, "adapter": None, "pattern": None, "inplace": False}
    runs = [
        (dict(score="magnitude"), {}),
        (dict(score="combined", combined_q=0.25, tropical=FIXED), {"combined_q": 0.25}),
        (dict(score="magnitude", allocation="structured", structured_scope="global"), {"structured_scope": "global"}),
        (dict(score="random", seed=7, adapter="a"), {"seed": 7, "adapter": "a"}),
        (dict(score="snip", data=_snip_data(3), data_batches=2), {"data_batches": 2}),
        (dict(score="magnitude", allow_non_relu=True), {"allow_non_relu": True}),
    ]
    for kw, diff in runs:
        rep = prune(m, 0.3, inplace=False, **kw)
        assert rep.options == {**base, **diff}, kw
        assert 0 <= rep.score_time_s <= rep.time_s < 600, (rep.score_time_s, rep.time_s)  # seconds, the scores' part of the whole
    net = _plain_net()
    rep = prune(net, 0.3, "magnitude", pattern="[01]", inplace=True)
    assert rep.options == {**base, "pattern": "[01]", "inplace": True}


def test_the_score_gets_keep_the_batch_count_and_the_scalings():
    m = tiny_model()
    # the tropical search aims at keep itself
    assert prune(m, 0.3, "tropical", inplace=False).solver["target_keep"] == 0.3
    # snip reads data_batches batches: 1 of 3 gives the scores of the first batch alone
    data = _snip_data(3)
    one = prune(m, 0.3, "snip", "global", data=data, data_batches=1, inplace=False)
    g = _snip_expected(m, data[:1])
    As, Bs = _weights(m)
    want = allocate_sorted(ScoreResult("snip", g[0::2], g[1::2], [a.abs() for a in As], [b.abs() for b in Bs]), 0.3, "global")
    for k, i in enumerate(find_adapters(one.model)):
        assert torch.equal(_masks_of(i)[0], want.masks_A[k]) and torch.equal(_masks_of(i)[1], want.masks_B[k]), k
    # synflow weighs each adapter by its output scaling: a global threshold then favours the
    # adapters scaled up (0.7 of the weights of the two scaled by 8, 0.0x of the others)
    s = tiny_model(head=False)
    infos = find_adapters(s)
    for k, i in enumerate(infos):
        i.module.scaling = 8.0 if k < 2 else 1.0
    As, Bs = _weights(s)
    from tropfast.pruning.scores import synflow_scores

    SA, SB = synflow_scores(As, Bs, [i.down.bias for i in infos], [8.0, 8.0, 1.0, 1.0])
    want = allocate_sorted(ScoreResult("synflow", SA, SB, [a.abs() for a in As], [b.abs() for b in Bs]), 0.3, "global")
    rep = prune(s, 0.3, "synflow", "global", inplace=False)
    for k, i in enumerate(find_adapters(rep.model)):
        assert torch.equal(_masks_of(i)[0], want.masks_A[k]) and torch.equal(_masks_of(i)[1], want.masks_B[k]), k
    kept = [a.kept_fraction for a in rep.adapters]
    assert min(kept[:2]) > max(kept[2:]), kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_structured_solver_values_are_the_solution_rows_of_the_kept_units(dtype):
    m = tiny_model(head=False).to(dtype)
    As, Bs = _weights(m)
    biases = [i.down.bias.detach().clone() for i in find_adapters(m)]
    Ah, Bh = _tropical_hat(As, Bs)
    want = allocate_sorted(
        ScoreResult("tropical", [a.abs() for a in Ah], [b.abs() for b in Bh], [A.abs() for A in As], [B.abs() for B in Bs]),
        0.5, "structured",
    )
    for values, srcA, srcB in (("solver", Ah, Bh), ("trained", As, Bs)):
        rep = prune(m, 0.5, "tropical", "structured", values=values, tropical=FIXED, inplace=False)
        for k, (i, u) in enumerate(zip(find_adapters(rep.model), want.units)):
            assert i.down.weight.dtype == dtype and i.up.weight.dtype == dtype and i.down.bias.dtype == dtype
            assert torch.equal(i.down.weight, srcA[k][u].to(dtype)), (values, k)
            assert torch.equal(i.up.weight, srcB[k][:, u].to(dtype)), (values, k)
            assert torch.equal(i.down.bias, biases[k][u]), (values, k)


@pytest.mark.parametrize("which", ["A_hat", "B_hat"])
@pytest.mark.parametrize("allocation", ["layer", "structured"])
def test_solver_values_that_do_not_fit_are_refused_naming_the_adapter(monkeypatch, allocation, which):
    # the third adapter's Â (or B̂) holds 1e6: finite as computed (float64), infinite in the
    # model's float16.  Refused before any write, naming that adapter.
    m = tiny_model(head=False).half()
    before = state(m)
    real = apply_mod.compute_scores

    def spoiled(*a, **kw):
        res = real(*a, **kw)
        getattr(res, which)[2] = torch.full_like(getattr(res, which)[2], 1e6)
        return res

    monkeypatch.setattr(apply_mod, "compute_scores", spoiled)
    name = find_adapters(m)[2].name
    with pytest.raises(FloatingPointError) as e:
        prune(m, 0.3, "tropical", allocation, values="solver", tropical=FIXED)
    assert str(e.value) == f"adapter {name!r}: the pruned weights are not finite"
    assert same_state(state(m), before)


def test_structured_prune_of_adapters_without_a_down_bias():
    net = _plain_net()
    for b in net:
        b.down.bias = None
    rep = prune(net, 0.5, "magnitude", "structured", pattern="[01]")
    assert [b.down.bias for b in net] == [None, None]
    assert [b.down.weight.shape[0] for b in net] == [2, 3] and [a.r_after for a in rep.adapters] == [2, 3]


def test_gradient_rank_gets_its_options_the_combined_share_and_the_survivors():
    import re

    from test_placement_allocation import _data, _reference_ranks, _tiny

    m = _tiny()
    data = _data(n=4)
    infos = find_adapters(m)
    # batches and rtol reach the rank measurement (the ranks differ with either)
    # (2 batches: others than with the default 4; rtol 0.3: others than with the default 1e-2)
    for opts, n, rtol, default in (({"batches": 2}, 2, 1e-2, (4, 1e-2)), ({"batches": 3, "rtol": 0.3}, 3, 0.3, (3, 1e-2))):
        ranks, maxr = _reference_ranks(m, infos, data[:n], rtol)
        assert ranks != _reference_ranks(m, infos, data[: default[0]], default[1])[0]
        rep = prune(m, 0.3, "magnitude", "gradient_rank", data=data, gradient_rank=opts, inplace=False)
        got = rep.options["gradient_rank"]
        assert sorted(got) == ["batches", "fro", "max_rank", "rank", "rtol", "tokens"], opts
        assert (got["batches"], got["rtol"], got["rank"], got["max_rank"]) == (n, rtol, ranks, maxr), opts
    # the combined share: q = 1 keeps what the tropical score keeps, q = 0 what magnitude keeps
    kw = dict(data=data, gradient_rank={"batches": 1}, tropical=FIXED, inplace=False)
    for q, other in ((1.0, "tropical"), (0.0, "magnitude")):
        got = prune(m, 0.3, "combined", "gradient_rank", combined_q=q, **kw)
        want = prune(m, 0.3, other, "gradient_rank", **kw)
        for a, b in zip(find_adapters(got.model), find_adapters(want.model)):
            assert torch.equal(_masks_of(a)[0], _masks_of(b)[0]) and torch.equal(_masks_of(a)[1], _masks_of(b)[1]), q
    # a second prune selects among the survivors of A and of B (a random score would revive
    # pruned weights otherwise) ...
    m2 = _tiny()
    prune(m2, 0.3, "magnitude")
    old = [_masks_of(i) for i in find_adapters(m2)]
    rep = prune(m2, 0.15, "random", "gradient_rank", data=data, gradient_rank={"batches": 1})
    for (a, b), i, ar in zip(old, find_adapters(m2), rep.adapters):
        assert not bool((_masks_of(i)[0] & ~a).any()) and not bool((_masks_of(i)[1] & ~b).any())
        # every kept weight is a survivor, so the kept counts are the nonzeros (a kept pruned
        # weight would be zero here and free to regrow in training)
        assert (ar.kept_A, ar.kept_B) == (int(i.down.weight.count_nonzero()), int(i.up.weight.count_nonzero()))
    # ... and asking more than survive is refused, naming the first adapter short of them
    prune(m, 0.2, "magnitude")
    with pytest.raises(ValueError) as e:
        prune(m, 0.9, "magnitude", "gradient_rank", data=data, gradient_rank={"batches": 1})
    found = re.search(r"of the \d+ weights of adapter ('[^']+'), but only \d+ survive", str(e.value))
    assert found and found.group(1) in [repr(i.name) for i in infos], str(e.value)


def test_allocation_refusals_name_the_adapter():
    m = tiny_model()
    prune(m, 0.5, "magnitude")
    name = find_adapters(m)[0].name
    with pytest.raises(ValueError) as e:
        prune(m, 0.7, "magnitude")
    assert str(e.value) == (
        f"keep=0.7 asks for 358 of the 512 weights of adapter {name!r}, but only 256 survive an earlier prune "
        "(keep is a fraction of all weights, pruned ones included; a prune never revives a weight): "
        "use keep <= 0.5, or remove_masks(model) to start afresh"
    )


def test_progress_reaches_the_tropical_search(capsys, monkeypatch):
    import collections

    from tropfast.pruning import scores

    monkeypatch.setattr(scores, "_SOLVE_CACHE", collections.OrderedDict())  # a cached solve would show no search
    m = tiny_model()
    prune(m, 0.3, "tropical", progress=True, inplace=False)
    assert "tropfast lambda search" in capsys.readouterr().err
    prune(m, 0.3, "tropical", inplace=False)
    assert "tropfast lambda search" not in capsys.readouterr().err
