"""allocate(): O(n) selection, bit-identical to the sort-based reference for every score x allocation;
the allocations of the papers: Erdős–Rényi densities (SparseAdapter) and class-distribution
(See et al. 2016), against hand-computed counts and masks."""
from __future__ import annotations

import math

import numpy as np
import pytest
from allocation_reference import allocate_sorted, top_n_sorted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pruning_fixtures import tiny_model, tokens, torch

from tropfast.pruning import allocation as allocation_mod
from tropfast.pruning import find_adapters, kept_count, prune
from tropfast.pruning.allocation import (
    allocate,
    allocate_gradient_rank,
    canonical_allocation,
    class_distribution_select,
    erdos_renyi_counts,
    gradient_rank_counts,
    select_top,
    select_top_rows,
    top_n,
)
from tropfast.pruning.scores import ScoreResult, compute_scores

ALLOCATIONS = ["global", "layer", "matrix", "node", "structured"]
SCORES = ["magnitude", "tropical", "combined", "random", "snip", "partner_norm", "grasp", "synflow"]


def _same(a, b) -> bool:
    if len(a.masks_A) != len(b.masks_A) or a.groups != b.groups:
        return False
    for x, y in zip(a.masks_A + a.masks_B, b.masks_A + b.masks_B):
        if x.shape != y.shape or x.dtype != torch.bool or not torch.equal(x, y):
            return False
    if (a.units is None) != (b.units is None):
        return False
    return a.units is None or all(torch.equal(x, y) for x, y in zip(a.units, b.units))


def _quantised(g, shape, levels, dtype):
    """Values on a grid of `levels` steps (levels = 1: all zero): many ties, many zeros."""
    return (torch.randint(0, levels, shape, generator=g) * 0.25).to(dtype)


def _scores(kind, shapes, seed, levels, dtype) -> ScoreResult:
    g = torch.Generator().manual_seed(seed)
    MA = [_quantised(g, (r, di), levels, dtype) for r, di, _ in shapes]
    MB = [_quantised(g, (do, r), levels, dtype) for r, _, do in shapes]
    if kind == "magnitude":  # the score is |W| itself: the same tensors
        return ScoreResult(kind, MA, MB, MA, MB)
    if kind == "tropical":  # |Â|: the magnitudes with the solver's zeros
        SA = [m * (torch.rand(m.shape, generator=g) < 0.5).to(dtype) for m in MA]
        SB = [m * (torch.rand(m.shape, generator=g) < 0.5).to(dtype) for m in MB]
    elif kind == "random":  # continuous scores, quantised tie-break
        SA = [torch.rand(m.shape, generator=g).to(dtype) for m in MA]
        SB = [torch.rand(m.shape, generator=g).to(dtype) for m in MB]
    else:  # independent quantised scores
        SA = [_quantised(g, m.shape, levels, dtype) for m in MA]
        SB = [_quantised(g, m.shape, levels, dtype) for m in MB]
    return ScoreResult(kind, SA, SB, MA, MB)


shapes_st = st.lists(
    st.tuples(st.integers(0, 5), st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4
).filter(lambda s: sum(r for r, _, _ in s) > 0)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=shapes_st,
    kind=st.sampled_from(["magnitude", "tropical", "random", "independent"]),
    seed=st.integers(0, 2**31 - 1),
    levels=st.integers(1, 4),
    keep=st.one_of(st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 1.0]), st.floats(0, 1)),
    allocation=st.sampled_from(ALLOCATIONS),
    combined_q=st.sampled_from([None, None, 0.0, 0.3, 0.5, 1.0]),
    scope=st.sampled_from(["layer", "global"]),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.float16]),
)
def test_masks_bit_identical_to_sort_reference(shapes, kind, seed, levels, keep, allocation, combined_q, scope, dtype):
    sc = _scores(kind, shapes, seed, levels, dtype)
    got = allocate(sc, keep, allocation, combined_q=combined_q, structured_scope=scope)
    ref = allocate_sorted(sc, keep, allocation, combined_q=combined_q, structured_scope=scope)
    assert _same(got, ref)


@pytest.fixture(scope="module")
def model_scores():
    m = tiny_model()
    infos = find_adapters(m)
    As = [i.down.weight.detach().double() for i in infos]
    Bs = [i.up.weight.detach().double() for i in infos]
    snip = [{"input_ids": tokens(4, 8, seed=s), "labels": torch.tensor([0, 1, 1, 0])} for s in range(2)]
    out = {}
    for score in SCORES:
        out[score] = compute_scores(
            score, As, Bs, 0.3, model=m, downs=[i.down for i in infos], ups=[i.up for i in infos], snip_data=snip
        )
    return out


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("score", SCORES)
def test_every_score_and_allocation_matches_reference(model_scores, score, allocation):
    sc = model_scores[score]
    for keep in (0.0, 0.1, 0.3, 0.5, 1.0):
        for q in ([0.0, 0.5, 1.0] if score == "combined" else [None]):
            for scope in ("layer", "global") if allocation == "structured" else ("layer",):
                got = allocate(sc, keep, allocation, combined_q=q, structured_scope=scope)
                ref = allocate_sorted(sc, keep, allocation, combined_q=q, structured_scope=scope)
                assert _same(got, ref), (keep, q, scope)


def test_select_top_hand_computed():
    P = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.0])
    S = torch.tensor([9.0, 0.0, 1.0, 5.0, 1.0, 9.0])
    # 3 kept: 3.0 (pos 1); then the 2.0s by |W| desc: pos 3 (5.0), then pos 2 before pos 4 (tie, position)
    assert select_top(P, S, 3).tolist() == [False, True, True, True, False, False]
    assert select_top(P, S, 2).tolist() == [False, True, False, True, False, False]
    assert select_top(P, S, 0).tolist() == [False] * 6
    assert select_top(P, S, 9).tolist() == [True] * 6
    assert top_n(P, S, 4).tolist() == [1, 2, 3, 4]
    zeros = torch.zeros(7)
    assert select_top(zeros, zeros, 3).tolist() == [True] * 3 + [False] * 4  # all tied: lowest positions
    # -0.0 ties with 0.0 exactly as in a sort
    assert select_top(torch.tensor([0.0, -0.0, 0.0]), torch.zeros(3), 2).tolist() == [True, True, False]


