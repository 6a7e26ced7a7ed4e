"""prune_saved (tropfast.fleet.engine): saved adapters in, pruned adapters out, no backbone."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from fleet_fixtures import (
    base_copy,
    hub_params,
    make_checkpoint,
    make_fleet,
    save_hub,
    tiny_model,
    tree_hashes,
)
from pruning_fixtures import tokens
from safetensors.torch import load_file, save_file
from torch import nn

import tropfast
from tropfast.fleet import engine
from tropfast.fleet.stio import read_header

SCORES = ["magnitude", "tropical", "combined", "random", "partner_norm"]
ALLOCS = ["global", "layer", "matrix", "node", "structured"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Three tiny AdapterHub adapters (hidden 32, r 8, 2 layers, mh + output): .bin, .safetensors, .bin."""
    root = tmp_path_factory.mktemp("fleet")
    return make_fleet(str(root), 3)


def _load(path: str, st: bool):
    m = base_copy(0)
    name = m.load_adapter(path, use_safetensors=st)
    return m, name


def _hidden(model, name: str, x):
    model.set_active_adapters(name)
    with torch.no_grad():
        return model.bert(x)[0]


def _reference(src: str, st: bool, **kw):
    """tropfast.prune on a model with the saved adapter loaded: the expected result."""
    m, name = _load(src, st)
    tropfast.prune(m, adapter=name, **kw)
    return hub_params(m, name)


@pytest.mark.parametrize("allocation", ALLOCS)
@pytest.mark.parametrize("score", SCORES)
def test_masks_equal_prune_on_the_loaded_model(fleet, tmp_path, score, allocation):
    out = str(tmp_path / "out")
    rep = tropfast.prune_saved([fleet], out, keep=0.4, score=score, allocation=allocation)
    assert rep.ok and rep.exit_code == 0
    for k in range(3):
        st = bool(k % 2)
        src = os.path.join(fleet, f"t{k}")
        want = _reference(src, st, keep=0.4, score=score, allocation=allocation)
        got_model, name = _load(os.path.join(out, "fleet", f"t{k}"), st)  # stock load_adapter
        got = hub_params(got_model, name)
        assert got.keys() == want.keys()
        for p in want:
            assert got[p].shape == want[p].shape and torch.equal(got[p], want[p]), (score, allocation, k, p)


def test_options_pass_through(fleet, tmp_path):
    kw = {
        "keep": 0.3,
        "score": "combined",
        "allocation": "global",
        "combined_q": 0.25,
        "values": "solver",
        "tropical": {"method": "bcd", "steps": 30},
    }
    rep = tropfast.prune_saved([os.path.join(fleet, "t1")], str(tmp_path / "o"), **kw)
    assert rep.ok
    want = _reference(os.path.join(fleet, "t1"), True, **kw)
    got = hub_params(_load(str(tmp_path / "o" / "t1"), True)[0], "t1")
    assert all(torch.equal(got[p], want[p]) for p in want)
    assert rep.sources[0]["solver"]["method"] == "bcd"


def test_structured_global_pads_like_export(tmp_path):
    src = save_hub(str(tmp_path / "src" / "a"), 5, "a")
    out = str(tmp_path / "out")
    rep = tropfast.prune_saved(
        [src], out, keep=0.3, score="tropical", allocation="structured", structured_scope="global"
    )
    assert rep.ok
    m, name = _load(src, False)
    tropfast.prune(m, adapter=name, keep=0.3, score="tropical", allocation="structured", structured_scope="global")
    exp = str(tmp_path / "exported")
    tropfast.export_adapter(m, name, exp)
    got_sd = torch.load(os.path.join(out, "a", "pytorch_adapter.bin"), weights_only=True)
    exp_sd = torch.load(os.path.join(exp, "pytorch_adapter.bin"), weights_only=True)
    assert got_sd.keys() == exp_sd.keys()
    for k in exp_sd:
        assert torch.equal(got_sd[k], exp_sd[k]), k
    got_cfg = json.loads(Path(os.path.join(out, "a", "adapter_config.json")).read_text())
    exp_cfg = json.loads(Path(os.path.join(exp, "adapter_config.json")).read_text())
    assert got_cfg["config"]["reduction_factor"] == exp_cfg["config"]["reduction_factor"]
    assert got_cfg["tropfast"] == exp_cfg["tropfast"]
    units = [x["r_after"] for x in rep.sources[0]["layers"]]
    assert sum(units) == round(0.3 * 32)  # 4 adapters x 8 units
    # the stock model computes what the pruned one does
    loaded, _ = _load(os.path.join(out, "a"), False)
    x = tokens()
    torch.testing.assert_close(_hidden(loaded, name, x), _hidden(m, name, x), rtol=1e-6, atol=1e-6)


