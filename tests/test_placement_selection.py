"""tropfast.placement selection: budgets, determinism, random and every-layer placements, JSON."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from tropfast import placement as P  # noqa: E402
from tropfast.placement.scoring import CandidateScore, Scores  # noqa: E402

D = 10  # hidden size of the hand-made candidates: params(r) = 20r + r + 10


def _scores(table: list[tuple[str, int, float]]) -> Scores:
    items = [CandidateScore(P.parse_id(cid, D), rank, fro, D) for cid, rank, fro in table]
    return Scores(items, 1e-2, 100, 1, 3, D)


TABLE = [
    ("seq@L0.attn", 3, 1.0),
    ("par@L0.attn", 5, 0.5),
    ("seq@L0.ffn", 5, 0.9),  # ties par@L0.attn on rank, wins on ‖G‖_F
    ("long@emb->L0.ffn", 1, 9.0),
    ("seq@L1.ffn", 4, 2.0),
    ("par@L1.ffn", 4, 2.0),  # a full tie with seq@L1.ffn: canonical order decides
    ("long@L0->L2.ffn", 2, 1.0),
]


def test_select_order_and_exact_budget():
    sc = _scores(TABLE)
    per = P.parse_id("seq@L0.attn", D).params(2)
    assert per == 2 * 20 + 2 + 10 == 52
    pl = P.select(sc, budget=3 * per + per - 1, r=2)  # room for 3 adapters, not 4
    assert pl.ids == ["seq@L0.ffn", "par@L0.attn", "seq@L1.ffn"]
    assert pl.params() == 3 * per <= pl.budget
    assert pl.strategy == "gradient_rank" and pl.r == 2 and pl.unit == "params"
    assert [s["id"] for s in pl.info["scores"]] == pl.ids
    pl4 = P.select(sc, budget=4 * per, r=2)
    assert pl4.ids == ["seq@L0.ffn", "par@L0.attn", "seq@L1.ffn", "par@L1.ffn"]
    assert pl4.params() == 4 * per
    # in weights: 40 per adapter at r=2, so 100 weights hold 2
    plw = P.select(sc, budget=100, r=2, unit="weights")
    assert plw.ids == ["seq@L0.ffn", "par@L0.attn"] and plw.weights() == 80
    assert P.select(sc, budget=per - 1, r=2).connections == []
    assert P.select(sc, budget=10**9, r=2).ids == [s.candidate.id for s in sc.ranked()]


def test_select_is_deterministic_and_ignores_input_order():
    a = P.select(_scores(TABLE), budget=300, r=2)
    b = P.select(_scores(list(reversed(TABLE))), budget=300, r=2)
    # the tie between seq@L1.ffn and par@L1.ffn goes to the earlier candidate of the scores given
    assert a.ids == ["seq@L0.ffn", "par@L0.attn", "seq@L1.ffn", "par@L1.ffn", "seq@L0.attn"]
    assert b.ids == ["seq@L0.ffn", "par@L0.attn", "par@L1.ffn", "seq@L1.ffn", "seq@L0.attn"]
    assert a.to_dict() == P.select(_scores(TABLE), budget=300, r=2).to_dict()


def test_select_kinds_filter():
    pl = P.select(_scores(TABLE), budget=10**6, r=1, kinds=("long",))
    assert pl.ids == ["long@L0->L2.ffn", "long@emb->L0.ffn"]


def test_random_is_seeded_and_respects_space():
    sc = _scores(TABLE)
    per = P.parse_id("seq@L0.attn", D).params(2)
    a = P.random(sc, budget=3 * per, r=2, seed=5)
    assert a.ids == P.random(sc, budget=3 * per, r=2, seed=5).ids
    assert len(a.connections) == 3 and a.strategy == "random"
    seen = {tuple(P.random(sc, budget=3 * per, r=2, seed=s).ids) for s in range(20)}
    assert len(seen) > 5
    for s in range(20):
        std = P.random(sc, budget=3 * per, r=2, seed=s, space="standard")
        assert std.strategy == "random_standard" and all(c.kind in ("seq", "par") for c in std.connections)
    # the chosen connections are listed in canonical order
    order = [c.id for c in (s.candidate for s in sc)]
    assert a.ids == sorted(a.ids, key=order.index)


def test_every_layer():
    m = pytest.importorskip("placement_fixtures").model_with_head(layers=3)
    pl = P.every_layer(m, r=4)
    assert pl.ids == ["seq@L0.ffn", "seq@L1.ffn", "seq@L2.ffn"]
    assert pl.params() == 3 * (4 * 64 + 4 + 32) and pl.weights() == 3 * 4 * 64
    assert P.every_layer(m, r=4, location="attn", kind="par").ids == ["par@L0.attn", "par@L1.attn", "par@L2.attn"]
    with pytest.raises(ValueError):
        P.every_layer(m, r=4, kind="long")


def test_bad_arguments():
    sc = _scores(TABLE)
    bad = ({"budget": -1, "r": 2}, {"budget": 10, "r": 0}, {"budget": 1.5, "r": 2}, {"budget": 10, "r": 2, "unit": "B"})
    for kw in bad:
        with pytest.raises(ValueError):
            P.select(sc, **kw)
    with pytest.raises(TypeError):
        P.select([("seq@L0.attn", 1)], budget=10, r=2)
    with pytest.raises(ValueError, match="space"):
        P.random(sc, budget=10, r=2, space="everything")
    with pytest.raises(ValueError, match="twice"):
        P.Placement([P.parse_id("seq@L0.ffn"), P.parse_id("seq@L0.ffn")], r=2)
    with pytest.raises(ValueError, match="layer"):
        P.Placement([P.parse_id("seq@L5.ffn")], r=2, n_layers=3)


def test_placement_json_round_trip(tmp_path):
    pl = P.select(_scores(TABLE), budget=200, r=2)
    path = pl.save(tmp_path / "sub" / "p.json")
    back = P.load_placement(path)
    assert back.to_dict() == pl.to_dict()
    d = json.loads(open(path).read())
    assert d["format"] == "tropfast.placement" and d["params"] == pl.params() and d["r"] == 2
    assert [c["id"] for c in d["connections"]] == pl.ids
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a tropfast placement"):
        P.load_placement(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="JSON"):
        P.load_placement(tmp_path / "broken.json")
    assert not [p for p in tmp_path.rglob("*.tmp")]