def test_select_top_rows_hand_computed():
    P = torch.tensor([[1.0, 1.0, 1.0, 0.0], [4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    S = torch.tensor([[0.0, 2.0, 1.0, 9.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    assert select_top_rows(P, S, 2).tolist() == [
        [False, True, True, False],
        [True, True, False, False],
        [True, False, True, False],
    ]


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 40), size=st.integers(1, 40), levels=st.integers(1, 5))
def test_select_top_matches_sort(seed, n, size, levels):
    g = torch.Generator().manual_seed(seed)
    P = torch.randint(0, levels, (size,), generator=g).double()
    S = torch.randint(0, levels, (size,), generator=g).double()
    want = torch.zeros(size, dtype=torch.bool)
    want[top_n_sorted(P, S, n)] = True
    assert torch.equal(select_top(P, S, n), want)
    assert int(want.sum()) == min(n, size)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    size=st.integers(64, 3000),
    zeros=st.sampled_from([0.0, 0.3, 0.7, 0.99, 1.0]),
    negatives=st.sampled_from([0.0, 0.2]),
    minus_inf=st.sampled_from([0.0, 0.1]),
    levels=st.sampled_from([0, 3]),
    where=st.sampled_from(["few", "many", "all but few", "any"]),
)
def test_select_top_large_groups_match_sort(seed, size, zeros, negatives, minus_inf, levels, where):
    """Groups large enough for every route of the selection: two counts when the n-th best
    is zero (most of a sparse solution's scores), a partial top-k for the few best or the
    few worst of a tie, a quickselect otherwise; continuous or quantised values, negative
    entries and -inf (weights removed by an earlier prune).  Masks equal the full sort's."""
    g = torch.Generator().manual_seed(seed)
    P = torch.rand(size, generator=g, dtype=torch.float64)
    if levels:
        P = torch.floor(P * levels) / levels
    P[torch.rand(size, generator=g) < zeros] = 0.0
    P[torch.rand(size, generator=g) < negatives] *= -1
    P[torch.rand(size, generator=g) < minus_inf] = -math.inf
    S = torch.floor(torch.rand(size, generator=g, dtype=torch.float64) * 4)
    small = max(1, size // 100)
    n = {"few": small, "many": size // 2, "all but few": size - small}.get(where)
    if n is None:
        n = int(torch.randint(0, size + 1, (1,), generator=g))
    want = torch.zeros(size, dtype=torch.bool)
    want[top_n_sorted(P, S, n)] = True
    assert torch.equal(select_top(P, S, n), want)
    assert torch.equal(select_top(P.float(), S.float(), n), want)
    with pytest.MonkeyPatch.context() as mp:  # torch's selection, as on other devices and dtypes
        mp.setattr(allocation_mod, "_NUMPY_DTYPES", ())
        assert torch.equal(select_top(P, S, n), want)
        rows = torch.stack([P, P.flip(0)])
        got = select_top_rows(rows, torch.stack([S, S.flip(0)]), n)
    assert torch.equal(select_top_rows(rows, torch.stack([S, S.flip(0)]), n), got)
    assert torch.equal(got[0], want)


@pytest.mark.parametrize("k", [1, 2, 15, 16, 17, 500, 999, 1008, 1009, 1023, 1024])
def test_kth_largest_by_every_route_equals_the_sort(k):
    """1024 entries, NumPy's selection (CPU, float16/32/64) and torch's: there k <= 16 takes
    the partial top-k of the best, N - k + 1 <= 16 that of the worst, the rest the quickselect;
    each is the k-th entry of the descending sort, in the input's dtype."""
    x = torch.randn(1024, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    x[::7] = 0.25  # repeated values
    want = torch.sort(x, descending=True).values[k - 1]
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        wd = torch.sort(xd, descending=True).values[k - 1]
        for fn in (allocation_mod._kth_largest, allocation_mod._kth_largest_torch):
            got = fn(xd, k)
            assert got.dtype == dtype and got.dim() == 0 and float(got) == float(wd), (fn.__name__, dtype)
    assert float(allocation_mod._kth_largest(x, k)) == float(want)
    assert allocation_mod._nth_is_zero(torch.tensor([0.0, 2.0, 0.0, -1.0]), 2)
    assert not allocation_mod._nth_is_zero(torch.tensor([0.0, 2.0, 0.0, -1.0]), 1)
    assert not allocation_mod._nth_is_zero(torch.tensor([0.0, 2.0, 0.0, -1.0]), 4)


def _result(SA, SB, MA=None, MB=None) -> ScoreResult:
    MA = MA if MA is not None else [a.abs() for a in SA]
    MB = MB if MB is not None else [b.abs() for b in SB]
    return ScoreResult("x", SA, SB, MA, MB)


# ---------------------------------------------------------------------------------------
# Erdős–Rényi
# ---------------------------------------------------------------------------------------
def test_erdos_renyi_counts_by_hand():
    # M1 4x4: rho = (4 + 4)/16 = 0.5, N = 16;  M2 1x8: rho = 9/8, N = 8.
    # keep 0.5: total 12 = eps (0.5*16 + 1.125*8) = 17 eps -> densities 6/17, 13.5/17:
    # 5.647 and 6.353 -> floors 5, 6; the one left goes to M1 (remainder .647 > .353).
    assert erdos_renyi_counts([(4, 4), (1, 8)], 0.5) == [6, 6]
    # keep 0.9: total round(21.6) = 22; eps = 22/17 gives M2 density 1.46 > 1: capped at 8,
    # and M1 takes the other 14 (density 14/16 < 1).
    assert erdos_renyi_counts([(4, 4), (1, 8)], 0.9) == [14, 8]
    assert erdos_renyi_counts([(4, 4), (1, 8)], 1.0) == [16, 8]
    assert erdos_renyi_counts([(4, 4), (1, 8)], 0.0) == [0, 0]
    # equal shapes: one density; the remainders are equal, so the first matrices get them
    assert erdos_renyi_counts([(8, 32), (32, 8), (8, 32)], 0.3) == [77, 77, 76]
    # a tiny budget: 1x1 (rho 2) and 10x10 (rho 0.2), total round(5.05) = 5 = eps (2 + 20):
    # 0.4545 and 4.545 weights -> floors 0, 4; the one left goes to the larger remainder (.545)
    assert erdos_renyi_counts([(1, 1), (10, 10)], 0.05) == [0, 5]


@pytest.mark.parametrize("keep", [0.0, 0.013, 0.2, 0.5, 0.77, 1.0])
def test_erdos_renyi_total_is_exact_on_mixed_shapes(keep):
    shapes = [(3, 50), (50, 3), (7, 20), (20, 7), (1, 9)]
    counts = erdos_renyi_counts(shapes, keep)
    N = sum(a * b for a, b in shapes)
    assert sum(counts) == kept_count(keep, N)
    assert all(0 <= c <= a * b for c, (a, b) in zip(counts, shapes))
    # densities follow rho = (n_in + n_out)/(n_in n_out): 1x9 (1.11) >= 3x50 (0.353) >= 7x20 (0.193),
    # up to one weight of rounding
    d = [c / (a * b) for c, (a, b) in zip(counts, shapes)]
    assert d[4] >= d[0] - 1 / 9 and d[0] >= d[2] - 1 / 140 and abs(d[0] - d[1]) <= 1 / 150 + 1e-12


def test_erdos_renyi_masks_follow_the_ranking_inside_each_matrix():
    g = torch.Generator().manual_seed(0)
    SA = [torch.rand(2, 6, generator=g)]
    SB = [torch.rand(3, 2, generator=g)]
    al = allocate(_result(SA, SB), 0.5, "erdos_renyi")
    # A 2x6: rho = 8/12;  B 3x2: rho = 5/6; total 9 = eps (8 + 5) -> 5.54 and 3.46 -> 5 + 3, one left
    # to A (remainder .54 > .46): 6 and 3
    assert int(al.masks_A[0].sum()) == 6 and int(al.masks_B[0].sum()) == 3
    assert set(al.masks_A[0].flatten().nonzero().flatten().tolist()) == set(torch.topk(SA[0].flatten(), 6).indices.tolist())
    assert set(al.masks_B[0].flatten().nonzero().flatten().tolist()) == set(torch.topk(SB[0].flatten(), 3).indices.tolist())


# ---------------------------------------------------------------------------------------
# Class distribution
# ---------------------------------------------------------------------------------------
def test_class_distribution_by_hand():
    # class 0 (adapter 0): scores 1, 2, 3, 4, 5, 6 -> population std sqrt(35/12) = 1.7078
    # class 1 (adapter 1): scores 10, 20, 30, 40, 50, 60 ... times 10 -> std 17.078
    # normalised the two are equal: keep 6 of 12 -> ties at every level, broken by |W|/σ(|W|)
    # (the magnitudes are the tie-break: here class 1's are spread less, so it wins each tie)
    SA = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[10.0, 20.0, 30.0]])]
    SB = [torch.tensor([[4.0], [5.0], [6.0]]), torch.tensor([[40.0], [50.0], [60.0]])]
    MA = [torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, 2.0]])]
    MB = [torch.tensor([[1.0], [1.0], [1.0]]), torch.tensor([[1.0], [1.0], [1.0]])]
    al = allocate(_result(SA, SB, MA, MB), 0.5, "class_distribution")
    kept = [int(m.sum()) for m in al.masks_A + al.masks_B]
    assert sum(kept) == 6
    # normalised scores 4,5,6 (x0.5855) of each class tie pairwise; class 0's magnitudes are all
    # equal (σ = 0 -> the smallest positive σ: normalised magnitude huge), so class 0 wins the ties
    # at 6, 5, 4 -> class 0 keeps its B entries (4, 5, 6) and class 1 keeps 60, 50, 40
    assert al.masks_B[0].flatten().tolist() == [True, True, True]
    assert al.masks_B[1].flatten().tolist() == [True, True, True]
    assert not al.masks_A[0].any() and not al.masks_A[1].any()


