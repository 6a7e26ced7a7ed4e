"""``solve``: min F(Â, B̂) = ½Σ_j(‖G1_j−Ĝ1_j‖² + ‖G2_j−Ĝ2_j‖²) + λ1‖Â‖₁ + λ2‖B̂‖₁
(+ lam_gen·Σ_i ‖Â_i‖₂‖B̂_{:,i}‖₁, the generator l2,1 penalty: ops.GENERATOR_PENALTY).

* ``ista``  the paper's Algorithm 1: Â = A, B̂ = B, then T proximal-gradient steps with
            both gradients at the current point (exactly a loop of ``prox_step``).
* ``fista`` ISTA with Nesterov momentum and adaptive (gradient) restart per hidden unit.
* ``bcd``   exact block minimisation over Â then B̂ then the free rescaling of each
            hidden unit (docs/design.md §3); needs no step size and never increases F.

Every solver runs all adapters of a model at once: a batch (L, r, d_in) / (L, d_out, r),
or lists of differently shaped adapters, zero-padded (padding is exact).  This module
never names a backend: the registry hands it the whole-solve callables (docs/design.md §5).
"""
from __future__ import annotations

import functools
import math
import numbers
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from . import _checks, backends, ops

METHODS = ops.METHODS
PATHS = ("auto", "dense", "sorted")


class _KernelStats(NamedTuple):
    """A whole solve's own sums (``stats``: F at the start and end, nonzeros; (L, 3) float64),
    from which a plain call's Solution makes its per-adapter fields when they are first read."""

    stats: Tensor
    numel: float
    steps: int


class _FromStats:
    """A field of ``Solution`` that a plain call's result makes from the kernel's stats when
    it is first read (docs/design.md §3): such a call then costs four small tensors fewer.
    Every other result holds the field's tensor itself, which shadows this descriptor."""

    def __init__(self, make: Callable[[_KernelStats], Tensor]):
        self.make = make

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None or "_stats" not in obj.__dict__:
            raise AttributeError(self.name)  # on the class: a dataclass field without a default
        value = obj.__dict__[self.name] = self.make(obj.__dict__["_stats"])
        return value


@dataclass
class Solution:
    """Result of ``solve``; per-adapter tensors have shape (L,)."""

    A_hat: Tensor | list[Tensor]  # same layout as the input A
    B_hat: Tensor | list[Tensor]
    # (L, n_records) float64: F at record_steps (frozen after an adapter converged)
    objective: Tensor = _FromStats(lambda s: s.stats.narrow(1, 0, 2))  # type: ignore[assignment]
    record_steps: list[int]  # step index of each objective record
    # (L,) nonzeros of (Â, B̂) over the adapter's weights
    kept_fraction: Tensor = _FromStats(lambda s: s.stats.select(1, 2) / s.numel)  # type: ignore[assignment]
    # (L,) steps (BCD: sweeps) run per adapter
    steps: Tensor = _FromStats(  # type: ignore[assignment]
        lambda s: torch.full(s.stats.shape[:1], s.steps, dtype=torch.long, device=s.stats.device)
    )
    # (L,) bool; with tol=None, False everywhere
    converged: Tensor = _FromStats(  # type: ignore[assignment]
        lambda s: torch.zeros(s.stats.shape[0], dtype=torch.bool, device=s.stats.device)
    )
    lam1: Tensor  # (L,) the λ used (scaled by the search when target_keep is set)
    lam2: Tensor
    lr: Tensor | None  # (L,) step size (None for bcd)
    method: str
    backend: str
    batched: bool = True
    search: list[dict] = field(default_factory=list)  # λ-search trace when target_keep is set
    path: str = "dense"  # the path that ran: "dense" or "sorted"
    lam_gen: Tensor | None = None  # (L,) the generator-penalty weight used (None: no penalty)

    @property
    def final_objective(self) -> Tensor:
        return self.objective[:, -1]

    def summary(self) -> str:
        """A short readable report, one line per adapter."""
        lines = [
            f"method={self.method} path={self.path} backend={self.backend} adapters={self.kept_fraction.numel()}",
            f"{'#':>4} {'F(start)':>12} {'F(end)':>12} {'kept':>7} {'steps':>6} {'conv':>5} {'lam1':>9} {'lam2':>9}",
        ]
        for i in range(self.kept_fraction.numel()):
            lines.append(
                f"{i:>4} {float(self.objective[i, 0]):12.5g} {float(self.objective[i, -1]):12.5g} "
                f"{float(self.kept_fraction[i]):7.3f} {int(self.steps[i]):6d} "
                f"{'yes' if bool(self.converged[i]) else 'no':>5} {float(self.lam1[i]):9.3g} {float(self.lam2[i]):9.3g}"
            )
        return "\n".join(lines)

    @classmethod
    def _from_kernel(cls, A_hat, B_hat, stats: _KernelStats, lam1, lam2, lr, method, backend, batched, path) -> Solution:
        """The result of one whole-solve call without target_keep, tol, records or penalty:
        objective, kept_fraction, steps and converged are made from ``stats`` when first read."""
        sol = cls.__new__(cls)
        sol.__dict__.update(
            A_hat=A_hat, B_hat=B_hat, record_steps=[0, stats.steps], lam1=lam1, lam2=lam2, lr=lr, method=method,
            backend=backend, batched=batched, search=[], path=path, lam_gen=None, _stats=stats,
        )  # fmt: skip
        return sol


# ---------------------------------------------------------------------------------------
# Layout: single, batched or a list of adapters of different shapes -> one padded batch.
# ---------------------------------------------------------------------------------------
@dataclass
class _Layout:
    kind: str  # "single", "batch" or "list"
    shapes: list[tuple[int, int, int]]  # (r, d_in, d_out) per adapter
    dtype: torch.dtype

    def numel(self, device) -> Tensor | float:
        """Weights per adapter: one number for a uniform batch, else an (L,) float64 tensor."""
        if self.kind != "list":
            r, di, do = self.shapes[0]
            return float(r * (di + do))
        return torch.tensor([r * (di + do) for r, di, do in self.shapes], device=device, dtype=torch.float64)


