"""The CLI contract: every bad invocation exits 2 with one line on stderr naming the culprit.

No traceback, nothing on stdout, no temporary file left, nothing changed on disk.  A few
cases also run through a real process (exit status, stderr), and Ctrl-C during a long
native solve exits 130 at once.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from pruning_fixtures import tiny_model, torch

from tropfast.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs of every kind, good and bad, in one folder."""
    d = tmp_path_factory.mktemp("inputs")
    m = tiny_model()
    m.save_pretrained(str(d / "model"))
    m.save_adapter(str(d / "adapter"), "a")
    (d / "junk_adapter").mkdir()
    (d / "junk_adapter" / "notes.txt").write_text("not an adapter")
    (d / "a_file").write_text("plain text")
    (d / "text.pt").write_text("hello")
    (d / "text.safetensors").write_text("hello")
    (d / "empty.pt").write_bytes(b"")
    (d / "empty.safetensors").write_bytes(b"")
    with open(d / "pickle.pt", "wb") as f:
        pickle.dump(Counter(a=1), f)
    torch.save({"X": torch.zeros(2)}, d / "no_ab.pt")
    torch.save({"A": torch.randn(4, 10), "B": torch.randn(10, 4)}, d / "w.pt")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(d / "foreign.safetensors"))
    return d


def _tree(root) -> dict:
    out = {}
    for dirpath, dirs, names in os.walk(root):
        for n in dirs + names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = None if os.path.isdir(p) else os.path.getsize(p)
    return out


