"""``prune``: score, allocate and write masks into a model's bottleneck adapters, atomically."""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from . import masks as _masks
from .allocation import allocate, canonical_allocation
from .discovery import AdapterInfo, UnsupportedAdapterError, find_adapters
from .scores import canonical_score, compute_scores

__all__ = ["prune", "PruneReport", "AdapterReport", "adapter_scale", "check_adapters"]

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


def adapter_scale(info: AdapterInfo) -> float | Tensor:
    """The factor an adapter multiplies its up-projection's output by (AdapterHub ``scaling``:
    a number, or a learned (1,) or (d_out,) parameter); 1 for plain PyTorch adapters."""
    s = getattr(info.module, "scaling", 1.0) if info.kind == "adapters" else 1.0
    if isinstance(s, Tensor):
        return s.detach().reshape(-1) if s.numel() > 1 else float(s.detach().reshape(()))
    return float(s) if isinstance(s, (int, float)) else 1.0


def _check_finite(infos: list[AdapterInfo]) -> None:
    for i in infos:
        for what, mod in (("down", i.down), ("up", i.up)):
            for pname, p in mod.named_parameters(recurse=False):
                if not torch.isfinite(p).all():
                    n_nan = int(torch.isnan(p).sum())
                    n_inf = int(torch.isinf(p).sum())
                    raise ValueError(
                        f"adapter {i.name!r}: {what}-projection {pname} has non-finite values "
                        f"({n_nan} NaN, {n_inf} Inf); the model was left unchanged"
                    )


@dataclass
class _Plan:
    info: AdapterInfo
    A: Tensor  # new down.weight
    B: Tensor  # new up.weight
    bias: Tensor | None  # new down.bias (structured only)
    units: Tensor | None  # kept units (structured only)
    mask_A: Tensor | None
    mask_B: Tensor | None


def _snapshot(infos: list[AdapterInfo]) -> list[dict]:
    snap = []
    for i in infos:
        s = {"info": i, "params": {}, "attrs": {}, "masks": {}}
        for mod_key, mod in (("down", i.down), ("up", i.up)):
            for pname, p in mod.named_parameters(recurse=False):
                s["params"][(mod_key, pname)] = (p, p.detach().clone())
            s["attrs"][(mod_key, "in_features")] = mod.in_features
            s["attrs"][(mod_key, "out_features")] = mod.out_features
            buf = mod._buffers.get(_masks.MASK_BUFFER)
            s["masks"][mod_key] = None if buf is None else buf.clone()
        if i.module is not None and hasattr(i.module, "down_sample"):
            s["attrs"][("module", "down_sample")] = i.module.down_sample
        snap.append(s)
    return snap