def pad_adapters(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Zero-pad adapters of different shapes into (L, r_max, d_in_max), (L, d_out_max, r_max)."""
    r = max(a.shape[0] for a in As)
    di = max(a.shape[1] for a in As)
    do = max(b.shape[0] for b in Bs)
    if all(a.shape == (r, di) for a in As) and all(b.shape == (do, r) for b in Bs):
        return torch.stack(list(As)), torch.stack(list(Bs))  # nothing to pad: one copy, no zeroing
    A = As[0].new_zeros((len(As), r, di))
    B = Bs[0].new_zeros((len(Bs), do, r))
    for k, (a, b) in enumerate(zip(As, Bs)):
        A[k, : a.shape[0], : a.shape[1]] = a
        B[k, : b.shape[0], : b.shape[1]] = b
    return A, B


def _canonical(A, B) -> tuple[Tensor, Tensor, _Layout]:
    """The padded batch of the input; shapes, dtypes and devices checked (values are not read)."""
    if isinstance(A, (list, tuple)) or isinstance(B, (list, tuple)):
        if not isinstance(A, (list, tuple)) or not isinstance(B, (list, tuple)):
            raise TypeError("A and B must both be tensors or both be lists of tensors")
        if len(A) != len(B):
            raise ValueError(f"got {len(A)} down-projections A but {len(B)} up-projections B")
        if len(A) == 0:
            raise ValueError("the list of adapters is empty")
        for k, (a, b) in enumerate(zip(A, B)):
            if _checks.check_adapter(a, b, (f"A[{k}]", f"B[{k}]"), finite=False):
                raise ValueError(f"list entries must be single adapters; A[{k}] has shape {tuple(a.shape)}")
            if a.dtype != A[0].dtype or a.device != A[0].device:
                raise TypeError(f"A[{k}] is {a.dtype} on {a.device}; every adapter must share A[0]'s dtype and device")
        shapes = [(a.shape[0], a.shape[1], b.shape[0]) for a, b in zip(A, B)]
        A3, B3 = pad_adapters([a.detach() for a in A], [b.detach() for b in B])
        return A3, B3, _Layout("list", shapes, A[0].dtype)
    batched = _checks.check_adapter(A, B, finite=False)
    A3, B3 = (A, B) if batched else (A.unsqueeze(0), B.unsqueeze(0))
    shapes = [(A3.shape[1], A3.shape[2], B3.shape[1])]
    if A3.requires_grad or B3.requires_grad:
        A3, B3 = A3.detach(), B3.detach()
    return A3, B3, _Layout("batch" if batched else "single", shapes, A.dtype)


def _restore(X: Tensor, layout: _Layout, which: str) -> Tensor | list[Tensor]:
    if X.dtype != layout.dtype:
        X = X.to(layout.dtype)
    if layout.kind == "single":
        return X[0]
    if layout.kind == "batch":
        return X
    if which == "A":
        return [X[k, :r, :di].clone() for k, (r, di, _) in enumerate(layout.shapes)]
    return [X[k, :do, :r].clone() for k, (r, _, do) in enumerate(layout.shapes)]


def _per_adapter(x, name: str, L: int, device, dtype, positive: bool = False) -> Tensor:
    if type(x) is float and math.isfinite(x) and (x > 0 or (x == 0 and not positive)):
        return torch.full((L,), x, dtype=dtype, device=device)  # the common case, checked
    _checks.check_scalar(x, name, L, positive=positive)
    if isinstance(x, Tensor):
        t = x.detach().to(device=device, dtype=dtype)
        return t.expand(L).clone() if t.dim() == 0 else t.clone()
    return torch.full((L,), float(x), dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------
# Pieces shared by the solvers (on the padded batch, in the compute dtype).
# ---------------------------------------------------------------------------------------
def objective(
    kern: ops.Kernels, A, B, Ah, Bh, lam1: Tensor, lam2: Tensor, lam_gen: Tensor | None = None
) -> Tensor:
    """F per adapter: (L,)."""
    l1 = lam1 * Ah.abs().sum((-2, -1)) + lam2 * Bh.abs().sum((-2, -1))
    if lam_gen is not None:
        l1 = l1 + lam_gen * (torch.linalg.vector_norm(Ah, dim=-1) * Bh.abs().sum(-2)).sum(-1)
    return kern.hsd_loss(A, B, Ah, Bh) + l1


def _unit_norms(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """a_i = ‖A_i‖², β_i = ‖B_{:,i}‖²: (L, r) each, one read of the weights."""
    return torch.linalg.vector_norm(A, dim=-1).square(), torch.linalg.vector_norm(B, dim=-2).square()


def _lr_from_norms(a: Tensor, beta: Tensor, dtype: torch.dtype) -> Tensor:
    lip = (3.0 * (a + beta)).amax(-1)
    return 1.0 / lip.clamp_min(torch.finfo(dtype).tiny)


def safe_lr(A: Tensor, B: Tensor) -> Tensor:
    """A step size 1/L per adapter from the curvature of the smooth part: (L,).

    For one unit the smooth part is ½(βa − 2sc + β̂â).  Its Hessian in (Â_i, B̂_{:,i}) has
    diagonal blocks β̂·I and â·I and off-diagonal blocks bounded by 2‖Â_i‖‖B̂_{:,i}‖ +
    ‖A_i‖‖B_{:,i}‖, so its norm is at most 2(â + β̂) + √(aβ) ≤ 3(a + β) while the
    iterates stay within the norms of the originals (soft-thresholding only shrinks).
    """
    return _lr_from_norms(*_unit_norms(A, B), A.dtype)


def _kept(Ah: Tensor, Bh: Tensor, numel: Tensor | float) -> Tensor:
    nnz = (Ah != 0).sum((-2, -1)).double() + (Bh != 0).sum((-2, -1)).double()
    return nnz / numel


# ---------------------------------------------------------------------------------------
# Which path: the cost model of docs/design.md §4.
# ---------------------------------------------------------------------------------------
# Measured on a 2-core x86-64 CPU, one thread, fp32, at 24x768x64 and 6x384x24 (the raw
# kernels of benchmarks/test_bench_sorted.py::test_crossover and the torch backend's public
# paths; benchmarks/results/README.md, "path crossover"): the sorted path costs about
# SORT_COST dense sweeps of the same weights to sort, plus per step REC_COST of a dense sweep
# per unit entry (a binary search and a few scalars per unit instead of a pass over d
# numbers: O(log d / d)).  Both depend on the method, because a BCD sweep costs about twice
# an ISTA step while the sort costs the same.  CUDA and Triton take the CPU constants until
# the GPU check measures their crossover.
SORT_COST = {
    "cpu": {"bcd": 32.0, "ista": 120.0},
    "torch": {"bcd": 20.0, "ista": 15.0},
}
REC_COST = {
    "cpu": {"bcd": 0.5, "ista": 14.0},
    "torch": {"bcd": 1.0, "ista": 30.0},
}
# BCD stops a unit once its state cycles, on the sorted path of every backend and in the
# native CPU dense loop (docs/design.md §4).  There a long dense BCD solve costs the sweeps
# its units take to cycle, not T: DENSE_EXIT is that cost, in sweeps per unit, measured on
# the benchmarks' weights (benchmarks/results/README.md, "T-scaling").  Backends without
# the dense early exit have no entry: their dense solve costs T sweeps.
DENSE_EXIT = {
    "cpu": {"bcd": 16.0},
}


def prefers_sorted(backend: str, method: str, steps: int, d_in: int, d_out: int) -> bool:
    """Whether ``path="auto"`` runs the sorted path: when its estimated cost is lower.

    Costs are in dense sweeps of the same weights: dense = steps, or at most DENSE_EXIT
    where the dense loop stops early; sorted = SORT_COST + steps · REC_COST · log2(d) / d,
    with d the mean of d_in and d_out (docs/design.md §4).
    """
    if method == "fista" or steps < 1:
        return False
    return sorted_sweeps(backend, method, steps, d_in, d_out) < dense_sweeps(backend, method, steps)


def dense_sweeps(backend: str, method: str, steps: int) -> float:
    """The dense path's estimated cost, in sweeps: ``steps``, capped by DENSE_EXIT."""
    cap = DENSE_EXIT.get(backend, {}).get(method)
    return float(steps) if cap is None else min(float(steps), cap)


def sorted_sweeps(backend: str, method: str, steps: int, d_in: int, d_out: int) -> float:
    """The sorted path's estimated cost, in dense sweeps of the same weights (bcd and ista)."""
    d = max(2.0, (d_in + d_out) / 2)
    sort = SORT_COST.get(backend, SORT_COST["cpu"])[method]
    rec = REC_COST.get(backend, REC_COST["cpu"])[method]
    return sort + steps * rec * math.log2(d) / d


# ---------------------------------------------------------------------------------------
# The two ways to run: one whole-solve kernel call, or a step loop with diagnostics.
# ---------------------------------------------------------------------------------------
def _run_whole(whole: Callable, A, B, lam1, lam2, method: str, steps: int, lr: Tensor | None, numel, lam_gen=None):
    """One call of a whole-solve kernel: its stats give F at the start and end and the kept counts."""
    lr_arg = lr if lr is not None else _unit_step(lam1)  # BCD takes no step: any positive one
    if lam_gen is None:  # the call without the penalty stays exactly what it was
        Ah, Bh, stats = whole(A, B, lam1, lam2, lr_arg, method, steps)
    else:
        Ah, Bh, stats = whole(A, B, lam1, lam2, lr_arg, method, steps, lam_gen)
    return Ah, Bh, stats.narrow(1, 0, 2), [0, steps], None, None, stats.select(1, 2) / numel


_ONES: dict = {}


def _unit_step(like: Tensor) -> Tensor:
    """A 0-d 1 of ``like``'s dtype and device, made once: the step size BCD's kernels are
    handed and never read (one tensor fewer per call).  Tensors without values (meta, fake)
    and traced calls get a fresh one, so no such tensor is ever cached."""
    if torch.compiler.is_compiling() or not _checks.reads_values(like):
        return like.new_ones(())  # traced or fake tensors: no cached constant
    key = (like.device, like.dtype)
    one = _ONES.get(key)
    if one is None:
        one = _ONES[key] = like.new_ones(())
    return one


def _run_steps(
    be: backends.Backend, A, B, lam1, lam2, method, steps, lr, tol, record_every, progress, numel, lam_gen=None
):
    """The step loop: tol (per-adapter early stop) and objective records every ``record_every`` steps."""
    kern = be.kernels
    L = A.shape[0]
    st = be.start(A, B)
    active = torch.ones(L, dtype=torch.bool, device=A.device)
    steps_run = torch.zeros(L, dtype=torch.long, device=A.device)
    records = [objective(kern, A, B, st.Ah, st.Bh, lam1, lam2, lam_gen)]
    record_steps = [0]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"tropfast {method}", unit="step", leave=False)
    for t in range(1, steps + 1):
        if lam_gen is None:
            new = be.step(method, A, B, st, lam1, lam2, lr)
        else:
            new = be.step(method, A, B, st, lam1, lam2, lr, lam_gen)
        act = active.view(-1, 1, 1)
        if tol is not None:
            scale = torch.maximum(st.Ah.abs().amax((-2, -1)), st.Bh.abs().amax((-2, -1))).clamp_min(torch.finfo(A.dtype).tiny)
            change = torch.maximum((new.Ah - st.Ah).abs().amax((-2, -1)), (new.Bh - st.Bh).abs().amax((-2, -1))) / scale
        st = new._replace(Ah=torch.where(act, new.Ah, st.Ah), Bh=torch.where(act, new.Bh, st.Bh))
        steps_run += active.long()
        if tol is not None:
            active = active & ~(change <= tol)
        if bar is not None:
            bar.update(1)
        last = t == steps or (tol is not None and not bool(active.any()))
        if last or (record_every > 0 and t % record_every == 0):
            records.append(objective(kern, A, B, st.Ah, st.Bh, lam1, lam2, lam_gen))
            record_steps.append(t)
        if last:
            break
    if bar is not None:
        bar.close()
    converged = ~active if tol is not None else torch.zeros(L, dtype=torch.bool, device=A.device)
    # float64 like the whole-solve kernels' sums: one dtype for F whichever way the solve ran
    obj = torch.stack(records, dim=1).to(torch.float64)
    return st.Ah, st.Bh, obj, record_steps, steps_run, converged, _kept(st.Ah, st.Bh, numel)


