"""Fault injection over every write path: exports, JSON reports, CLI outputs, benchmark results.

Each operation is run once per step at which it can fail: the k-th call of any function
that writes (file creation, ``open`` for writing, rename, mkdir, rmdir, unlink, chmod,
fsync, rmtree, ``torch.save``, ``json.dump``, safetensors' ``save_file``, ``save_adapter``)
raises, k = 1, 2, ... until the operation completes untouched.  After every run:

* the destination holds the old complete result or the new complete one, nothing in between;
* nothing else in its folder changed;
* no temporary file or folder is left.

The injected failure is an OSError (a full disk, a permission) and, for the exports, also
a KeyboardInterrupt (Ctrl-C at that point).
"""
from __future__ import annotations

import builtins
import json
import os
import shutil

import pytest
from pruning_fixtures import tiny_model, torch

from tropfast.cli import main
from tropfast.pruning import export_adapter, prune

MAX_STEPS = 400


class Injected(OSError):
    pass


class Faults:
    """Patches every writer so that its ``fail_at``-th call (all writers counted together) raises."""

    def __init__(self, monkeypatch, fail_at: int, exc: type[BaseException] = Injected, extra=()):
        self.calls = 0
        self.fail_at = fail_at
        self.exc = exc
        self.hit = False
        import safetensors.torch

        targets = [
            (os, "replace", None),
            (os, "rename", None),
            (os, "mkdir", None),
            (os, "makedirs", None),
            (os, "rmdir", None),
            (os, "unlink", None),
            (os, "remove", None),
            (os, "fsync", None),
            (os, "chmod", None),
            (os, "open", lambda path, flags, *a, **k: bool(flags & os.O_CREAT)),
            (shutil, "rmtree", None),
            (builtins, "open", lambda file, mode="r", *a, **k: any(c in mode for c in "wax+")),
            (torch, "save", None),
            (json, "dump", None),
            (safetensors.torch, "save_file", None),
            *extra,
        ]
        for obj, name, counts in targets:
            monkeypatch.setattr(obj, name, self._wrap(getattr(obj, name), name, counts))

    def _wrap(self, real, name, counts):
        def call(*a, **k):
            if counts is None or counts(*a, **k):
                self.calls += 1
                if self.calls == self.fail_at:
                    self.hit = True
                    raise self.exc(f"injected fault at write step {self.calls} ({name})")
            return real(*a, **k)

        return call


def _snapshot(path):
    """Comparable content of a destination: None if absent, file bytes per name for a folder."""
    if not os.path.lexists(path):
        return None
    if os.path.isdir(path):
        out = {}
        for root, dirs, files in os.walk(path):
            for f in files:
                p = os.path.join(root, f)
                out[os.path.relpath(p, path)] = _file_content(p)
            for d in dirs:
                out[os.path.relpath(os.path.join(root, d), path) + "/"] = None
        return out
    return _file_content(path)


def _file_content(p):
    if p.endswith(".safetensors"):  # its metadata order varies from run to run: compare contents
        from safetensors import safe_open

        try:
            with safe_open(p, framework="pt") as f:
                return ("safetensors", f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()})
        except Exception:
            pass
    if p.endswith(".json"):
        try:
            with open(p) as fh:
                return ("json", _stable(json.load(fh)))
        except ValueError:
            pass
    with open(p, "rb") as fh:
        return fh.read()


def _stable(x):
    """A JSON report without its timings and output paths (they differ between runs)."""
    if isinstance(x, dict):
        return {k: _stable(v) for k, v in x.items() if not k.endswith("_s") and k not in ("timings", "exported", "out")}
    if isinstance(x, list):
        return [_stable(v) for v in x]
    return x


def _others(folder, dests):
    """Everything under folder but the destinations (paths relative to it) and the folders holding them."""
    holders = {os.path.dirname(d) for d in dests}
    out = {}
    for root, dirs, files in os.walk(folder):
        rel = os.path.relpath(root, folder)
        dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(rel, d)) not in dests]
        for f in files:
            r = os.path.normpath(os.path.join(rel, f))
            if r not in dests:
                out[r] = _file_content(os.path.join(root, f))
        if rel != "." and os.path.normpath(rel) not in holders:
            out[rel + "/"] = None
    return out


def _hidden(folder):
    return [os.path.join(r, n) for r, ds, fs in os.walk(folder) for n in ds + fs if n.startswith(".")]


def _sweep(monkeypatch, setup, op, dests, exc=Injected, extra=lambda: ()):
    """Run op once per failing step.  setup() -> folder, prepared afresh each time; dests: names in it.

    Returns the number of write steps of a complete run.
    """
    reference = None
    for k in range(1, MAX_STEPS):
        folder = setup()
        old = {d: _snapshot(os.path.join(folder, d)) for d in dests}
        others = _others(folder, dests)
        with monkeypatch.context() as mp:
            faults = Faults(mp, k, exc, extra())
            try:
                op(folder)
            except BaseException as e:  # the injected fault, as it reaches the caller
                assert faults.hit and (isinstance(e, exc) or exc.__name__ in str(e) or "injected" in str(e)), e
        assert not _hidden(folder), f"step {k}: temporaries left: {_hidden(folder)}"
        assert _others(folder, dests) == others, f"step {k}: something else changed"
        now = {d: _snapshot(os.path.join(folder, d)) for d in dests}
        if not faults.hit:  # ran to the end: this is the new complete result
            for d in dests:  # every partial state seen was this one
                assert now[d] == (reference or {}).get(d, now[d]), f"{d}: an earlier step left another result"
            return k - 1, old, now
        for d in dests:
            if now[d] != old[d]:  # then it must be the new complete one, known after the sweep
                reference = reference or {}
                assert reference.get(d, now[d]) == now[d], f"step {k}: {d} is neither old nor new"
                reference[d] = now[d]
    raise AssertionError("the operation never completed")