def test_class_distribution_is_a_threshold_q_times_sigma():
    g = torch.Generator().manual_seed(3)
    SA = [torch.rand(4, 10, generator=g) * s for s in (1.0, 5.0, 0.2)]
    SB = [torch.rand(10, 4, generator=g) * s for s in (1.0, 5.0, 0.2)]
    keep = 0.37
    al = allocate(_result(SA, SB), keep, "class_distribution")
    N = 3 * 80
    kept = sum(int(a.sum()) + int(b.sum()) for a, b in zip(al.masks_A, al.masks_B))
    assert kept == kept_count(keep, N) == 89
    # one q: every kept weight has score >= q σ_c and every pruned one < q σ_c (continuous scores: no ties)
    sig = [torch.cat([a.flatten(), b.flatten()]).double().std(unbiased=False) for a, b in zip(SA, SB)]
    norm_kept = [float((torch.cat([a[ma], b[mb]]).double() / s).min()) for a, b, ma, mb, s in zip(SA, SB, al.masks_A, al.masks_B, sig)]
    norm_pruned = [float((torch.cat([a[~ma], b[~mb]]).double() / s).max()) for a, b, ma, mb, s in zip(SA, SB, al.masks_A, al.masks_B, sig)]
    q = min(norm_kept)
    assert max(norm_pruned) < q
    # it differs from class-blind (global) and class-uniform (layer) allocation here
    glob = allocate(_result(SA, SB), keep, "global")
    lay = allocate(_result(SA, SB), keep, "layer")
    per = lambda a: [int(x.sum()) + int(y.sum()) for x, y in zip(a.masks_A, a.masks_B)]  # noqa: E731
    assert per(al) != per(glob) and per(al) != per(lay)


def test_class_distribution_select_ties_at_q_are_exact():
    # every score equal: q sits on all of them; exactly round(keep N) survive, by magnitude then position
    P = [torch.ones(5), torch.ones(5)]
    S = [torch.tensor([1.0, 3.0, 2.0, 3.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])]
    sel = class_distribution_select(P, S, [[0], [1]], 0.4)
    assert sum(int(x.sum()) for x in sel) == 4
    assert sel[0].tolist() == [False, True, True, True, False] or sel[1].any()


@pytest.mark.parametrize("score", ["magnitude", "tropical", "combined"])
def test_class_distribution_and_erdos_renyi_through_prune(score):
    model = tiny_model()
    for alloc in ("class_distribution", "erdos_renyi"):
        rep = prune(model, 0.2, score, allocation=alloc, inplace=False)
        nz = sum(int((i.down.weight != 0).sum() + (i.up.weight != 0).sum()) for i in find_adapters(rep.model))
        assert rep.kept == kept_count(0.2, 2048) == 410 and nz <= 410


def test_class_distribution_among_survivors_uses_their_spread():
    # class 0: survivors 1, 2, 3, 4 (5 and 6 pruned before): σ = sqrt(1.25); class 1: 10..40, σ = sqrt(125).
    # Normalised: class 0 -> 0.89, 1.79, 2.68, 3.58; class 1 the same: keep 0.4 of 10 = 4, the top two of each.
    P = [torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), torch.tensor([10.0, 20.0, 30.0, 40.0])]
    alive = [torch.tensor([True, True, True, True, False, False]), torch.ones(4, dtype=torch.bool)]
    sel = class_distribution_select(P, P, [[0], [1]], 0.4, alive=alive)
    assert sel[0].tolist() == [False, False, True, True, False, False] and sel[1].tolist() == [False, False, True, True]
    # without the earlier prune σ_0 = sqrt(35/12): 6 -> 3.51, 5 -> 2.93, 4 -> 2.34 < 30/σ_1 = 2.68
    sel = class_distribution_select(P, P, [[0], [1]], 0.4)
    assert sel[0].tolist() == [False, False, False, False, True, True] and sel[1].tolist() == [False, False, True, True]