def _rows(x, idx: Tensor):
    """Rows ``idx`` of a per-adapter tensor; a number or None (the same for every adapter) as is."""
    return x[idx] if isinstance(x, Tensor) else x


# Early stopping and the λ search branch on the iterates' values: they cannot be traced.
_run_steps_eager = ops.eager(_run_steps, "tropfast.solve(tol=...): the early stop reads the iterates")


def solve(
    A: Tensor | Sequence[Tensor],
    B: Tensor | Sequence[Tensor],
    lam1: float | Tensor = 1e-3,
    lam2: float | Tensor = 1e-3,
    method: str = "ista",
    steps: int = 100,
    lr: float | Tensor | None = None,
    tol: float | None = None,
    target_keep: float | None = None,
    backend: str | None = None,
    *,
    record_every: int | None = None,
    search_iters: int = 24,
    search_tol: float | None = None,
    progress: bool = False,
    fused: bool | None = None,
    path: str = "auto",
    lam_gen: float | Tensor = 0.0,
) -> Solution:
    """Sparse (Â, B̂) whose zonotope generators stay close to those of (A, B).

    A: (r, d_in) | (L, r, d_in) | list of (r_k, d_in_k);  B: (d_out, r) | (L, d_out, r) | list.
    lam1, lam2: L1 weights on Â and B̂ (numbers, or (L,) tensors, one per adapter).
    method: "ista" (the paper's Algorithm 1), "fista" or "bcd".  steps: iterations (sweeps).
    lr: ISTA/FISTA step; None picks ``safe_lr`` per adapter.
    tol: stop an adapter once the largest relative change of its weights in a step is <= tol.
    target_keep: search a per-adapter multiplier μ of (lam1, lam2) (the ratio is kept) so the
    solution keeps about that fraction of the weights, stopping once every adapter is within
    ``search_tol`` of it (default: half a weight) or after ``search_iters`` solves.

    How it runs (docs/design.md §3-4): without ``tol`` and ``record_every``, one whole-solve
    kernel call per solve (``fused``), which returns F at the start and the end and the kept
    counts from its own sums; ``path`` picks the dense iteration or the sorted path for it:
    "auto" (default) by the cost model of ``prefers_sorted`` (sorted for long solves),
    "dense" or "sorted" (``bcd``/``ista`` only; the same iterates up to rounding).  With
    ``tol`` or ``record_every`` > 0 (or ``fused=False``) a step loop runs instead, recording
    F every ``record_every`` steps (default: about 100 records) and stopping adapters on tol.

    lam_gen: weight of the generator l2,1 penalty lam_gen·Σ_i ‖Â_i‖₂‖B̂_{:,i}‖₁ (a number or
    (L,) tensor, >= 0; 0 solves exactly the problem without it).  It pushes whole hidden
    units to zero; every method, backend and path keeps its closed-form block updates
    (``tropfast.ops.GENERATOR_PENALTY``), and F (``objective``) includes it.  The λ search
    of ``target_keep`` scales it with lam1 and lam2.
    """
    key = None
    if tol is None and target_keep is None and record_every is None and fused is None and search_tol is None:
        key = _plain_key(A, B, lam1, lam2, method, steps, lr, backend, path, search_iters, lam_gen)
        if key is not None:
            plan = _PLANS.get(key)
            if plan is not None:
                return _run_plan(plan, A, B, lam1, lam2, lr, method, steps)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a solver; choose one of {', '.join(METHODS)}")
    steps = _int_arg(steps, "steps", 1)
    search_iters = _int_arg(search_iters, "search_iters", 0 if target_keep is None else 1)
    if tol is not None and (not isinstance(tol, (int, float)) or isinstance(tol, bool) or not math.isfinite(tol) or tol < 0):
        raise ValueError(f"tol must be a finite number >= 0 or None, got {tol!r}")
    if target_keep is not None:
        target_keep = _fraction_arg(target_keep, "target_keep")
    if search_tol is not None and (not isinstance(search_tol, (int, float)) or not 0 <= search_tol < 1):
        raise ValueError(f"search_tol must be in [0, 1), got {search_tol!r}")
    if record_every is not None:
        record_every = _int_arg(record_every, "record_every", 0)
    if method == "bcd" and lr is not None:
        raise ValueError("bcd takes no step size: leave lr=None")
    if fused and tol is not None:
        raise ValueError("fused=True runs exactly `steps` iterations: it cannot stop early on tol")
    if path not in PATHS:
        raise ValueError(f"path={path!r}: choose 'auto', 'dense' or 'sorted'")
    stepwise = fused is False or tol is not None or bool(record_every)
    if path == "sorted":
        if method == "fista":
            raise ValueError("fista has no sorted form (its extrapolation mixes two thresholds): use path='dense'")
        if stepwise:
            raise ValueError("path='sorted' runs exactly `steps` iterations in one call: leave tol, record_every and fused unset")

    A3, B3, layout = _canonical(A, B)
    L = A3.shape[0]
    ct = ops.compute_dtype(A3.dtype)
    if key is not None and _checks.reads_values(A3):
        # a plain call, checked: its plan is made once and kept for the calls like it
        plan = _make_plan(backends.get(backend, A3.device, ct), layout, ct, method, steps, path, A, B, A3, B3)
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = plan
        return _run_plan(plan, A, B, lam1, lam2, lr, method, steps)
    if ct != A3.dtype:
        A3, B3 = A3.to(ct), B3.to(ct)
    lam1_t = _per_adapter(lam1, "lam1", L, A3.device, ct)
    lam2_t = _per_adapter(lam2, "lam2", L, A3.device, ct)
    live = _checks.reads_values(A3)
    # no penalty anywhere: the unpenalised solve, exactly (fake tensors while tracing keep it);
    # a plain zero (the default) needs neither a check nor a tensor
    lg_t: Tensor | None = None
    if isinstance(lam_gen, Tensor) or not isinstance(lam_gen, (int, float)) or isinstance(lam_gen, bool) or lam_gen != 0:
        lg_t = _per_adapter(lam_gen, "lam_gen", L, A3.device, ct)
        if _checks.reads_values(lg_t) and not bool((lg_t != 0).any()):
            lg_t = None
    norms = _unit_norms(A3, B3) if (method != "bcd" and lr is None) else None
    if live and norms is not None:
        # one read of the weights gives the safe step and the NaN/Inf check: a non-finite
        # entry makes its unit's norm non-finite (a finite overflow is told apart by the exact check)
        _check_sum(norms[0].sum() + norms[1].sum(), A, B)
    lr_t = None
    if method != "bcd":
        lr_t = _lr_from_norms(*norms, ct) if lr is None else _per_adapter(lr, "lr", L, A3.device, ct, positive=True)
    if live:
        _check_lambdas(method, lam1, lam2, lam1_t, lam2_t, target_keep is not None, lg_t)
    shapes_only = not live and not torch.compiler.is_compiling()
    be = backends.get(backend, A3.device, ct, shapes_only=shapes_only)
    numel = layout.numel(A3.device)
    long = True  # the step loop: a solve of unknown length
    if stepwise:
        every = max(1, steps // 100) if record_every is None else record_every
        ran = "dense"

        steps_fn = _run_steps if tol is None else _run_steps_eager
        subset = True

        def run(l1: Tensor, l2: Tensor, lg: Tensor | None = None, idx: Tensor | None = None):
            show = progress and target_keep is None
            if idx is None:
                return steps_fn(be, A3, B3, l1, l2, method, steps, lr_t, tol, every, show, numel, lg)
            return steps_fn(be, A3[idx], B3[idx], l1, l2, method, steps, _rows(lr_t, idx), tol, every, show, _rows(numel, idx), lg)

    else:
        use_sorted, long = _path_and_length(be, method, steps, path, A3, B3)
        whole = _whole_solver(be, use_sorted, long, A3, B3)
        ran = "sorted" if use_sorted else "dense"
        # a prepared sorted solver holds every adapter's sorted units: probes solve them all
        subset = not (use_sorted and be.prepares_sorted)

        def run(l1: Tensor, l2: Tensor, lg: Tensor | None = None, idx: Tensor | None = None):
            if idx is None:
                return _run_whole(whole, A3, B3, l1, l2, method, steps, lr_t, numel, lg)
            return _run_whole(whole, A3[idx], B3[idx], l1, l2, method, steps, _rows(lr_t, idx), _rows(numel, idx), lg)

    # Without the norms, the NaN/Inf check of one solve reads the kernel's own sums: the
    # start objective λ1‖A‖₁ + λ2‖B‖₁ of every backend is non-finite when an entry is (the
    # λ are finite and >= 0, and 0·Inf is NaN), so it costs no pass over the weights.  A λ
    # search, the step loop and a long solve check first, with two plain sums, so that a bad
    # input fails before the work starts (docs/design.md §3).
    check_after = live and norms is None and not long and target_keep is None
    if live and norms is None and not check_after:
        _check_sum(A3.sum() + B3.sum(), A, B)
    trace: list[dict] = []
    found = None
    if target_keep is not None:
        tol_keep = 0.5 / numel if search_tol is None else float(search_tol)
        mu, found = _search_eager(
            run, lam1_t, lam2_t, float(target_keep), search_iters, tol_keep, trace, progress, lg_t, subset
        )
        lam1_t, lam2_t = lam1_t * mu, lam2_t * mu
        lg_t = None if lg_t is None else lg_t * mu
    # the search's best probe of each adapter is the solve at its μ: no second run
    Ah, Bh, obj, rec_steps, steps_run, conv, kept = found if found is not None else run(lam1_t, lam2_t, lg_t)
    if check_after:
        # F at the start and end are finite unless an input is (or a sum overflows); the
        # (L, 2) records come to Python in one call, which is cheaper than a sum and an item
        _check_sum(float(sum(map(sum, obj.tolist()))), A, B)
    if steps_run is None:
        steps_run = torch.full((L,), steps, dtype=torch.long, device=A3.device)
        conv = torch.zeros(L, dtype=torch.bool, device=A3.device)
    return Solution(
        A_hat=_restore(Ah, layout, "A"),
        B_hat=_restore(Bh, layout, "B"),
        objective=obj,
        record_steps=rec_steps,
        kept_fraction=kept,
        steps=steps_run,
        converged=conv,
        lam1=lam1_t,
        lam2=lam2_t,
        lr=lr_t,
        method=method,
        backend=be.name,
        batched=layout.kind != "single",
        search=trace,
        path=ran,
        lam_gen=lg_t,
    )


def _path_and_length(be: backends.Backend, method: str, steps: int, path: str, A3: Tensor, B3: Tensor) -> tuple[bool, bool]:
    """Whether a whole solve runs the sorted path, and whether it is long (it is then checked
    before the work, and a native one runs so that Ctrl-C interrupts it)."""
    L, r, d_in = A3.shape
    d_out = B3.shape[1]
    use_sorted = path == "sorted" or (path == "auto" and prefers_sorted(be.name, method, steps, d_in, d_out))
    sweeps = sorted_sweeps(be.name, method, steps, d_in, d_out) if use_sorted else steps  # the worst case
    return use_sorted, L * r * (d_in + d_out) * max(sweeps, 16) >= _LONG_SOLVE


def _whole_solver(be: backends.Backend, use_sorted: bool, long: bool, A3: Tensor, B3: Tensor) -> Callable:
    """The whole-solve callable for these weights."""
    whole = be.sorted_solver(A3, B3) if use_sorted else be.kernels.solve_fused
    if be.name == "cpu" and long and not torch.compiler.is_compiling():
        whole = _interruptible(whole)
    return whole


# ---------------------------------------------------------------------------------------
# The plain call, planned once (docs/design.md §3).
# ---------------------------------------------------------------------------------------
_INF = math.inf
_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)
_PLANS: dict = {}
_PLANS_MAX = 256