def test_sharded_checkpoint_equals_prune_and_keeps_backbone_bytes(tmp_path):
    from adapters import AutoAdapterModel

    ck = make_checkpoint(str(tmp_path / "ckpt"))
    assert os.path.isfile(os.path.join(ck, "model.safetensors.index.json"))
    out = str(tmp_path / "out")
    rep = tropfast.prune_saved([ck], out, keep=0.35, score="tropical", allocation="global")
    assert rep.ok and rep.sources[0]["kind"] == "checkpoint" and rep.sources[0]["adapters"] == 4
    ref = AutoAdapterModel.from_pretrained(ck)
    tropfast.prune(ref, adapter="a", keep=0.35, score="tropical", allocation="global")
    got = AutoAdapterModel.from_pretrained(os.path.join(out, "ckpt"))
    for k, v in ref.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    # every non-adapter tensor keeps its bytes; files without adapters are copies
    for f in sorted(os.listdir(ck)):
        a, b = os.path.join(ck, f), os.path.join(out, "ckpt", f)
        if not f.endswith(".safetensors"):
            assert Path(a).read_bytes() == Path(b).read_bytes(), f
            continue
        ha, hb = read_header(a), read_header(b)
        for name, info in ha.tensors.items():
            if ".adapters.a.adapter_" in name and name.endswith("weight") and len(info.shape) == 2:
                continue
            with open(a, "rb") as fa, open(b, "rb") as fb:
                fa.seek(ha.data_start + info.begin)
                fb.seek(hb.data_start + hb.tensors[name].begin)
                assert fa.read(info.nbytes) == fb.read(info.nbytes), name


def test_checkpoint_structured_updates_config(tmp_path):
    from adapters import AutoAdapterModel

    ck = make_checkpoint(str(tmp_path / "ckpt"), shard="1GB")
    assert os.path.isfile(os.path.join(ck, "model.safetensors"))
    out = str(tmp_path / "out")
    rep = tropfast.prune_saved([ck], out, keep=0.5, score="magnitude", allocation="structured")
    assert rep.ok
    ref = AutoAdapterModel.from_pretrained(ck)
    tropfast.prune(ref, adapter="a", keep=0.5, score="magnitude", allocation="structured")
    got = AutoAdapterModel.from_pretrained(os.path.join(out, "ckpt"))  # loads only if config and shapes agree
    assert got.bert.encoder.layer[0].output.adapters["a"].adapter_up.weight.shape == (32, 4)
    x = tokens()
    torch.testing.assert_close(_hidden(got, "a", x), _hidden(ref, "a", x), rtol=1e-6, atol=1e-6)