def test_erdos_renyi_refuses_more_than_an_earlier_prune_left():
    SA, SB = [torch.rand(2, 6, generator=torch.Generator().manual_seed(1))], [torch.rand(3, 2)]
    alive_A = [torch.zeros(2, 6, dtype=torch.bool)]
    alive_A[0][0, :2] = True  # 2 of A's 12 weights survive; ER asks A for 6 at keep 0.5
    with pytest.raises(ValueError, match=r"asks for 6 of the 12 weights of A of adapter #0, but only 2 survive"):
        allocate(_result(SA, SB), 0.5, "erdos_renyi", alive_A=alive_A)
    al = allocate(_result(SA, SB), 0.1, "erdos_renyi", alive_A=alive_A)
    assert not bool((al.masks_A[0] & ~alive_A[0]).any())


def test_combined_share_hand_computed():
    """combined_q: the top round(q·n) of a group by the tropical score, the rest by magnitude."""
    # one adapter, r = 2, d_in = d_out = 2: the layer group is A (row-major) then B, 8 entries
    trop = torch.tensor([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    mag = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], dtype=torch.float64)
    sc = ScoreResult("combined", [trop[:4].view(2, 2)], [trop[4:].view(2, 2)], [mag[:4].view(2, 2)], [mag[4:].view(2, 2)])

    def kept(q, keep=0.5):  # keep 0.5 of 8: n = 4
        a = allocate(sc, keep, "layer", combined_q=q)
        return torch.cat([a.masks_A[0].flatten(), a.masks_B[0].flatten()]).nonzero().flatten().tolist()

    assert kept(0.0) == [4, 5, 6, 7]  # all by magnitude
    assert kept(0.25) == [0, 5, 6, 7]  # round(1.0) = 1 by tropical: position 0; 3 by magnitude
    assert kept(0.5) == [0, 1, 6, 7]  # 2 and 2
    assert kept(0.75) == [0, 1, 2, 7]  # 3 and 1
    assert kept(1.0) == [0, 1, 2, 3]  # all by tropical
    assert kept(0.5, keep=0.75) == [0, 1, 2, 5, 6, 7]  # n = 6: round(3.0) = 3 and 3
    assert kept(0.5, keep=0.625) == [0, 1, 5, 6, 7]  # n = 5: round(2.5) = 2 (half to even) and 3


def test_gradient_rank_masks_hand_computed():
    """allocate_gradient_rank: the counts per adapter, then each adapter's top entries (A, then B),
    among the survivors of an earlier prune when given; combined_q as in ``layer``."""
    sc = ScoreResult(
        "tropical",
        [torch.tensor([[4.0, 3.0]]), torch.tensor([[1.0, 2.0]])],  # S_A: (r=1, d_in=2) per adapter
        [torch.tensor([[2.0], [1.0]]), torch.tensor([[3.0], [4.0]])],  # S_B: (d_out=2, r=1)
        [torch.tensor([[0.1, 0.2]]), torch.tensor([[0.1, 0.2]])],  # tie-break |W|
        [torch.tensor([[0.3], [0.4]]), torch.tensor([[0.3], [0.4]])],
    )

    def kept(**kw):
        a = allocate_gradient_rank(sc, 0.5, [2, 1], [2, 2], **kw)
        assert a.name == "gradient_rank" and a.groups == 2 and a.units is None
        return [torch.cat([mA.flatten(), mB.flatten()]).nonzero().flatten().tolist() for mA, mB in zip(a.masks_A, a.masks_B)]

    # w = (1, 0.5); round(0.5·8) = 4 kept; quotas 8/3 and 4/3 -> 3 and 1 (largest remainder)
    assert kept() == [[0, 1, 2], [3]]
    # position 0 of adapter 0 was pruned before: its top 3 among the survivors
    alive_A = [torch.tensor([[False, True]]), None]
    assert kept(alive_A=alive_A) == [[1, 2, 3], [3]]
    assert kept(alive_A=alive_A, alive_B=[torch.ones(2, 1, dtype=torch.bool), None]) == [[1, 2, 3], [3]]
    # combined, q = 0.5: round(1.5) = 2 by the score (0, 1), the third by magnitude (3, not 2)
    assert kept(combined_q=0.5) == [[0, 1, 3], [3]]
    with pytest.raises(ValueError, match=r"asks for 3 of the 4 weights of adapter first, but only 1 survive.*keep <= 0\.25,"):
        kept(alive_A=[torch.tensor([[False, False]]), None], alive_B=[torch.tensor([[True], [False]]), None],
             labels=["first", "second"])


@pytest.mark.parametrize(
    "ranks, max_ranks, numels, keep, want",
    [
        # a maximum rank of 0 gives w = 0 (no division); w = (0, .5); c = 5 / 5 = 1: q = (0, 5)
        ([0, 1], [0, 2], [10, 10], 0.25, [0, 5]),
        # adapter 0 is full (c·w = 2.5 >= 1); the other 15 of round(0.5·50) = 25 spill to the rank-0
        # adapters in proportion to size: 3.75 and 11.25 -> 3 and 11, the last one by remainder (.75)
        ([1, 0, 0], [4, 4, 4], [10, 10, 30], 0.5, [10, 4, 11]),
        # spill of 1 over sizes 1 and 3: .25 and .75 -> the larger remainder, the later adapter
        ([1, 0, 0], [4, 4, 4], [2, 1, 3], 0.5, [2, 0, 1]),
        # spill of 2 over sizes 2 and 1: 4/3 and 2/3 -> 1 and 0, then the remainder .67 -> (1, 1)
        ([1, 0, 0], [1, 1, 1], [2, 2, 1], 0.8, [2, 1, 1]),
        # Σ w·N = 1/64·8 + 7/64·8 = 1: c = 8, quotas 1 and 7
        ([1, 7], [64, 64], [8, 8], 0.5, [1, 7]),
        # an adapter of one weight takes part like any other: c = .5, quotas .5 and 1.5 -> tie, the first
        ([1, 1], [1, 1], [1, 3], 0.5, [1, 1]),
    ],
)
def test_gradient_rank_counts_edge_cases(ranks, max_ranks, numels, keep, want):
    assert gradient_rank_counts(ranks, max_ranks, numels, keep) == want


