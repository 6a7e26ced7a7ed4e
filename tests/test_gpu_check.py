"""The prepared GPU check (benchmarks/gpu_check.py) and the ratio report, tested without a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_check  # noqa: E402
import report  # noqa: E402

# What the lent GPU machine has (its image's package list): the check may import nothing else.
GPU_MACHINE_PACKAGES = {"torch", "triton", "pytest", "pytest_benchmark", "hypothesis", "numpy", "safetensors", "tqdm",
                        "xdist", "pybind11", "ninja", "setuptools"}


def test_dry_run_plans_every_step_and_runs_the_cpu_parts(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    planned = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("[plan]")]
    assert planned == ["build", "tests", "bench_solve", "bench_paths", "bench_ops", "profile"]
    assert "selections collect: exit 0" in out.stdout and "profile driver on CPU: exit 0" in out.stdout
    assert "TROPFAST_CUDA_ARCHS" not in out.stdout  # the architecture travels in the environment
    assert not os.path.exists(os.path.join(ROOT, "benchmarks", "results", "gpu", "dry-run"))


def test_the_plan_fits_the_allowance_and_needs_only_what_the_machine_has():
    assert sum(gpu_check.BUDGET.values()) <= 8 * 60
    assert set(gpu_check.NEEDS) <= GPU_MACHINE_PACKAGES
    steps = gpu_check.plan("/tmp/x", "90", dry=True)
    build_env = steps[0][2]
    assert build_env["TROPFAST_BUILD_CUDA"] == "1" and build_env["TROPFAST_CUDA_ARCHS"] == "90"
    assert "TRITON_INTERPRET" not in build_env and build_env["TROPFAST_BENCH_BACKENDS"] == "cuda,triton"


def test_ratios_from_a_benchmark_json(tmp_path):
    def bench(group, median, **info):
        return {"group": group, "name": info.get("impl", "x"), "stats": {"median": median, "iqr": 0.0, "rounds": 3},
                "extra_info": info}

    g = "roberta-base 24x768x64 ista T=100"
    data = {"benchmarks": [
        bench(g, 0.022, model="m", impl="public solve", backend="cpu"),
        bench(g, 0.020, model="m", impl="raw solve_fused", backend="cpu"),
        bench(g, 0.66, model="m", impl="eager loop", backend="torch"),
        bench(g, 0.10, model="m", impl="compiled loop", backend="torch.compile"),
        bench(g, 0.011, model="m", impl="public solve (default path)", backend="cpu"),
        bench("bcd 10", 0.010, impl="public solve", path="auto", T=10, lam=1e-3, method="bcd", backend="cpu"),
        bench("bcd 1000", 0.025, impl="public solve", path="auto", T=1000, lam=1e-3, method="bcd", backend="cpu"),
        bench("hsd_grad m", 0.003, op="hsd_grad", model="m", backend="cpu"),
        bench("hsd_grad m", 0.001, op="hsd_grad", model="m", backend="clone"),
        bench("hsd_loss m", 0.004, op="hsd_loss", model="m", backend="cpu"),
        bench("hsd_loss m", 0.001, op="hsd_loss", model="m", backend="clone"),
    ]}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    found = {q["ratio"]: (round(q["value"], 3), q["met"]) for q in report.ratios(report.rows(str(path)))}
    assert found[f"{g} [cpu] public / raw"] == (1.1, True)
    assert found[f"{g} [cpu] eager loop / public"] == (30.0, True)
    assert found[f"{g} [cpu] compiled loop / public"] == (4.545, False)
    assert found[f"{g} [cpu] eager loop / public (default path)"] == (60.0, True)
    assert found[f"{g} [cpu] compiled loop / public (default path)"] == (9.091, True)
    assert found["auto bcd lam=0.001 [cpu] T=1000 / T=10"] == (2.5, False)
    assert found["hsd_grad m [cpu] / clone of its inputs"] == (3.0, True)
    assert found["hsd_loss / hsd_grad m [cpu]"] == (1.333, False)