class _Block(nn.Module):
    def __init__(self, d: int, r: int):
        super().__init__()
        self.down = nn.Linear(d, r)
        self.act = nn.ReLU()
        self.up = nn.Linear(r, d)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.body = nn.Linear(10, 10)
        self.blocks = nn.ModuleList([_Block(10, 3), _Block(10, 5)])


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize(
    "score, allocation, dtype",
    [
        ("tropical", "layer", torch.float32),
        ("partner_norm", "global", torch.float32),
        ("random", "structured", torch.float32),
        # tropical on half-precision weights ranks in float32 (exact), prune in float64
        ("tropical", "node", torch.bfloat16),
        ("tropical", "global", torch.float16),
    ],
)
def test_plain_state_dict_matches_prune_with_pattern(tmp_path, fmt, score, allocation, dtype):
    net = _Net().to(dtype)
    p = str(tmp_path / f"net.{fmt}")
    sd = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    save_file(sd, p) if fmt == "safetensors" else torch.save(sd, p)
    out = str(tmp_path / "out")
    rep = tropfast.prune_saved(
        [p], out, keep=0.4, score=score, allocation=allocation, down_key="*.down.weight", up_key="*.up.weight"
    )
    assert rep.ok, rep.table()
    tropfast.prune(net, pattern="blocks.*", keep=0.4, score=score, allocation=allocation)
    got = (
        load_file(os.path.join(out, f"net.{fmt}"))
        if fmt == "safetensors"
        else torch.load(os.path.join(out, f"net.{fmt}"), weights_only=True)
    )
    for k, v in net.state_dict().items():
        assert torch.equal(got[k], v), k
    if fmt == "safetensors" and allocation != "structured":
        assert read_header(os.path.join(out, "net.safetensors")).tensors.keys() == read_header(p).tensors.keys()
        raw_a, raw_b = Path(p).read_bytes(), Path(os.path.join(out, "net.safetensors")).read_bytes()
        h = read_header(p)
        for name in ("body.weight", "body.bias", "blocks.0.down.bias", "blocks.1.up.bias"):
            i = h.tensors[name]
            assert (
                raw_a[h.data_start + i.begin : h.data_start + i.end]
                == raw_b[h.data_start + i.begin : h.data_start + i.end]
            )


def test_snip_and_bad_arguments_refused(fleet, tmp_path):
    with pytest.raises(ValueError, match=r"forward passes.*tropfast\.prune\(model, score='snip'"):
        tropfast.prune_saved([fleet], str(tmp_path / "o"), score="snip")
    with pytest.raises(ValueError, match="keep must be a fraction"):
        tropfast.prune_saved([fleet], str(tmp_path / "o"), keep=1.5)
    with pytest.raises(ValueError, match="values='solver' needs"):
        tropfast.prune_saved([fleet], str(tmp_path / "o"), score="magnitude", values="solver")
    with pytest.raises(ValueError, match="unknown tropical option"):
        tropfast.prune_saved([fleet], str(tmp_path / "o"), tropical={"stepz": 3})
    with pytest.raises(ValueError, match="inside the source"):
        tropfast.prune_saved([fleet], os.path.join(fleet, "inner"))
    with pytest.raises(ValueError, match="max_memory"):
        tropfast.prune_saved([fleet], str(tmp_path / "o"), max_memory="lots")
    assert not os.path.exists(tmp_path / "o")


def test_batched_solve_covers_many_files(fleet, tmp_path, monkeypatch):
    calls: list[int] = []
    real = tropfast.solve

    def counting(A, B, *a, **k):
        calls.append(len(A))
        return real(A, B, *a, **k)

    monkeypatch.setattr(tropfast.fleet.scoring, "solve", counting)
    alone = []
    for k in range(3):
        calls.clear()
        tropfast.prune_saved([os.path.join(fleet, f"t{k}")], str(tmp_path / f"one{k}"), keep=0.3)
        alone.append(list(calls))
    calls.clear()
    tropfast.prune_saved([fleet], str(tmp_path / "all"), keep=0.3)
    # one call per search step for the whole fleet: as many calls as the slowest file needs alone,
    # the first one holding all 3 x 4 adapter layers
    assert len(calls) == max(len(c) for c in alone)
    assert calls[0] == 12 and all(c[0] == 4 for c in alone)