class _Plan(NamedTuple):
    """What ``solve`` decides from a plain call's arguments and the weights' metadata alone."""

    layout: _Layout
    L: int
    ct: torch.dtype  # the compute dtype
    detach: bool  # the weights require grad: the solve runs on detached views
    whole: Callable | None  # the whole-solve callable (None: a sorted solver prepared per weights)
    be: backends.Backend
    ran: str  # "dense" or "sorted"
    long: bool  # a long solve: the weights are summed (checked) before the kernel
    numel: float
    one: Tensor  # BCD's step argument, which it never reads (``_unit_step``)


def _plain_key(A, B, lam1, lam2, method, steps, lr, backend, path, search_iters, lam_gen) -> tuple | None:
    """The key of a plain call, or None.

    A plain call gives two tensors (or parameters), positive finite floats for lam1 and lam2
    (and lr, or None), no generator penalty, and none of tol, target_keep, record_every,
    fused or search_tol (checked by the caller); every other argument is a str or int.  Its
    checks raise nothing and warn of nothing once they passed for the same arguments and the
    same shapes, dtypes and devices, so ``solve`` keeps its decisions (``_Plan``) under this
    key: the arguments, the weights' metadata, what picks the backend (TROPFAST_BACKEND when
    ``backend`` is None, TRITON_INTERPRET where Triton can be picked, the registry's epoch)
    and the cost model's tables (assigned anew, as a test does, they give new keys).  Only
    the NaN/Inf check reads the weights on every call (docs/design.md §3).
    """
    if (
        type(A) not in _PLAIN_TENSORS
        or type(B) not in _PLAIN_TENSORS
        or type(lam1) is not float
        or type(lam2) is not float
        or not (0.0 < lam1 < _INF and 0.0 < lam2 < _INF)
        or (lr is not None and not (type(lr) is float and 0.0 < lr < _INF))
        or type(lam_gen) not in (int, float)
        or lam_gen != 0
        or type(method) is not str
        or type(steps) is not int
        or type(path) is not str
        or type(search_iters) is not int
        or (backend is not None and type(backend) is not str)
        or torch.compiler.is_compiling()
    ):
        return None
    dev = A.device
    req = backend if backend is not None else os.environ.get(backends.ENV_VAR)
    # TRITON_INTERPRET decides whether Triton runs: CPU tensors reach it only by its name
    interp = os.environ.get("TRITON_INTERPRET") if dev.type != "cpu" or (req or "").lower() == "triton" else None
    return (
        method, steps, path, backend, req, interp, search_iters, lr is None,
        A.shape, B.shape, A.dtype, B.dtype, dev, B.device, A.requires_grad, B.requires_grad,
        backends.epoch(), id(SORT_COST), id(REC_COST), id(DENSE_EXIT), _LONG_SOLVE,
    )  # fmt: skip


