"""prune_saved at scale: throughput against a plain copy and the naive route, memory, ranks.

    python benchmarks/fleet/run.py [--count 500] [--tropical-count 100] [--naive-count 20]

Writes benchmarks/results/fleet/fleet-<host>.json and .md.  Everything is measured in one
run, on the same generated files, as ratios:

* copy: safetensors ``load_file`` + ``save_file`` of every adapter file (and its config):
  the I/O limit; timed --repeats times, alternating with the magnitude run, and the two
  medians compared (the machine's speed drifts between minutes);
* ``tropfast prune-saved`` with magnitude (all --count adapters) and tropical (the first
  --tropical-count) at keep 0.3, layer allocation; adapters/s and MB/s (input + output file
  bytes over the run's time), as ratios to the copy;
* the naive route per adapter: build the backbone (a RoBERTa-base from its config), stock
  ``load_adapter``, ``tropfast.prune``, stock ``save_adapter``: on the first --naive-count
  adapters, per-adapter rates (and the masks compared with prune-saved's);
* peak RSS of the magnitude run on 50 and on --count sources;
* 1 process against ``torchrun --nproc_per_node 2`` (gloo), parallel efficiency;
* an LLM-style sharded checkpoint (32 layers, hidden 4096, r = 64, bf16, backbone tensors
  present): global allocation, 1 process against 2 ranks, time and identical outputs.

Every process computes with one torch thread (torchrun's default per rank), so that
"1 process" and "2 processes" have the same per-process resources; tropical also runs once
as the CLI runs by default, with torch's default threads (one per core), against the copy.  The generated files
live under --work (default: a temporary folder) and are deleted at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "fleet")

# The peak RSS is this process's own: VmHWM, the high-water mark of the memory map that exec
# created.  getrusage's ru_maxrss also keeps the peak of the map exec replaced, which for a
# child started by fork or vfork is the parent's: the benchmark's own process, which
# generated the checkpoint (6 GB) or the fleet.
_WRAP = r"""
import json, resource, sys
import torch
if int(sys.argv[1]):
    torch.set_num_threads(int(sys.argv[1]))
