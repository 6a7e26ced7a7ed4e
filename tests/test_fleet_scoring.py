"""Batched tropical scores across files (tropfast.fleet.scoring) against prune's own scoring."""

from __future__ import annotations

import pytest
import torch

from tropfast.fleet.scoring import Problem, tropical_batch
from tropfast.pruning.scores import compute_scores


def _problems(seed: int, n: int, shapes) -> list[Problem]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        As, Bs = [], []
        for r, d_in, d_out in shapes[k % len(shapes)]:
            s = 0.2 + torch.rand(1, generator=g).item()
            As.append(torch.randn(r, d_in, generator=g, dtype=torch.float64) * s)
            Bs.append(torch.randn(d_out, r, generator=g, dtype=torch.float64) * s)
        out.append(Problem(As, Bs))
    return out


@pytest.mark.parametrize(
    "opts",
    [
        {},  # the defaults: target search to within 2 points
        {"search_tol": 0.0, "search_iters": 6},
        {"target": False},
        {"method": "bcd", "steps": 20},
        {"dtype": "float64", "steps": 30},
        {"lam_gen": 2.0},  # the generator penalty, scaled by the λ search with lam1 and lam2
        {"lam_gen": 2.0, "method": "bcd", "steps": 20, "target": False},
    ],
)
def test_each_problem_equals_prunes_own_solve(opts):
    # numel 100 per adapter: kept fractions are multiples of 0.01, so errors land on the
    # tolerance's edge (|0.28 - 0.3| is just below 0.02 in float64, above it in float32)
    shapes = [[(2, 25, 25)] * 3, [(2, 25, 25), (4, 10, 15)], [(3, 20, 20)] * 2]
    probs = _problems(1, 6, shapes)
    got = tropical_batch(probs, 0.3, dict(opts))
    for p, (Ah, Bh, diag) in zip(probs, got):
        want = compute_scores("tropical", p.As, p.Bs, 0.3, tropical=dict(opts))
        for a, b in zip(Ah, want.A_hat):
            assert torch.equal(a, b)
        for a, b in zip(Bh, want.B_hat):
            assert torch.equal(a, b)
        for key in ("lam1", "lam2", "lr", "steps", "objective_start", "objective_end", "solver_kept_fraction", "search_iters"):
            assert diag[key] == want.solver[key], key
        if opts.get("lam_gen"):  # the penalty really changed the solution
            plain = compute_scores("tropical", p.As, p.Bs, 0.3, tropical=dict(opts, lam_gen=0.0))
            assert not all(torch.equal(a, b) for a, b in zip(Ah + Bh, plain.A_hat + plain.B_hat))


def test_uniform_buckets_probe_rows_of_one_stack(monkeypatch):
    """Adapters of one shape are stacked once per bucket, with their safe steps, and each probe
    solves rows of that stack: the same numbers as solving the probe's list of adapters."""
    from tropfast.fleet import scoring

    probs = _problems(5, 4, [[(3, 24, 20)] * 3])
    calls: list = []
    real_solve = scoring.solve

    def spy(A, B, **kw):
        calls.append((type(A).__name__, kw["lr"] is None))
        return real_solve(A, B, **kw)

    monkeypatch.setattr(scoring, "solve", spy)
    stacked = tropical_batch(probs, 0.3)
    assert calls and all(kind == "Tensor" and not no_lr for kind, no_lr in calls), calls
    probes = len(calls)
    calls.clear()
    monkeypatch.setattr(scoring, "_uniform_batch", lambda *a: None)
    listed = tropical_batch(probs, 0.3)
    assert len(calls) == probes and all(kind == "list" and no_lr for kind, no_lr in calls), calls
    for (Ah, Bh, d1), (Ah2, Bh2, d2) in zip(stacked, listed):
        assert all(torch.equal(a, b) for a, b in zip(Ah + Bh, Ah2 + Bh2))
        assert d1 == d2
        # kept rows are copies: nothing holds a probe's whole output
        assert all(a._base is None for a in Ah + Bh)