def _make_plan(be, layout: _Layout, ct, method: str, steps: int, path: str, A, B, A3: Tensor, B3: Tensor) -> _Plan:
    """The plan of a plain call whose arguments passed ``solve``'s checks (A, B as given; A3, B3 batched)."""
    use_sorted, long = _path_and_length(be, method, steps, path, A3, B3)
    return _Plan(
        layout=layout,
        L=A3.shape[0],
        ct=ct,
        detach=A.requires_grad or B.requires_grad,
        whole=None if use_sorted and be.prepares_sorted else _whole_solver(be, use_sorted, long, A3, B3),
        be=be,
        ran="sorted" if use_sorted else "dense",
        long=long,
        numel=layout.numel(A3.device),
        one=_unit_step(torch.empty((), dtype=ct, device=A3.device)),
    )


def _run_plan(plan: _Plan, A: Tensor, B: Tensor, lam1: float, lam2: float, lr, method: str, steps: int) -> Solution:
    """A plain call on its plan: the general path's work for it, less the checks of the
    arguments (they passed when the plan was made) and with the fields made from the
    kernel's stats on first read."""
    layout, L, ct, detach, whole, be, ran, long, numel, one = plan
    A3, B3 = (A, B) if layout.kind == "batch" else (A.unsqueeze(0), B.unsqueeze(0))
    if detach:
        A3, B3 = A3.detach(), B3.detach()
    if ct is not layout.dtype:
        A3, B3 = A3.to(ct), B3.to(ct)
    dev = A3.device
    lam1_t = torch.full((L,), lam1, dtype=ct, device=dev)
    lam2_t = torch.full((L,), lam2, dtype=ct, device=dev)
    lr_t = None
    by_norms = method != "bcd" and lr is None  # the safe step's norms are the NaN/Inf check
    if method == "bcd":
        lr_arg = one  # BCD takes no step: any positive one
    elif by_norms:
        norms = _unit_norms(A3, B3)
        _check_sum(norms[0].sum() + norms[1].sum(), A, B)
        lr_t = lr_arg = _lr_from_norms(*norms, ct)
    else:
        lr_t = lr_arg = torch.full((L,), lr, dtype=ct, device=dev)
    if long and not by_norms:
        _check_sum(A3.sum() + B3.sum(), A, B)  # a long solve: before the work starts
    if whole is None:  # a sorted solver prepared for these weights
        whole = _whole_solver(be, True, long, A3, B3)
    Ah, Bh, stats = whole(A3, B3, lam1_t, lam2_t, lr_arg, method, steps)
    if not (by_norms or long):  # F at the start and end (and the counts), in one call
        _check_sum(float(sum(map(sum, stats.tolist()))), A, B)
    return Solution._from_kernel(
        Ah if layout.kind == "batch" and ct is layout.dtype else _restore(Ah, layout, "A"),
        Bh if layout.kind == "batch" and ct is layout.dtype else _restore(Bh, layout, "B"),
        _KernelStats(stats, numel, steps),
        lam1_t, lam2_t, lr_t, method, be.name, layout.kind != "single", ran,
    )  # fmt: skip


