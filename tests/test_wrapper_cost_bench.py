"""benchmarks/wrapper_cost.py: the split of a public solve around its kernel, and the small
ops after a pause; the solver is left as it was."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

import tropfast
from tropfast import solver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not tropfast.backends.available()["cpu"].available, reason="native CPU backend not built")


def _module():
    spec = importlib.util.spec_from_file_location("wrapper_cost", os.path.join(ROOT, "benchmarks", "wrapper_cost.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_split_times_every_part_and_the_stub_skips_the_kernel(tmp_path, capsys):
    plans, threads = solver._PLANS, torch.get_num_threads()
    out = _module().main(["--method", "ista", "--calls", "3", "--json", str(tmp_path / "w.json")])
    assert solver._PLANS is plans and torch.get_num_threads() == threads  # the timed plan is gone
    real, stub = out["public solve, real kernel (us)"], out["public solve, stub kernel (us)"]
    for part in (real, stub):
        assert set(part) == {"before kernel", "kernel", "after kernel"} and all(v > 0 for v in part.values())
    assert stub["kernel"] < real["kernel"]  # the stub hands back precomputed outputs
    pauses = out["four small torch ops after a pause (us)"]
    assert set(pauses) == {"busy", "sleep"} and all(len(row) == 4 for row in pauses.values())
    assert json.loads((tmp_path / "w.json").read_text())["method"] == "ista"
    assert "stub kernel" in capsys.readouterr().out


def test_split_restores_the_solver_when_a_solve_fails(monkeypatch):
    mod = _module()
    plans = solver._PLANS

    def boom(*a, **k):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(solver, "_run_plan", boom)
    A, B = torch.randn(2, 3, 8), torch.randn(2, 8, 3)
    with pytest.raises(RuntimeError, match="kernel failed"):
        mod.split_public(A, B, "bcd", 1, stub=True)
    assert solver._PLANS is plans


def test_refuses_an_unknown_model():
    with pytest.raises(SystemExit):
        _module().main(["--model", "gpt-17"])
