"""``prune``: score, allocate and write masks into a model's bottleneck adapters, atomically."""
from __future__ import annotations

import copy
import itertools
import json
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from . import masks as _masks
from .allocation import allocate, allocate_gradient_rank, canonical_allocation
from .discovery import AdapterInfo, UnsupportedAdapterError, find_adapters
from .scores import (
    GRADIENT_RANK_DEFAULTS,
    _real,
    adapter_gradient_ranks,
    all_finite,
    canonical_score,
    check_tropical_options,
    compute_scores,
)

__all__ = ["prune", "PruneReport", "AdapterReport", "check_adapters"]

VALUES = ("trained", "solver")


@dataclass
class AdapterReport:
    """What happened to one adapter.  Shapes are before pruning: A (r, d_in), B (d_out, r)."""

    name: str
    adapter: str | None
    layer: int | None
    location: str | None
    activation: str
    shape_A: tuple[int, int]
    shape_B: tuple[int, int]
    r_after: int
    kept_A: int
    kept_B: int
    nonzero_A: int
    nonzero_B: int

    @property
    def numel_A(self) -> int:
        return self.shape_A[0] * self.shape_A[1]

    @property
    def numel_B(self) -> int:
        return self.shape_B[0] * self.shape_B[1]

    @property
    def kept_fraction_A(self) -> float:
        return self.kept_A / self.numel_A if self.numel_A else 0.0

    @property
    def kept_fraction_B(self) -> float:
        return self.kept_B / self.numel_B if self.numel_B else 0.0

    @property
    def kept_fraction(self) -> float:
        n = self.numel_A + self.numel_B
        return (self.kept_A + self.kept_B) / n if n else 0.0

    @property
    def label(self) -> str:
        if self.layer is not None:
            loc = (self.location or "").replace("_adapter", "")
            return f"{self.adapter} L{self.layer} {loc}".strip()
        return self.name

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "adapter": self.adapter,
            "layer": self.layer,
            "location": self.location,
            "activation": self.activation,
            "shape_A": list(self.shape_A),
            "shape_B": list(self.shape_B),
            "r_before": self.shape_A[0],
            "r_after": self.r_after,
            "kept_A": self.kept_A,
            "kept_B": self.kept_B,
            "numel_A": self.numel_A,
            "numel_B": self.numel_B,
            "nonzero_A": self.nonzero_A,
            "nonzero_B": self.nonzero_B,
            "kept_fraction_A": self.kept_fraction_A,
            "kept_fraction_B": self.kept_fraction_B,
            "kept_fraction": self.kept_fraction,
        }


