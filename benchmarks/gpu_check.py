"""The GPU check: build the CUDA extension, test the cuda and triton backends, benchmark, profile.

    make gpu-check                      # = python3 benchmarks/gpu_check.py
    python3 benchmarks/gpu_check.py --dry-run     # on any machine: the plan, and every part that runs without a GPU

Made for a fresh GPU machine with torch (CUDA build), triton, nvcc, pytest,
pytest-benchmark and hypothesis, and no package registry: it installs nothing and needs
nothing of requirements/ beyond those.  It takes about 8 minutes on an H100/H200. Each step
has its own time limit, and a step that fails or runs out of time does not stop the next.
Steps:

1. build     ``setup.py build_ext --inplace`` with TROPFAST_BUILD_NATIVE=1, TROPFAST_BUILD_CUDA=1,
             for the device's own compute capability only (TROPFAST_CUDA_ARCHS)
2. tests     tests/backends, test_ops, test_functional, test_solver with the cuda and triton
             backends live (every op and both whole-solve ops against the oracle, fp32/fp64,
             ragged lists, tol, target_keep)
3. bench     benchmarks/test_bench_solve.py (24x768x64, 6x384x24, 32x4096x64; T = 1, 100,
             1000; cuda, triton, torch on cuda, torch.compile on cuda), the T-scaling of the
             paths, each op against a clone of its inputs: one JSON per suite
4. profile   ncu on the whole-solve kernels (gpu_profile.py): DRAM throughput and SM
             throughput as a percentage of the device's peak, and duration
5. report    report.py over every JSON (ratios against the targets), summary.json

Results land in benchmarks/results/gpu/<device>/ (and in $OUT too, when set).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# Seconds per step: they add up to 8 minutes, leaving room for a rerun in a 15-minute allowance.
BUDGET = {"build": 200, "tests": 100, "bench_solve": 90, "bench_paths": 30, "bench_ops": 20, "profile": 30}
TESTS = ["tests/backends", "tests/test_ops.py", "tests/test_functional.py", "tests/test_solver.py"]
BENCHES = {
    "bench_solve": ["benchmarks/test_bench_solve.py"],
    "bench_paths": ["benchmarks/test_bench_sorted.py::test_public_paths"],
    "bench_ops": ["benchmarks/test_bench_ops.py::test_op_vs_clone"],
}
NCU_METRICS = [
    "gpu__time_duration.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
]
NCU_KERNELS = "regex:solve_kernel|sorted_state_kernel|_solve_kernel|_bcd_sorted_kernel"
NEEDS = ["torch", "pytest", "pytest_benchmark", "hypothesis", "numpy", "safetensors", "tqdm"]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def run_step(name: str, cmd: list[str], out_dir: str, env: dict | None = None, dry: bool = False) -> dict:
    """Run one step under its time limit; its output goes to <out>/<name>.log."""
    rec = {"step": name, "command": " ".join(cmd), "limit_s": BUDGET.get(name)}
    if dry:
        rec["status"] = "planned"
        print(f"[plan] {name} (<= {BUDGET.get(name)} s): {' '.join(cmd)}")
        return rec
    t0 = time.time()
    log = os.path.join(out_dir, f"{name}.log")
    with open(log, "w") as f:
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env or os.environ.copy(), stdout=f, stderr=subprocess.STDOUT,
                               timeout=BUDGET.get(name))
            rec["status"] = "ok" if p.returncode == 0 else f"failed (exit {p.returncode})"
        except subprocess.TimeoutExpired:
            rec["status"] = f"stopped at its limit ({BUDGET.get(name)} s)"
    rec["seconds"] = round(time.time() - t0, 1)
    with open(log) as f:
        rec["tail"] = f.read()[-1500:]
    print(f"[{rec['status']}] {name} in {rec['seconds']} s; log: {os.path.relpath(log, ROOT)}", flush=True)
    return rec


def device_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001 - any import failure is worth recording
        info["triton"] = f"not importable ({exc})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}{p.minor}",
                    multiprocessors=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    else:
        info["device"] = "none (no CUDA device visible)"
    return info


def plan(out_dir: str, cap: str, dry: bool) -> list[tuple[str, list[str], dict]]:
    env = dict(os.environ, TROPFAST_BUILD_NATIVE="1", TROPFAST_BUILD_CUDA="1", TROPFAST_CUDA_ARCHS=cap,
               MAX_JOBS=str(os.cpu_count() or 4), PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    # the GPU entries only: the CPU ones are measured on the CPU machine
    env.update(TROPFAST_BENCH_BACKENDS="cuda,triton", TROPFAST_BENCH_WHERE="cuda")
    steps = [("build", [PY, "setup.py", "build_ext", "--inplace"], env)]
    xdist = ["-n", "8"] if importlib.util.find_spec("xdist") else []
    steps.append(("tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *xdist, *TESTS], env))
    for name, targets in BENCHES.items():
        js = os.path.join(out_dir, f"{name}.json")
        steps.append((name, [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *targets, "--benchmark-only",
                             f"--benchmark-json={js}"], env))
    prof = [PY, "benchmarks/gpu_profile.py", "--json", os.path.join(out_dir, "profile_timings.json")]
    ncu = shutil.which("ncu")
    if ncu or dry:
        prof = [ncu or "ncu", "--target-processes", "all", "--kernel-name", NCU_KERNELS, "--metrics",
                ",".join(NCU_METRICS), "--csv", "--log-file", os.path.join(out_dir, "ncu.csv"), *prof]
    steps.append(("profile", prof, env))
    return steps


def report(out_dir: str, info: dict, records: list[dict]) -> None:
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from report import ratios, rows

    table = []
    for js in sorted(glob.glob(os.path.join(out_dir, "bench_*.json"))):
        table += rows(js)
    found = ratios(table)
    with open(os.path.join(out_dir, "ratios.json"), "w") as f:
        json.dump(found, f, indent=1)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"device": info, "steps": records, "ratios": found}, f, indent=1)
    for q in found:
        print(f"{q['ratio'][:90]:90s} {q['value']:9.3f}  {q['target']}{'' if q['met'] else '  (missed)'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan and run what needs no GPU")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/gpu/<device>)")
    args = ap.parse_args(argv)
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        print(f"gpu-check: missing Python packages: {', '.join(missing)} (carry them as wheels)", file=sys.stderr)
        return 2
    info = device_info()
    gpu = info["device"].startswith("none") is False
    if not gpu and not args.dry_run:
        print("gpu-check: no CUDA device is visible; use --dry-run to check the plan on this machine", file=sys.stderr)
        return 2
    if args.out:
        out_dir = args.out
    elif args.dry_run:
        import tempfile

        out_dir = tempfile.mkdtemp(prefix="tropfast-gpu-check-")
    else:
        out_dir = os.path.join(ROOT, "benchmarks", "results", "gpu", slug(info["device"]))
    os.makedirs(out_dir, exist_ok=True)
    print(json.dumps(info))
    records = []
    for name, cmd, env in plan(out_dir, info.get("capability", "90"), args.dry_run):
        records.append(run_step(name, cmd, out_dir, env, dry=args.dry_run))
    if args.dry_run:
        # what runs without a GPU: the suites collect, the profile driver runs on CPU tensors
        collect = subprocess.run([PY, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *TESTS,
                                  *sum(BENCHES.values(), [])], cwd=ROOT, capture_output=True, text=True)
        print(f"[dry-run] test and benchmark selections collect: exit {collect.returncode}")
        smoke = subprocess.run([PY, "benchmarks/gpu_profile.py", "--device", "cpu", "--backends", "torch", "--size", "2,4,16"],
                               cwd=ROOT, capture_output=True, text=True)
        print(f"[dry-run] profile driver on CPU: exit {smoke.returncode}")
        return 0 if collect.returncode == 0 and smoke.returncode == 0 else 1
    report(out_dir, info, records)
    if os.environ.get("OUT"):
        shutil.copytree(out_dir, os.path.join(os.environ["OUT"], os.path.basename(out_dir)), dirs_exist_ok=True)
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