def test_summary_records_and_table(fleet, tmp_path, capsys):
    out = str(tmp_path / "out")
    rep = tropfast.prune_saved([fleet], out, keep=0.4, score="magnitude", allocation="layer")
    s = json.loads(Path(os.path.join(out, "summary.json")).read_text())
    assert s["state"] == "done" and s["totals"]["ok"] == 3 and s["settings"]["score"] == "magnitude"
    for rec in s["sources"]:
        assert rec["status"] == "ok" and rec["adapters"] == 4
        # layer allocation keeps round(0.4 * (8*32 + 32*8)) = round(204.8) = 205 weights per adapter layer
        assert [x["kept_A"] + x["kept_B"] for x in rec["layers"]] == [205] * 4
        assert rec["bytes_read"] == 4 * 512 * 4 and rec["bytes_written"] > 0
    t = rep.table()
    assert "3/3 sources ok" in t and "fleet/t2" in t
    assert not os.path.exists(os.path.join(out, ".prune-saved"))


def test_summary_file_puts_one_record_per_line(fleet, tmp_path):
    out = str(tmp_path / "out")
    tropfast.prune_saved([fleet], out, keep=0.4, score="magnitude", allocation="layer")
    text = Path(os.path.join(out, "summary.json")).read_text()
    s = json.loads(text)
    lines = text.splitlines()
    assert lines[0] == "{" and lines[-1] == "}" and text.endswith("}\n")
    bare = [ln.rstrip(",") for ln in lines]
    for rec in s["sources"]:  # each record whole on its own line, the rest indented
        assert "  " + json.dumps(rec) in bare
    assert ' "settings": {' in lines and '  "score": "magnitude",' in lines
    # an empty list and nested values keep their shape
    p = str(tmp_path / "x.json")
    obj = {"a": [], "b": {"c": [1, {"d": None}]}, "e": [[1, 2], "f"], "g": 1.5}
    engine._atomic_json(obj, p)
    assert json.loads(Path(p).read_text()) == obj
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_inputs_never_modified(fleet, tmp_path):
    before = tree_hashes(fleet)
    mtimes = {f: os.stat(os.path.join(fleet, f)).st_mtime_ns for f in before}
    tropfast.prune_saved([fleet], str(tmp_path / "o"), keep=0.2, allocation="structured")
    assert tree_hashes(fleet) == before
    assert {f: os.stat(os.path.join(fleet, f)).st_mtime_ns for f in before} == mtimes


def test_resume_by_default_and_settings_mismatch(fleet, tmp_path):
    out = str(tmp_path / "out")
    tropfast.prune_saved([fleet], out, keep=0.4, score="magnitude")
    m0 = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in tree_hashes(out)}
    rep = tropfast.prune_saved([fleet], out, keep=0.4, score="magnitude")
    assert all(s.get("resumed") for s in rep.sources) and rep.ok
    assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in tree_hashes(out)} == m0
    with pytest.raises(ValueError, match="keep differ.*resume=False"):
        tropfast.prune_saved([fleet], out, keep=0.5, score="magnitude")
    rep = tropfast.prune_saved([fleet], out, keep=0.5, score="magnitude", resume=False)
    assert rep.ok and not any(s.get("resumed") for s in rep.sources)
    assert abs(rep.totals()["kept_fraction"] - 0.5) < 1e-9


def test_foreign_output_needs_overwrite(fleet, tmp_path):
    out = tmp_path / "out"
    (out / "fleet" / "t1").mkdir(parents=True)
    (out / "fleet" / "t1" / "mine.txt").write_text("someone's file")
    with pytest.raises(FileExistsError, match="not written by a prune_saved run"):
        tropfast.prune_saved([fleet], str(out), keep=0.4, score="magnitude")
    assert (out / "fleet" / "t1" / "mine.txt").exists() and not (out / "fleet" / "t0").exists()
    rep = tropfast.prune_saved([fleet], str(out), keep=0.4, score="magnitude", overwrite=True)
    assert rep.ok and not (out / "fleet" / "t1" / "mine.txt").exists()


def test_small_memory_gives_same_outputs(fleet, tmp_path, monkeypatch):
    sizes: list[int] = []
    real = engine._compute
    monkeypatch.setattr(engine, "_compute", lambda b, *a: (sizes.append(len(b)), real(b, *a))[1])
    tropfast.prune_saved([fleet], str(tmp_path / "big"), keep=0.3, score="tropical")
    assert sizes == [3]
    sizes.clear()
    tropfast.prune_saved([fleet], str(tmp_path / "small"), keep=0.3, score="tropical", max_memory=1)
    assert sizes == [1, 1, 1]
    assert tree_hashes(str(tmp_path / "big")) == tree_hashes(str(tmp_path / "small"))


