"""benchmarks/bench_common.py: how many calls make a round."""
from __future__ import annotations

import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_common", os.path.join(ROOT, "benchmarks", "bench_common.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))


def _clocked(monkeypatch, mod, durations):
    """A function whose k-th call takes durations[k] seconds on a fake perf_counter."""
    now = [0.0]
    calls = []
    monkeypatch.setattr(mod.time, "perf_counter", lambda: now[0])

    def fn():
        now[0] += durations[min(len(calls), len(durations) - 1)]
        calls.append(1)

    return fn, calls


def test_a_round_is_sized_from_several_warm_calls_not_one(monkeypatch):
    mod = _module()
    # warm-up 9 ms (cold), then one slow call of 2 ms among 1 ms calls: the mean of the
    # probes decides, so an outlier does not halve the round
    fn, calls = _clocked(monkeypatch, mod, [9e-3, 2e-3, 1e-3, 1e-3, 1e-3, 1e-3])
    assert mod.calls_per_round(fn, target_s=5e-3) == 5 and len(calls) == 2 + 4
    fn, calls = _clocked(monkeypatch, mod, [1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])
    assert mod.calls_per_round(fn, target_s=5e-3, most=3) == 3


def test_a_long_call_is_timed_once_and_makes_a_round_alone(monkeypatch):
    mod = _module()
    fn, calls = _clocked(monkeypatch, mod, [0.3, 0.2])
    assert mod.calls_per_round(fn, target_s=5e-3) == 1 and len(calls) == 2


def test_real_calls_give_a_count_in_range():
    mod = _module()
    n = mod.calls_per_round(lambda: time.sleep(1e-3), target_s=5e-3)
    assert 1 <= n <= 5