def test_mixed_shapes_are_not_stacked():
    from tropfast.fleet.scoring import _uniform_batch

    A = [torch.ones(2, 5), torch.ones(3, 5)]
    B = [torch.ones(4, 2), torch.ones(4, 3)]
    assert _uniform_batch(A, B, {"lr": None, "method": "ista"}) is None
    A3, B3, lr = _uniform_batch(A[:1] * 2, B[:1] * 2, {"lr": None, "method": "ista"})
    assert A3.shape == (2, 2, 5) and B3.shape == (2, 4, 2) and lr.shape == (2,)
    assert _uniform_batch(A[:1] * 2, B[:1] * 2, {"lr": None, "method": "bcd"})[2] is None


def test_problems_stop_on_their_own():
    # one slow problem must not change the others' lambda (it would in one shared solve call)
    probs = _problems(3, 4, [[(2, 25, 25)] * 2])
    together = tropical_batch(probs, 0.3)
    alone = [tropical_batch([p], 0.3)[0] for p in probs]
    iters = [d["search_iters"] for _, _, d in together]
    assert len(set(iters)) > 1  # the problems really stop at different steps
    for (a1, b1, d1), (a2, b2, d2) in zip(together, alone):
        assert d1["lam1"] == d2["lam1"]
        assert all(torch.equal(x, y) for x, y in zip(a1 + b1, a2 + b2))


def test_part_of_a_problem_padded_to_the_whole():
    # a split checkpoint: one rank holds the small adapter of a list that pads to (4, 25, 25);
    # told so (pad=...), its solves pad like the whole list's and give the same values
    p = _problems(5, 1, [[(2, 25, 25), (4, 10, 15)]])[0]
    whole = tropical_batch([p], 0.3, {"target": False})[0]
    part = tropical_batch([Problem(p.As[:1], p.Bs[:1], pad=(4, 25, 25))], 0.3, {"target": False})[0]
    assert torch.equal(part[0][0], whole[0][0]) and torch.equal(part[1][0], whole[1][0])
    assert part[2]["lam1"] == whole[2]["lam1"][:1]


def test_the_search_keeps_its_best_probes_and_solves_nothing_after(monkeypatch):
    """The outputs of each adapter's best probe are its result, as in solve(target_keep=...):
    the solves are the probes, one per search iteration of each padded shape, with no second
    run at the found λ."""
    import tropfast.fleet.scoring as scoring

    probs = _problems(3, 4, [[(2, 25, 25)] * 2, [(3, 20, 20)]])
    calls = []
    real = scoring._solve
    monkeypatch.setattr(scoring, "_solve", lambda As, *a, **k: calls.append(len(As)) or real(As, *a, **k))
    got = tropical_batch(probs, 0.3)
    iters = {}  # search iterations per padded shape: its longest problem's
    for (_, _, d), p in zip(got, probs):
        shape = tuple(p.As[0].shape)
        iters[shape] = max(iters.get(shape, 0), d["search_iters"])
    assert len(calls) == sum(iters.values()) and max(iters.values()) >= 2
    for (a1, b1, _), p in zip(got, probs):
        want = compute_scores("tropical", p.As, p.Bs, 0.3)
        assert all(torch.equal(x, y) for x, y in zip(a1 + b1, want.A_hat + want.B_hat))
    calls.clear()
    fixed = tropical_batch(probs, 0.3, {"target": False})  # fixed λ: one solve per shape, of every adapter
    assert calls == [4, 2] and fixed[0][2]["search_iters"] == 0


def test_solves_run_on_the_threads_asked_for(monkeypatch):
    import tropfast.fleet.scoring as scoring

    seen = []
    real = scoring.solve
    monkeypatch.setattr(scoring, "solve", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    got = tropical_batch(_problems(5, 2, [[(2, 12, 10)]]), 0.3, threads=want)
    assert seen and set(seen) == {want} and torch.get_num_threads() == before
    seen.clear()
    again = tropical_batch(_problems(5, 2, [[(2, 12, 10)]]), 0.3)
    assert set(seen) == {before}
    assert all(torch.equal(x, y) for (a, b, _), (c, d, _) in zip(got, again) for x, y in zip(a + b, c + d))