from tropfast.cli import main
rc = main(sys.argv[2:])
try:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("@@BENCH@@" + json.dumps({"rc": rc, "maxrss_kb": kb}))
"""


def _env(one_thread: bool = True) -> dict:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([ROOT] + [p for p in sys.path if p]),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    if not one_thread:
        del env["OMP_NUM_THREADS"]
    return env


def _tree_bytes(paths: list[str]) -> int:
    n = 0
    for p in paths:
        if os.path.isfile(p):
            n += os.path.getsize(p)
        for r, _, fs in os.walk(p):
            n += sum(os.path.getsize(os.path.join(r, f)) for f in fs)
    return n


def _hashes(d: str) -> dict:
    out = {}
    for r, _, fs in os.walk(d):
        for f in fs:
            if f == "summary.json":
                continue
            p = os.path.join(r, f)
            h = hashlib.sha1()
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            out[os.path.relpath(p, d)] = h.hexdigest()
    return out


def prune_cli(sources: list[str], out: str, *args: str, ranks: int = 1, log=None, one_thread: bool = True) -> dict:
    """Run `tropfast prune-saved`; returns the summary's totals, the wall time and (1 process) the peak RSS.

    one_thread=False (1 process): torch's default threads, as the CLI runs when not told."""
    shutil.rmtree(out, ignore_errors=True)
    cli = ["prune-saved", *sources, "--out", out, "--no-progress", "--rows", "3", *args]
    if ranks == 1:
        cmd = [sys.executable, "-c", _WRAP, "1" if one_thread else "0", *cli]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(ranks),
            "-m",
            "tropfast",
            *cli,
            "--threads",
            "1",
        ]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=_env(one_thread), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])} ... failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        summ = json.load(f)
    res = {"time_s": summ["totals"]["time_s"], "wall_s": wall, "totals": summ["totals"], "ranks": ranks}
    if ranks == 1:
        res["threads"] = 1 if one_thread else "default"
    for line in r.stdout.splitlines():
        if line.startswith("@@BENCH@@"):
            res["peak_rss_mb"] = json.loads(line[9:])["maxrss_kb"] / 1024
    stages: dict = {}
    for s in summ["sources"]:
        for k, v in (s.get("stages_s") or {}).items():
            stages[k] = stages.get(k, 0.0) + v
    res["stage_s"] = stages
    if log:
        log(
            f"  prune-saved {' '.join(args)} ranks={ranks}: {res['time_s']:.1f} s, "
            + (f"peak RSS {res['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in res else "")
        )
    return res


def copy_fleet(sources: list[str], out: str) -> float:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    for s in sources:
        d = os.path.join(out, os.path.basename(s))
        os.makedirs(d)
        w = os.path.join(s, "adapter.safetensors")
        with safe_open(w, framework="pt") as f:
            meta = f.metadata()
        save_file(load_file(w), os.path.join(d, "adapter.safetensors"), metadata=meta)
        shutil.copyfile(os.path.join(s, "adapter_config.json"), os.path.join(d, "adapter_config.json"))
    return time.perf_counter() - t0


def naive(sources: list[str], out: str, score: str, keep: float) -> tuple[float, list[str]]:
    """Per adapter: build the backbone, load_adapter, tropfast.prune, save_adapter."""
    import logging
    import warnings

    import torch
    from adapters import AutoAdapterModel
    from transformers import RobertaConfig

    import tropfast

    warnings.filterwarnings("ignore")
    logging.getLogger("adapters").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    outs = []
    t0 = time.perf_counter()
    for s in sources:
        torch.manual_seed(0)
        model = AutoAdapterModel.from_config(
            RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1)
        )
        name = model.load_adapter(s, use_safetensors=True)
        tropfast.prune(model, keep=keep, score=score, allocation="layer", adapter=name, keep_masks=False)
        d = os.path.join(out, os.path.basename(s))
        os.makedirs(d)
        model.save_adapter(d, name, use_safetensors=True)
        outs.append(d)
        del model
    return time.perf_counter() - t0, outs