def _check_final(steps, old, new, dests):
    assert steps > 0
    for d in dests:
        assert new[d] is not None and new[d] != old[d]


@pytest.fixture(scope="module")
def models():
    m_old = tiny_model()
    m_new = tiny_model()
    prune(m_new, 0.3, "magnitude")
    return m_old, m_new


def _folder(tmp_path, name):
    counter = {"n": 0}

    def setup(prepare=None):
        counter["n"] += 1
        d = tmp_path / f"{name}{counter['n']}"
        d.mkdir()
        (d / "unrelated.txt").write_text("keep me")
        (d / "sub").mkdir()
        (d / "sub" / "x.bin").write_bytes(b"\x00\x01")
        return str(d)

    return setup


@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
@pytest.mark.parametrize("earlier", [False, True], ids=["new", "replace"])
@pytest.mark.parametrize("fmt", ["adapters", "sparse"])
def test_export(monkeypatch, tmp_path, models, fmt, earlier, exc):
    m_old, m_new = models
    make = _folder(tmp_path, "f")
    dest = "ad" if fmt == "adapters" else "ad.safetensors"

    def setup():
        folder = make()
        if earlier:
            export_adapter(m_old, "a", os.path.join(folder, dest), format=fmt)
        return folder

    def op(folder):
        export_adapter(m_new, "a", os.path.join(folder, dest), format=fmt)

    extra = (lambda: [(m_new, "save_adapter", None)]) if fmt == "adapters" else (lambda: ())
    steps, old, new = _sweep(monkeypatch, setup, op, [dest], exc, extra)
    _check_final(steps, old, new, [dest])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_model")
    tiny_model().save_pretrained(str(d / "model"))
    torch.save({"A": torch.randn(4, 12), "B": torch.randn(12, 4)}, d / "w.pt")
    return d


@pytest.mark.parametrize("earlier", [False, True], ids=["new", "replace"])
def test_cli_prune_outputs(monkeypatch, tmp_path, model_dir, earlier):
    make = _folder(tmp_path, "p")

    def run(folder, keep):
        out = ["--json", os.path.join(folder, "r.json"), "--out", os.path.join(folder, "out"), "--format", "both"]
        return main(["prune", str(model_dir / "model"), "--score", "magnitude", "--keep", keep, "--no-eval",
                     "--no-progress", *out])

    def setup():
        folder = make()
        if earlier:
            assert run(folder, "0.5") == 0
        return folder

    def op(folder):
        code = run(folder, "0.3")
        if code != 0:
            raise Injected(f"exit status {code}")

    # every export is its own destination: each is atomic, the set of runs is not
    dests = ["r.json", "out/a-magnitude-layer-keep0.3", "out/a-magnitude-layer-keep0.3.safetensors"]
    steps, old, new = _sweep(monkeypatch, setup, op, dests)
    _check_final(steps, old, new, dests)


@pytest.mark.parametrize("earlier", [False, True], ids=["new", "replace"])
@pytest.mark.parametrize("cmd", ["solve", "inspect", "backends"])
def test_cli_file_outputs(monkeypatch, tmp_path, model_dir, cmd, earlier):
    make = _folder(tmp_path, "s")
    dests = ["r.json", "sol.safetensors"] if cmd == "solve" else ["r.json"]

    def run(folder, lam):
        if cmd == "solve":
            argv = ["solve", str(model_dir / "w.pt"), "--steps", "5", "--lam1", lam, "--lam2", lam, "--no-progress",
                    "--out", os.path.join(folder, "sol.safetensors")]
        elif cmd == "inspect":
            argv = ["inspect", str(model_dir / "model")]
        else:
            argv = ["backends"]
        return main(argv + ["--json", os.path.join(folder, "r.json")])

    def setup():
        folder = make()
        if earlier:
            assert run(folder, "0.5") == 0
            if cmd != "solve":  # the same report again: make the earlier one differ
                with open(os.path.join(folder, "r.json"), "w") as f:
                    f.write('{"old": true}\n')
        return folder

    def op(folder):
        code = run(folder, "0.1")
        if code != 0:
            raise Injected(f"exit status {code}")

    steps, old, new = _sweep(monkeypatch, setup, op, dests)
    _check_final(steps, old, new, dests)


@pytest.mark.parametrize("earlier", [False, True], ids=["new", "replace"])
def test_benchmark_summary(monkeypatch, tmp_path, earlier):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(root)
    from benchmarks.prune_summary import main as summary_main

    def bench(ms):  # a pytest-benchmark JSON of two entries
        def entry(impl, t):
            return {"extra_info": {"model": "m", "weights": 10, "impl": impl, "score": "magnitude",
                                   "allocation": "global", "threads": 1},
                    "stats": {"min": t, "median": t, "rounds": 1}, "options": {"timer": "perf_counter"}}

        return {"benchmarks": [entry("peer", 2e-3), entry("tropfast.prune", ms * 1e-3)], "machine_info": {}}

    src = tmp_path / "in.json"
    make = _folder(tmp_path, "b")

    def setup():
        folder = make()
        if earlier:
            src.write_text(json.dumps(bench(3)))
            assert summary_main([str(src), "--out", os.path.join(folder, "r")]) == 0
        src.write_text(json.dumps(bench(1)))
        return folder

    def op(folder):
        summary_main([str(src), "--out", os.path.join(folder, "r")])

    dests = ["r.csv", "r-summary.json"]
    steps, old, new = _sweep(monkeypatch, setup, op, dests)
    _check_final(steps, old, new, dests)
