"""Mutation testing of tropfast's Python modules with mutmut 3, one group of modules at a time.

    python benchmarks/mutation.py [--group NAME ...] [--max-children N] [--report-only]
                                  [--rerun-survivors | --mutant NAME ...]

Each group pairs the modules it mutates with the test files that cover them (``GROUPS``).
A group runs in its own scratch copy of the tree, ``.mutation/<group>/``, whose
pyproject.toml is this repository's with ``[tool.mutmut]`` narrowed to the group: mutmut's
stats run then maps every function to the tests of that subset that call it, and each
mutant runs only those tests.  Results stay in the scratch copy (a second run resumes and
only runs mutants without a result; delete the folder to start afresh).

What is written to benchmarks/results/mutation/:
    scores.json, scores.csv   per module: mutants, killed, timeouts, survivors, score
    survivors.json            every surviving mutant with its diff and, from notes.json,
                              why it is equivalent (or "UNEXPLAINED")
The README there is written by hand from these files.

Score = (killed + timeout) / (mutants - skipped - not checked).  A mutant that no test of
the subset reaches ("no tests") counts as a survivor; "not checked" are the mutants an
interrupted run has not reached yet (run again to resume; scores.json gives their number).  The runs set OMP_NUM_THREADS=1 (forked test
processes then never inherit an OpenMP pool; the machine is shared) and use the native
library as CI does.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / ".mutation"
RESULTS = ROOT / "benchmarks" / "results" / "mutation"
NOTES = RESULTS / "notes.json"
MUTMUT_VERSION = "3.8.1"


@dataclass(frozen=True)
class Group:
    modules: tuple[str, ...]  # paths of the mutated files, relative to the root
    tests: tuple[str, ...]  # test files (or node ids) whose tests may kill them


# Deselected in every group: torch.compile (tens of seconds per test, and compile workers
# are not fork-safe) and the SIGINT test (it signals its own process).
# test_benchmark_summary checks a script of benchmarks/, which the scratch copies do not hold
DESELECT = "not torch_compile and not interruptible and not compile_over and not test_benchmark_summary"

GROUPS: dict[str, Group] = {
    "solver": Group(
        ("tropfast/solver.py",),
        ("tests/test_solver.py", "tests/backends/test_contract.py", "tests/backends/test_registry.py"),
    ),
    "torch_backend": Group(
        (
            "tropfast/backends/torch/closed_form.py",
            "tropfast/backends/torch/dense.py",
            "tropfast/backends/torch/kernels.py",
        ),
        (
            "tests/test_functional.py",
            "tests/test_ops.py",
            "tests/test_solver.py",
            "tests/backends/test_contract.py",
            "tests/backends/test_native.py",
            "tests/backends/test_torch_sorted.py",
        ),
    ),
    "sorted": Group(
        ("tropfast/backends/torch/sorted.py",),
        ("tests/backends/test_torch_sorted.py", "tests/test_solver.py", "tests/backends/test_contract.py"),
    ),
    # every pruning module on its own, so that one can be run (and resumed) at a time
    "allocation": Group(
        ("tropfast/pruning/allocation.py",),
        ("tests/test_pruning_allocation.py", "tests/test_pruning_prune.py", "tests/test_placement_allocation.py"),
    ),
    "scores": Group(
        ("tropfast/pruning/scores.py",),
        (
            "tests/test_pruning_scores.py",
            "tests/test_pruning_prune.py",
            "tests/test_pruning_allocation.py",
            "tests/test_faults.py",
            "tests/test_placement_allocation.py",
        ),
    ),
    # export's helpers (destinations, atomic writes, folder swaps) serve the CLI, the fleet
    # writers and placement's install too: their tests reach code the export tests do not
    "export": Group(
        ("tropfast/pruning/export.py",),
        (
            "tests/test_pruning_export.py",
            "tests/test_pruning_export_io.py",
            "tests/test_cli.py",
            "tests/test_cli_contract.py",
            "tests/test_faults.py",
            "tests/test_placement_install.py",
        ),
    ),
    "apply": Group(
        ("tropfast/pruning/apply.py",),
        (
            "tests/test_pruning_prune.py",
            "tests/test_pruning_export.py",
            "tests/test_pruning_masks.py",
            "tests/test_faults.py",
            "tests/test_cli.py",
        ),
    ),
    "masks": Group(
        ("tropfast/pruning/masks.py",),
        ("tests/test_pruning_masks.py", "tests/test_pruning_prune.py", "tests/test_pruning_export.py"),
    ),
    "discovery": Group(
        ("tropfast/pruning/discovery.py",),
        (
            "tests/test_pruning_discovery.py",
            "tests/test_pruning_prune.py",
            "tests/test_pruning_export.py",
            "tests/test_faults.py",
        ),
    ),
}

KILLED = {"killed", "timeout", "segfault", "caught by type check"}


def _check_mutmut(python: str) -> None:
    """mutmut is a development tool, pinned in requirements/mutation.txt (``make mutation`` installs it)."""
    probe = subprocess.run([python, "-c", f"import mutmut, sys; sys.exit(mutmut.__version__ != {MUTMUT_VERSION!r})"])
    if probe.returncode != 0:
        sys.exit(
            f"mutmut {MUTMUT_VERSION} is not installed in {Path(python).parent.parent}: "
            "run `make mutation`, or `pip install -r requirements/mutation.txt`"
        )


def _toml_list(xs) -> str:
    return "[" + ", ".join(json.dumps(x) for x in xs) + "]"


def _pyproject(group: Group) -> str:
    """The repository's pyproject.toml with [tool.mutmut] replaced by the group's."""
    text = (ROOT / "pyproject.toml").read_text()
    text = re.sub(r"\n\[tool\.mutmut\]\n(?:(?!\n\[).)*", "\n", text, flags=re.S)
    section = "\n".join(
        [
            "[tool.mutmut]",
            'source_paths = ["tropfast"]',
            f"only_mutate = {_toml_list(group.modules)}",
            f"pytest_add_cli_args_test_selection = {_toml_list(group.tests)}",
            f"pytest_add_cli_args = {_toml_list(['-p', 'no:cacheprovider', '-m', 'not slow and not gpu', '-k', DESELECT])}",
            "timeout_multiplier = 5.0",
            "timeout_constant = 10.0",
            "",
        ]
    )
    return text.rstrip() + "\n\n" + section


def _prepare(name: str, group: Group) -> Path:
    """The scratch copy for ``group``: tropfast/ and tests/ refreshed, pyproject.toml narrowed.

    mutmut regenerates a mutated file when its source is newer than the copy in mutants/,
    so results of unchanged modules survive a refresh.
    """
    work = SCRATCH / name
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("tropfast", "tests"):
        dst = work / sub
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / sub, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (work / "pyproject.toml").write_text(_pyproject(group))
    return work


def _survivor_names(work: Path, group: Group) -> list[str]:
    """The mutants of an earlier run of the group that survived or that no test reached."""
    from mutmut.stats import status_by_exit_code

    names = []
    for module in group.modules:
        meta = work / "mutants" / (module + ".meta")
        if meta.exists():
            codes = json.loads(meta.read_text())["exit_code_by_key"]
            names += [k for k, c in sorted(codes.items()) if status_by_exit_code[c] in ("survived", "no tests")]
    return names


def run_group(
    name: str, group: Group, python: str, max_children: int, rerun_survivors: bool = False, only: list[str] | None = None
) -> bool:
    work = _prepare(name, group)
    names = _survivor_names(work, group) if rerun_survivors else []
    if only:  # named mutants of this group's modules
        prefixes = tuple(m[:-3].replace("/", ".") + ".x" for m in group.modules)
        names = [n for n in only if n.startswith(prefixes)]
        if not names:
            return True
    if rerun_survivors and not names:
        print(f"== {name}: no survivors to run again", flush=True)
        return True
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # mutmut puts mutants/ first; the tree itself must not be importable
    mutmut = [python, "-m", "mutmut"]
    # named mutants are run again even when they have a result (new tests get their stats first)
    cmd = ["nice", "-n", "10", *mutmut, "run", "--max-children", str(max_children), *names]
    print(f"== {name}: {' '.join(group.modules)}\n   tests: {' '.join(group.tests)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=work, env=env)
    print(f"== {name}: mutmut exited {proc.returncode} after {time.time() - t0:.0f} s", flush=True)
    return proc.returncode == 0


def _diff(work: Path, module: str, mutant: str) -> str:
    """The changed lines of a mutant ('-'/'+' lines of ``mutmut show``), read in this process."""
    from mutmut import _reset_globals
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    here = os.getcwd()
    os.chdir(work)
    try:
        _reset_globals()
        out = get_diff_for_mutant(mutant, path=module)
    finally:
        os.chdir(here)
    lines = [ln for ln in out.splitlines() if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    return "\n".join(ln.rstrip() for ln in lines)


def collect(names: list[str], python: str) -> tuple[list[dict], list[dict]]:
    """Per-module counts and the list of survivors of the groups that have results."""
    from mutmut.stats import status_by_exit_code

    notes = json.loads(NOTES.read_text()) if NOTES.exists() else {}
    rows, survivors = [], []
    for name in names:
        work = SCRATCH / name
        for module in GROUPS[name].modules:
            meta = work / "mutants" / (module + ".meta")
            if not meta.exists():
                continue
            codes = json.loads(meta.read_text())["exit_code_by_key"]
            counts: dict[str, int] = {}
            for key, code in sorted(codes.items()):
                status = status_by_exit_code[code]
                counts[status] = counts.get(status, 0) + 1
                if status in KILLED or status in ("skipped", "not checked"):
                    continue
                diff = _diff(work, module, key)
                note = notes.get(key, {})
                if note and note.get("diff") != diff:
                    note = {"reason": "UNEXPLAINED (the note was written for another diff)"}
                survivors.append(
                    {"group": name, "module": module, "mutant": key, "status": status, "diff": diff,
                     "reason": note.get("reason", "UNEXPLAINED")}
                )
            total = sum(counts.values())
            # skipped by mutmut, or not reached yet by an interrupted run: out of the score
            skipped = counts.get("skipped", 0)
            not_checked = counts.get("not checked", 0)
            killed = sum(v for k, v in counts.items() if k in KILLED)
            rows.append(
                {
                    "module": module,
                    "group": name,
                    "mutants": total,
                    "killed": killed,
                    "survived": counts.get("survived", 0),
                    "no_tests": counts.get("no tests", 0),
                    "timeout": counts.get("timeout", 0),
                    "not_checked": not_checked,
                    "other": total - killed - skipped - not_checked - counts.get("survived", 0) - counts.get("no tests", 0),
                    "score": round(killed / (total - skipped - not_checked), 4) if total > skipped + not_checked else None,
                }
            )
    return rows, survivors


def write(rows: list[dict], survivors: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    import torch  # noqa: E402  (versions for the record)

    head = {"mutmut": MUTMUT_VERSION, "torch": torch.__version__, "python": sys.version.split()[0], "deselected": DESELECT}
    old = json.loads((RESULTS / "scores.json").read_text()) if (RESULTS / "scores.json").exists() else {}
    by_module = {r["module"]: r for r in old.get("modules", [])}
    by_module.update({r["module"]: r for r in rows})  # groups not run this time keep their last result
    merged = sorted(by_module.values(), key=lambda r: r["module"])
    groups = {g: {"modules": list(GROUPS[g].modules), "tests": list(GROUPS[g].tests)} for g in GROUPS}
    (RESULTS / "scores.json").write_text(json.dumps({**head, "groups": groups, "modules": merged}, indent=2) + "\n")
    with open(RESULTS / "scores.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(merged[0]) if merged else ["module"])
        w.writeheader()
        w.writerows(merged)
    old_s = json.loads((RESULTS / "survivors.json").read_text()) if (RESULTS / "survivors.json").exists() else []
    ran = {r["module"] for r in rows}
    keep = [s for s in old_s if s["module"] not in ran] + survivors
    (RESULTS / "survivors.json").write_text(json.dumps(sorted(keep, key=lambda s: s["mutant"]), indent=2) + "\n")
    for r in merged:
        print(f"{r['module']:<45} {r['killed']:>4}/{r['mutants']:<4} killed  score {r['score']}")
    unexplained = [s["mutant"] for s in keep if s["reason"].startswith("UNEXPLAINED")]
    if unexplained:
        print(f"{len(unexplained)} survivors without a note in {NOTES.relative_to(ROOT)}: {', '.join(unexplained)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", action="append", choices=sorted(GROUPS), help="run only these groups (repeatable)")
    ap.add_argument("--max-children", type=int, default=1, help="mutants tested at once (default 1)")
    ap.add_argument("--report-only", action="store_true", help="only collect the results of earlier runs")
    ap.add_argument(
        "--rerun-survivors", action="store_true",
        help="run only the survivors of the last run again (after tests were added to kill them)",
    )
    ap.add_argument("--mutant", action="append", metavar="NAME", help="run only this mutant again (repeatable)")
    args = ap.parse_args(argv)
    python = sys.executable
    names = args.group or list(GROUPS)
    if not args.report_only:
        _check_mutmut(python)
        failed = [name for name in names if not run_group(name, GROUPS[name], python, args.max_children, args.rerun_survivors, args.mutant)]
        if failed:
            print(f"mutmut failed for {', '.join(failed)}: no results written", file=sys.stderr)
            return 1
    rows, survivors = collect(names, python)
    write(rows, survivors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