def _check_sum(total: Tensor | float, A, B) -> None:
    """Raise the NaN/Inf error naming the first input with a non-finite entry, when ``total``
    (a sum over every entry of the inputs) is not finite; an overflow of finite entries passes."""
    if math.isfinite(total if type(total) is float else total.item()):
        return
    for X, name in ((A, "A"), (B, "B")):
        for k, x in enumerate(X) if isinstance(X, (list, tuple)) else [(None, X)]:
            _checks.raise_non_finite(x, name if k is None else f"{name}[{k}]")


def _check_lambdas(
    method: str, lam1, lam2, lam1_t: Tensor, lam2_t: Tensor, searching: bool, lam_gen_t: Tensor | None = None
) -> None:
    """Warn where F has no minimiser; refuse a λ search that has nothing to scale.  Plain
    numbers are checked in Python, tensors with a few small ops.  ``lam_gen_t``: the generator
    penalty's weights (None: none), which the λ search scales too."""
    if isinstance(lam1, (int, float)) and isinstance(lam2, (int, float)):
        one_sided = list(range(lam1_t.shape[0])) if (lam1 > 0) != (lam2 > 0) and lam1 + lam2 > 0 else []
        both_zero = lam1 == 0 and lam2 == 0
    else:
        mask = ((lam1_t > 0) != (lam2_t > 0)) & (lam1_t + lam2_t > 0)
        one_sided = mask.nonzero().flatten().tolist()
        both_zero = not bool(((lam1_t > 0) | (lam2_t > 0)).all())
    if searching and both_zero and lam_gen_t is not None:
        both_zero = not bool(((lam1_t > 0) | (lam2_t > 0) | (lam_gen_t > 0)).all())
    if searching and both_zero:
        raise ValueError(
            "target_keep scales (lam1, lam2, lam_gen) to reach the kept fraction: give lam1 or lam2 > 0 (or lam_gen > 0)"
        )
    if method != "bcd" and one_sided:
        # (tÂ_i, B̂_i/t) leaves the fit unchanged, so with only one L1 term F keeps falling
        # as t grows: there is no minimiser, and gradient iterates drift (FISTA can diverge).
        warnings.warn(
            f"adapters {one_sided} have exactly one of lam1, lam2 equal to 0: "
            "F then has no minimiser (rescaling a unit lowers it forever) and the "
            f"{method} iterates drift; use both > 0, or method='bcd', which skips the rescaling",
            RuntimeWarning,
            stacklevel=3,
        )


_INT64_MAX = 2**63 - 1


def _int_arg(x, name: str, lo: int) -> int:
    """An integer in [lo, 2**63 - 1] (the kernels take int64), or an error naming the argument."""
    if type(x) is int and lo <= x <= _INT64_MAX:  # the common case, without the ABC checks below
        return x
    what = "a positive integer" if lo == 1 else f"an integer >= {lo}"
    if isinstance(x, (bool, Tensor)) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{name} must be {what}, got {x!r}")
    v = int(x)
    if v < lo:
        raise ValueError(f"{name} must be {what}, got {v}")
    if v > _INT64_MAX:
        raise ValueError(f"{name} must be {what} below 2**63, got {v}")
    return v


def _fraction_arg(x, name: str) -> float:
    """A fraction in (0, 1]: a real number (numpy scalars and 0-d tensors too), never a bool."""
    if isinstance(x, Tensor) and x.dim() == 0 and x.dtype != torch.bool and not x.is_complex():
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be in (0, 1], got {x!r}")
    if not 0 < float(x) <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {x!r}")
    return float(x)


_LONG_SOLVE = 10**9
"""Unit entries x dense sweeps (the sorted path's counted by its cost model) above which a native solve runs on a worker thread (about 0.1 s and
more): Ctrl-C then interrupts it; below, the thread's start would cost more than it buys."""


_BACKGROUND: set = set()


def solving_in_background() -> bool:
    """Whether a native solve still runs on a worker thread (an interrupted one runs to its end).

    Tracked here rather than with ``Thread.is_alive``, which can answer False once a join
    of that thread was interrupted by Ctrl-C.
    """
    return bool(_BACKGROUND)