@pytest.mark.parametrize(
    "ranks, max_ranks, numels, match",
    [
        ([1, 1], [2, 2], [-1, 3], "adapter sizes must be non-negative"),
        ([-1, 1], [2, 2], [3, 3], r"adapter #0: rank -1\.0 and maximum rank 2\.0 must satisfy"),
        ([float("nan"), 1], [2, 2], [3, 3], "adapter #0: rank nan"),
        ([1, 1], [2, float("inf")], [3, 3], "adapter #1: rank 1.0 and maximum rank inf"),
        ([1, 3], [2, 2], [3, 3], "adapter #1: rank 3.0 and maximum rank 2.0"),
    ],
)
def test_gradient_rank_counts_refuses_bad_ranks(ranks, max_ranks, numels, match):
    with pytest.raises(ValueError, match=match):
        gradient_rank_counts(ranks, max_ranks, numels, 0.5)


def test_top_n_hand_computed():
    P = torch.tensor([3.0, 2.0, 2.0, 0.0, 2.0])
    S = torch.tensor([0.0, 1.0, 5.0, 9.0, 1.0])
    assert top_n(P, S, 2).tolist() == [0, 2]  # the tie at 2 goes to the larger secondary
    assert top_n(P, S, 3).tolist() == [0, 1, 2]  # secondary tie (1, 1): the lower position
    assert top_n(P.view(5, 1), S.view(5, 1), 4).tolist() == [0, 1, 2, 4]  # any shape, flattened
    assert top_n(P, S, 0).dtype == torch.int64 and top_n(P, S, 0).numel() == 0


def test_survivors_of_an_earlier_prune_hand_computed():
    """Pruned weights are never kept (their score is -inf), and under ``structured`` a unit is
    scored by its surviving weights only (the pruned ones count 0)."""
    # one adapter, r = 1, d_in = 3, d_out = 1: group = A (3 entries) then B (1)
    sc = ScoreResult("magnitude", [torch.tensor([[0.0, 5.0, 0.0]])], [torch.tensor([[1.0]])],
                     [torch.tensor([[0.0, 5.0, 0.0]])], [torch.tensor([[1.0]])])
    a = allocate(sc, 0.75, "global", alive_A=[torch.tensor([[False, True, True]])])
    # 3 of 4: the three survivors, though position 2 ties with the pruned position 0 at score 0
    assert a.name == "global" and a.masks_A[0].tolist() == [[False, True, True]] and a.masks_B[0].tolist() == [[True]]
    # node: unit 0's group is A_0 (2 entries) and B_:,0 (2); keep 0.5 -> 2 per unit
    sc_node = ScoreResult("magnitude", [torch.tensor([[4.0, 3.0]])], [torch.tensor([[2.0], [1.0]])],
                          [torch.tensor([[4.0, 3.0]])], [torch.tensor([[2.0], [1.0]])])
    a = allocate(sc_node, 0.5, "node", alive_A=[torch.tensor([[False, False]])])  # exactly 2 left: both kept
    assert a.name == "node" and a.masks_A[0].tolist() == [[False, False]] and a.masks_B[0].tolist() == [[True], [True]]
    with pytest.raises(ValueError, match=r"asks for 2 of the 4 weights of unit 0 of adapter #0, but only 1 survive"):
        allocate(sc_node, 0.5, "node", alive_A=[torch.tensor([[False, False]])], alive_B=[torch.tensor([[True], [False]])])
    # structured, r = 2, d_in = d_out = 1: unit scores ‖S_A[i]‖·‖S_B[:, i]‖ = 1·0.5 and 4·1, but
    # unit 1's A weight was pruned, so it scores 0·1 and unit 0 is the one kept
    sc = ScoreResult("magnitude", [torch.tensor([[1.0], [4.0]])], [torch.tensor([[0.5, 1.0]])],
                     [torch.tensor([[1.0], [4.0]])], [torch.tensor([[0.5, 1.0]])])
    assert allocate(sc, 0.5, "structured").units[0].tolist() == [1]
    alive = allocate(sc, 0.5, "structured", alive_A=[torch.tensor([[True], [False]])])
    assert alive.name == "structured" and alive.units[0].tolist() == [0]
    with pytest.raises(ValueError, match="structured_scope must be 'layer' or 'global', got 'all'"):
        allocate(sc, 0.5, "structured", structured_scope="all")
    with pytest.raises(ValueError, match=r"needs each adapter's gradient rank: use allocate_gradient_rank \(tropfast"):
        allocate(sc, 0.5, "gradient_rank")


def test_survivor_masks_are_checked_and_refusals_name_the_group():
    # one adapter, r = 1, d_in = 3, d_out = 2: A has 3 weights, B 2
    S_A, S_B = torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[5.0], [4.0]])
    sc = ScoreResult("magnitude", [S_A], [S_B], [S_A], [S_B])
    for name in ("global", "layer", "matrix", "node", "structured"):
        assert allocate(sc, 0.5, name).name == name
    # only B's survivors given: A counts as all alive
    a = allocate(sc, 0.6, "global", alive_B=[torch.tensor([[False], [True]])])  # round(0.6·5) = 3
    assert a.masks_A[0].tolist() == [[True, True, False]] and a.masks_B[0].tolist() == [[False], [True]]
    with pytest.raises(ValueError, match=r"adapter #0: survivor mask of shape \(1, 2\) for scores \(1, 3\)"):
        allocate(sc, 0.5, "global", alive_A=[torch.ones(1, 2, dtype=torch.bool)])
    none_in_A = [torch.zeros(1, 3, dtype=torch.bool)]
    with pytest.raises(ValueError, match=r"asks for 3 of the 5 weights of the adapters, but only 2 survive"):
        allocate(sc, 0.6, "global", alive_A=none_in_A)
    with pytest.raises(ValueError, match=r"asks for 2 of the 3 weights of A of adapter #0, but only 1 survive"):
        allocate(sc, 0.5, "matrix", alive_A=[torch.tensor([[True, False, False]])])
    with pytest.raises(ValueError, match=r"asks for 1 of the 2 weights of B of adapter #0, but only 0 survive"):
        allocate(sc, 0.5, "matrix", alive_B=[torch.zeros(2, 1, dtype=torch.bool)])


def test_survivor_masks_of_any_dtype_and_the_messages_in_full():
    S_A, S_B = torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[5.0], [4.0]])
    sc = ScoreResult("magnitude", [S_A], [S_B], [S_A], [S_B])
    # 0/1 masks of another dtype (here float) mean the same as bool ones
    a = allocate(sc, 0.4, "global", alive_A=[torch.tensor([[0.0, 1.0, 1.0]])],
                 alive_B=[torch.tensor([[0.0], [1.0]])])  # round(0.4·5) = 2 of the survivors 2, 1, 4
    assert a.masks_A[0].tolist() == [[False, True, False]] and a.masks_B[0].tolist() == [[False], [True]]
    names = "global, layer, matrix, node, structured, erdos_renyi, class_distribution, gradient_rank"
    with pytest.raises(ValueError, match=rf"^allocation='foo' is not an allocation; choose one of {names} "
                       r"\(aliases: class-blind = global, class-uniform = layer\)$"):
        canonical_allocation("foo")
    with pytest.raises(TypeError, match=rf"^allocation must be a string, one of {names}; got 3$"):
        canonical_allocation(3)
    with pytest.raises(ValueError, match=r"^adapter sizes must be non-negative$"):
        gradient_rank_counts([1], [1], [-1], 0.5)