def _restore(snap: list[dict]) -> None:
    for s in snap:
        i = s["info"]
        mods = {"down": i.down, "up": i.up, "module": i.module}
        for (mod_key, pname), (p, data) in s["params"].items():
            mod = mods[mod_key]
            if getattr(mod, pname) is not p:
                setattr(mod, pname, p)
            with torch.no_grad():
                p.copy_(data)
        for (mod_key, attr), v in s["attrs"].items():
            setattr(mods[mod_key], attr, v)
        for mod_key in ("down", "up"):
            mod = mods[mod_key]
            _masks._detach(mod)
            if s["masks"][mod_key] is not None:
                _masks.attach_mask(mod, s["masks"][mod_key])


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
            with torch.no_grad():
                down.weight.copy_(pl.A)
                up.weight.copy_(pl.B)
            if keep_masks:
                _masks.attach_mask(down, pl.mask_A)
                _masks.attach_mask(up, pl.mask_B)
            else:
                _masks._detach(down)
                _masks._detach(up)


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
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    data_batches: int | None = None,
    snip_data: Iterable | None = None,
    snip_loss_fn: Callable | None = None,
    snip_batches: int | None = None,
    allow_non_relu: bool = False,
    progress: bool = False,
) -> PruneReport:
    """Prune the bottleneck adapters of ``model`` to a kept fraction ``keep`` of their weights.

    keep: fraction of the weights (A and B) kept in each allocation group, in [0, 1].
    score: magnitude | tropical | combined | random | snip | partner_norm | grasp | synflow.
    allocation: global (class-blind) | layer (class-uniform) | matrix | node | structured |
    erdos_renyi | class_distribution.
    adapter: AdapterHub adapter name (None: every AdapterHub adapter); pattern: glob on module
    names for plain PyTorch adapters (with ``activation`` if it is applied functionally).
    inplace: write into ``model``; False prunes a deep copy, returned as ``report.model``.
    keep_masks: leave masks attached so fine-tuning keeps pruned weights at zero
    (``tropfast.pruning.remove_masks`` detaches them).  values: "trained" keeps the trained
    weights under the mask; "solver" writes the solver's Â, B̂ (tropical/combined only).
    combined_q: share of each group's budget given to the top tropical weights (combined).
    structured_scope: "layer" (round(keep·r) units per adapter) or "global" (one threshold
    over all units).  tropical: solver options, see ``scores.TROPICAL_DEFAULTS``.
    seed: for score="random".  data / loss_fn(model, batch) / data_batches (default 4): the
    batches the data-dependent scores (snip, grasp) differentiate the loss over (default
    loss: ``model(**batch).loss``); snip_data / snip_loss_fn / snip_batches are older names of
    the same three.  allow_non_relu: prune adapters with other activations as if they were ReLU.

    Atomic: every score, mask and new weight is computed before anything is written; if
    anything fails, the model is left exactly as it was.
    """
    t0 = time.perf_counter()
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not math.isfinite(keep) or not 0 <= keep <= 1:
        raise ValueError(f"keep must be a fraction in [0, 1], got {keep!r}")
    keep = float(keep)
    score = canonical_score(score)
    allocation = canonical_allocation(allocation)
    if values not in VALUES:
        raise ValueError(f"values={values!r}; choose 'trained' or 'solver'")
    if values == "solver" and score not in ("tropical", "combined"):
        raise ValueError(f"values='solver' needs score='tropical' or 'combined', not {score!r}")
    if not isinstance(combined_q, (int, float)) or not 0 <= combined_q <= 1:
        raise ValueError(f"combined_q must be in [0, 1], got {combined_q!r}")
    if not inplace:
        model = copy.deepcopy(model)
        for _, m in _masks.masked_modules(model):  # hooks do not survive deepcopy; buffers do
            _masks.attach_mask(m, m._buffers[_masks.MASK_BUFFER])
    infos = find_adapters(model, adapter=adapter, pattern=pattern, activation=activation)
    check_adapters(infos, allow_non_relu)
    _check_finite(infos)

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
        data=data,
        loss_fn=loss_fn,
        data_batches=data_batches,
        snip_data=snip_data,
        snip_loss_fn=snip_loss_fn,
        snip_batches=snip_batches,
        scales=[adapter_scale(i) for i in infos],
        progress=progress,
    )
    alloc = allocate(
        sc,
        keep,
        allocation,
        combined_q=float(combined_q) if score == "combined" else None,
        structured_scope=structured_scope,
    )

    plans: list[_Plan] = []
    reports: list[AdapterReport] = []
    for k, i in enumerate(infos):
        srcA = sc.A_hat[k] if values == "solver" else As[k]
        srcB = sc.B_hat[k] if values == "solver" else Bs[k]
        mA, mB = alloc.masks_A[k], alloc.masks_B[k]
        dt = i.down.weight.dtype
        if alloc.units is not None:
            u = alloc.units[k]
            newA = srcA[u].to(dt)
            newB = srcB[:, u].to(dt)
            bias = i.down.bias.detach()[u].clone() if i.down.bias is not None else None
            plan = _Plan(i, newA, newB, bias, u, None, None)
            r_after = int(u.numel())
        else:
            newA = torch.where(mA, srcA, torch.zeros_like(srcA)).to(dt)
            newB = torch.where(mB, srcB, torch.zeros_like(srcB)).to(dt)
            plan = _Plan(i, newA, newB, None, None, mA, mB)
            r_after = i.r
        if not (torch.isfinite(newA).all() and torch.isfinite(newB).all()):
            raise FloatingPointError(f"adapter {i.name!r}: the pruned weights are not finite")
        plans.append(plan)
        reports.append(
            AdapterReport(
                i.name,
                i.adapter,
                i.layer,
                i.location,
                i.activation,
                (i.r, i.d_in),
                (i.d_out, i.r),
                r_after,
                int(mA.sum()),
                int(mB.sum()),
                int((newA != 0).sum()),
                int((newB != 0).sum()),
            )
        )

    snap = _snapshot(infos)
    try:
        _write(plans, keep_masks)
    except BaseException:
        _restore(snap)
        for i, s in zip(infos, snap):
            i.r = s["attrs"][("down", "out_features")]
        raise
    options = {
        "combined_q": combined_q if score == "combined" else None,
        "structured_scope": structured_scope if allocation == "structured" else None,
        "seed": seed if score == "random" else None,
        "data_batches": sc.extra.get("data_batches"),
        "allow_non_relu": allow_non_relu,
        "adapter": adapter,
        "pattern": pattern,
        "inplace": inplace,
    }
    return PruneReport(
        keep=keep,
        score=score,
        allocation=allocation,
        adapters=reports,
        values=values,
        masks_attached=bool(keep_masks and alloc.units is None),
        solver=sc.solver,
        time_s=time.perf_counter() - t0,
        score_time_s=sc.time_s,
        options=options,
        model=model,
    )
