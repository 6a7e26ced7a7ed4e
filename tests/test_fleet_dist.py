"""torch.distributed for prune_saved (tropfast.fleet.dist): sharding, the exact global cut, 2-process runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from fleet_fixtures import make_checkpoint, make_fleet, save_sharded, tied_state, tree_hashes

import tropfast
from tropfast.fleet import dist as D
from tropfast.pruning.allocation import top_n

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tropfast.__file__)))


def test_lpt_greedy_by_size():
    # sizes 5,4,3,3,1 over 2 ranks: 5->r0, 4->r1, 3->r1 (4<5), 3->r0 (5<7), 1->r1 (7<8)
    assert D.lpt([5, 4, 3, 3, 1], 2) == [[0, 3], [1, 2, 4]]
    assert D.lpt([1, 1, 1], 1) == [[0, 1, 2]]
    assert D.lpt([2], 3) == [[0], [], []]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_order_keys_order_floats(dtype):
    x = np.array([3.5, -0.0, 0.0, -2.0, 1e-30, -1e30, 7.0, np.inf, -np.inf, -1e-45, 1e-45], dtype=dtype)
    k = D.order_keys(x)
    assert k.dtype == (np.uint32 if dtype == np.float32 else np.uint64)
    for i in range(len(x)):
        for j in range(len(x)):
            assert (k[i] < k[j]) == (x[i] < x[j]) and (k[i] == k[j]) == (x[i] == x[j]), (x[i], x[j])


def _parts(P: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    return [P[a:b] for a, b in zip([0] + cuts, cuts + [P.numel()])]


@pytest.mark.parametrize("n", [0, 1, 17, 250, 499, 500, 900])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_select_top_equals_allocation_order(n, dtype):
    g = torch.Generator().manual_seed(n)
    N = 500
    P = (torch.randint(0, 4, (N,), generator=g).double() * 0.25 - 0.25).to(dtype)  # few values: ties on the score ...
    S = torch.randint(0, 3, (N,), generator=g).to(dtype)  # ... and on |W|, so positions decide
    want = torch.zeros(N, dtype=torch.bool)
    want[top_n(P.double(), S.double(), min(n, N))] = True
    cuts = [0, 120, 121, 400]  # an empty part and a part of one element among them
    got = D.select_top(_parts(P, cuts), _parts(S, cuts), [0] + cuts, n, D.Ctx())
    assert torch.equal(torch.cat(got), want)
    shaped = D.select_top([P.view(20, 25)], [S.view(20, 25)], [0], n, D.Ctx())  # a mask has its part's shape
    half = D.select_top([P.to(torch.bfloat16)], [S.to(torch.float16)], [0], n, D.Ctx())  # exact in float32
    assert torch.equal(half[0], want)
    assert shaped[0].shape == (20, 25) and torch.equal(shaped[0].reshape(-1), want)


def test_select_top_continuous_scores_and_eligible():
    g = torch.Generator().manual_seed(3)
    P, S = torch.rand(1000, generator=g), torch.rand(1000, generator=g)
    el = torch.rand(1000, generator=g) > 0.3
    want = torch.zeros(1000, dtype=torch.bool)
    idx = el.nonzero().flatten()
    want[idx[top_n(P[idx].double(), S[idx].double(), 300)]] = True
    cuts = [333, 666]
    got = D.select_top(_parts(P, cuts), _parts(S, cuts), [0] + cuts, 300, D.Ctx(), eligible=_parts(el, cuts))
    assert torch.equal(torch.cat(got), want)
    everything = D.select_top(_parts(P, cuts), _parts(S, cuts), [0] + cuts, 5000, D.Ctx(), eligible=_parts(el, cuts))
    assert torch.equal(torch.cat(everything), el)


def test_select_top_on_shuffled_shards_matches():
    # a rank holds any subset of positions, in any order: the cut is by value and position only
    g = torch.Generator().manual_seed(1)
    N = 300
    P = torch.randint(0, 3, (N,), generator=g).float().double()
    S = torch.randint(0, 2, (N,), generator=g).double()
    perm = torch.randperm(N, generator=g)
    got = torch.zeros(N, dtype=torch.bool)
    got[perm] = D.select_top([P[perm]], [S[perm]], [perm], 123, D.Ctx())[0]
    want = torch.zeros(N, dtype=torch.bool)
    want[top_n(P, S, 123)] = True
    assert torch.equal(got, want)


def _torchrun(args: list[str], tmp_path, timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + sys.path), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path), check=False)


def test_torchrun_fleet_identical_to_one_process(tmp_path):
    src = make_fleet(str(tmp_path / "src"), 5)
    out2 = str(tmp_path / "out2")
    r = _torchrun(
        ["-m", "tropfast", "prune-saved", src, "--out", out2, "--keep", "0.3", "--score", "tropical", "--no-progress"],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("5/5 sources ok") == 1  # rank 0 prints
    s = json.loads(Path(os.path.join(out2, "summary.json")).read_text())
    assert s["world_size"] == 2 and {x["rank"] for x in s["sources"]} == {0, 1}
    out1 = str(tmp_path / "out1")
    rep = tropfast.prune_saved([src], out1, keep=0.3, score="tropical")
    assert rep.ok and tree_hashes(out1) == tree_hashes(out2)


_GLOBAL = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    import tropfast
    from tropfast.fleet import dist as D
    from tropfast.pruning.allocation import top_n
    cases = json.loads(sys.argv[1])
    for kw in cases:
        bad = kw.pop("expect_error", None)
        rep = tropfast.prune_saved(**kw)
        if bad:  # found by one rank, reported by all, nobody hangs
            assert rep.exit_code == 1 and bad in rep.sources[0]["error"], rep.sources[0]
            continue
        assert rep.ok, rep.table()
        assert rep.sources[0]["split"] == 2, rep.sources[0]
    # the cut over shards of one tensor, each rank holding every other position
    ctx = D.init()
    g = torch.Generator().manual_seed(5)
    P = torch.randint(0, 5, (1001,), generator=g).double()
    S = torch.randint(0, 2, (1001,), generator=g).double()
    mine = torch.arange(ctx.rank, 1001, 2)
    want = torch.zeros(1001, dtype=torch.bool)
    want[top_n(P, S, 400)] = True
    for dt in (torch.float64, torch.float32):  # two rounds or four
        got = D.select_top([P[mine].to(dt)], [S[mine]], [mine], 400, ctx)[0]
        assert torch.equal(got, want[mine])
    # contiguous parts: rank 0 holds [0, 500), rank 1 [500, 1001) in two parts; ranks
    # disagreeing on the dtype rank in float64
    parts = [(0, 500)] if ctx.rank == 0 else [(500, 700), (700, 1001)]
    got = D.select_top([P[a:b].to(torch.float32 if ctx.rank else torch.float64) for a, b in parts],
                       [S[a:b] for a, b in parts], [a for a, _ in parts], 400, ctx)
    assert torch.equal(torch.cat(got), want[parts[0][0]:parts[-1][1]])
    open(f"rank{ctx.rank}.ok", "w").close()  # a file each: the ranks' stdout may interleave
    ctx.close()
    """
)


