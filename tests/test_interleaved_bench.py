"""benchmarks/interleaved.py: the alternating timer runs, and its ratios are those of its medians."""
from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    spec = importlib.util.spec_from_file_location("interleaved", os.path.join(ROOT, "benchmarks", "interleaved.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("method", ["ista", "bcd"])
def test_interleaved_ratios_come_from_the_medians(method, capsys):
    out = _module().main(["--model", "minilm-l6", "--method", method, "--steps", "2", "--rounds", "2", "--repeat", "1"])
    med = out["median_ms"]
    assert set(med) == {"eager loop", "public", "public (default path)", "raw"} and all(v > 0 for v in med.values())
    assert out["eager / public"] == med["eager loop"] / med["public"]
    assert out["public / raw"] == med["public"] / med["raw"]
    assert "eager / public" in capsys.readouterr().out


def test_interleaved_refuses_an_unknown_model():
    with pytest.raises(SystemExit):
        _module().main(["--model", "gpt-17"])