def _interruptible(fn: Callable) -> Callable:
    """A native whole-solve kernel, run so that Ctrl-C interrupts the caller.

    A native ``solve_fused``/``solve_sorted`` call runs every step without returning to
    Python, which handles a SIGINT only between bytecodes: the call would ignore Ctrl-C for
    as long as it runs.  It releases the GIL, so it runs on a worker thread while the main
    thread waits in short joins, where KeyboardInterrupt is raised at once.  The iterates
    are those of the single call.  The kernel itself cannot be stopped from Python: an
    interrupted call finishes in the background and its result is dropped.
    """

    @functools.wraps(fn)
    def call(*args):
        if threading.current_thread() is not threading.main_thread():
            return fn(*args)  # signals reach only the main thread: nothing to gain
        box: dict = {}
        grad = torch.is_grad_enabled()

        def work():
            try:
                with torch.set_grad_enabled(grad):
                    box["out"] = fn(*args)
            except BaseException as e:  # handed to the caller below
                box["err"] = e
            finally:
                _BACKGROUND.discard(key)

        worker = threading.Thread(target=work, name="tropfast-solve", daemon=True)
        key = id(worker)
        _BACKGROUND.add(key)
        worker.start()
        while worker.is_alive():
            worker.join(0.05)
        if "err" in box:
            raise box["err"]
        return box["out"]

    return call


class MuSearch:
    """Per-adapter search of a multiplier μ of (λ1, λ2, λg) so that a solve keeps ``target``.

    The kept fraction falls as μ grows, often steeply (ISTA's T = 100 solves of the pruning
    defaults go from keeping 70% to nothing within a factor of two of μ), and its logit is
    closer to linear in log μ than the fraction itself.  The search works on
    z = logit(kept), clipped to [ε, 1 − ε] with ε = min(target, 1 − target)/10
    (docs/design.md §3):

    - from μ = 1, while the root is not bracketed, it moves log μ by |z − z_target| / 2 (a
      typical slope) for the first move, then by 1.5 times the secant estimate from the last
      two probes; every move is at least 0.02 and at most log 4 the first time, at most twice
      the previous move after that;
    - once bracketed, it interpolates z linearly between the bracket's ends (regula falsi,
      the share clamped to [0.05, 0.95] of the bracket), Illinois-style: when a probe replaces
      the same end as the probe before it, the other end's distance to the target counts
      half as much again;
    - after three interpolations in a row that did not halve the bracket it bisects, so the
      bracket at least halves every four probes.

    An adapter whose best kept fraction is within ``tol`` of the target is done: it is not
    probed again and keeps that μ.  Every adapter moves on its own values only, so probing
    any subset of the adapters (the still-searching ones, or the adapters of one file of a
    fleet) gives each one the same μ.

    The state is a few numbers per adapter, kept in NumPy float64: the bookkeeping of a probe
    is then tens of microseconds, not the hundreds that the same operations cost as small
    tensors (at MiniLM size a probe's solve takes about 2 ms).
    """

    SLOPE = 2.0  # |d z / d log μ| assumed for the first move
    FIRST_MAX = math.log(4)  # the first move is at most this (in log μ)
    MIN_MOVE = 0.02  # no move while unbracketed is smaller
    OVERSHOOT = 1.5  # later unbracketed moves: this times the secant's estimate of the root
    GUARD = 0.05  # interpolation points stay this share of the bracket inside its ends

    def __init__(self, L: int, target: float, tol: float | Tensor, dtype: torch.dtype, device):
        self.target = float(target)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if isinstance(tol, Tensor):
            self.tol = tol.detach().to("cpu", torch.float64).numpy().copy()
        else:
            self.tol = np.full(L, float(tol))
        self.eps = max(min(self.target, 1.0 - self.target) / 10.0, 1e-6)
        self.z_target = self._z(np.float64(self.target))
        self.log_mu = np.zeros(L)
        self.lo = np.full(L, -math.inf)  # log μ whose solve keeps > target
        self.hi = np.full(L, math.inf)  # log μ whose solve keeps <= target
        self.k_lo = np.zeros(L)
        self.k_hi = np.zeros(L)
        self.prev = np.full(L, math.nan)  # the last probe's log μ (nan: none yet)
        self.k_prev = np.zeros(L)  # and its kept fraction
        self.move = np.full(L, math.nan)  # the last move while unbracketed (nan: none yet)
        self.side = np.zeros(L, dtype=np.int64)  # the end the last probe replaced: 1 lo, -1 hi, 0 none
        self.weight = np.ones(L)  # Illinois weight of the end kept over repeated replacements
        self.bisect = np.zeros(L, dtype=bool)  # the next probe bisects
        self.slow_run = np.zeros(L, dtype=np.int64)  # interpolations in a row that did not halve
        self.best_err = np.full(L, math.inf)
        self.best_log_mu = np.zeros(L)  # μ = 1 until a probe is recorded
        self._probes = np.zeros(L, dtype=np.int64)

    def _z(self, k: np.ndarray) -> np.ndarray:
        k = np.clip(k, self.eps, 1.0 - self.eps)
        return np.log(k / (1.0 - k))

    def _tensor(self, x: np.ndarray) -> Tensor:
        return torch.from_numpy(x).to(self.device)

    @property
    def best_mu(self) -> Tensor:
        """(L,) the μ of each adapter's best probe so far, in the solve's dtype."""
        return self._tensor(np.exp(self.best_log_mu)).to(self.dtype)

    @property
    def probes(self) -> Tensor:
        """(L,) int64: the probes recorded per adapter."""
        return self._tensor(self._probes.copy())

    def mu(self, idx: Tensor | None = None) -> Tensor:
        """The next probe's μ, for every adapter or for the adapters ``idx``."""
        lm = self.log_mu if idx is None else self.log_mu[_np_index(idx)]
        return self._tensor(np.exp(lm)).to(self.dtype)

    def done(self) -> Tensor:
        """(L,) bool: the adapters whose best kept fraction is within tol of the target."""
        return self._tensor(self.best_err <= self.tol)

    def update(self, idx: Tensor | None, kept: Tensor) -> Tensor:
        """Record the kept fractions of the probe at ``mu(idx)``; returns where it is the best yet."""
        sel = slice(None) if idx is None else _np_index(idx)
        kept = kept.detach().to("cpu", torch.float64).numpy().reshape(-1)
        lm, lo, hi, k_lo, k_hi = (x[sel] for x in (self.log_mu, self.lo, self.hi, self.k_lo, self.k_hi))
        err = np.abs(kept - self.target)
        better = err < self.best_err[sel]
        self.best_err[sel] = np.where(better, err, self.best_err[sel])
        self.best_log_mu[sel] = np.where(better, lm, self.best_log_mu[sel])
        self._probes[sel] += 1
        with np.errstate(invalid="ignore"):  # inf − inf while unbracketed
            width = hi - lo
        dense = kept > self.target
        lo, k_lo = np.where(dense, lm, lo), np.where(dense, kept, k_lo)
        hi, k_hi = np.where(dense, hi, lm), np.where(dense, k_hi, kept)
        nxt = self._next(sel, lm, kept, dense, width, lo, hi, k_lo, k_hi)
        self.log_mu[sel], self.lo[sel], self.hi[sel] = nxt, lo, hi
        self.k_lo[sel], self.k_hi[sel] = k_lo, k_hi
        return self._tensor(better)

    def _next(self, sel, lm, kept, dense, width, lo, hi, k_lo, k_hi) -> np.ndarray:
        """The next probe's log μ of the adapters ``sel`` just probed at ``lm`` (``width``: their
        bracket's width before it; lo, hi, k_lo, k_hi: the bracket after it)."""
        bracketed = np.isfinite(lo) & np.isfinite(hi)
        tiny = np.finfo(np.float64).tiny
        zt = self.z_target
        z = self._z(kept)
        # (unbracketed adapters compute an unused interpolation, and the first probe an
        # unused secant, from infinite or missing ends)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            # bracketed: Illinois regula falsi on z (k_lo > target >= k_hi: both gaps >= 0)
            side = np.where(dense, 1, -1)
            was_bracketed = np.isfinite(width)
            weight = np.where(was_bracketed & (side == self.side[sel]), 0.5 * self.weight[sel], 1.0)
            g_lo = (self._z(k_lo) - zt) * np.where(dense, 1.0, weight)
            g_hi = (zt - self._z(k_hi)) * np.where(dense, weight, 1.0)
            share = np.clip(g_lo / np.maximum(g_lo + g_hi, tiny), self.GUARD, 1 - self.GUARD)
            # three interpolations in a row (this probe's included) that did not halve a
            # finite bracket are followed by a bisection; a bisection is never slow, so the
            # run restarts after it
            slow = bracketed & was_bracketed & ((hi - lo) > 0.5 * width) & ~self.bisect[sel]
            slow_run = np.where(slow, self.slow_run[sel] + 1, 0)
            bisect = slow_run >= 3
            inner = lo + np.where(bisect, 0.5, share) * (hi - lo)
            # unbracketed: the first move by the typical slope, later ones by the secant
            prev, last = self.prev[sel], self.move[sel]
            gap = np.abs(z - zt)
            slope = np.abs(self._z(self.k_prev[sel]) - z) / np.abs(lm - prev)
            secant = self.OVERSHOOT * gap / np.maximum(slope, tiny)
            move = np.where(
                np.isnan(last),
                np.clip(gap / self.SLOPE, self.MIN_MOVE, self.FIRST_MAX),
                np.clip(np.nan_to_num(secant, nan=math.inf), self.MIN_MOVE, 2 * np.nan_to_num(last, nan=0.0)),
            )
        nxt = np.where(np.isinf(hi), lm + move, np.where(np.isinf(lo), lm - move, inner))
        self.move[sel] = np.where(bracketed, last, move)
        self.prev[sel], self.k_prev[sel] = lm, kept
        self.side[sel] = np.where(bracketed, side, 0)
        self.weight[sel] = np.where(bracketed & ~bisect, weight, 1.0)
        self.slow_run[sel], self.bisect[sel] = slow_run, bisect
        return nxt