def same_weights(a_dirs: list[str], b_root: str) -> bool:
    from safetensors.torch import load_file

    for a in a_dirs:
        wa = load_file(os.path.join(a, "adapter.safetensors"))
        wb = load_file(os.path.join(b_root, os.path.basename(a), "adapter.safetensors"))
        if wa.keys() != wb.keys() or any(not (wa[k] == wb[k]).all() for k in wa):
            return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--small", type=int, default=50, help="the smaller fleet of the peak-RSS comparison")
    p.add_argument("--tropical-count", type=int, default=100)
    p.add_argument("--naive-count", type=int, default=20)
    p.add_argument("--keep", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=3, help="copy / magnitude alternations (medians)")
    p.add_argument("--work", default=None, help="folder for the generated files (default: a temporary folder)")
    p.add_argument("--keep-data", action="store_true", help="do not delete the generated files")
    p.add_argument("--skip-llm", action="store_true")
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    sys.path.insert(0, HERE)
    from generate import make_fleet, make_llm

    work = a.work or tempfile.mkdtemp(prefix="tropfast-fleet-bench-")
    os.makedirs(work, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < 12 * 2**30:
        raise SystemExit(f"{work}: {free / 2**30:.1f} GiB free; the benchmark needs about 10 GiB")
    res: dict = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
        "settings": {
            "keep": a.keep,
            "allocation": "layer",
            "count": a.count,
            "small": a.small,
            "tropical_count": a.tropical_count,
            "naive_count": a.naive_count,
            "repeats": a.repeats,
            "threads_per_process": 1,
        },
    }
    import torch

    res["torch"] = torch.__version__

    def log(msg):
        print(msg, flush=True)

    try:
        t0 = time.perf_counter()
        fleet_dir = os.path.join(work, "fleet")
        log(f"generating {a.count} RoBERTa-base-sized adapters in {fleet_dir}")
        torch.set_num_threads(1)
        srcs = make_fleet(fleet_dir, a.count, seed=0)
        res["generate_s"] = time.perf_counter() - t0
        in_bytes = _tree_bytes(srcs)
        res["fleet_bytes"] = in_bytes
        def at(name):
            return os.path.join(work, name)


        # --- the I/O limit (copy) and magnitude on all, 1 process, alternately: --repeats of
        # each, so that both see the same machine; the medians give the ratio
        copies, mags1 = [], []
        for _ in range(a.repeats):
            tc = copy_fleet(srcs, at("copy"))
            cb = _tree_bytes([at("copy")])
            shutil.rmtree(at("copy"))
            copies.append(tc)
            log(f"  copy: {len(srcs) / tc:.1f} adapters/s")
            mags1.append(prune_cli([fleet_dir], at("mag1"), "--keep", str(a.keep), "--score", "magnitude", log=log))
        tc = statistics.median(copies)
        res["copy"] = {
            "time_s": tc,
            "adapters_per_s": len(srcs) / tc,
            "MB_per_s": (in_bytes + cb) / 1e6 / tc,
            "times_s": copies,
        }
        log(f"  copy: median {res['copy']['adapters_per_s']:.1f} adapters/s, {res['copy']['MB_per_s']:.0f} MB/s")

        def rates(r, srcs_, out):
            ob = _tree_bytes([out])
            ib = _tree_bytes(srcs_)
            r["adapters_per_s"] = len(srcs_) / r["time_s"]
            r["MB_per_s"] = (ib + ob) / 1e6 / r["time_s"]
            r["ratio_to_copy"] = r["adapters_per_s"] / res["copy"]["adapters_per_s"]
            return r

        # the median magnitude run (its stages and RSS), the others' times kept
        mag1 = sorted(mags1, key=lambda x: x["time_s"])[len(mags1) // 2]
        mag1 = rates(dict(mag1, times_s=[x["time_s"] for x in mags1]), srcs, at("mag1"))
        # --- peak RSS against the small fleet
        small = srcs[: a.small]
        mags = prune_cli(small, at("mag_small"), "--keep", str(a.keep), "--score", "magnitude", log=log)
        shutil.rmtree(at("mag_small"))
        mag2 = prune_cli([fleet_dir], at("mag2"), "--keep", str(a.keep), "--score", "magnitude", ranks=2, log=log)
        mag2 = rates(mag2, srcs, at("mag2"))
        same_mag = _hashes(at("mag1")) == _hashes(at("mag2"))
        shutil.rmtree(at("mag2"))
        res["magnitude"] = {
            "one_process": mag1,
            "two_processes": mag2,
            "identical_outputs": same_mag,
            "speedup": mag1["time_s"] / mag2["time_s"],
            "efficiency": mag1["time_s"] / mag2["time_s"] / 2,
        }
        res["peak_rss"] = {
            "sources_small": a.small,
            "sources_large": a.count,
            "mb_small": mags["peak_rss_mb"],
            "mb_large": mag1["peak_rss_mb"],
            "ratio": mag1["peak_rss_mb"] / mags["peak_rss_mb"],
        }
        log(
            f"  magnitude {mag1['adapters_per_s']:.2f} adapters/s ({mag1['ratio_to_copy']:.3f}x copy); "
            f"RSS {a.count} vs {a.small}: {res['peak_rss']['ratio']:.2f}x; 2 ranks x{res['magnitude']['speedup']:.2f}"
        )

        # --- tropical on a subset, 1 and 2 processes
        tsrcs = srcs[: a.tropical_count]
        tr1 = rates(
            prune_cli(tsrcs, at("trop1"), "--keep", str(a.keep), "--score", "tropical", log=log), tsrcs, at("trop1")
        )
        tr2 = rates(
            prune_cli(tsrcs, at("trop2"), "--keep", str(a.keep), "--score", "tropical", ranks=2, log=log),
            tsrcs,
            at("trop2"),
        )
        trd = rates(
            prune_cli(tsrcs, at("tropd"), "--keep", str(a.keep), "--score", "tropical", log=log, one_thread=False),
            tsrcs,
            at("tropd"),
        )
        same_trop = _hashes(at("trop1")) == _hashes(at("trop2")) == _hashes(at("tropd"))
        shutil.rmtree(at("trop2"))
        shutil.rmtree(at("tropd"))
        res["tropical"] = {
            "one_process": tr1,
            "two_processes": tr2,
            "default_threads": trd,
            "identical_outputs": same_trop,
            "speedup": tr1["time_s"] / tr2["time_s"],
            "efficiency": tr1["time_s"] / tr2["time_s"] / 2,
        }
        log(
            f"  tropical {tr1['adapters_per_s']:.3f} adapters/s ({tr1['ratio_to_copy']:.4f}x copy), default threads "
            f"{trd['adapters_per_s']:.3f} ({trd['ratio_to_copy']:.4f}x); 2 ranks x{res['tropical']['speedup']:.2f}"
        )

        # --- the naive route on a subset, per adapter
        nsrcs = srcs[: a.naive_count]
        res["naive"] = {}
        for score, mine in (("magnitude", os.path.join(at("mag1"), "fleet")), ("tropical", at("trop1"))):
            tn, outs = naive(nsrcs, at(f"naive-{score}"), score, a.keep)
            ref = res["magnitude" if score == "magnitude" else "tropical"]["one_process"]
            res["naive"][score] = {
                "adapters": len(nsrcs),
                "time_s": tn,
                "adapters_per_s": len(nsrcs) / tn,
                "prune_saved_adapters_per_s": ref["adapters_per_s"],
                "speedup": ref["adapters_per_s"] / (len(nsrcs) / tn),
                "same_weights_as_prune_saved": same_weights(outs, mine),
            }
            shutil.rmtree(at(f"naive-{score}"))
            log(f"  naive {score}: {len(nsrcs) / tn:.3f} adapters/s; prune-saved x{res['naive'][score]['speedup']:.1f}")
        shutil.rmtree(at("mag1"))
        shutil.rmtree(at("trop1"))

        # --- one LLM-style checkpoint, global allocation, 1 vs 2 ranks
        if not a.skip_llm:
            llm = make_llm(at("llm"), seed=0)
            res["llm"] = {"layers": 32, "hidden": 4096, "r": 64, "dtype": "bfloat16", "bytes": _tree_bytes([llm])}
            for score in ("magnitude", "tropical"):
                args = ("--keep", str(a.keep), "--score", score, "--allocation", "global")
                one = prune_cli([llm], at("llm1"), *args, log=log)
                two = prune_cli([llm], at("llm2"), *args, ranks=2, log=log)
                res["llm"][score] = {
                    "one_process": one,
                    "two_ranks": two,
                    "speedup": one["time_s"] / two["time_s"],
                    "identical_outputs": _hashes(at("llm1")) == _hashes(at("llm2")),
                }
                shutil.rmtree(at("llm1"))
                shutil.rmtree(at("llm2"))
                log(
                    f"  llm {score}: 1 process {one['time_s']:.1f} s, 2 ranks {two['time_s']:.1f} s, "
                    f"identical {res['llm'][score]['identical_outputs']}"
                )
        res["load_average_end"] = os.getloadavg()
        res["total_s"] = time.perf_counter() - t0
    finally:
        if not a.keep_data:
            shutil.rmtree(work, ignore_errors=True)
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, f"fleet-{platform.node()}")
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(report(res))
    print(report(res))
    return 0