@dataclass
class PruneReport:
    """Result of ``prune``: per adapter shapes and kept counts, plus the run's settings."""

    keep: float
    score: str
    allocation: str
    adapters: list[AdapterReport]
    values: str
    masks_attached: bool
    solver: dict | None
    time_s: float
    score_time_s: float
    options: dict = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    # seconds per phase: check, scores, allocate, snapshot, write (wall clock; CUDA work may overlap)
    timings: dict = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return sum(a.kept_A + a.kept_B for a in self.adapters)

    @property
    def total(self) -> int:
        return sum(a.numel_A + a.numel_B for a in self.adapters)

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        """Everything but the model, JSON-serialisable."""
        return {
            "keep": self.keep,
            "score": self.score,
            "allocation": self.allocation,
            "values": self.values,
            "masks_attached": self.masks_attached,
            "kept": self.kept,
            "total": self.total,
            "kept_fraction": self.kept_fraction,
            "time_s": self.time_s,
            "score_time_s": self.score_time_s,
            "solver": self.solver,
            "timings": dict(self.timings),
            "options": _jsonable(self.options),
            "adapters": [a.to_dict() for a in self.adapters],
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def table(self) -> str:
        """A readable summary, one line per adapter."""
        head = (
            f"score={self.score} allocation={self.allocation} keep={self.keep:g} values={self.values}: "
            f"kept {self.kept}/{self.total} weights ({self.kept_fraction:.4f}) in {self.time_s:.2f} s"
        )
        rows = [("adapter", "act", "A (r x d_in)", "B (d_out x r)", "r after", "kept A", "kept B", "kept")]
        for a in self.adapters:
            rows.append(
                (
                    a.label,
                    a.activation,
                    f"{a.shape_A[0]}x{a.shape_A[1]}",
                    f"{a.shape_B[0]}x{a.shape_B[1]}",
                    str(a.r_after),
                    f"{a.kept_fraction_A:.4f}",
                    f"{a.kept_fraction_B:.4f}",
                    f"{a.kept_fraction:.4f}",
                )
            )
        w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head]
        for j, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)))
            if j == 0:
                lines.append("  ".join("-" * x for x in w))
        if self.solver:
            s = self.solver
            lines.append(
                f"solver: {s.get('method')} on {s.get('backend')}, steps {max(s.get('steps') or [0])}, "
                f"lambda search iterations {s.get('search_iters')}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def check_adapters(infos: list[AdapterInfo], allow_non_relu: bool = False) -> None:
    """Refuse PHM layers always and non-ReLU activations unless allowed."""
    for i in infos:
        if not i.supported:
            raise UnsupportedAdapterError(f"adapter {i.name!r} cannot be pruned: {i.reason}")
    bad = [i for i in infos if not i.is_relu]
    if bad and not allow_non_relu:
        acts = sorted({i.activation for i in bad})
        raise UnsupportedAdapterError(
            f"{len(bad)} adapter(s) use activation {', '.join(acts)} (first: {bad[0].name!r}); the tropical "
            "characterization is exact only for ReLU bottlenecks. Pass allow_non_relu=True (CLI: "
            "--allow-non-relu) to prune them anyway, treating the activation as if it were ReLU"
        )


def _count(t: Tensor) -> int:
    return int(torch.count_nonzero(t))


def _fraction(x: Any, name: str) -> float:
    v = _real(x)
    if v is None or not math.isfinite(v) or not 0 <= v <= 1:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {x!r}")
    return v


def _check_weights(infos: list[AdapterInfo]) -> None:
    """Weights that hold values, are floating point and share one device."""
    for i in infos:
        for what, mod in (("down", i.down), ("up", i.up)):
            w = mod.weight
            if w.device.type == "meta":
                raise ValueError(
                    f"adapter {i.name!r}: the {what}-projection weight is on the meta device and holds no values; "
                    "load the weights (e.g. from_pretrained without a meta device_map) before pruning"
                )
            if not w.is_floating_point():
                raise TypeError(
                    f"adapter {i.name!r}: the {what}-projection weight is {w.dtype}; it must be floating point"
                )
    devices = sorted({str(m.weight.device) for i in infos for m in (i.down, i.up)})
    if len(devices) > 1:
        raise ValueError(f"the adapters' weights are on several devices ({', '.join(devices)}); move them to one first")


def _survivors(infos: list[AdapterInfo]) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """The masks an earlier prune attached (None: no mask): a new prune selects only among their True entries."""
    out: tuple[list[Tensor | None], list[Tensor | None]] = ([], [])
    for i in infos:
        for what, mod, dst in (("down", i.down, out[0]), ("up", i.up, out[1])):
            m = mod._buffers.get(_masks.MASK_BUFFER)
            if m is not None and m.shape != mod.weight.shape:
                raise ValueError(
                    f"adapter {i.name!r}: the {what}-projection carries a tropfast mask of shape {tuple(m.shape)} "
                    f"but its weight is {tuple(mod.weight.shape)}; call tropfast.pruning.remove_masks(model) first"
                )
            dst.append(m)
    return out


def _check_finite(infos: list[AdapterInfo]) -> None:
    items = [
        (i, what, pname, p)
        for i in infos
        for what, mod in (("down", i.down), ("up", i.up))
        for pname, p in mod.named_parameters(recurse=False)
    ]
    for (i, what, pname, p), ok in zip(items, all_finite([it[3] for it in items])):
        if not ok:
            n_nan = int(torch.isnan(p).sum())
            n_inf = int(torch.isinf(p).sum())
            raise ValueError(
                f"adapter {i.name!r}: {what}-projection {pname} has non-finite values "
                f"({n_nan} NaN, {n_inf} Inf); the model was left unchanged"
            )


@dataclass
class _Plan:
    info: AdapterInfo
    A: Tensor | None  # new down.weight; None: keep the trained values, zero where the mask is False
    B: Tensor | None  # new up.weight
    bias: Tensor | None  # new down.bias (structured only)
    units: Tensor | None  # kept units (structured only)
    mask_A: Tensor | None
    mask_B: Tensor | None


def _snapshot(plans: list[_Plan]) -> list[dict]:
    """What ``_restore`` needs to undo ``_write``, copying only what ``_write`` overwrites in place.

    Structured pruning replaces Parameters (the old ones are kept by reference) and ``attach_mask``
    replaces mask buffers (never written into), so the only copies are the weights that
    unstructured pruning zeroes in place: each read once.
    """
    snap = []
    for pl in plans:
        i = pl.info
        s: dict = {"info": i, "params": {}, "data": {}, "attrs": {}, "masks": {}}
        for mod_key, mod in (("down", i.down), ("up", i.up)):
            for pname, p in mod.named_parameters(recurse=False):
                s["params"][(mod_key, pname)] = p
            if pl.units is None:
                s["data"][mod_key] = mod.weight.detach().clone()
            s["attrs"][(mod_key, "in_features")] = mod.in_features
            s["attrs"][(mod_key, "out_features")] = mod.out_features
            s["masks"][mod_key] = mod._buffers.get(_masks.MASK_BUFFER)
        if i.module is not None and hasattr(i.module, "down_sample"):
            s["attrs"][("module", "down_sample")] = i.module.down_sample
        s["r"] = i.r
        snap.append(s)
    return snap


def _restore(snap: list[dict]) -> None:
    for s in snap:
        i = s["info"]
        mods = {"down": i.down, "up": i.up, "module": i.module}
        for (mod_key, pname), p in s["params"].items():
            mod = mods[mod_key]
            if getattr(mod, pname) is not p:
                setattr(mod, pname, p)
        with torch.no_grad():
            for mod_key, data in s["data"].items():
                mods[mod_key].weight.copy_(data)
        for (mod_key, attr), v in s["attrs"].items():
            setattr(mods[mod_key], attr, v)
        for mod_key in ("down", "up"):
            mod = mods[mod_key]
            _masks._detach(mod)
            if s["masks"][mod_key] is not None:
                _masks._attach(mod, s["masks"][mod_key], zero=False, copy=False)
        i.r = s["r"]


def _new_param(old: nn.Parameter, data: Tensor) -> nn.Parameter:
    return nn.Parameter(data.to(dtype=old.dtype, device=old.device).contiguous(), requires_grad=old.requires_grad)


def _write(plans: list[_Plan], keep_masks: bool) -> None:
    for pl in plans:
        i = pl.info
        down, up = i.down, i.up
        if pl.units is not None:
            old_mask_A = down._buffers.get(_masks.MASK_BUFFER)
            old_mask_B = up._buffers.get(_masks.MASK_BUFFER)
            _masks._detach(down)
            _masks._detach(up)
            k = int(pl.units.numel())
            down.weight = _new_param(down.weight, pl.A)
            if down.bias is not None:
                down.bias = _new_param(down.bias, pl.bias)
            down.out_features = k
            up.weight = _new_param(up.weight, pl.B)
            up.in_features = k
            if i.module is not None and hasattr(i.module, "down_sample"):
                i.module.down_sample = k
            i.r = k
            if keep_masks and old_mask_A is not None:
                _masks.attach_mask(down, old_mask_A[pl.units.to(old_mask_A.device)])
            if keep_masks and old_mask_B is not None:
                _masks.attach_mask(up, old_mask_B[:, pl.units.to(old_mask_B.device)])
        else:
            # one pass per weight: zero the pruned entries in place (or copy the solver's values)
            for mod, new, mask in ((down, pl.A, pl.mask_A), (up, pl.B, pl.mask_B)):
                with torch.no_grad():
                    if new is None:
                        mod.weight.masked_fill_(mask.logical_not(), 0)
                    else:
                        mod.weight.copy_(new)
                if keep_masks:
                    _masks._attach(mod, mask, zero=False, copy=False)
                else:
                    _masks._detach(mod)


def prune(
    model: nn.Module,
    keep: float = 0.3,
    score: str = "tropical",
    allocation: str = "layer",
    adapter: str | None = None,
    *,
    pattern: str | None = None,
    activation: str | None = None,
    inplace: bool = True,
    keep_masks: bool = True,
    values: str = "trained",
    combined_q: float = 0.5,
    structured_scope: str = "layer",
    tropical: dict | None = None,
    seed: int = 0,
    snip_data: Iterable | None = None,
    snip_loss_fn: Callable | None = None,
    snip_batches: int = 4,
    allow_non_relu: bool = False,
    progress: bool = False,
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    gradient_rank: dict | None = None,
) -> PruneReport:
    """Prune the bottleneck adapters of ``model`` to a kept fraction ``keep`` of their weights.

    keep: fraction of the weights (A and B) kept in each allocation group, in [0, 1] (a
    number, numpy scalar or 0-d tensor).
    score: magnitude | tropical | combined | random | snip | partner_norm.
    allocation: global (class-blind) | layer (class-uniform) | matrix | node | structured.
    adapter: AdapterHub adapter name (None: every AdapterHub adapter); pattern: glob on module
    names for plain PyTorch adapters (with ``activation`` if it is applied functionally).
    inplace: write into ``model``; False prunes a deep copy, returned as ``report.model``.
    keep_masks: leave masks attached so fine-tuning keeps pruned weights at zero
    (``tropfast.pruning.remove_masks`` detaches them).  values: "trained" keeps the trained
    weights under the mask; "solver" writes the solver's Â, B̂ (tropical/combined only).
    combined_q: share of each group's budget given to the top tropical weights (combined).
    structured_scope: "layer" (round(keep·r) units per adapter) or "global" (one threshold
    over all units).  tropical: solver options, see ``scores.TROPICAL_DEFAULTS``.
    seed: for score="random".  snip_data / snip_loss_fn(model, batch) / snip_batches: for
    score="snip" (default loss: ``model(**batch).loss``).  allow_non_relu: prune adapters
    with other activations as if they were ReLU.
    data / loss_fn(model, batch): a few batches of the task for the data-aware parts:
    ``allocation="gradient_rank"`` and, when ``snip_data`` is not given, ``score="snip"``.
    gradient_rank: {"rtol": 1e-2, "batches": 4}, the rank tolerance and the batches used.
    With ``allocation="gradient_rank"`` each adapter keeps a fraction proportional to its
    normalised gradient rank rank(G_k)/min(d_out, d_in, tokens), G_k = Σ δ xᵀ at its output
    and input (``allocation.gradient_rank_counts``), round(keep·N) weights in total, chosen
    inside each adapter by ``score``.

    Iterative pruning: ``keep`` is always a fraction of all the adapter weights, pruned ones
    included.  A model that carries masks from an earlier ``prune`` (``keep_masks=True``)
    is pruned among its surviving weights only: no pruned weight is revived, the report
    counts what the model holds, and asking a group for more weights than survive in it is
    a ValueError (the model unchanged).  ``structured`` then scores units by their
    surviving weights and keeps the masks.  Without masks (``keep_masks=False``, or after
    ``remove_masks``) every weight is a candidate again.

    Every argument is checked before any work.  Atomic: every score, mask and new weight is
    computed before anything is written; if anything fails, the model is left exactly as it was.
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    keep = _fraction(keep, "keep")
    score = canonical_score(score)
    allocation = canonical_allocation(allocation)
    if values not in VALUES:
        raise ValueError(f"values={values!r}; choose 'trained' or 'solver'")
    if values == "solver" and score not in ("tropical", "combined"):
        raise ValueError(f"values='solver' needs score='tropical' or 'combined', not {score!r}")
    combined_q = _fraction(combined_q, "combined_q")
    if structured_scope not in ("layer", "global"):
        raise ValueError(f"structured_scope must be 'layer' or 'global', got {structured_scope!r}")
    tropical = check_tropical_options(tropical)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(2**63) <= int(seed) < 2**64:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
    if isinstance(snip_batches, bool) or not isinstance(snip_batches, numbers.Integral) or snip_batches < 1:
        raise ValueError(f"snip_batches must be a positive integer, got {snip_batches!r}")
    for arg, v in (("adapter", adapter), ("pattern", pattern), ("activation", activation)):
        if v is not None and not isinstance(v, str):
            raise TypeError(f"{arg} must be a string or None, got {v!r}")
    infos = find_adapters(model, adapter=adapter, pattern=pattern, activation=activation)
    check_adapters(infos, allow_non_relu)
    _check_weights(infos)
    _check_finite(infos)
    gr_opts = None
    if allocation == "gradient_rank":
        gr_opts = dict(GRADIENT_RANK_DEFAULTS)
        unknown = set(gradient_rank or {}) - set(gr_opts)
        if unknown:
            raise ValueError(f"unknown gradient_rank option(s) {sorted(unknown)}; known: {sorted(gr_opts)}")
        gr_opts.update(gradient_rank or {})
        if data is None:
            raise ValueError(
                "allocation='gradient_rank' needs data=<a few batches> to measure the adapters' gradient ranks"
            )
    if data is not None and iter(data) is data:  # a one-shot iterator may feed both SNIP and the gradient ranks
        data = list(itertools.islice(data, max(snip_batches, int((gr_opts or {}).get("batches", 0)))))
    if snip_data is None:
        snip_data = data
    if snip_loss_fn is None:
        snip_loss_fn = loss_fn
    if not inplace:  # checked on the original: no copy is made of a model that cannot be pruned
        model = copy.deepcopy(model)
        for _, m in _masks.masked_modules(model):  # hooks do not survive deepcopy; buffers do
            _masks.attach_mask(m, m._buffers[_masks.MASK_BUFFER])
        infos = find_adapters(model, adapter=adapter, pattern=pattern, activation=activation)
    alive_A, alive_B = _survivors(infos)
    timings = {"check_s": time.perf_counter() - t0}

    dev = infos[0].down.weight.device
    ct = torch.float64 if dev.type == "cpu" else torch.float32
    As = [i.down.weight.detach().to(ct) for i in infos]
    Bs = [i.up.weight.detach().to(ct) for i in infos]
    sc = compute_scores(
        score,
        As,
        Bs,
        keep,
        seed=seed,
        tropical=tropical,
        model=model,
        downs=[i.down for i in infos],
        ups=[i.up for i in infos],
        snip_data=snip_data,
        snip_loss_fn=snip_loss_fn,
        snip_batches=snip_batches,
        progress=progress,
    )
    timings["scores_s"] = sc.time_s
    t1 = time.perf_counter()
    labels = [repr(i.name) for i in infos]
    q = float(combined_q) if score == "combined" else None
    grad_ranks = None
    if allocation == "gradient_rank":
        grad_ranks = adapter_gradient_ranks(
            model,
            [i.module for i in infos],
            data,
            loss_fn,
            batches=int(gr_opts["batches"]),
            rtol=float(gr_opts["rtol"]),
        )
        alloc = allocate_gradient_rank(
            sc, keep, grad_ranks["rank"], grad_ranks["max_rank"], combined_q=q, alive_A=alive_A, alive_B=alive_B,
            labels=labels,
        )
    else:
        alloc = allocate(
            sc, keep, allocation, combined_q=q, structured_scope=structured_scope, alive_A=alive_A, alive_B=alive_B,
            labels=labels,
        )
    timings["allocate_s"] = time.perf_counter() - t1

    plans: list[_Plan] = []
    shapes = [(i.r, i.d_in, i.d_out) for i in infos]
    for k, i in enumerate(infos):
        mA, mB = alloc.masks_A[k], alloc.masks_B[k]
        dt = i.down.weight.dtype
        if alloc.units is not None:
            srcA = sc.A_hat[k] if values == "solver" else As[k]
            srcB = sc.B_hat[k] if values == "solver" else Bs[k]
            u = alloc.units[k]
            bias = i.down.bias.detach()[u].clone() if i.down.bias is not None else None
            plan = _Plan(i, srcA[u].to(dt), srcB[:, u].to(dt), bias, u, None, None)
        elif values == "solver":
            newA = torch.where(mA, sc.A_hat[k], 0).to(dt)
            newB = torch.where(mB, sc.B_hat[k], 0).to(dt)
            plan = _Plan(i, newA, newB, None, None, mA, mB)
        else:  # the trained values under the mask: written in place, nothing to build
            plan = _Plan(i, None, None, None, None, mA, mB)
        plans.append(plan)
    if values == "solver":  # the solver's values may not fit a narrower weight dtype
        new = [t for pl in plans for t in (pl.A, pl.B)]
        for k, ok in enumerate(all_finite(new)):
            if not ok:
                raise FloatingPointError(f"adapter {infos[k // 2].name!r}: the pruned weights are not finite")

    t1 = time.perf_counter()
    snap = _snapshot(plans)
    timings["snapshot_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    try:
        _write(plans, keep_masks)
    except BaseException:
        _restore(snap)
        raise
    timings["write_s"] = time.perf_counter() - t1
    reports = []
    for k, (i, (r, d_in, d_out)) in enumerate(zip(infos, shapes)):
        reports.append(
            AdapterReport(
                i.name,
                i.adapter,
                i.layer,
                i.location,
                i.activation,
                (r, d_in),
                (d_out, r),
                i.r,
                _count(alloc.masks_A[k]),
                _count(alloc.masks_B[k]),
                _count(i.down.weight),
                _count(i.up.weight),
            )
        )
    options = {
        "combined_q": combined_q if score == "combined" else None,
        "structured_scope": structured_scope if allocation == "structured" else None,
        "seed": seed if score == "random" else None,
        "snip_batches": snip_batches if score == "snip" else None,
        "allow_non_relu": allow_non_relu,
        "adapter": adapter,
        "pattern": pattern,
        "inplace": inplace,
    }
    if grad_ranks is not None:
        options["gradient_rank"] = dict(gr_opts, **grad_ranks)
    return PruneReport(
        keep=keep,
        score=score,
        allocation=allocation,
        adapters=reports,
        values=values,
        masks_attached=any(_masks.MASK_BUFFER in m._buffers for i in infos for m in (i.down, i.up)),
        solver=sc.solver,
        time_s=time.perf_counter() - t0,
        score_time_s=sc.time_s,
        options=options,
        model=model,
        timings=timings,
    )
