"""benchmarks/fleet/run.py: the peak RSS it reports is the pruning process's own."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    spec = importlib.util.spec_from_file_location("fleet_run", os.path.join(ROOT, "benchmarks", "fleet", "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM is read from /proc")
def test_peak_rss_is_the_childs_not_the_parents():
    """A child started by fork or vfork inherits the parent's peak in getrusage's ru_maxrss;
    the wrapper reports its own memory map's high-water mark instead."""
    held = torch.ones(200 * 2**20, dtype=torch.float32)  # 800 MiB resident in this process
    mod = _module()
    r = subprocess.run(
        [sys.executable, "-c", mod._WRAP, "1", "backends"],
        env=mod._env(),
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(x for x in r.stdout.splitlines() if x.startswith("@@BENCH@@"))
    got = json.loads(line[9:])
    assert got["rc"] == 0
    # the child imports torch (a few hundred MB at most); the parent holds more than 800 MB
    assert 0 < got["maxrss_kb"] < 700 * 1024, got
    assert float(held[-1]) == 1.0