def _run_in_process(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# (argv with {d} = the inputs folder and {t} = an empty scratch folder, text the error line must contain)
CASES = [
    # prune: arguments
    (["prune", "{d}/model", "--keep", "0.5,,0.2"], "--keep"),
    (["prune", "{d}/model", "--keep", ""], "--keep"),
    (["prune", "{d}/model", "--keep", "1.5"], "--keep"),
    (["prune", "{d}/model", "--keep", "nan"], "--keep"),
    (["prune", "{d}/model", "--score", ""], "--score"),
    (["prune", "{d}/model", "--score", "magnitude,,random"], "--score"),
    (["prune", "{d}/model", "--score", "nope"], "--score"),
    (["prune", "{d}/model", "--allocation", "nope"], "--allocation"),
    (["prune", "{d}/model", "--lam", "-1"], "--lam"),
    (["prune", "{d}/model", "--steps", str(2**63)], "--steps"),
    (["prune", "{d}/model", "--combined-q", "2"], "--combined-q"),
    (["prune", "{d}/model", "--format", "zip"], "--format"),
    (["prune", "{d}/model", "--structured-scope", "foo"], "--structured-scope"),
    (["prune", "{d}/model", "--seed", "-1"], "--seed"),
    (["prune", "{d}/model", "--threads", "0"], "--threads"),
    # prune: inputs and outputs
    (["prune", "{d}/missing_model"], "missing_model"),
    (["prune", "{d}/a_file"], "a_file"),
    (["prune", "{d}/model", "--adapter", "{d}/junk_adapter"], "junk_adapter"),
    (["prune", "{d}/model", "--adapter", "{d}/no_such_dir"], "no_such_dir"),
    (["prune", "{d}/model", "--adapter", "nope"], "'nope'"),
    (["prune", "{d}/model", "--out", "{d}/a_file", "--no-progress"], "a_file"),
    (["prune", "{d}/model", "--json", "{t}", "--no-progress"], "is a directory"),
    (["prune", "{d}/model", "--json", "{d}/a_file/r.json", "--no-progress"], "a_file"),
    (["prune", "{d}/model", "--keep", "0.5", "--score", "magnitude", "--out", "{d}", "--no-progress"], "not empty"),
    # inspect
    (["inspect", "{d}/text.safetensors"], "text.safetensors"),
    (["inspect", "{d}/empty.safetensors"], "empty.safetensors"),
    (["inspect", "{d}/foreign.safetensors"], "not a tropfast sparse adapter file"),
    (["inspect", "{d}/a_file"], "a_file"),
    (["inspect", "{d}/missing_model"], "missing_model"),
    (["inspect", "{d}/model", "--json", "{t}"], "is a directory"),
    # solve
    (["solve", "{d}/empty.safetensors"], "empty.safetensors"),
    (["solve", "{d}/empty.pt"], "empty.pt"),
    (["solve", "{d}/text.pt"], "text.pt"),
    (["solve", "{d}/text.safetensors"], "text.safetensors"),
    (["solve", "{d}/pickle.pt"], "pickle.pt"),
    (["solve", "{d}/missing.pt"], "missing.pt"),
    (["solve", "{d}/no_ab.pt"], "'A'"),
    (["solve", "{d}/junk_adapter"], "junk_adapter"),
    (["solve", "{d}/w.pt", "--out", "{t}"], "is a directory"),
    (["solve", "{d}/w.pt", "--out", "{d}/a_file/x.safetensors"], "a_file"),
    (["solve", "{d}/w.pt", "--json", "{t}"], "is a directory"),
    (["solve", "{d}/w.pt", "--steps", "0"], "--steps"),
    (["solve", "{d}/w.pt", "--steps", str(2**63)], "--steps"),
    (["solve", "{d}/w.pt", "--target-keep", "0"], "--target-keep"),
    (["solve", "{d}/w.pt", "--lam1", "-1"], "--lam1"),
    (["solve", "{d}/w.pt", "--method", "adam"], "--method"),
    # backends, unknown commands
    (["backends", "--json", "{t}"], "is a directory"),
    (["nope"], "nope"),
]


@pytest.mark.parametrize("argv, culprit", CASES, ids=[" ".join(c[0][:4]) for c in CASES])
def test_bad_invocation(files, tmp_path, capsys, argv, culprit):
    (files / "a-magnitude-layer-keep0.5").mkdir(exist_ok=True)
    (files / "a-magnitude-layer-keep0.5" / "notes.txt").write_text("mine")
    argv = [a.format(d=files, t=tmp_path) for a in argv]
    before, before_t = _tree(files), _tree(tmp_path)
    code, out, err = _run_in_process(argv, capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("tropfast") and " error: " in lines[0], err
    assert culprit in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
    assert _tree(files) == before and _tree(tmp_path) == before_t  # nothing written, no temporary left


def _cli(*argv: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    code = "import sys; from tropfast.cli import main; sys.exit(main())"
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


@pytest.mark.parametrize(
    "argv, culprit",
    [(["solve", "{d}/pickle.pt"], "pickle.pt"), (["prune", "{d}/model", "--keep", "0.5,,0.2"], "--keep")],
)
def test_bad_invocation_in_a_real_process(files, argv, culprit):
    p = _cli(*[a.format(d=files) for a in argv])
    try:
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()  # never leave it running, whatever happened
    lines = [x for x in err.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and culprit in lines[0] and "Traceback" not in err, err
    assert out == ""


def _cpu_s(pid: int) -> float:
    """CPU seconds a live process has used (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_ctrl_c_during_a_long_native_solve(files, tmp_path):
    st = __import__("tropfast").backends.available()
    if "cpu" not in st or not st["cpu"].available:
        pytest.skip("the native CPU backend is not built")
    torch.save({"A": torch.randn(8, 64, 256), "B": torch.randn(8, 256, 64)}, tmp_path / "big.pt")
    out = tmp_path / "sol.safetensors"
    probe = _cli("solve", str(tmp_path / "big.pt"), "--steps", "1", "--backend", "cpu", "--no-progress")
    t0, ready = time.monotonic(), 0.0
    while probe.poll() is None and time.monotonic() - t0 < 120:
        ready = _cpu_s(probe.pid)
        time.sleep(0.1)
    probe.communicate(timeout=60)
    p = _cli("solve", str(tmp_path / "big.pt"), "--steps", str(10**9), "--backend", "cpu", "--no-progress",
             "--out", str(out))
    try:
        # well inside the one native call: the child has used the CPU time of its imports and
        # the load (measured on a child that stops there) and then some
        deadline = time.monotonic() + 120
        while _cpu_s(p.pid) < ready + 1.0 and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()
        t0 = time.perf_counter()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=10)
        waited = time.perf_counter() - t0
    finally:
        p.kill()  # a solve that ignored Ctrl-C would run for hours
    assert waited < 5
    assert p.returncode == 130 and err.strip() == "tropfast solve: interrupted", err
    assert sorted(os.listdir(tmp_path)) == ["big.pt"]  # no output, no temporary