def _np_index(idx: Tensor) -> np.ndarray:
    return idx.detach().to("cpu").numpy().reshape(-1)


def _search(run, lam1: Tensor, lam2: Tensor, target: float, iters: int, tol, trace: list, progress: bool, lam_gen, subset: bool):
    """``MuSearch`` over ``run`` (a solve of every adapter, or of the adapters ``idx``).

    Returns (μ (L,), the outputs of ``run`` at that μ or None).  Each probe solves only the
    adapters not yet within tol (all of them when ``subset`` is False).  The outputs of the
    probe that gave each adapter its best μ are kept, so the solve at the found μ needs no
    second run; None where the probes' outputs cannot be merged row by row.
    """
    L = lam1.shape[0]
    dev = lam1.device
    search = MuSearch(L, target, tol, lam1.dtype, dev)
    best: list | None = None
    merge = True
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=iters, desc="tropfast lambda search", unit="solve", leave=False)
    for it in range(iters):
        todo = (~search.done()).nonzero().squeeze(1)
        if todo.numel() == L:
            todo = None
        if todo is None or subset:
            mu = search.mu(todo)
            sel = slice(None) if todo is None else todo
            lg = None if lam_gen is None else lam_gen[sel] * mu
            out = run(lam1[sel] * mu, lam2[sel] * mu, lg, todo)
        else:  # every adapter is solved; the rows of those done are dropped
            every = search.mu()
            lg = None if lam_gen is None else lam_gen * every
            out = run(lam1 * every, lam2 * every, lg)
            out = tuple(t[todo] if isinstance(t, Tensor) else t for t in out)
            mu = every[todo]
        kept = out[-1]
        # the probed adapters (None: all), their μ and kept fractions
        trace.append({"iter": it, "adapters": None if todo is None else todo.tolist(), "mu": mu.tolist(), "kept": kept.tolist()})
        better = search.update(todo, kept)
        if merge:
            best, merge = _keep_rows(best, out, todo, better, L)
        if bar is not None:
            bar.update(1)
        if bool(search.done().all()):
            break
    if bar is not None:
        bar.close()
    return search.best_mu, best  # None once the probes stopped lining up (_keep_rows)


def _keep_rows(best, out, idx: Tensor | None, better: Tensor, L: int):
    """Merge the rows ``better`` of a probe's outputs (rows ``idx`` of L) into ``best``.

    Returns (best, mergeable): False once two probes' outputs differ in a non-row shape (the
    step loop's objective records end where its adapters stop).
    """
    Ah, Bh, obj, rec_steps, steps_run, conv, kept = out
    if best is None:
        best = [
            torch.zeros((L,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device) if isinstance(t, Tensor) else t
            for t in (Ah, Bh, obj, rec_steps, steps_run, conv, kept)
        ]
    elif best[3] != rec_steps or best[2].shape[1:] != obj.shape[1:] or (best[4] is None) != (steps_run is None):
        return None, False
    rows = better.nonzero().squeeze(1)
    dst = rows if idx is None else idx[rows]
    for k, t in enumerate((Ah, Bh, obj, rec_steps, steps_run, conv, kept)):
        if isinstance(t, Tensor):
            best[k][dst] = t[rows]
    return best, True


_search_eager = ops.eager(_search, "tropfast.solve(target_keep=...): the λ search reads the kept fractions")
