"""prune(): exact counts per group for every score x allocation, masks through training, atomicity."""
from __future__ import annotations

import json

import pytest

from pruning_fixtures import logits, same_state, state, tiny_model, tokens, torch

import tropfast

from tropfast.pruning import PruneReport, find_adapters, kept_count, prune, remove_masks
from tropfast.pruning import apply as apply_mod
from tropfast.pruning import masks as masks_mod

SCORES = ["magnitude", "tropical", "combined", "random", "snip", "partner_norm", "grasp", "synflow"]
ALLOCATIONS = ["global", "layer", "matrix", "node", "structured", "erdos_renyi", "class_distribution"]


def _snip_data(n=2):
    return [{"input_ids": tokens(4, 8, seed=s), "labels": torch.tensor([0, 1, 1, 0])} for s in range(n)]


def _masks_of(info):
    return info.down.weight != 0, info.up.weight != 0


@pytest.fixture(scope="module")
def model():
    return tiny_model()


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
    if allocation == "structured":
        for i, o in zip(infos, orig):
            k = kept_count(keep, o.r)
            assert i.r == k and i.down.weight.shape == (k, 32) and i.up.weight.shape == (32, k)
            assert i.down.bias.shape == (k,) and i.module.down_sample == k
        assert [a.r_after for a in rep.adapters] == [kept_count(keep, 8)] * 4
    else:
        mA = [_masks_of(i)[0] for i in infos]
        mB = [_masks_of(i)[1] for i in infos]
        if allocation in ("global", "class_distribution"):
            total = sum(i.numel for i in orig)
            assert sum(int(a.sum()) + int(b.sum()) for a, b in zip(mA, mB)) == kept_count(keep, total) == 614
        elif allocation == "erdos_renyi":
            # 8 matrices of 256 weights, one Erdős–Rényi density (all shapes alike): 76.8 each,
            # floor 76, and the 6 weights left go to the first 6 matrices (equal remainders)
            counts = [int(m.sum()) for a, b in zip(mA, mB) for m in (a, b)]
            assert counts == [77] * 6 + [76] * 2 and sum(counts) == kept_count(keep, 2048)
        elif allocation == "layer":
            for i, a, b in zip(orig, mA, mB):
                assert int(a.sum()) + int(b.sum()) == kept_count(keep, i.numel)
        elif allocation == "matrix":
            for a, b in zip(mA, mB):
                assert int(a.sum()) == kept_count(keep, a.numel()) and int(b.sum()) == kept_count(keep, b.numel())
        else:
            for a, b in zip(mA, mB):
                per_unit = a.sum(1) + b.sum(0)
                assert per_unit.tolist() == [kept_count(keep, 64)] * 8
        # the report counts what was written; masks are attached
        for a_rep, a, b in zip(rep.adapters, mA, mB):
            assert (a_rep.kept_A, a_rep.kept_B) == (int(a.sum()), int(b.sum()))
        assert rep.masks_attached and len(masks_mod.masked_modules(pruned)) == 8
    out = logits(pruned, tokens())
    assert out.shape == (3, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize("keep", [0.0, 0.07, 0.5, 1.0])
def test_extreme_fractions(model, keep):
    rep = prune(model, keep=keep, score="tropical", allocation="layer", inplace=False)
    assert rep.kept == sum(kept_count(keep, 512) for _ in range(4))
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


def test_snip_works_under_no_grad():
    m = tiny_model()
    with torch.no_grad():
        report = prune(m, 0.5, "snip", snip_data=_snip_data(), snip_batches=2)
    assert report.adapters


def test_snip_leaves_grads_and_flags_alone():
    m = tiny_model()
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    for p in m.parameters():
        p.requires_grad_(False)
    prune(m, 0.5, "snip", snip_data=_snip_data(), snip_batches=2)
    assert all(p.grad is None for p in m.parameters())
    assert not any(p.requires_grad for p in m.parameters())
    assert flags  # the model had parameters
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
    rep = prune(model, keep=0.3, score="tropical", values="solver", inplace=False)
    rep_t = prune(model, keep=0.3, score="tropical", inplace=False)
    wa, wt = find_adapters(rep.model)[0].down.weight, find_adapters(rep_t.model)[0].down.weight
    assert bool(((wa != 0) <= (wt != 0)).all())  # solver zeros only inside the mask's zeros and a few kept
    assert not torch.equal(wa, wt)
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
    target = "attach_mask" if allocation == "layer" else "_new_param"
    real = getattr(masks_mod if target == "attach_mask" else apply_mod, target)

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(masks_mod if target == "attach_mask" else apply_mod, target, flaky)
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
    assert sum(i.r for i in infos) == kept_count(0.5, 32)
    zeroed = find_adapters(ref)
    for i, z, (A, a, B, b) in zip(infos, zeroed, orig):
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
    assert [a.kept_A + a.kept_B for a in rep.adapters] == [kept_count(0.25, 128), kept_count(0.25, 192)]
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
        k = kept_count(keep, 8)
        assert info.r == k
        order = sorted(range(8), key=lambda i: (-float(u[i]), -float(m[i]), i))
        got = [int((A == row.double()).all(1).nonzero()[0]) for row in info.down.weight.detach()]
        assert got == sorted(order[:k])
        alive.append(int((u > 0).sum()))
    assert max(alive) < kept_count(keep, 8)  # every surviving unit is kept, then the dead ones by magnitude
    with pytest.raises(ValueError, match="tropical lam_gen must be a finite number >= 0"):
        prune(model, keep, "tropical", allocation="structured", tropical={"lam_gen": -1.0}, inplace=False)
