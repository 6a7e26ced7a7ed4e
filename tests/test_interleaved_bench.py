"""benchmarks/interleaved.py: the alternating timer runs, and its ratios are those of its medians."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

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


def test_interleaved_threads_and_compiled_loop_leave_the_thread_count_as_it_was(capsys):
    before = torch.get_num_threads()
    out = _module().main(
        ["--method", "ista", "--steps", "2", "--rounds", "1", "--repeat", "1", "--threads", "2", "--compiled"]
    )
    assert torch.get_num_threads() == before
    assert out["threads"] == 2 and out["clock"] == "perf_counter"
    med = out["median_ms"]
    assert med["compiled loop"] > 0
    assert out["compiled / public"] == med["compiled loop"] / med["public"]
    assert out["compiled / public (default path)"] == med["compiled loop"] / med["public (default path)"]
    assert "compiled / public" in capsys.readouterr().out


def test_interleaved_one_thread_counts_cpu_time():
    out = _module().main(["--method", "bcd", "--steps", "2", "--rounds", "1", "--repeat", "1"])
    assert out["threads"] == 1 and out["clock"] == "process_time" and "compiled loop" not in out["median_ms"]


def test_interleaved_refuses_zero_threads():
    with pytest.raises(SystemExit):
        _module().main(["--threads", "0"])
