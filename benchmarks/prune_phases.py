"""Where ``tropfast.prune`` spends its time: the phases of ``report.timings``, in CPU time.

    python benchmarks/prune_phases.py --out benchmarks/results/prune-phases-cpu.json

The models of ``test_bench_prune.py``, magnitude score, global and layer allocation, one
torch thread, best of 5 per phase.  The phase clock of ``tropfast.pruning.apply`` is made
``time.process_time`` here, so that other work on the machine does not count; ``scores_s``
is timed inside the score module and stays wall-clock.  Phases: ``check_s`` (argument and
finite checks: one float64 sum per weight tensor), ``scores_s``, ``allocate_s`` (the O(n)
selection), ``snapshot_s`` (one copy of each weight written in place), ``write_s`` (one
``masked_fill_`` per weight and the masks attached).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import types

import torch

ROUNDS = 5


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the phases as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from test_bench_prune import MODELS, _base  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

    import tropfast
    from tropfast.pruning import apply as apply_mod

    apply_mod.time = types.SimpleNamespace(perf_counter=time.process_time)
    out = {"timer": "process_time", "torch_threads": 1, "rounds": ROUNDS, "torch": torch.__version__, "runs": []}
    for name in MODELS:
        for allocation in ("global", "layer"):
            reps = [
                tropfast.prune(copy.deepcopy(_base(name)), 0.3, "magnitude", allocation, pattern="*.adapter")
                for _ in range(ROUNDS)
            ]
            phases = {k: min(r.timings[k] for r in reps) for k in reps[0].timings}
            phases["total_s"] = min(r.time_s for r in reps)
            out["runs"].append({"model": name, "score": "magnitude", "allocation": allocation, **phases})
            print(name, allocation, {k: f"{v * 1e3:.1f} ms" for k, v in phases.items()})
    if args.out:
        from tropfast.pruning.export import atomic_write_text

        atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