def test_layer_and_global_select_part_by_part_even_at_a_zero_cut(monkeypatch):
    # one NumPy selection (or, for the cut at zero of a sparse tropical solution, two counts)
    # and comparisons per matrix, ties at the cut ranked among themselves; never the
    # concatenated path (_choose), and no selection when the cut is at zero
    from tropfast.pruning import allocation as al

    g = torch.Generator().manual_seed(0)
    As = [torch.rand(6, 20, generator=g) for _ in range(3)]
    Bs = [torch.rand(20, 6, generator=g) for _ in range(3)]
    dense = compute_scores("magnitude", As, Bs, 0.3)
    tied = compute_scores("magnitude", [a.round(decimals=1) for a in As], [b.round(decimals=1) for b in Bs], 0.3)
    tied.SA = [a.round(decimals=1) for a in tied.SA]  # another object than MA: ties ranked by MA
    sparse = ScoreResult("tropical", [a * (a > 0.8) for a in As], [b * (b > 0.8) for b in Bs], dense.MA, dense.MB)
    want = {(k, a): allocate_sorted(sc, 0.3, a) for k, sc in (("dense", dense), ("tied", tied), ("sparse", sparse))
            for a in ("layer", "global")}

    def refuse(*a, **kw):
        raise AssertionError("the concatenated selection ran")

    monkeypatch.setattr(al, "_choose", refuse)
    for (k, a), ref in want.items():
        sc = {"dense": dense, "tied": tied, "sparse": sparse}[k]
        assert _same(allocate(sc, 0.3, a), ref), (k, a)
    # the zero cut: the scores' selection never runs (only the ties' one, on the secondary scores)
    sizes, joined = [], []
    part, cat = al.np.partition, al.np.concatenate
    monkeypatch.setattr(al.np, "partition", lambda x, *a, **kw: sizes.append(x.size) or part(x, *a, **kw))
    monkeypatch.setattr(al.np, "concatenate", lambda xs, *a, **kw: joined.append(sum(x.size for x in xs)) or cat(xs, *a, **kw))
    allocate(sparse, 0.3, "global")
    N = sum(t.numel() for t in sparse.SA + sparse.SB)
    nonzero = sum(int((t != 0).sum()) for t in sparse.SA + sparse.SB)
    # one concatenation and one selection, both of the entries tied at zero: none of all N scores
    assert sizes == [N - nonzero] and joined == [N - nonzero]


def test_erdos_renyi_and_class_distribution_records_refusals_and_the_combined_share():
    g = torch.Generator().manual_seed(5)
    SA = [torch.rand(4, 10, generator=g) * s for s in (1.0, 3.0)]
    SB = [torch.rand(10, 4, generator=g) * s for s in (1.0, 3.0)]
    MA = [torch.rand(4, 10, generator=g) for _ in range(2)]
    MB = [torch.rand(10, 4, generator=g) for _ in range(2)]
    sc = _result(SA, SB, MA, MB)
    er = allocate(sc, 0.4, "erdos_renyi")
    cd = allocate(sc, 0.4, "class_distribution")
    assert (er.name, er.groups, er.units) == ("erdos_renyi", 4, None)
    assert (cd.name, cd.groups, cd.units) == ("class_distribution", 1, None)
    # combined: q = 1 selects by the primary score, q = 0 by the secondary (|W|), in each group
    for alloc in ("erdos_renyi", "class_distribution"):
        by_p = allocate(sc, 0.4, alloc, combined_q=1.0)
        by_s = allocate(_result(MA, MB, SA, SB), 0.4, alloc) if alloc == "erdos_renyi" else None
        plain = allocate(sc, 0.4, alloc)
        assert _same(by_p, plain), alloc
        mixed = allocate(sc, 0.4, alloc, combined_q=0.0)
        assert not _same(mixed, plain), alloc
        if by_s is not None:  # q = 0 in every matrix: its top |W| (the ER counts depend on shapes only)
            assert all(torch.equal(x, y) for x, y in zip(mixed.masks_A + mixed.masks_B, by_s.masks_A + by_s.masks_B))
    # refusals name the group, with the labels given
    alive_A = [torch.zeros(4, 10, dtype=torch.bool), torch.ones(4, 10, dtype=torch.bool)]
    alive_B = [torch.ones(10, 4, dtype=torch.bool), torch.zeros(10, 4, dtype=torch.bool)]
    with pytest.raises(ValueError, match=r"weights of A of adapter 'a0', but only 0 survive"):
        allocate(sc, 0.4, "erdos_renyi", alive_A=alive_A, labels=["'a0'", "'a1'"])
    with pytest.raises(ValueError, match=r"weights of A of adapter 'a1', but only 0 survive"):
        allocate(sc, 0.4, "erdos_renyi", alive_A=alive_A[::-1], labels=["'a0'", "'a1'"])
    with pytest.raises(ValueError, match=r"weights of B of adapter 'a1', but only 0 survive"):
        allocate(sc, 0.4, "erdos_renyi", alive_A=[torch.ones(4, 10, dtype=torch.bool)] * 2, alive_B=alive_B,
                 labels=["'a0'", "'a1'"])
    with pytest.raises(ValueError) as e:
        allocate(sc, 0.6, "class_distribution", alive_A=alive_A, alive_B=alive_B)
    assert str(e.value) == (
        "keep=0.6 asks for 96 of the 160 weights of the adapters, but only 80 survive an earlier prune "
        "(keep is a fraction of all weights, pruned ones included; a prune never revives a weight): "
        "use keep <= 0.5, or remove_masks(model) to start afresh"
    )
    assert kept_count(0.5, 160) == 80 and _count_kept(allocate(sc, 0.5, "class_distribution", alive_A=alive_A, alive_B=alive_B)) == 80


def _count_kept(al) -> int:
    return sum(int(a.sum()) + int(b.sum()) for a, b in zip(al.masks_A, al.masks_B))


