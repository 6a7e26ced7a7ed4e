"""The tropfast command end to end on a tiny locally built model."""
from __future__ import annotations

import json
import os

import pytest
from pruning_fixtures import base_copy, logits, tiny_model, tokens, torch

from tropfast.cli import main
from tropfast.pruning import find_adapters, prune


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    m = tiny_model()
    m.save_pretrained(str(d / "model"))
    m.save_adapter(str(d / "adapter"), "a")
    base_copy(0).save_pretrained(str(d / "base"))
    return d


def test_backends(capsys):
    assert main(["backends"]) == 0
    assert "torch" in capsys.readouterr().out
    assert main(["backends", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["torch"]["available"] is True


@pytest.mark.parametrize("cmd", ["prune", "inspect", "solve", "backends"])
def test_help_for_every_subcommand(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--json" in out
    if cmd == "prune":
        for opt in ("--score", "--allocation", "--keep", "--out", "--adapter", "--train-size", "--values"):
            assert opt in out


def test_inspect_model_dir(model_dir, capsys):
    assert main(["inspect", str(model_dir / "model")]) == 0
    out = capsys.readouterr().out
    assert out.count("adapters.a") == 4 and "8x32" in out and "relu" in out
    assert main(["inspect", str(model_dir / "base"), "--adapter", str(model_dir / "adapter"), "--json", "-"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["adapters"]) == 4 and res["adapters"][0]["shape_B"] == [32, 8]


def test_prune_end_to_end(model_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    jf = tmp_path / "r.json"
    rc = main(
        ["prune", str(model_dir / "model"), "--score", "magnitude,tropical", "--keep", "0.5,0.2",
         "--allocation", "class-uniform", "--out", str(out_dir), "--json", str(jf), "--no-progress"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "magnitude" in text and "tropical" in text and "0.1992" in text  # round(0.2 * 512) / 512
    res = json.loads(jf.read_text())
    assert [(r["score"], r["keep"]) for r in res["runs"]] == [("magnitude", 0.5), ("magnitude", 0.2), ("tropical", 0.5), ("tropical", 0.2)]
    assert all(r["allocation"] == "layer" for r in res["runs"])
    assert res["runs"][1]["kept"] == 4 * round(0.2 * 512)
    assert sorted(os.listdir(out_dir)) == sorted(
        f"a-{s}-layer-keep{k}" for s in ("magnitude", "tropical") for k in ("0.5", "0.2")
    )
    # the exported adapter is the one the Python API produces
    ref = tiny_model()
    prune(ref, keep=0.2, score="tropical", allocation="layer")
    fresh = base_copy(0)
    fresh.set_active_adapters(fresh.load_adapter(str(out_dir / "a-tropical-layer-keep0.2")))
    fresh.eval()
    assert torch.equal(logits(fresh, tokens()), logits(ref, tokens()))


def test_prune_adapter_dir_structured_both_formats(model_dir, tmp_path, capsys):
    rc = main(
        ["prune", str(model_dir / "base"), "--adapter", str(model_dir / "adapter"), "--score", "combined",
         "--keep", "0.5", "--allocation", "structured", "--out", str(tmp_path), "--format", "both", "--no-progress"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "r after" in out and "combined" in out  # single run: the per-adapter table too
    assert sorted(os.listdir(tmp_path)) == ["a-combined-structured-keep0.5", "a-combined-structured-keep0.5.safetensors"]
    fresh = base_copy(0)
    fresh.load_adapter(str(tmp_path / "a-combined-structured-keep0.5"))
    assert [i.r for i in find_adapters(fresh)] == [4] * 4
    assert main(["inspect", str(tmp_path / "a-combined-structured-keep0.5.safetensors")]) == 0
    assert "adapter_down.0.weight  4x32" in capsys.readouterr().out


def test_prune_json_stdout_only(model_dir, capsys):
    assert main(["prune", str(model_dir / "model"), "--score", "partner_norm", "--keep", "0.3", "--json", "-", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["runs"][0]["score"] == "partner_norm" and res["runs"][0]["adapters"][0]["kept_A"] + res["runs"][0]["adapters"][0]["kept_B"] == round(0.3 * 512)


def test_prune_refuses_gelu(tmp_path, capsys):
    m = tiny_model(non_linearity="gelu", mh_adapter=False)
    m.save_pretrained(str(tmp_path / "g"))
    assert main(["prune", str(tmp_path / "g"), "--score", "magnitude", "--keep", "0.5", "--no-progress"]) == 2
    assert "allow-non-relu" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "g"), "--score", "magnitude", "--keep", "0.5", "--no-progress", "--allow-non-relu"]) == 0


def test_solve_on_files(model_dir, tmp_path, capsys):
    torch.manual_seed(0)
    f = tmp_path / "w.pt"
    torch.save({"A": torch.randn(6, 20), "B": torch.randn(10, 6)}, f)
    out = tmp_path / "sol.safetensors"
    assert main(["solve", str(f), "--steps", "20", "--lam1", "0.5", "--lam2", "0.5", "--out", str(out), "--no-progress"]) == 0
    assert "method=ista" in capsys.readouterr().out
    from safetensors.torch import load_file

    sol = load_file(str(out))
    assert sol["A_hat"].shape == (6, 20) and sol["B_hat"].shape == (10, 6)
    assert main(["solve", str(model_dir / "adapter"), "--method", "bcd", "--steps", "5", "--target-keep", "0.3", "--relative", "--lam1", "0.5", "--lam2", "0.5", "--json", "-", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["adapters"]) == 4 and all(abs(k - 0.3) < 0.1 for k in res["kept_fraction"])
    # the sorted path gives the dense iterates
    dense_out, sorted_out = tmp_path / "d.safetensors", tmp_path / "s.safetensors"
    for path, dest in (("dense", dense_out), ("sorted", sorted_out)):
        args = ["solve", str(f), "--method", "bcd", "--steps", "30", "--lam1", "0.5", "--lam2", "0.5", "--path", path]
        assert main(args + ["--out", str(dest), "--no-progress"]) == 0
    d, s_ = load_file(str(dense_out)), load_file(str(sorted_out))
    torch.testing.assert_close(s_["A_hat"], d["A_hat"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s_["B_hat"], d["B_hat"], rtol=1e-9, atol=1e-12)
    capsys.readouterr()
    bad = tmp_path / "bad.pt"
    torch.save({"X": torch.zeros(2)}, bad)
    assert main(["solve", str(bad)]) == 2
    assert "'A'" in capsys.readouterr().err


def test_outputs_into_missing_folders_are_created(model_dir, tmp_path, capsys):
    """solve --out/--json and prune --json into folders that do not exist yet: created, no temporary left."""
    torch.manual_seed(0)
    w = tmp_path / "w.pt"
    torch.save({"A": torch.randn(4, 10), "B": torch.randn(10, 4)}, w)
    out, js = tmp_path / "new" / "deeper" / "sol.safetensors", tmp_path / "new2" / "r.json"
    assert main(["solve", str(w), "--steps", "3", "--no-progress", "--out", str(out), "--json", str(js)]) == 0
    assert out.is_file() and json.loads(js.read_text())["out"] == str(out)
    pj = tmp_path / "new3" / "p.json"
    assert main(["prune", str(model_dir / "model"), "--score", "magnitude", "--keep", "0.5", "--no-eval",
                 "--no-progress", "--json", str(pj)]) == 0
    assert json.loads(pj.read_text())["runs"][0]["kept"] == 4 * 256
    hidden = [p for p in tmp_path.rglob(".*")]
    assert sorted(os.listdir(tmp_path)) == ["new", "new2", "new3", "w.pt"] and not hidden