def report(r: dict) -> str:
    c = r["copy"]
    n_rep = r["settings"].get("repeats", 1)
    rep = f", median of {n_rep} alternating runs" if n_rep > 1 else ""
    m1, t1 = r["magnitude"]["one_process"], r["tropical"]["one_process"]
    lines = [
        f"# prune_saved benchmark ({r['host']}, {r['cpus']} CPUs, torch {r['torch']}, 1 torch thread per process unless said)",
        "",
        (
            f"Fleet: {r['settings']['count']} RoBERTa-base-sized adapters (12 layers, d 768, r 48, adapter.safetensors), "
            f"keep {r['settings']['keep']}, layer allocation. Load average at start {r['load_average_start'][0]:.1f}, "
            f"at end {r.get('load_average_end', [0])[0]:.1f} (shared machine)."
        ),
        "",
        "| run | adapters | time s | adapters/s | MB/s | vs copy |",
        "|---|---:|---:|---:|---:|---:|",
        (
            f"| copy (safetensors load_file + save_file){rep} | {r['settings']['count']} | {c['time_s']:.1f} | "
            f"{c['adapters_per_s']:.1f} | {c['MB_per_s']:.0f} | 1 |"
        ),
        f"| prune-saved magnitude{rep} | {r['settings']['count']} | {m1['time_s']:.1f} | {m1['adapters_per_s']:.2f} | {m1['MB_per_s']:.1f} | {m1['ratio_to_copy']:.3f}x |",
        f"| prune-saved tropical | {r['settings']['tropical_count']} | {t1['time_s']:.1f} | {t1['adapters_per_s']:.3f} | {t1['MB_per_s']:.2f} | {t1['ratio_to_copy']:.4f}x |",
    ]
    td = r["tropical"].get("default_threads")
    if td:
        lines.append(
            f"| prune-saved tropical, torch's default threads ({r['cpus']}; the CLI without --threads) | "
            f"{r['settings']['tropical_count']} | {td['time_s']:.1f} | {td['adapters_per_s']:.3f} | {td['MB_per_s']:.2f} | "
            f"{td['ratio_to_copy']:.4f}x |"
        )
    for score, n in r["naive"].items():
        lines.append(
            f"| naive route {score} (backbone + load_adapter + prune + save_adapter) | {n['adapters']} | {n['time_s']:.1f} | "
            f"{n['adapters_per_s']:.3f} | - | prune-saved is {n['speedup']:.1f}x faster per adapter "
            f"(same weights: {n['same_weights_as_prune_saved']}) |"
        )
    lines += [
        "",
        "Time split of the prune-saved runs (seconds summed over sources; score is each source's share of its batch):",
        "",
        f"- magnitude: {', '.join(f'{k} {v:.1f}' for k, v in m1['stage_s'].items())}",
        f"- tropical: {', '.join(f'{k} {v:.1f}' for k, v in t1['stage_s'].items())}",
        "",
        (
            f"Peak RSS (magnitude, 1 process): {r['peak_rss']['sources_small']} sources {r['peak_rss']['mb_small']:.0f} MB, "
            f"{r['peak_rss']['sources_large']} sources {r['peak_rss']['mb_large']:.0f} MB: ratio {r['peak_rss']['ratio']:.2f}."
        ),
        "",
        "| 1 process vs torchrun 2 ranks (gloo) | 1 process s | 2 ranks s | speedup | parallel efficiency | identical outputs |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for score in ("magnitude", "tropical"):
        x = r[score]
        lines.append(
            f"| fleet {score} | {x['one_process']['time_s']:.1f} | {x['two_processes']['time_s']:.1f} | {x['speedup']:.2f} | "
            f"{x['efficiency']:.2f} | {x['identical_outputs']} |"
        )
    if "llm" in r:
        for score in ("magnitude", "tropical"):
            x = r["llm"][score]
            lines.append(
                f"| LLM checkpoint {score}, global allocation | {x['one_process']['time_s']:.1f} | {x['two_ranks']['time_s']:.1f} | "
                f"{x['speedup']:.2f} | {x['speedup'] / 2:.2f} | {x['identical_outputs']} |"
            )
        lines += [
            "",
            (
                f"LLM checkpoint: 32 layers, hidden 4096, r 64, bf16, {r['llm']['bytes'] / 1e6:.0f} MB with backbone tensors; "
                "2 ranks split its 64 adapters and find the global cut by all-reduced histograms; 1 process uses allocate."
            ),
        ]
        for score in ("magnitude", "tropical"):
            x = r["llm"][score]
            rss = x["one_process"].get("peak_rss_mb")
            lines.append(
                f"- {score}: 1 process stages {', '.join(f'{k} {v:.1f}' for k, v in x['one_process']['stage_s'].items())}"
                + (f"; peak RSS {rss:.0f} MB" if rss else "")
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