def _corrupt_fleet(root) -> str:
    d = make_fleet(str(root), 3)
    # a truncated safetensors adapter, a garbage .bin adapter, a LoRA adapter, NaN weights
    save_hub(os.path.join(d, "cut"), 10, "cut", safetensors=True)
    w = os.path.join(d, "cut", "adapter.safetensors")
    data = Path(w).read_bytes()
    Path(w).write_bytes(data[: len(data) // 2])
    save_hub(os.path.join(d, "junk"), 11, "junk")
    Path(os.path.join(d, "junk", "pytorch_adapter.bin")).write_bytes(b"\x00garbage")
    save_hub(os.path.join(d, "lora"), 12, "lora")
    cfg = json.loads(Path(os.path.join(d, "lora", "adapter_config.json")).read_text())
    cfg["config"]["architecture"] = "lora"
    Path(os.path.join(d, "lora", "adapter_config.json")).write_text(json.dumps(cfg))
    m = tiny_model(seed=13, name="nan")
    with torch.no_grad():
        m.bert.encoder.layer[1].output.adapters["nan"].adapter_up.weight[0, 0] = float("inf")
    os.makedirs(os.path.join(d, "nan"))
    m.save_adapter(os.path.join(d, "nan"), "nan")
    return d


def test_corrupt_and_unsupported_sources_reported_others_complete(tmp_path):
    d = _corrupt_fleet(tmp_path / "src")
    out = str(tmp_path / "out")
    rep = tropfast.prune_saved([d], out, keep=0.4, score="tropical")
    st = {s["name"]: (s["status"], s["error"]) for s in rep.sources}
    assert rep.exit_code == 1
    assert st["fleet/cut"][0] == "failed" and "adapter.safetensors" in st["fleet/cut"][1]
    assert st["fleet/junk"][0] == "failed" and "pytorch_adapter.bin: cannot be loaded" in st["fleet/junk"][1]
    assert st["fleet/lora"][0] == "unsupported" and "'lora' adapter" in st["fleet/lora"][1]
    assert st["fleet/nan"][0] == "failed" and "non-finite values (0 NaN, 1 Inf)" in st["fleet/nan"][1]
    assert all(st[f"fleet/t{k}"] == ("ok", None) for k in range(3))
    assert not any(os.path.exists(os.path.join(out, "fleet", n)) for n in ("cut", "junk", "lora", "nan"))
    clean = str(tmp_path / "clean")
    tropfast.prune_saved([os.path.join(d, f"t{k}") for k in range(3)], clean, keep=0.4, score="tropical")
    for k in range(3):
        assert tree_hashes(os.path.join(out, "fleet", f"t{k}")) == tree_hashes(os.path.join(clean, f"t{k}"))
    s = json.loads(Path(os.path.join(out, "summary.json")).read_text())
    assert s["totals"]["failed"] == 4


def test_failed_write_leaves_nothing_half_written(fleet, tmp_path, monkeypatch):
    from tropfast.fleet import writers

    real = writers.write_replaced

    def boom(header, dst, repl):
        real(header, dst, repl)
        raise OSError("disk full")

    monkeypatch.setattr(writers, "write_replaced", boom)
    out = tmp_path / "out"
    rep = tropfast.prune_saved([fleet], str(out), keep=0.4, score="magnitude")
    st = {s["name"]: s for s in rep.sources}
    assert st["fleet/t1"]["status"] == "failed" and "disk full" in st["fleet/t1"]["error"]  # the safetensors one
    assert st["fleet/t0"]["status"] == "ok" and st["fleet/t2"]["status"] == "ok"
    assert sorted(os.listdir(out / "fleet")) == ["t0", "t2"]  # no t1, no temporary


def test_cli_prune_saved(fleet, tmp_path, capsys):
    from tropfast.cli import main

    out = str(tmp_path / "out")
    rc = main(
        [
            "prune-saved",
            fleet,
            "--out",
            out,
            "--keep",
            "0.4",
            "--score",
            "magnitude",
            "--allocation",
            "node",
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "3/3 sources ok" in printed and "fleet/t0" in printed
    want = _reference(os.path.join(fleet, "t0"), False, keep=0.4, score="magnitude", allocation="node")
    got = hub_params(_load(os.path.join(out, "fleet", "t0"), False)[0], "t0")
    assert all(torch.equal(got[p], want[p]) for p in want)
    rc = main(["prune-saved", fleet, "--out", out, "--keep", "0.4", "--score", "snip", "--no-progress"])
    assert rc == 2 and "tropfast.prune" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(fleet, bad / "fleet")
    Path(bad / "fleet" / "t0" / "pytorch_adapter.bin").write_bytes(b"x")
    rc = main(
        [
            "prune-saved",
            str(bad / "fleet"),
            "--out",
            str(tmp_path / "o2"),
            "--score",
            "magnitude",
            "--json",
            "-",
            "--no-progress",
        ]
    )
    assert rc == 1
    s = json.loads(capsys.readouterr().out)
    assert [x["status"] for x in s["sources"]] == ["failed", "ok", "ok"]


_SLOW_RUN = """
import sys, time
import tropfast
from tropfast.fleet import engine
real = engine.write_output

def slow(*a, **k):
    n = real(*a, **k)
    time.sleep(0.3)  # a window in which the kill can land between an output's rename and its record
    return n

engine.write_output = slow
tropfast.prune_saved([sys.argv[1]], sys.argv[2], keep=0.3, score="tropical", max_memory=1, workers=1)
"""


def test_killed_run_resumes_to_byte_identical_outputs(tmp_path):
    import subprocess
    import sys
    import time

    src = make_fleet(str(tmp_path / "src"), 6)
    out = str(tmp_path / "out")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(tropfast.__file__))] + sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_RUN, src, out], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    journal = os.path.join(out, ".prune-saved", "journal-rank0.jsonl")
    t0 = time.time()
    while time.time() - t0 < 120:
        if os.path.exists(journal) and sum('"ok"' in line for line in Path(journal).read_text().splitlines()) >= 2:
            break
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert json.loads(Path(os.path.join(out, "summary.json")).read_text())["state"] == "running"
    done_before = len([n for n in os.listdir(os.path.join(out, "fleet")) if not n.startswith(".")])
    assert 2 <= done_before < 6
    rep = tropfast.prune_saved([src], out, keep=0.3, score="tropical")  # resumes by default
    assert rep.ok and 2 <= rep.totals()["resumed"] < 6
    fresh = str(tmp_path / "fresh")
    tropfast.prune_saved([src], fresh, keep=0.3, score="tropical")
    assert tree_hashes(out) == tree_hashes(fresh)  # no temporaries left either
    assert sorted(os.listdir(os.path.join(out, "fleet"))) == [f"t{k}" for k in range(6)]


def test_reading_and_writing_overlap_scoring(fleet, tmp_path, monkeypatch):
    import threading
    import time

    events: list[str] = []
    lock = threading.Lock()

    def log(x):
        with lock:
            events.append(x)

    real_load, real_compute, real_write = engine._load, engine._compute, engine._write

    def load(spec, cfg):
        log(f"load {os.path.basename(spec.path)}")
        return real_load(spec, cfg)

    def compute(batch, cfg, out):
        name = os.path.basename(batch[0].spec.path)
        log(f"compute {name}")
        time.sleep(0.3)
        r = real_compute(batch, cfg, out)
        log(f"computed {name}")
        return r

    def write(ld, *rest):
        name = os.path.basename(ld.spec.path)
        log(f"write {name}")
        time.sleep(0.3)
        r = real_write(ld, *rest)
        log(f"written {name}")
        return r

    monkeypatch.setattr(engine, "_load", load)
    monkeypatch.setattr(engine, "_compute", compute)
    monkeypatch.setattr(engine, "_write", write)
    rep = tropfast.prune_saved([fleet], str(tmp_path / "o"), keep=0.3, score="magnitude", max_memory=1)  # 1 per batch
    assert rep.ok
    at = {e: i for i, e in enumerate(events)}
    assert at["load t1"] < at["computed t0"]  # the next source is read while this one is scored
    assert at["compute t1"] < at["written t0"]  # and the previous one is written while the next is scored


def test_progress_bar(fleet, tmp_path, capsys):
    tropfast.prune_saved([fleet], str(tmp_path / "o"), keep=0.3, score="magnitude", progress=True)
    err = capsys.readouterr().err
    assert "prune-saved" in err and "3/3" in err and "adapter/s" in err and "MB/s" in err


def test_changed_source_is_redone_on_resume(fleet, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(fleet, src / "fleet")
    out = str(tmp_path / "out")
    tropfast.prune_saved([str(src / "fleet")], out, keep=0.4, score="magnitude")
    cfg = src / "fleet" / "t2" / "adapter_config.json"
    cfg.write_text(cfg.read_text() + " ")  # same content to pruning, a new file to the fingerprint
    rep = tropfast.prune_saved([str(src / "fleet")], out, keep=0.4, score="magnitude")
    assert [bool(s.get("resumed")) for s in rep.sources] == [True, True, False]


def test_freed_memory_is_kept_for_reuse_once_per_process(monkeypatch):
    calls = []

    class Lib:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(engine, "_MALLOC_TUNED", False)
    monkeypatch.setenv("TROPFAST_MALLOC_TUNING", "0")
    assert engine._reuse_freed_memory(Lib()) is False and calls == []
    monkeypatch.delenv("TROPFAST_MALLOC_TUNING")
    assert engine._reuse_freed_memory(Lib()) is True
    # glibc's M_MMAP_THRESHOLD (-3) fixed at 32 MiB, then M_TRIM_THRESHOLD (-1) at 256 MiB
    assert calls == [(-3, 32 << 20), (-1, 256 << 20)]
    assert engine._reuse_freed_memory(Lib()) is False and len(calls) == 2  # once per process


def test_prune_saved_tunes_malloc_before_its_work(fleet, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(engine, "_reuse_freed_memory", lambda: seen.append(os.path.exists(tmp_path / "o")))
    tropfast.prune_saved([fleet], str(tmp_path / "o"), keep=0.5, score="magnitude")
    assert seen == [False]


@pytest.mark.parametrize("fail", [False, True])
def test_solves_use_every_thread_and_the_rest_one(fleet, tmp_path, monkeypatch, fail):
    """prune_saved runs its solves on torch's threads and its small per-matrix ops on one
    (a team's wake-up costs more than such an op), and leaves the setting as it found it,
    also when the run fails."""
    import tropfast.fleet.scoring as scoring

    before = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: state["n"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: state.update(n=n))
    state = {"n": 4}
    at_solve, at_alloc = [], []
    real_solve, real_alloc = scoring.solve, engine.allocate

    class Crash(Exception):  # not a source's fault: it ends the run
        pass

    def solve(*a, **k):
        at_solve.append(state["n"])
        if fail:
            raise Crash("solver crashed")
        return real_solve(*a, **k)

    monkeypatch.setattr(scoring, "solve", solve)
    monkeypatch.setattr(engine, "allocate", lambda *a, **k: at_alloc.append(state["n"]) or real_alloc(*a, **k))
    if fail:
        with pytest.raises(Crash, match="solver crashed"):
            tropfast.prune_saved([fleet], str(tmp_path / "o"), keep=0.3)
    else:
        tropfast.prune_saved([fleet], str(tmp_path / "o"), keep=0.3)
        assert at_alloc and set(at_alloc) == {1}
    assert at_solve and set(at_solve) == {4}
    assert state["n"] == 4
    monkeypatch.undo()
    assert torch.get_num_threads() == before