def test_node_refuses_a_unit_short_of_survivors_naming_it():
    SA, SB = [torch.rand(3, 4, generator=torch.Generator().manual_seed(2))], [torch.rand(5, 3)]
    alive_A = [torch.ones(3, 4, dtype=torch.bool)]
    alive_B = [torch.ones(5, 3, dtype=torch.bool)]
    alive_A[0][1] = False  # unit 1 keeps only its 5 B weights of 9
    alive_B[0][:, 1] = torch.tensor([True, True, False, False, False])  # ... and 2 of them
    with pytest.raises(ValueError, match=r"asks for 4 of the 9 weights of unit 1 of adapter #0, but only 2 survive"):
        allocate(_result(SA, SB), 0.5, "node", alive_A=alive_A, alive_B=alive_B)
    al = allocate(_result(SA, SB), 0.2, "node", alive_A=alive_A, alive_B=alive_B)
    assert not bool((al.masks_A[0] & ~alive_A[0]).any()) and not bool((al.masks_B[0] & ~alive_B[0]).any())


@pytest.mark.parametrize("allocation", ["structured", "node", "layer"])
def test_masks_follow_the_scores_device_not_the_default_one(allocation):
    # CPU scores under a meta default device: every mask and unit list stays on the CPU
    g = torch.Generator().manual_seed(0)
    sc = _result([torch.rand(4, 6, generator=g)], [torch.rand(5, 4, generator=g)])
    want = allocate(sc, 0.5, allocation)
    with torch.device("meta"):
        got = allocate(sc, 0.5, allocation)
    assert all(m.device.type == "cpu" for m in got.masks_A + got.masks_B + (got.units or []))
    assert _same(got, want)
    rows = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])  # ties at the cut
    with torch.device("meta"):
        sel = select_top_rows(rows, rows, 5)
        part = select_top_rows(rows, torch.zeros_like(rows, device="cpu"), 2)
    assert sel.device.type == "cpu" and bool(sel.all())
    assert part.device.type == "cpu" and torch.equal(part, select_top_rows(rows, torch.zeros_like(rows), 2))


def test_erdos_renyi_counts_with_empty_and_capped_matrices_by_hand():
    # a matrix without weights (an adapter without units) gets none and takes no budget:
    # 4x4 alone, keep 0.5 -> 8
    assert erdos_renyi_counts([(0, 8), (4, 4)], 0.5) == [0, 8]
    assert erdos_renyi_counts([(4, 4), (8, 0)], 0.25) == [4, 0]
    assert erdos_renyi_counts([(0, 0)], 0.5) == [0]
    # 1x8 (rho 9/8) capped at keep 0.9 (see the by-hand test), 2x2 (rho 1): total round(0.9*12) = 11:
    # eps = 11 / (9 + 4) -> 1x8 density 0.95, 2x2 0.85 -> 7.6 and 3.4; nothing capped: 7 + 3, the one
    # left to the larger remainder (.615 > .385): 8, 3
    assert erdos_renyi_counts([(1, 8), (2, 2)], 0.9) == [8, 3]
    # two capped rounds: 1x1 (rho 2) and 1x2 (rho 1.5) cap at once, 10x10 takes the rest
    assert erdos_renyi_counts([(1, 1), (1, 2), (10, 10)], 0.5) == [1, 2, 49]


def test_hand_out_remainders_by_hand():
    from tropfast.pruning.allocation import _hand_out_remainders

    # largest remainder first, a group at its cap skipped, rounds until the total is reached
    assert _hand_out_remainders([0, 0, 0], [0.9, 0.8, 0.7], [0, 1, 5], 4) == [0, 1, 3]
    # every group at its cap: what is left is not handed out (and the loop ends)
    assert _hand_out_remainders([0, 0], [0.5, 0.5], [1, 1], 5) == [1, 1]
    assert _hand_out_remainders([0, 0], [0.5, 0.5], [0, 0], 2) == [0, 0]
    # nothing short: unchanged
    assert _hand_out_remainders([2, 3], [2.0, 3.0], [9, 9], 5) == [2, 3]


def _erdos_renyi_reference(shapes, keep):
    """Densities min(1, ε·ρ_m) with ε found by bisection (Σ d_m N_m = round(keep·N)), then floors plus
    one per matrix by largest remainder (ties: first), never above N_m: independent of the code."""
    sizes = [o * i for o, i in shapes]
    total = kept_count(keep, sum(sizes))
    rho = [(o + i) / (o * i) if o * i else 0.0 for o, i in shapes]
    lo, hi = 0.0, 1e9
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(min(1.0, mid * r) * n for r, n in zip(rho, sizes)) < total:
            lo = mid
        else:
            hi = mid
    exact = [min(1.0, hi * r) * n for r, n in zip(rho, sizes)]
    counts = [min(n, math.floor(x + 1e-9)) for x, n in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda m: (-(exact[m] - counts[m]), m))
    while sum(counts) < total and any(c < n for c, n in zip(counts, sizes)):
        for m in order:
            if sum(counts) < total and counts[m] < sizes[m]:
                counts[m] += 1
    return counts


def test_erdos_renyi_counts_match_a_bisection_reference():
    g = torch.Generator().manual_seed(7)
    # by hand with the reference, two cases where capping at density 1 and an empty matrix decide the counts:
    assert erdos_renyi_counts([(6, 6), (0, 9), (5, 3), (1, 3), (1, 6)], 0.5) == [13, 0, 8, 3, 6]
    assert erdos_renyi_counts([(1, 10), (3, 1), (1, 1), (3, 3), (0, 12)], 0.3) == [3, 1, 1, 2, 0]
    cases = [[(1, 1), (5, 20), (10, 10)], [(1, 1), (1, 1), (1, 3), (4, 8), (8, 8)], [(2, 2), (1, 30), (30, 1), (12, 12)]]
    for _ in range(60):
        k = int(torch.randint(2, 6, (1,), generator=g))
        cases.append([tuple(int(x) for x in torch.randint(1, 12, (2,), generator=g)) for _ in range(k)])
    checked = 0
    for shapes in cases:
        for keep in (0.1, 0.35, 0.5, 0.8, 0.95):
            got = erdos_renyi_counts(shapes, keep)
            want = _erdos_renyi_reference(shapes, keep)
            # equal up to a remainder that rounds differently (exact ties of remainders)
            assert sum(got) == sum(want) and all(abs(a - b) <= 1 for a, b in zip(got, want)), (shapes, keep, got, want)
            checked += got == want
    assert checked >= 0.98 * len(cases) * 5, checked  # the rest: remainders the bisection's ε orders otherwise