def test_torchrun_one_checkpoint_global_identical_to_one_process(tmp_path):
    tied = save_sharded(str(tmp_path / "src" / "tied"), tied_state(2, layers=4), shards=3)
    hub = make_checkpoint(str(tmp_path / "src" / "hub"))
    plain = {"down_key": "*.down.weight", "up_key": "*.up.weight"}
    cases = [
        dict(
            sources=[tied], out=str(tmp_path / "{}" / "mag"), keep=0.37, score="magnitude", allocation="global", **plain
        ),
        dict(
            sources=[tied],
            out=str(tmp_path / "{}" / "comb"),
            keep=0.4,
            score="combined",
            allocation="global",
            combined_q=0.3,
            **plain,
        ),
        dict(
            sources=[tied],
            out=str(tmp_path / "{}" / "units"),
            keep=0.5,
            score="magnitude",
            allocation="structured",
            structured_scope="global",
            **plain,
        ),
        {
            "sources": [hub],
            "out": str(tmp_path / "{}" / "trop"),
            "keep": 0.35,
            "score": "tropical",
            "allocation": "global",
        },
        {
            "sources": [hub],
            "out": str(tmp_path / "{}" / "rand"),
            "keep": 0.35,
            "score": "random",
            "allocation": "matrix",
            "seed": 3,
        },
    ]
    nan = tied_state(4, layers=2)
    nan["model.layers.0.ffn_adapter.up.weight"][1, 1] = float("nan")  # adapter #1: rank 1's share
    nan_ck = save_sharded(str(tmp_path / "src" / "nan"), nan, shards=2)
    cases.append(
        dict(
            sources=[nan_ck],
            out=str(tmp_path / "{}" / "nan"),
            keep=0.5,
            score="magnitude",
            allocation="global",
            expect_error="model.layers.0.ffn_adapter.up.weight has non-finite values (1 NaN",
            **plain,
        )
    )
    script = tmp_path / "run_global.py"
    script.write_text(_GLOBAL)
    two = [dict(c, out=c["out"].format("two")) for c in cases]
    r = _torchrun([str(script), json.dumps(two)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()
    for c in cases:
        if c.get("expect_error"):
            continue
        one = dict(c, out=c["out"].format("one"))
        rep = tropfast.prune_saved(**one)
        assert rep.ok
        assert tree_hashes(one["out"]) == tree_hashes(c["out"].format("two")), c["out"]
    # and the tied checkpoint really had ties across the cut: fewer distinct magnitudes than weights
    from safetensors.torch import load_file

    w = load_file(os.path.join(tmp_path, "one", "mag", "tied", "model-00001-of-00003.safetensors"))
    vals = torch.cat([v.flatten() for k, v in w.items() if k.endswith(("down.weight", "up.weight"))]).abs()
    assert vals.unique().numel() <= 4
