"""``prune_saved``: prune adapters straight from saved files, in large batches, on one process or many.

Per source the result is exactly what ``tropfast.prune`` gives on a model holding that
adapter, with the same score, allocation and options: the tensors go through the same
``compute_scores`` (tropical: the same λ search, see ``scoring``) and ``allocate``, in
the same compute dtype (float64 on the CPU, float32 on a GPU).  Only data-free scores
are possible: there is no model to run.

The pipeline (per rank): a small pool reads and indexes the next batch of sources while
the current one is scored (tropical: every adapter shape of the batch in one ``solve``
call per λ-search step) and the previous one is written.  A batch holds as many sources
as fit ``max_memory``, so memory stays bounded whatever the number of sources.  Each
output is renamed into place when complete and then journalled, so a killed run resumes
where it stopped and writes byte-identical outputs.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..pruning.allocation import Allocation, allocate, canonical_allocation, kept_count
from ..pruning.masks import keep_only
from ..pruning.scores import ScoreResult, all_finite, canonical_score, compute_scores
from . import dist as _dist
from .errors import CorruptFileError
from .scoring import Problem, check_tropical_options, intra_op_threads, tropical_batch
from .sources import (
    DEFAULT_DOWN_KEY,
    DEFAULT_UP_KEY,
    SourceError,
    SourceIndex,
    SourceSpec,
    UnsupportedSourceError,
    discover,
    index_source,
    read_adapters,
)
from .writers import StaleTemps, write_output

__all__ = ["DATA_FREE_SCORES", "FleetReport", "parse_memory", "prune_saved"]

DATA_FREE_SCORES = ("magnitude", "tropical", "combined", "random", "partner_norm")
SUMMARY = "summary.json"
STATE_DIR = ".prune-saved"
FORMAT = "tropfast.prune_saved"
VERSION = 1
# Sources per batch at most: the tropical solve gains from many files per call; the other
# scores do not, and small batches let reading, scoring and writing overlap sooner.
_BATCH_SOURCES = {"tropical": 64, "combined": 64}
_BATCH_SOURCES_OTHER = 8


def parse_memory(x: float | str | None) -> int | None:
    """Bytes from 123, "512M", "2G", "1.5GiB" (powers of 1024)."""
    if x is None:
        return None
    if isinstance(x, bool):
        raise TypeError(f"max_memory must be a size, got {x!r}")
    if isinstance(x, (int, float)):
        v = float(x)
    else:
        s = str(x).strip().upper().replace("IB", "").rstrip("B")
        mult = 1
        for suf, m in (("K", 2**10), ("M", 2**20), ("G", 2**30), ("T", 2**40)):
            if s.endswith(suf):
                s, mult = s[:-1], m
                break
        try:
            v = float(s) * mult
        except ValueError:
            raise ValueError(f"max_memory={x!r} is not a size (use e.g. 512M, 2G or a number of bytes)") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"max_memory must be positive, got {x!r}")
    return int(v)


def default_max_memory(local_world: int = 1) -> int:
    """A quarter of the memory available now, shared by the ranks of this machine, in [256 MiB, 2 GiB]."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        avail = 8 * 2**30
    return int(min(max(avail // 4 // max(1, local_world), 256 * 2**20), 2 * 2**30))


# ---------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------
@dataclass
class FleetReport:
    """What ``prune_saved`` did: one record per source (as in out/summary.json), and totals."""

    out: str
    settings: dict
    sources: list[dict]
    time_s: float
    world_size: int = 1
    summary_path: str | None = None

    @property
    def failed(self) -> list[dict]:
        return [s for s in self.sources if s["status"] != "ok"]

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def totals(self) -> dict:
        done = [s for s in self.sources if s["status"] == "ok"]
        fresh = [s for s in done if not s.get("resumed")]
        br = sum(s.get("bytes_read", 0) for s in fresh)
        bw = sum(s.get("bytes_written", 0) for s in fresh)
        kept = sum(s.get("kept", 0) for s in done)
        total = sum(s.get("total", 0) for s in done)
        return {
            "sources": len(self.sources),
            "ok": len(done),
            "failed": len(self.sources) - len(done),
            "resumed": len(done) - len(fresh),
            "adapter_layers": sum(s.get("adapters", 0) for s in done),
            "kept": kept,
            "total": total,
            "kept_fraction": kept / total if total else 0.0,
            "bytes_read": br,
            "bytes_written": bw,
            "time_s": self.time_s,
            "sources_per_s": len(fresh) / self.time_s if self.time_s > 0 else 0.0,
            "MB_per_s": (br + bw) / 1e6 / self.time_s if self.time_s > 0 else 0.0,
        }

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "state": "done",
            "settings": self.settings,
            "settings_hash": _settings_hash(self.settings),
            "world_size": self.world_size,
            "totals": self.totals(),
            "sources": self.sources,
        }

    def table(self, max_rows: int = 40) -> str:
        s = self.settings
        t = self.totals()
        head = (
            f"prune-saved score={s['score']} allocation={s['allocation']} keep={s['keep']:g}: "
            f"{t['ok']}/{t['sources']} sources ok ({t['resumed']} resumed), kept {t['kept']}/{t['total']} weights "
            f"({t['kept_fraction']:.4f}) in {t['time_s']:.1f} s, {t['sources_per_s']:.2f} sources/s, "
            f"{t['MB_per_s']:.1f} MB/s"
            + (f", {self.world_size} ranks" if self.world_size > 1 else "")
        )
        rows = [("source", "kind", "layers", "kept", "status", "time s")]
        shown = [x for x in self.sources if x["status"] != "ok"]
        ok = [x for x in self.sources if x["status"] == "ok"]
        room = max(0, max_rows - len(shown))
        shown = ok[:room] + shown
        for x in shown:
            rows.append(
                (
                    x["name"],
                    x.get("kind") or "-",
                    str(x.get("adapters", "-")),
                    f"{x['kept_fraction']:.4f}" if x["status"] == "ok" else "-",
                    x["status"] + (" (resumed)" if x.get("resumed") else ""),
                    f"{x.get('time_s', 0.0):.2f}",
                )
            )
        w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head]
        for j, r in enumerate(rows):
            lines.append(
                "  ".join(c.ljust(w[i]) if i in (0, 1, 4) else c.rjust(w[i]) for i, c in enumerate(r)).rstrip()
            )
            if j == 0:
                lines.append("  ".join("-" * x for x in w))
        if len(ok) > room:
            lines.append(f"... {len(ok) - room} more ok sources in {self.summary_path or SUMMARY}")
        for x in self.failed:
            lines.append(f"{x['status']}: {x['name']}: {x.get('error')}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------
@dataclass
class _Cfg:
    keep: float
    score: str
    allocation: str
    values: str
    combined_q: float
    structured_scope: str
    tropical: dict
    seed: int
    down_key: str
    up_key: str
    activation: str | None
    allow_non_relu: bool
    max_memory: int
    workers: int
    progress: bool
    ctx: _dist.Ctx = field(default_factory=_dist.Ctx)
    solve_threads: int | None = None  # torch's intra-op threads for the solves (None: as set)

    def settings(self) -> dict:
        return {
            "keep": self.keep,
            "score": self.score,
            "allocation": self.allocation,
            "values": self.values,
            "combined_q": self.combined_q if self.score == "combined" else None,
            "structured_scope": self.structured_scope if self.allocation == "structured" else None,
            "tropical": self.tropical if self.score in ("tropical", "combined") else None,
            "seed": self.seed if self.score == "random" else None,
            "down_key": self.down_key,
            "up_key": self.up_key,
            "activation": self.activation,
            "allow_non_relu": self.allow_non_relu,
            "compute": "float64-cpu" if self.ctx.device.type == "cpu" else "float32-cuda",
        }

    @property
    def ct(self) -> torch.dtype:
        # prune computes in float64 on the CPU and float32 on a GPU; so do we
        return torch.float64 if self.ctx.device.type == "cpu" else torch.float32

    @property
    def global_alloc(self) -> bool:
        return self.allocation == "global" or (self.allocation == "structured" and self.structured_scope == "global")

    def working_factor(self) -> int:
        """Approximate peak bytes of scoring per byte of adapter weights (float32 on disk)."""
        return 12 if self.score == "magnitude" else 40


# ---------------------------------------------------------------------------------------
# per-source work
# ---------------------------------------------------------------------------------------
@dataclass
class _Loaded:
    spec: SourceSpec
    index: SourceIndex | None = None
    tensors: list | None = None  # (A, B, down bias) per adapter
    error: str | None = None
    status: str = "ok"
    bytes_read: int = 0
    t0: float = 0.0
    t_read: float = 0.0
    t_score: float = 0.0  # this source's share of its batch's scoring (one batched solve for all)
    t_alloc: float = 0.0
    t_write: float = 0.0


def _fail_status(e: BaseException) -> str:
    return "unsupported" if isinstance(e, UnsupportedSourceError) else "failed"


_EXPECTED = (SourceError, CorruptFileError, OSError, KeyError, ValueError, TypeError, RuntimeError, FloatingPointError)


def _load(spec: SourceSpec, cfg: _Cfg) -> _Loaded:
    ld = _Loaded(spec, t0=time.perf_counter())
    try:
        ld.index = index_source(spec, cfg.down_key, cfg.up_key, cfg.activation, cfg.allow_non_relu)
        ld.tensors = read_adapters(ld.index)
        ld.bytes_read = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in ld.tensors)
    except _EXPECTED as e:
        ld.error, ld.status = str(e), _fail_status(e)
        ld.index, ld.tensors = None, None
    ld.t_read = time.perf_counter() - ld.t0
    return ld


def _score_dtype(cfg: _Cfg, dt: torch.dtype) -> torch.dtype:
    """The dtype the scores are computed in: prune's (``cfg.ct``), or a narrower one that
    holds the same values where the allocation only ranks them, so the masks are prune's."""
    if cfg.allocation not in _RANKING_ALLOCATIONS:
        return cfg.ct  # norms, sums or spreads of the scores: computed as prune computes them
    if cfg.score == "magnitude":
        # |W| is exact in any float dtype and the cast to float64 is exact and monotone, so
        # the ranking (ties included) is prune's without the float64 copies
        return dt if dt in (torch.float32, torch.float64) else torch.float32
    if cfg.score == "tropical" and cfg.tropical["dtype"] == "float32" and dt in (torch.float32, torch.bfloat16, torch.float16):
        # the solve runs in float32 anyway: |Â|, |B̂| and the tie-break |W| are exact in
        # float32, as in prune's float64 copies
        return torch.float32
    return cfg.ct


# allocations whose masks depend only on the order of the scores (no sums or norms of them)
_RANKING_ALLOCATIONS = ("global", "layer", "matrix", "node")


def _scores(loaded: list[_Loaded], cfg: _Cfg) -> list[ScoreResult | BaseException]:
    dev = cfg.ctx.device
    As = [[a.to(dev, _score_dtype(cfg, a.dtype)) for a, _, _ in ld.tensors] for ld in loaded]
    Bs = [[b.to(dev, _score_dtype(cfg, b.dtype)) for _, b, _ in ld.tensors] for ld in loaded]
    out: list = []
    if cfg.score in ("tropical", "combined"):
        try:
            res = tropical_batch(
                [Problem(a, b) for a, b in zip(As, Bs)], cfg.keep, cfg.tropical, threads=cfg.solve_threads
            )
        except _EXPECTED:
            # find the source at fault: each on its own (same result for the others)
            res = []
            for a, b in zip(As, Bs):
                try:
                    res.append(tropical_batch([Problem(a, b)], cfg.keep, cfg.tropical, threads=cfg.solve_threads)[0])
                except _EXPECTED as e:
                    res.append(e)
        for a, b, r in zip(As, Bs, res):
            if isinstance(r, BaseException):
                out.append(r)
                continue
            Ah, Bh, diag = r
            MA, MB = [x.abs() for x in a], [x.abs() for x in b]
            out.append(ScoreResult(cfg.score, [x.abs() for x in Ah], [x.abs() for x in Bh], MA, MB, Ah, Bh, diag))
        return out
    for a, b in zip(As, Bs):
        try:
            out.append(compute_scores(cfg.score, a, b, cfg.keep, seed=cfg.seed))
        except _EXPECTED as e:
            out.append(e)
    return out


def _apply(ld: _Loaded, sc: ScoreResult, alloc, cfg: _Cfg, entries=None, tensors=None):
    """New tensors (name -> tensor, CPU, original dtype), kept units per adapter (structured) and layer records."""
    entries = ld.index.adapters if entries is None else entries
    tensors = ld.tensors if tensors is None else tensors
    new: dict[str, Tensor] = {}
    units: list[int] | None = [] if alloc.units is not None else None
    layers = []
    for k, (e, (A, B, bias)) in enumerate(zip(entries, tensors)):
        mA, mB = alloc.masks_A[k], alloc.masks_B[k]
        solver_vals = cfg.values == "solver"
        if alloc.units is not None:
            u = alloc.units[k]
            uc = u.to("cpu")
            if solver_vals:
                newA = sc.A_hat[k][u].to("cpu", A.dtype)
                newB = sc.B_hat[k][:, u].to("cpu", B.dtype)
            else:  # = W[u] in the compute dtype, cast back: the dtype round trip is exact
                newA, newB = A[uc].clone(), B[:, uc].clone()
            new[e.down_key], new[e.up_key] = newA, newB
            if bias is not None:
                new[e.down_bias_key] = bias[uc].clone()
            units.append(int(u.numel()))
            r_after = int(u.numel())
        else:
            if solver_vals:
                newA = torch.where(mA, sc.A_hat[k], torch.zeros_like(sc.A_hat[k])).to("cpu", A.dtype)
                newB = torch.where(mB, sc.B_hat[k], torch.zeros_like(sc.B_hat[k])).to("cpu", B.dtype)
            else:
                # = where(mask, W, 0) in the compute dtype, cast back: the dtype round trip is exact
                newA, newB = keep_only(A, mA), keep_only(B, mB)
            new[e.down_key], new[e.up_key] = newA, newB
            r_after = e.r
        if solver_vals and not all(all_finite([newA, newB])):
            raise FloatingPointError(f"adapter {e.name!r}: the pruned weights are not finite")
        layers.append(
            {
                "name": e.name,
                "layer": e.layer,
                "shape_A": [e.r, e.d_in],
                "shape_B": [e.d_out, e.r],
                "r_after": r_after,
                "kept_A": int(torch.count_nonzero(mA)),
                "kept_B": int(torch.count_nonzero(mB)),
            }
        )
    return new, units, layers


def _record(spec: SourceSpec, out: str, cfg: _Cfg) -> dict:
    return {
        "name": spec.out_name,
        "source": spec.path,
        "output": os.path.join(out, spec.out_name),
        "kind": spec.kind,
        "status": "ok",
        "error": None,
        "fingerprint": spec.fingerprint(),
        "rank": cfg.ctx.rank,
    }


def _finish_record(rec: dict, layers: list[dict], solver: dict | None, ld: _Loaded, written: int) -> dict:
    kept = sum(x["kept_A"] + x["kept_B"] for x in layers)
    total = sum(x["shape_A"][0] * x["shape_A"][1] + x["shape_B"][0] * x["shape_B"][1] for x in layers)
    rec.update(
        adapters=len(layers),
        activation=ld.index.activation + (" (assumed)" if ld.index.activation_assumed else ""),
        kept=kept,
        total=total,
        kept_fraction=kept / total if total else 0.0,
        layers=layers,
        solver=_slim(solver),
        bytes_read=ld.bytes_read,
        bytes_written=written,
        time_s=time.perf_counter() - ld.t0,
        stages_s={"read": ld.t_read, "score": ld.t_score, "allocate": ld.t_alloc, "write": ld.t_write},
    )
    return rec


def _slim(diag: dict | None) -> dict | None:
    if diag is None:
        return None
    keep = (
        "method",
        "backend",
        "search_iters",
        "target_keep",
        "lam1",
        "lam2",
        "solver_kept_fraction",
        "objective_start",
        "objective_end",
    )
    return {k: diag.get(k) for k in keep}


# ---------------------------------------------------------------------------------------
# journal, summary, resume
# ---------------------------------------------------------------------------------------
def _atomic_json(obj: dict, path: str) -> None:
    """Write the summary: its keys indented, each record of a list one compact line (the
    indenting encoder is pure Python, seven times the C one's cost on a large fleet)."""
    tmp = f"{path}.tmp{os.getpid()}"
    parts = []
    for k, v in obj.items():
        if isinstance(v, list) and v:
            body = ",\n".join("  " + json.dumps(x, default=str) for x in v)
            parts.append(f" {json.dumps(k)}: [\n{body}\n ]")
        else:
            parts.append(f" {json.dumps(k)}: " + json.dumps(v, indent=1, default=str).replace("\n", "\n "))
    with open(tmp, "w") as f:
        f.write("{\n" + ",\n".join(parts) + "\n}\n")
    os.replace(tmp, path)


class _Journal:
    """One line per event: "writing" before an output is started (so a resumed run knows the
    output is its own even if the kill came between the rename and the record), then the record."""

    def __init__(self, out: str, rank: int):
        d = os.path.join(out, STATE_DIR)
        os.makedirs(d, exist_ok=True)
        self.path = os.path.join(d, f"journal-rank{rank}.jsonl")
        self.lock = threading.Lock()

    def add(self, rec: dict) -> None:
        line = json.dumps(rec, default=str) + "\n"
        with self.lock, open(self.path, "a") as f:
            f.write(line)

    def writing(self, name: str) -> None:
        self.add({"name": name, "status": "writing"})


def _previous(out: str) -> tuple[dict | None, dict[str, dict]]:
    """The summary in out/ (or None) and the latest record per output name (summary + journals)."""
    summ = None
    p = os.path.join(out, SUMMARY)
    if os.path.isfile(p):
        try:
            with open(p) as f:
                summ = json.load(f)
        except (OSError, json.JSONDecodeError):
            summ = None
        if not isinstance(summ, dict) or summ.get("format") != FORMAT:
            summ = {"format": "unknown"}
    recs: dict[str, dict] = {}
    if summ and isinstance(summ.get("sources"), list):
        for r in summ["sources"]:
            if isinstance(r, dict) and "name" in r:
                recs[r["name"]] = r
    d = os.path.join(out, STATE_DIR)
    if os.path.isdir(d):
        for name in sorted(os.listdir(d)):
            if not name.startswith("journal-"):
                continue
            with open(os.path.join(d, name)) as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if isinstance(r, dict) and "name" in r:
                        recs[r["name"]] = r
    return summ, recs


def _plan(sources, out: str, cfg: _Cfg, resume: bool | None, overwrite: bool) -> dict:
    specs = discover(list(sources))
    out_real = os.path.realpath(out)
    for src in [os.path.realpath(p) for p in sources] + [os.path.realpath(s.path) for s in specs]:
        if out_real == src or out_real.startswith(src + os.sep):
            raise ValueError(f"out={out} lies inside the source {src}; inputs are never modified, choose another out")
        if src.startswith(out_real + os.sep):
            raise ValueError(f"source {src} lies inside out={out}; choose another out")
    settings = cfg.settings()
    shash = _settings_hash(settings)
    summ, recs = _previous(out)
    if summ is not None:
        if summ.get("format") != FORMAT:
            raise ValueError(f"{os.path.join(out, SUMMARY)} was not written by prune_saved; choose another out")
        same = summ.get("settings_hash") == shash
        if not same and resume is not False:
            old = summ.get("settings") or {}
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(
                f"{out} holds the summary of a run with other settings ({', '.join(diff) or 'format'} differ); "
                "pass resume=False (CLI: --no-resume) to redo it with these settings, or choose another out"
            )
        if resume is False:
            recs_ok: dict[str, dict] = {}
        else:
            recs_ok = recs
    else:
        if resume is True:
            print(f"prune-saved: nothing to resume in {out}; starting", file=sys.stderr)
        recs_ok = {}
    ours = set(recs)  # outputs a previous run in this out/ wrote
    done: dict[int, dict] = {}
    for i, s in enumerate(specs):
        dest = os.path.join(out, s.out_name)
        r = recs_ok.get(s.out_name)
        if r and r.get("status") == "ok" and r.get("fingerprint") == s.fingerprint() and os.path.exists(dest):
            done[i] = dict(r, resumed=True)
            continue
        if os.path.lexists(dest) and s.out_name not in ours and not overwrite:
            raise FileExistsError(
                f"{dest} exists and was not written by a prune_saved run in {out}; "
                "pass overwrite=True (CLI: --overwrite) to replace it"
            )
    return {"specs": specs, "done": done, "settings": settings, "hash": shash}


# ---------------------------------------------------------------------------------------
# one rank's share of whole sources
# ---------------------------------------------------------------------------------------
def _batches(specs: list[SourceSpec], cfg: _Cfg) -> list[list[SourceSpec]]:
    cap = max(1, int(cfg.max_memory * 0.75) // cfg.working_factor())
    out: list[list[SourceSpec]] = []
    cur: list[SourceSpec] = []
    size = 0
    for s in specs:
        if cur and (size + s.est_bytes > cap or len(cur) >= _BATCH_SOURCES.get(cfg.score, _BATCH_SOURCES_OTHER)):
            out.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += s.est_bytes
    if cur:
        out.append(cur)
    return out


def _compute(batch: list[_Loaded], cfg: _Cfg, out: str) -> list[tuple[_Loaded, dict, Any]]:
    """Score and allocate a batch; per source (loaded, record, (new, units, layers, solver) or None)."""
    good = [ld for ld in batch if ld.error is None]
    res: dict[int, Any] = {}
    t0 = time.perf_counter()
    if good:
        scs = _scores(good, cfg)
        share = (time.perf_counter() - t0) / len(good)
        for ld, sc in zip(good, scs):
            ld.t_score = share
            if isinstance(sc, BaseException):
                ld.error, ld.status = f"{ld.spec.path}: {sc}", _fail_status(sc)
                continue
            try:
                ta = time.perf_counter()
                alloc = allocate(
                    sc,
                    cfg.keep,
                    cfg.allocation,
                    combined_q=cfg.combined_q if cfg.score == "combined" else None,
                    structured_scope=cfg.structured_scope,
                )
                ld.t_alloc = time.perf_counter() - ta
                new, units, layers = _apply(ld, sc, alloc, cfg)
                res[id(ld)] = (new, units, layers, sc.solver)
            except _EXPECTED as e:
                ld.error, ld.status = f"{ld.spec.path}: {e}", _fail_status(e)
    return [(ld, _record(ld.spec, out, cfg), res.get(id(ld))) for ld in batch]


def _write(ld: _Loaded, rec: dict, work, out: str, journal: _Journal, stale: StaleTemps) -> dict:
    dest = os.path.join(out, ld.spec.out_name)
    if work is None or ld.error is not None:
        rec.update(
            status=ld.status if ld.status != "ok" else "failed", error=ld.error, time_s=time.perf_counter() - ld.t0
        )
        return rec
    new, units, layers, solver = work
    try:
        journal.writing(ld.spec.out_name)
        tw = time.perf_counter()
        stale.clean(dest)
        written = write_output(ld.index, dest, new, units)
        ld.t_write = time.perf_counter() - tw
    except _EXPECTED as e:
        rec.update(status="failed", error=f"writing {dest}: {e}", time_s=time.perf_counter() - ld.t0)
        return rec
    return _finish_record(rec, layers, solver, ld, written)


def _run_local(specs: list[SourceSpec], cfg: _Cfg, out: str, journal: _Journal, stale: StaleTemps, bar) -> list[dict]:
    batches = _batches(specs, cfg)
    recs: list[dict] = []
    if not batches:
        return recs
    workers = max(1, cfg.workers)
    with (
        ThreadPoolExecutor(workers, thread_name_prefix="prune-saved-read") as rpool,
        ThreadPoolExecutor(workers, thread_name_prefix="prune-saved-write") as wpool,
    ):
        reads: dict[int, list[Future]] = {0: [rpool.submit(_load, s, cfg) for s in batches[0]]}
        pending: list[Future] = []
        for b in range(len(batches)):
            if b + 1 < len(batches):  # prefetch one batch ahead
                reads[b + 1] = [rpool.submit(_load, s, cfg) for s in batches[b + 1]]
            loaded = [f.result() for f in reads.pop(b)]
            work = _compute(loaded, cfg, out)
            del loaded
            for f in pending:  # the previous batch's writes end before this batch's start
                recs.append(_done(f.result(), journal, bar))
            pending = [wpool.submit(_write, ld, rec, w, out, journal, stale) for ld, rec, w in work]
            del work
        for f in pending:
            recs.append(_done(f.result(), journal, bar))
    return recs


def _done(rec: dict, journal: _Journal, bar) -> dict:
    journal.add(rec)
    if bar is not None:
        bar.update(1)
        bar.moved += rec.get("bytes_read", 0) + rec.get("bytes_written", 0)
        el = time.perf_counter() - bar.t_start
        if el > 0:
            bar.set_postfix_str(f"{bar.moved / 1e6 / el:.1f} MB/s", refresh=False)
    return rec


# ---------------------------------------------------------------------------------------
# one source split over all ranks
# ---------------------------------------------------------------------------------------
def _agree(ctx: _dist.Ctx, err: str | None, ld: _Loaded) -> str | None:
    """The first rank's error (and its status) on every rank, or None when all went well."""
    errs = [e for e in ctx.all_gather((err, ld.status) if err else None) if e]
    if not errs:
        return None
    ld.status = errs[0][1]
    return errs[0][0]


def _run_split(spec: SourceSpec, cfg: _Cfg, out: str, journal: _Journal, stale: StaleTemps) -> dict | None:
    """Every rank runs this for the same source; rank 0 writes it and returns the record."""
    ctx = cfg.ctx
    rec = _record(spec, out, cfg)
    ld = _Loaded(spec, t0=time.perf_counter())
    err = None
    mine: list[int] = []
    try:
        ld.index = index_source(spec, cfg.down_key, cfg.up_key, cfg.activation, cfg.allow_non_relu)
        ents = ld.index.adapters
        mine = _dist.lpt([e.numel for e in ents], ctx.world)[ctx.rank]
        ld.tensors = read_adapters(ld.index, [ents[i] for i in mine])
        ld.bytes_read = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in ld.tensors)
    except _EXPECTED as e:
        err = f"{spec.path}: {e}" if spec.path not in str(e) else str(e)
        ld.status = _fail_status(e)
    ld.t_read = time.perf_counter() - ld.t0
    err = _agree(ctx, err, ld)
    if err:
        return _split_fail(rec, ld, err, ctx)
    ents = ld.index.adapters
    local = [ents[i] for i in mine]
    dev, ct = ctx.device, cfg.ct
    As = [a.to(dev, _score_dtype(cfg, a.dtype)) for a, _, _ in ld.tensors]
    Bs = [b.to(dev, _score_dtype(cfg, b.dtype)) for _, b, _ in ld.tensors]
    sc = None
    ts = time.perf_counter()
    try:
        if cfg.score in ("tropical", "combined"):
            pad = (max(e.r for e in ents), max(e.d_in for e in ents), max(e.d_out for e in ents))
            Ah, Bh, diag = tropical_batch(
                [Problem(As, Bs, pad=pad)], cfg.keep, cfg.tropical, all_done=ctx.all_true, threads=cfg.solve_threads
            )[0]
            sc = ScoreResult(
                cfg.score,
                [x.abs() for x in Ah],
                [x.abs() for x in Bh],
                [a.abs() for a in As],
                [b.abs() for b in Bs],
                Ah,
                Bh,
                diag,
            )
        elif cfg.score == "random":
            # the draws run over every adapter in order; other ranks' adapters are drawn and dropped
            at = {i: k for k, i in enumerate(mine)}
            fullA = [
                As[at[i]] if i in at else torch.empty(e.r, e.d_in, dtype=ct, device=dev) for i, e in enumerate(ents)
            ]
            fullB = [
                Bs[at[i]] if i in at else torch.empty(e.d_out, e.r, dtype=ct, device=dev) for i, e in enumerate(ents)
            ]
            full = compute_scores("random", fullA, fullB, cfg.keep, seed=cfg.seed)
            sc = ScoreResult(
                "random",
                [full.SA[i] for i in mine],
                [full.SB[i] for i in mine],
                [a.abs() for a in As],
                [b.abs() for b in Bs],
            )
        else:
            sc = (
                compute_scores(cfg.score, As, Bs, cfg.keep, seed=cfg.seed)
                if As
                else ScoreResult(cfg.score, [], [], [], [])
            )
    except _EXPECTED as e:
        err, ld.status = f"{spec.path}: {e}", _fail_status(e)
    ld.t_score = time.perf_counter() - ts
    err = _agree(ctx, err, ld)
    if err:
        return _split_fail(rec, ld, err, ctx)
    try:
        ta = time.perf_counter()
        alloc = _split_allocate(sc, ents, mine, cfg)
        ld.t_alloc = time.perf_counter() - ta
        work = _apply(ld, sc, alloc, cfg, entries=local)
    except _EXPECTED as e:
        err, work, ld.status = f"{spec.path}: {e}", None, _fail_status(e)
    err = _agree(ctx, err, ld)
    if err:
        return _split_fail(rec, ld, err, ctx)
    new, units, layers = work
    parts = ctx.gather((mine, new, units, layers, sc.solver, ld.bytes_read))
    status = None
    if ctx.rank == 0:
        order: dict[int, tuple] = {}
        allnew: dict[str, Tensor] = {}
        diags = []
        total_read = 0
        for m, nw, un, ly, dg, br in parts:
            allnew.update(nw)
            total_read += br
            for j, i in enumerate(m):
                order[i] = (un[j] if un is not None else None, ly[j])
            if dg:
                diags.append((m, dg))
        all_units = [order[i][0] for i in range(len(ents))] if units is not None else None
        all_layers = [order[i][1] for i in range(len(ents))]
        ld.bytes_read = total_read
        dest = os.path.join(out, spec.out_name)
        try:
            journal.writing(spec.out_name)
            tw = time.perf_counter()
            stale.clean(dest)
            written = write_output(ld.index, dest, allnew, all_units)
            ld.t_write = time.perf_counter() - tw
            status = _finish_record(rec, all_layers, _merge_diag(diags, len(ents)), ld, written)
            status["split"] = ctx.world
        except _EXPECTED as e:
            rec.update(status="failed", error=f"writing {dest}: {e}", time_s=time.perf_counter() - ld.t0)
            status = rec
    return ctx.broadcast(status)


def _split_fail(rec: dict, ld: _Loaded, err: str, ctx: _dist.Ctx) -> dict:
    rec.update(status=ld.status if ld.status != "ok" else "failed", error=err, time_s=time.perf_counter() - ld.t0)
    return rec


def _merge_diag(diags: list, n: int) -> dict | None:
    if not diags:
        return None
    base = dict(diags[0][1])
    for key in ("steps", "lam1", "lam2", "lr", "objective_start", "objective_end", "solver_kept_fraction"):
        if base.get(key) is None:
            continue
        vals: list = [None] * n
        for m, d in diags:
            for j, i in enumerate(m):
                vals[i] = d[key][j]
        base[key] = vals
    return base


def _split_allocate(sc: ScoreResult, ents, mine: list[int], cfg: _Cfg):
    """Masks of this rank's adapters; class-blind allocations through the exact distributed cut."""
    ctx = cfg.ctx
    q = cfg.combined_q if cfg.score == "combined" else None
    if not cfg.global_alloc:
        if not sc.SA:
            return Allocation(cfg.allocation, [], [], [] if cfg.allocation == "structured" else None, 0)
        return allocate(sc, cfg.keep, cfg.allocation, combined_q=q, structured_scope=cfg.structured_scope)
    if cfg.allocation == "structured":
        # unit scores, one part per adapter, and where each starts in the concatenation over
        # all adapters, as in allocate
        offs = [0]
        for e in ents:
            offs.append(offs[-1] + e.r)
        P = [sa.norm(dim=1) * sb.norm(dim=0) for sa, sb in zip(sc.SA, sc.SB)]
        S = [ma.norm(dim=1) * mb.norm(dim=0) for ma, mb in zip(sc.MA, sc.MB)]
        pos = [offs[i] for i in mine]
    else:  # every weight matrix a part: A_i, then B_i
        offs = [0]
        for e in ents:
            offs.append(offs[-1] + e.numel)
        P = [t for sa, sb in zip(sc.SA, sc.SB) for t in (sa, sb)]
        S = [t for ma, mb in zip(sc.MA, sc.MB) for t in (ma, mb)]
        pos = [offs[i] + k * ents[i].r * ents[i].d_in for i in mine for k in (0, 1)]
    n = kept_count(cfg.keep, offs[-1])
    if q is None:
        sel = _dist.select_top(P, S, pos, n, ctx)
    else:
        first = _dist.select_top(P, S, pos, kept_count(q, n), ctx)
        rest = _dist.select_top(S, P, pos, n - kept_count(q, n), ctx, eligible=[~f for f in first])
        sel = [f | r for f, r in zip(first, rest)]
    if cfg.allocation != "structured":
        return Allocation(cfg.allocation, sel[0::2], sel[1::2], None, 1)
    mA, mB, units = [], [], []
    for s, i in zip(sel, mine):
        e = ents[i]
        units.append(s.nonzero().flatten())
        mA.append(s[:, None].expand(e.r, e.d_in).clone())
        mB.append(s[None, :].expand(e.d_out, e.r).clone())
    return Allocation(cfg.allocation, mA, mB, units, 1)


# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_MALLOC_TUNED = False


def _reuse_freed_memory(lib=None) -> bool:
    """Have glibc keep freed memory for the next source (once per process); returns whether set.

    Every source allocates and frees the same few MB of tensors.  With glibc's defaults that
    memory goes back to the OS after each source and is faulted in again by the next (about
    1 200 page faults per RoBERTa-base adapter, a tenth of its time on the CPU).  A fixed mmap
    threshold of 32 MiB (the ceiling of glibc's own sliding one) and a trim threshold of
    256 MiB keep it in the heap: peak memory is unchanged, and the process holds on to up to
    that much after the run.  ``TROPFAST_MALLOC_TUNING=0`` leaves malloc alone; other C
    libraries are left alone anyway.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("TROPFAST_MALLOC_TUNING", "1") == "0":
        return False
    if lib is None:
        if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
            return False
        try:
            lib = ctypes.CDLL(None)
            lib.mallopt  # noqa: B018 - present in glibc
        except (OSError, AttributeError):
            return False
    ok = bool(lib.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(lib.mallopt(_M_TRIM_THRESHOLD, 256 << 20))
    _MALLOC_TUNED = True
    return ok


def prune_saved(
    sources,
    out: str | os.PathLike,
    keep: float = 0.3,
    score: str = "tropical",
    allocation: str = "layer",
    *,
    values: str = "trained",
    combined_q: float = 0.5,
    structured_scope: str = "layer",
    tropical: dict | None = None,
    seed: int = 0,
    down_key: str = DEFAULT_DOWN_KEY,
    up_key: str = DEFAULT_UP_KEY,
    activation: str | None = None,
    allow_non_relu: bool = False,
    max_memory: int | str | None = None,
    workers: int = 2,
    resume: bool | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    distributed: bool | None = None,
    split: str = "auto",
    progress: bool = False,
    verbose: bool = False,
) -> FleetReport:
    """Prune saved adapters from their files, without the backbone; write them under ``out``.

    sources: paths (or one path) of AdapterHub adapter folders (``save_adapter``), folders
    of them, plain ``.safetensors``/``.bin`` state dicts, or HF checkpoints
    (``model.safetensors[.index.json]``); see ``tropfast.fleet.sources``.  ``.../NAME`` is
    written to ``out/NAME`` in the same format; ``out/summary.json`` records every source.
    keep, score, allocation, values, combined_q, structured_scope, tropical, seed,
    allow_non_relu: as in ``tropfast.prune`` (data-free scores only: magnitude, tropical,
    combined, random, partner_norm).  down_key / up_key: globs on tensor names finding the
    bottleneck pairs (default: AdapterHub naming).  activation: the activation of plain
    state dicts (default: assumed ReLU).  max_memory: bytes (or "2G") for the batches in
    flight on this rank (default: a quarter of the available memory, 256 MiB..2 GiB).
    workers: threads reading and writing ahead.  On glibc the process keeps freed memory for
    reuse (``_reuse_freed_memory``; ``TROPFAST_MALLOC_TUNING=0`` turns that off).  The solves
    run on ``torch.get_num_threads()`` threads and the rest on one: the process-wide setting
    is 1 during the run outside the solves, and restored when it returns or fails (other
    torch work running in parallel threads of the process sees it).  resume: continue a run in ``out``
    (None: when out/summary.json has the same settings; False: redo everything).
    overwrite: replace outputs that no earlier run in ``out`` wrote.  device: where
    scores are computed (default: CUDA if available; under torchrun cuda:LOCAL_RANK).
    distributed: None detects torchrun.  split: "auto" splits a source whose adapters
    outweigh an even share over the ranks; "never" keeps every source on one rank.

    Returns a FleetReport; ``report.exit_code`` is 1 when any source failed.
    """
    t0 = time.perf_counter()
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [os.fspath(s) for s in sources]
    if not sources:
        raise ValueError("no sources given")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not math.isfinite(keep) or not 0 <= keep <= 1:
        raise ValueError(f"keep must be a fraction in [0, 1], got {keep!r}")
    score = canonical_score(score)
    if score not in DATA_FREE_SCORES:
        raise ValueError(
            f"score={score!r} needs forward passes through the model on data, and prune_saved reads only the "
            "adapter weights; load the model and use tropfast.prune(model, score='snip', snip_data=...) instead. "
            f"Data-free scores: {', '.join(DATA_FREE_SCORES)}"
        )
    allocation = canonical_allocation(allocation)
    if values not in ("trained", "solver"):
        raise ValueError(f"values={values!r}; choose 'trained' or 'solver'")
    if values == "solver" and score not in ("tropical", "combined"):
        raise ValueError(f"values='solver' needs score='tropical' or 'combined', not {score!r}")
    if isinstance(combined_q, bool) or not isinstance(combined_q, (int, float)) or not 0 <= combined_q <= 1:
        raise ValueError(f"combined_q must be in [0, 1], got {combined_q!r}")
    if structured_scope not in ("layer", "global"):
        raise ValueError(f"structured_scope must be 'layer' or 'global', got {structured_scope!r}")
    trop = check_tropical_options(tropical)
    if split not in ("auto", "never"):
        raise ValueError(f"split={split!r}; choose 'auto' or 'never'")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    out = os.path.abspath(os.fspath(out))
    _reuse_freed_memory()
    ctx = _dist.init(distributed, device)
    try:
        mem = parse_memory(max_memory) or default_max_memory(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        cfg = _Cfg(
            float(keep),
            score,
            allocation,
            values,
            float(combined_q),
            structured_scope,
            trop,
            int(seed),
            down_key,
            up_key,
            activation,
            bool(allow_non_relu),
            mem,
            workers,
            progress,
            ctx,
            solve_threads=torch.get_num_threads(),
        )
        # the solves run on every thread torch has; the rest (small ops on each matrix,
        # beside the reading and writing threads) on one
        with intra_op_threads(1):
            return _main(sources, out, cfg, resume, overwrite, split, t0, verbose)
    finally:
        ctx.close()


def _main(sources, out, cfg: _Cfg, resume, overwrite, split, t0, verbose) -> FleetReport:
    ctx = cfg.ctx
    plan = None
    err = None
    if ctx.rank == 0:
        try:
            plan = _plan(sources, out, cfg, resume, overwrite)
            os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)
            if resume is False or not plan["done"]:
                # a fresh run: old journals would otherwise mark outputs as done
                for name in os.listdir(os.path.join(out, STATE_DIR)):
                    if name.startswith("journal-"):
                        os.remove(os.path.join(out, STATE_DIR, name))
            _atomic_json(
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "state": "running",
                    "settings": plan["settings"],
                    "settings_hash": plan["hash"],
                    "world_size": ctx.world,
                    "sources": list(plan["done"].values()),
                },
                os.path.join(out, SUMMARY),
            )
        except (ValueError, OSError, LookupError) as e:
            err = e
    if ctx.is_dist:
        box = ctx.broadcast((plan, None if err is None else (type(err).__name__, str(err))))
        plan, e = box
        if e is not None:
            cls = {"FileNotFoundError": FileNotFoundError, "FileExistsError": FileExistsError}.get(e[0], ValueError)
            raise cls(e[1])
    elif err is not None:
        raise err
    specs: list[SourceSpec] = plan["specs"]
    done: dict[int, dict] = plan["done"]
    todo = [i for i in range(len(specs)) if i not in done]
    split_ids: list[int] = []
    if ctx.is_dist and split == "auto" and todo:
        total = sum(specs[i].est_bytes for i in todo)
        split_ids = [i for i in todo if specs[i].kind == "checkpoint" and specs[i].est_bytes * ctx.world > total]
    rest = [i for i in todo if i not in split_ids]
    assign = (
        _dist.lpt([specs[i].est_bytes for i in rest], ctx.world)[ctx.rank] if ctx.is_dist else list(range(len(rest)))
    )
    mine = [rest[j] for j in assign]

    journal = _Journal(out, ctx.rank)
    stale = StaleTemps()  # what a killed run left beside the outputs this rank writes
    bar = None
    if cfg.progress and ctx.rank == 0:
        from tqdm.auto import tqdm

        n_mine = len(mine) + len(split_ids)
        desc = "prune-saved" + (f" rank 0/{ctx.world}" if ctx.is_dist else "")
        bar = tqdm(total=n_mine, desc=desc, unit="adapter", dynamic_ncols=True)
        bar.moved, bar.t_start = 0, time.perf_counter()
    recs: dict[int, dict] = {}
    try:
        for i in split_ids:
            r = _run_split(specs[i], cfg, out, journal, stale)
            if ctx.rank == 0:
                recs[i] = _done(r, journal, bar)
        local = _run_local([specs[i] for i in mine], cfg, out, journal, stale, bar)
        for i, r in zip(mine, local):
            recs[i] = r
    finally:
        if bar is not None:
            bar.close()
    gathered = ctx.gather(recs)
    report = None
    if ctx.rank == 0:
        allrecs: dict[int, dict] = dict(done)
        for part in gathered:
            allrecs.update(part)
        ordered = [allrecs[i] for i in range(len(specs))]
        report = FleetReport(
            out, plan["settings"], ordered, time.perf_counter() - t0, ctx.world, os.path.join(out, SUMMARY)
        )
        _atomic_json(report.to_dict(), os.path.join(out, SUMMARY))
        # the journals are folded into the summary now
        shutil.rmtree(os.path.join(out, STATE_DIR), ignore_errors=True)
    report = ctx.broadcast(report)
    return report