def test_class_distribution_spread_is_the_population_one_of_each_class():
    # class 0: 1, 3.2 -> population σ 1.1 -> 0.909, 2.909; class 1: 1..4 -> σ 1.118 -> 0.894 .. 3.578.
    # keep 1/3 of 6 = 2: 3.578 (class 1's 4) and 2.909 (class 0's 3.2).  (The sample σ, or σ = 0
    # for a class of two, would keep class 1's 3 or class 0's 1 instead.)
    P = [torch.tensor([1.0, 3.2]), torch.tensor([1.0, 2.0, 3.0, 4.0])]
    sel = class_distribution_select(P, P, [[0], [1]], 1 / 3)
    assert sel[0].tolist() == [False, True] and sel[1].tolist() == [False, False, False, True]


def test_erdos_renyi_allows_exactly_the_survivors_it_asks_for():
    SA, SB = [torch.rand(2, 6, generator=torch.Generator().manual_seed(1))], [torch.rand(3, 2)]
    n_a = erdos_renyi_counts([(2, 6), (3, 2)], 0.3)[0]
    alive_A = [torch.zeros(2, 6, dtype=torch.bool)]
    alive_A[0].view(-1)[:n_a] = True  # exactly as many survivors as A is asked for
    al = allocate(_result(SA, SB), 0.3, "erdos_renyi", alive_A=alive_A)
    assert torch.equal(al.masks_A[0], alive_A[0])


def test_class_distribution_ties_use_the_survivors_magnitude_spread():
    # both classes' survivors score 1, 2, 3 (σ equal): their 3s tie at q for the one kept weight.
    # The magnitudes of the survivors, 1, 1, 2, have equal spreads too, so the tie goes to the
    # first position (class 0).  Counting class 0's pruned magnitude 100 in its spread would
    # shrink its normalised magnitude and hand the weight to class 1.
    P = [torch.tensor([1.0, 2.0, 3.0, 9.0]), torch.tensor([1.0, 2.0, 3.0])]
    S = [torch.tensor([1.0, 1.0, 2.0, 100.0]), torch.tensor([1.0, 1.0, 2.0])]
    alive = [torch.tensor([True, True, True, False]), torch.ones(3, dtype=torch.bool)]
    sel = class_distribution_select(P, S, [[0], [1]], 1 / 7, alive=alive)
    assert sel[0].tolist() == [False, False, True, False] and sel[1].tolist() == [False, False, False]


@pytest.mark.parametrize("case", ["negative", "zero_cut", "ties_above_zero", "positive", "sparse_mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_choose_parts_equals_the_choice_on_the_concatenation(case, dtype):
    g = torch.Generator().manual_seed(7)
    shapes = [(3, 5), (5, 3), (4,)]
    if case == "negative":  # the n-th largest is below zero, all scores nonzero
        Ps = [-torch.rand(s, generator=g) - 0.1 for s in shapes]
    elif case == "zero_cut":  # fewer nonzero scores than kept: the cut is a tie at zero
        Ps = [torch.rand(s, generator=g) * (torch.rand(s, generator=g) > 0.8) for s in shapes]
    elif case == "ties_above_zero":  # few distinct values: a tie straddles a positive cut
        Ps = [torch.randint(1, 4, s, generator=g).float() for s in shapes]
    elif case == "sparse_mixed":  # mostly zeros, some negative, a few positive (ties among them): cuts on every side
        Ps = [(torch.randint(-1, 3, s, generator=g) * (torch.rand(s, generator=g) > 0.6)).float() for s in shapes]
    else:
        Ps = [torch.rand(s, generator=g) + 0.01 for s in shapes]
    Ps = [p.to(dtype) for p in Ps]
    Ss = [torch.rand(s, generator=g).to(dtype) for s in shapes]
    N = sum(p.numel() for p in Ps)
    flatP = torch.cat([p.reshape(-1) for p in Ps])
    flatS = torch.cat([s.reshape(-1) for s in Ss])
    pos = int((flatP > 0).sum())
    for n in sorted({1, 7, N // 2, N - 1} | {k for k in (pos - 1, pos, pos + 1) if 0 < k < N}):
        for same in (True, False):
            got = allocation_mod._choose_parts(Ps, Ps if same else Ss, n, None, same)
            want = select_top(flatP, flatP if same else flatS, n)
            assert [m.shape for m in got] == [p.shape for p in Ps]
            assert torch.equal(torch.cat([m.reshape(-1) for m in got]), want), (case, n, same)
            assert sum(int(m.sum()) for m in got) == n


@pytest.mark.parametrize("kind", ["gaussian", "sparse", "few_values", "sorted", "striped", "small"])
def test_nth_largest_is_the_sort_s_whatever_the_sample(kind):
    """The sampled selection returns exactly the sorted array's n-th largest, leaves x as it
    was, and falls back to the full selection where its sample misses (a sorted array, or
    stripes that line up with the stride of 17)."""
    rng = np.random.default_rng(3)
    M = 20000 if kind != "small" else 500
    if kind == "gaussian":
        x = np.abs(rng.standard_normal(M)).astype(np.float32)
    elif kind == "sparse":  # mostly zeros: ties at zero
        x = (rng.random(M) * (rng.random(M) > 0.7)).astype(np.float64)
    elif kind == "few_values":
        x = rng.integers(0, 5, M).astype(np.float32)
    elif kind == "sorted":
        x = np.sort(rng.random(M))
    elif kind == "striped":  # every 17th entry huge: the sample sees only those
        x = rng.random(M).astype(np.float32)
        x[::17] += 100.0
    else:
        x = rng.standard_normal(M)
    desc = np.sort(x)[::-1]
    before = x.copy()
    for n in sorted({1, 2, M // 17, M // 3, M // 2, M - 1, M} | set(int(k) for k in rng.integers(1, M + 1, 20))):
        assert allocation_mod._nth_largest(x, n) == desc[n - 1], (kind, n)
    assert np.array_equal(x, before)


def test_choose_parts_large_parts_equal_the_concatenation():
    """Parts large enough for the sampled selection (and a tie ranking after it)."""
    g = torch.Generator().manual_seed(11)
    Ps = [torch.rand(48, 768, generator=g), (torch.rand(768, 48, generator=g) * 8).round() / 8]
    Ss = [torch.rand(48, 768, generator=g), torch.rand(768, 48, generator=g)]
    flatP = torch.cat([p.reshape(-1) for p in Ps])
    flatS = torch.cat([s.reshape(-1) for s in Ss])
    N = flatP.numel()
    for n in (1, 500, N // 3, N // 2 + 7, N - 1):
        for same in (True, False):
            got = allocation_mod._choose_parts(Ps, Ps if same else Ss, n, None, same)
            want = select_top(flatP, flatP if same else flatS, n)
            assert torch.equal(torch.cat([m.reshape(-1) for m in got]), want), (n, same)
