"""Solvers for min F(Â, B̂) = ½Σ_j(‖G1_j−Ĝ1_j‖² + ‖G2_j−Ĝ2_j‖²) + λ1‖Â‖₁ + λ2‖B̂‖₁.

* ``ista``  the paper's Algorithm 1: Â = A, B̂ = B, then T proximal-gradient steps with
            both gradients at the current point (exactly a loop of ``prox_step``).
* ``fista`` ISTA with Nesterov momentum and adaptive (gradient) restart per adapter.
* ``bcd``   exact block minimisation over Â then B̂ then the free rescaling of each
            hidden unit (DESIGN §2); needs no step size and never increases F.

Every solver runs all adapters of a model at once: a batch (L, r, d_in) / (L, d_out, r),
or lists of differently shaped adapters, zero-padded (padding is exact).
"""
from __future__ import annotations

import functools
import math
import numbers
import threading
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from . import _checks, backends
from .ops import Kernels

METHODS = ("ista", "fista", "bcd")


@dataclass
class Solution:
    """Result of ``solve``; per-adapter tensors have shape (L,)."""

    A_hat: Tensor | list[Tensor]  # same layout as the input A
    B_hat: Tensor | list[Tensor]
    objective: Tensor  # (L, n_records) F at record_steps (frozen after an adapter converged)
    record_steps: list[int]  # step index of each objective record
    kept_fraction: Tensor  # (L,) nonzeros of (Â, B̂) over the adapter's weights
    steps: Tensor  # (L,) steps (BCD: sweeps) run per adapter
    converged: Tensor  # (L,) bool; with tol=None, False everywhere
    lam1: Tensor  # (L,) the λ used (scaled by the search when target_keep is set)
    lam2: Tensor
    lr: Tensor | None  # (L,) step size (None for bcd)
    method: str
    backend: str
    batched: bool = True
    search: list[dict] = field(default_factory=list)  # λ-search trace when target_keep is set

    @property
    def final_objective(self) -> Tensor:
        return self.objective[:, -1]

    def summary(self) -> str:
        """A short readable report, one line per adapter."""
        lines = [
            f"method={self.method} backend={self.backend} adapters={self.kept_fraction.numel()}",
            f"{'#':>4} {'F(start)':>12} {'F(end)':>12} {'kept':>7} {'steps':>6} {'conv':>5} {'lam1':>9} {'lam2':>9}",
        ]
        for i in range(self.kept_fraction.numel()):
            lines.append(
                f"{i:>4} {float(self.objective[i, 0]):12.5g} {float(self.objective[i, -1]):12.5g} "
                f"{float(self.kept_fraction[i]):7.3f} {int(self.steps[i]):6d} "
                f"{'yes' if bool(self.converged[i]) else 'no':>5} {float(self.lam1[i]):9.3g} {float(self.lam2[i]):9.3g}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Layout: single, batched or a list of adapters of different shapes -> one padded batch.
# ---------------------------------------------------------------------------------------
@dataclass
class _Layout:
    kind: str  # "single", "batch" or "list"
    shapes: list[tuple[int, int, int]]  # (r, d_in, d_out) per adapter
    dtype: torch.dtype

    def numel(self, device) -> Tensor:
        return torch.tensor([r * (di + do) for r, di, do in self.shapes], device=device, dtype=torch.float64)


def pad_adapters(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Zero-pad adapters of different shapes into (L, r_max, d_in_max), (L, d_out_max, r_max)."""
    r = max(a.shape[0] for a in As)
    di = max(a.shape[1] for a in As)
    do = max(b.shape[0] for b in Bs)
    A = As[0].new_zeros((len(As), r, di))
    B = Bs[0].new_zeros((len(Bs), do, r))
    for k, (a, b) in enumerate(zip(As, Bs)):
        A[k, : a.shape[0], : a.shape[1]] = a
        B[k, : b.shape[0], : b.shape[1]] = b
    return A, B


def _canonical(A, B) -> tuple[Tensor, Tensor, _Layout]:
    if isinstance(A, (list, tuple)) or isinstance(B, (list, tuple)):
        if not isinstance(A, (list, tuple)) or not isinstance(B, (list, tuple)):
            raise TypeError("A and B must both be tensors or both be lists of tensors")
        if len(A) != len(B):
            raise ValueError(f"got {len(A)} down-projections A but {len(B)} up-projections B")
        if len(A) == 0:
            raise ValueError("the list of adapters is empty")
        for k, (a, b) in enumerate(zip(A, B)):
            if _checks.check_adapter(a, b, (f"A[{k}]", f"B[{k}]")):
                raise ValueError(f"list entries must be single adapters; A[{k}] has shape {tuple(a.shape)}")
            if a.dtype != A[0].dtype or a.device != A[0].device:
                raise TypeError(f"A[{k}] is {a.dtype} on {a.device}; every adapter must share A[0]'s dtype and device")
        shapes = [(a.shape[0], a.shape[1], b.shape[0]) for a, b in zip(A, B)]
        A3, B3 = pad_adapters(A, B)
        return A3, B3, _Layout("list", shapes, A[0].dtype)
    batched = _checks.check_adapter(A, B)
    A3, B3 = (A, B) if batched else (A.unsqueeze(0), B.unsqueeze(0))
    shapes = [(A3.shape[1], A3.shape[2], B3.shape[1])] * A3.shape[0]
    return A3, B3, _Layout("batch" if batched else "single", shapes, A.dtype)


def _restore(X: Tensor, layout: _Layout, which: str) -> Tensor | list[Tensor]:
    X = X.to(layout.dtype)
    if layout.kind == "single":
        return X[0]
    if layout.kind == "batch":
        return X
    if which == "A":
        return [X[k, :r, :di].clone() for k, (r, di, _) in enumerate(layout.shapes)]
    return [X[k, :do, :r].clone() for k, (r, _, do) in enumerate(layout.shapes)]


def _per_adapter(x, name: str, L: int, device, dtype, positive: bool = False) -> Tensor:
    _checks.check_scalar(x, name, L, positive=positive)
    t = torch.as_tensor(x.detach() if isinstance(x, Tensor) else x, dtype=dtype, device=device)
    return t.expand(L).clone() if t.dim() == 0 else t.clone()


# ---------------------------------------------------------------------------------------
# Pieces shared by the solvers (on the padded batch, in the compute dtype).
# ---------------------------------------------------------------------------------------
def _col(x: Tensor) -> Tensor:
    return x.view(-1, 1, 1)


def objective(kern: Kernels, A, B, Ah, Bh, lam1: Tensor, lam2: Tensor) -> Tensor:
    """F per adapter: (L,)."""
    l1 = lam1 * Ah.abs().sum((-2, -1)) + lam2 * Bh.abs().sum((-2, -1))
    return kern.hsd_loss(A, B, Ah, Bh) + l1


def safe_lr(A: Tensor, B: Tensor) -> Tensor:
    """A step size 1/L per adapter from the curvature of the smooth part: (L,).

    For one unit the smooth part is ½(βa − 2sc + β̂â).  Its Hessian in (Â_i, B̂_{:,i}) has
    diagonal blocks β̂·I and â·I and off-diagonal blocks bounded by 2‖Â_i‖‖B̂_{:,i}‖ +
    ‖A_i‖‖B_{:,i}‖, so its norm is at most 2(â + β̂) + √(aβ) ≤ 3(a + β) while the
    iterates stay within the norms of the originals (soft-thresholding only shrinks).
    """
    a = (A * A).sum(-1)
    beta = (B * B).sum(-2)
    lip = (3.0 * (a + beta)).amax(-1)
    return 1.0 / lip.clamp_min(torch.finfo(A.dtype).tiny)


def _kept(Ah: Tensor, Bh: Tensor, numel: Tensor) -> Tensor:
    nnz = (Ah != 0).sum((-2, -1)).double() + (Bh != 0).sum((-2, -1)).double()
    return (nnz / numel).to(torch.float64)


def _bcd_sweep(A, B, Ah, Bh, lam1: Tensor, lam2: Tensor) -> tuple[Tensor, Tensor]:
    """One sweep of exact block minimisation: Â | B̂, then B̂ | Â, then per-unit rescaling."""
    tiny = torch.finfo(A.dtype).tiny
    # Â_i = S_λ1(s_i A_i) / β̂_i
    s = torch.relu(B * Bh).sum(-2)  # (L, r)
    beta_hat = (Bh * Bh).sum(-2)
    Z = s.unsqueeze(-1) * A
    Ah = torch.sign(Z) * torch.clamp_min(Z.abs() - _col(lam1), 0)
    Ah = torch.where(beta_hat.unsqueeze(-1) > 0, Ah / beta_hat.clamp_min(tiny).unsqueeze(-1), torch.zeros_like(Ah))
    # B̂_ji = sign(B_ji) · max(c_i |B_ji| − λ2, 0) / â_i  when c_i > 0, else 0
    c = (A * Ah).sum(-1)
    a_hat = (Ah * Ah).sum(-1)
    ok = ((c > 0) & (a_hat > 0)).unsqueeze(-2)
    mag = torch.clamp_min(c.clamp_min(0).unsqueeze(-2) * B.abs() - _col(lam2), 0) / a_hat.clamp_min(tiny).unsqueeze(-2)
    Bh = torch.where(ok, torch.sign(B) * mag, torch.zeros_like(B))
    # (Â_i, B̂_i) -> (tÂ_i, B̂_i/t) leaves the fit unchanged; t minimises λ1 t‖Â_i‖₁ + λ2‖B̂_i‖₁/t.
    nA = Ah.abs().sum(-1)
    nB = Bh.abs().sum(-2)
    l1, l2 = lam1.unsqueeze(-1), lam2.unsqueeze(-1)
    can = (nA > 0) & (nB > 0) & (l1 > 0) & (l2 > 0)
    t = torch.where(can, torch.sqrt((l2 * nB) / (l1 * nA).clamp_min(tiny)), torch.ones_like(nA))
    return Ah * t.unsqueeze(-1), Bh / t.unsqueeze(-2)


def fista_step(kern: Kernels, A, B, Ah, Bh, Ah_prev, Bh_prev, mom_t: Tensor, lr, lam1, lam2):
    """One FISTA step with per-unit momentum mom_t (L, r).  Returns (Â', B̂', mom_t')."""
    mom_next = (1 + torch.sqrt(1 + 4 * mom_t * mom_t)) / 2
    w = (mom_t - 1) / mom_next
    YA = Ah + w.unsqueeze(-1) * (Ah - Ah_prev)
    YB = Bh + w.unsqueeze(-2) * (Bh - Bh_prev)
    nA, nB = kern.prox_step(A, B, YA, YB, lr, lam1, lam2)
    # Gradient restart (O'Donoghue & Candès 2015), per unit: drop the momentum of a unit
    # whose step points uphill.
    uphill = ((YA - nA) * (nA - Ah)).sum(-1) + ((YB - nB) * (nB - Bh)).sum(-2) > 0
    return nA, nB, torch.where(uphill, torch.ones_like(mom_next), mom_next)


def dense_solve(kern: Kernels, A, B, lam1, lam2, lr, method: str, steps: int) -> tuple[Tensor, Tensor]:
    """T iterations from (A, B) with no diagnostics: the default kernel of ``solve_fused``."""
    Ah, Bh = A.clone(), B.clone()
    Ah_prev, Bh_prev = Ah, Bh
    mom_t = torch.ones(A.shape[:2], dtype=A.dtype, device=A.device)
    for _ in range(steps):
        if method == "ista":
            Ah, Bh = kern.prox_step(A, B, Ah, Bh, lr, lam1, lam2)
        elif method == "fista":
            nA, nB, mom_t = fista_step(kern, A, B, Ah, Bh, Ah_prev, Bh_prev, mom_t, lr, lam1, lam2)
            Ah_prev, Bh_prev, Ah, Bh = Ah, Bh, nA, nB
        elif method == "bcd":
            Ah, Bh = _bcd_sweep(A, B, Ah, Bh, lam1, lam2)
        else:
            raise ValueError(f"unknown method {method!r}")
    return Ah, Bh


def _run(
    kern: Kernels,
    A: Tensor,
    B: Tensor,
    lam1: Tensor,
    lam2: Tensor,
    method: str,
    steps: int,
    lr: Tensor | None,
    tol: float | None,
    record_every: int,
    progress: bool,
    fused: bool = False,
    sorted_solve=None,
):
    """The iteration itself on a padded batch.  Returns (Ah, Bh, obj, record_steps, steps_run, converged).

    ``fused``: one ``solve_fused`` call; ``sorted_solve``: a ``solve_sorted`` kernel to run
    instead, in the sorted family.  Both record only the start and the end.
    """
    L = A.shape[0]
    if fused or sorted_solve is not None:
        lr_arg = lr if lr is not None else torch.ones(L, dtype=A.dtype, device=A.device)
        whole = sorted_solve if sorted_solve is not None else kern.solve_fused
        Ah, Bh = whole(A, B, lam1, lam2, lr_arg, method, steps)
        obj = torch.stack([objective(kern, A, B, A, B, lam1, lam2), objective(kern, A, B, Ah, Bh, lam1, lam2)], 1)
        full = torch.full((L,), steps, dtype=torch.long, device=A.device)
        return Ah, Bh, obj, [0, steps], full, torch.zeros(L, dtype=torch.bool, device=A.device)
    Ah, Bh = A.clone(), B.clone()
    active = torch.ones(L, dtype=torch.bool, device=A.device)
    steps_run = torch.zeros(L, dtype=torch.long, device=A.device)
    records = [objective(kern, A, B, Ah, Bh, lam1, lam2)]
    record_steps = [0]
    # FISTA state: momentum and restart per hidden unit (F separates by unit)
    Ah_prev, Bh_prev = Ah, Bh
    mom_t = torch.ones(A.shape[:2], dtype=A.dtype, device=A.device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"tropfast {method}", unit="step", leave=False)
    for t in range(1, steps + 1):
        if method == "ista":
            nA, nB = kern.prox_step(A, B, Ah, Bh, lr, lam1, lam2)
        elif method == "fista":
            nA, nB, mom_t = fista_step(kern, A, B, Ah, Bh, Ah_prev, Bh_prev, mom_t, lr, lam1, lam2)
            Ah_prev, Bh_prev = Ah, Bh
        else:
            nA, nB = _bcd_sweep(A, B, Ah, Bh, lam1, lam2)
        act = _col(active)
        if tol is not None:
            scale = torch.maximum(Ah.abs().amax((-2, -1)), Bh.abs().amax((-2, -1))).clamp_min(torch.finfo(A.dtype).tiny)
            change = torch.maximum((nA - Ah).abs().amax((-2, -1)), (nB - Bh).abs().amax((-2, -1))) / scale
        Ah = torch.where(act, nA, Ah)
        Bh = torch.where(act, nB, Bh)
        steps_run += active.long()
        if tol is not None:
            active = active & ~(change <= tol)
        if bar is not None:
            bar.update(1)
        last = t == steps or (tol is not None and not bool(active.any()))
        if last or (record_every > 0 and t % record_every == 0):
            records.append(objective(kern, A, B, Ah, Bh, lam1, lam2))
            record_steps.append(t)
        if last:
            break
    if bar is not None:
        bar.close()
    converged = ~active if tol is not None else torch.zeros(L, dtype=torch.bool, device=A.device)
    return Ah, Bh, torch.stack(records, dim=1), record_steps, steps_run, converged


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
    path: str = "dense",
) -> Solution:
    """Sparse (Â, B̂) whose zonotope generators stay close to those of (A, B).

    A: (r, d_in) | (L, r, d_in) | list of (r_k, d_in_k);  B: (d_out, r) | (L, d_out, r) | list.
    lam1, lam2: L1 weights on Â and B̂ (numbers, or (L,) tensors, one per adapter).
    method: "ista" (the paper's Algorithm 1), "fista" or "bcd".  steps: iterations (sweeps).
    lr: ISTA/FISTA step; None picks ``safe_lr`` per adapter.  tol: stop an adapter once the
    largest relative change of its weights in a step is <= tol.  target_keep: search a
    per-adapter multiplier μ of (lam1, lam2) (the ratio is kept) so the solution keeps about
    that fraction of the weights, stopping once every adapter is within ``search_tol`` of it
    (default: half a weight) or after ``search_iters`` solves.  record_every: steps between objective records (default
    about 100 records; 0 records only the start and the end).  fused: run all T
    iterations in one ``solve_fused`` call (one pass over memory on the fused backends;
    records only the start and the end, no tol); None uses it on the compiled and Triton
    backends whenever tol is None and record_every is None or 0.  path: "dense" iterates on the weights; "sorted" runs
    ``bcd``/``ista`` in the sorted family (DESIGN §2, ``tropfast.family``): one sort per
    hidden unit, then O(log d) per unit per step, so T = 1000 costs about what T = 10 does;
    same iterates up to rounding, on every backend (``solve_sorted``), start/end records only, no tol.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a solver; choose one of {', '.join(METHODS)}")
    steps = _int_arg(steps, "steps", 1)
    search_iters = _int_arg(search_iters, "search_iters", 0 if target_keep is None else 1)
    if tol is not None and (not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0):
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
    if path not in ("dense", "sorted"):
        raise ValueError(f"path={path!r}: choose 'dense' or 'sorted'")
    if path == "sorted":
        if method == "fista":
            raise ValueError("fista has no sorted-family form (its extrapolation mixes two thresholds): use path='dense'")
        if tol is not None or fused:
            raise ValueError("path='sorted' runs exactly `steps` iterations in one call: leave tol=None and fused unset")
    A3, B3, layout = _canonical(A, B)
    L = A3.shape[0]
    ct = torch.float32 if A3.dtype in (torch.float16, torch.bfloat16) else A3.dtype
    A3, B3 = A3.detach().to(ct), B3.detach().to(ct)
    lam1_t = _per_adapter(lam1, "lam1", L, A3.device, ct)
    lam2_t = _per_adapter(lam2, "lam2", L, A3.device, ct)
    lr_t = None
    if method != "bcd":
        lr_t = safe_lr(A3, B3) if lr is None else _per_adapter(lr, "lr", L, A3.device, ct, positive=True)
    one_sided = ((lam1_t > 0) != (lam2_t > 0)) & (lam1_t + lam2_t > 0)
    if method != "bcd" and bool(one_sided.any()):
        # (tÂ_i, B̂_i/t) leaves the fit unchanged, so with only one L1 term F keeps falling
        # as t grows: there is no minimiser, and gradient iterates drift (FISTA can diverge).
        warnings.warn(
            f"adapters {one_sided.nonzero().flatten().tolist()} have exactly one of lam1, lam2 equal to 0: "
            "F then has no minimiser (rescaling a unit lowers it forever) and the "
            f"{method} iterates drift; use both > 0, or method='bcd', which skips the rescaling",
            RuntimeWarning,
            stacklevel=2,
        )
    if target_keep is not None and not bool(((lam1_t > 0) | (lam2_t > 0)).all()):
        raise ValueError("target_keep scales (lam1, lam2) to reach the kept fraction: give lam1 or lam2 > 0")
    name = backends.resolve(backend, A3.device, ct)
    kern = backends.kernels(name)
    if name != "torch" and A3.device.type == "cpu":
        kern = _interruptible(kern)
    every = max(1, steps // 100) if record_every is None else record_every
    numel = layout.numel(A3.device)
    use_fused = fused if fused is not None else (name != "torch" and tol is None and not record_every)
    sorted_solve = None
    if path == "sorted":
        sorted_solve = kern.solve_sorted  # compiled backends sort inside each call
        if name == "torch":
            from . import family

            # the PyTorch form sorts once for every solve of a λ search
            sorted_solve = functools.partial(family.solve_sorted, units=family.sort_units(A3, B3))

    def run(l1: Tensor, l2: Tensor):
        show = progress and target_keep is None
        return _run(kern, A3, B3, l1, l2, method, steps, lr_t, tol, every, show, use_fused, sorted_solve)

    trace: list[dict] = []
    if target_keep is None:
        out = run(lam1_t, lam2_t)
    else:
        tol_keep = 0.5 / numel if search_tol is None else torch.full_like(numel, float(search_tol))
        mu = _search(run, lam1_t, lam2_t, numel, float(target_keep), search_iters, tol_keep, trace, progress)
        lam1_t, lam2_t = lam1_t * mu, lam2_t * mu
        out = run(lam1_t, lam2_t)
    Ah, Bh, obj, rec_steps, steps_run, conv = out
    return Solution(
        A_hat=_restore(Ah, layout, "A"),
        B_hat=_restore(Bh, layout, "B"),
        objective=obj,
        record_steps=rec_steps,
        kept_fraction=_kept(Ah, Bh, numel),
        steps=steps_run,
        converged=conv,
        lam1=lam1_t,
        lam2=lam2_t,
        lr=lr_t,
        method=method,
        backend=name,
        batched=layout.kind != "single",
        search=trace,
    )


_INT64_MAX = 2**63 - 1


def _int_arg(x, name: str, lo: int) -> int:
    """An integer in [lo, 2**63 - 1] (the kernels take int64), or an error naming the argument."""
    what = "a positive integer" if lo == 1 else f"an integer >= {lo}"
    if isinstance(x, (bool, Tensor)) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{name} must be {what}, got {x!r}")
    if not lo <= int(x) <= _INT64_MAX:
        raise ValueError(f"{name} must be {what} below 2**63, got {int(x)}")
    return int(x)


def _fraction_arg(x, name: str) -> float:
    """A fraction in (0, 1]: a real number (numpy scalars and 0-d tensors too), never a bool."""
    if isinstance(x, Tensor) and x.dim() == 0 and x.dtype != torch.bool and not x.is_complex():
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be in (0, 1], got {x!r}")
    if not 0 < float(x) <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {x!r}")
    return float(x)


def _interruptible(kern: Kernels) -> Kernels:
    """The whole-solve kernels of a compiled backend, run so that Ctrl-C interrupts the caller.

    A native ``solve_fused``/``solve_sorted`` call runs every step without returning to
    Python, which handles a SIGINT only between bytecodes: the call would ignore Ctrl-C for
    as long as it runs.  It releases the GIL, so it runs on a worker thread while the main
    thread waits in short joins, where KeyboardInterrupt is raised at once.  The iterates
    are those of the single call.  The kernel itself cannot be stopped from Python: an
    interrupted call finishes in the background and its result is dropped.
    """

    def wrap(fn):
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

            worker = threading.Thread(target=work, name="tropfast-solve", daemon=True)
            worker.start()
            while worker.is_alive():
                worker.join(0.05)
            if "err" in box:
                raise box["err"]
            return box["out"]

        return call

    return kern._replace(solve_fused=wrap(kern.solve_fused), solve_sorted=wrap(kern.solve_sorted))


def _search(run, lam1: Tensor, lam2: Tensor, numel: Tensor, target: float, iters: int, tol: Tensor, trace: list, progress: bool):
    """Per-adapter bisection on log μ so that solve(μ·lam1, μ·lam2) keeps about ``target``.

    Returns the μ (L,) whose kept fraction came closest to the target for each adapter.
    """
    L = lam1.shape[0]
    dev, dt = lam1.device, lam1.dtype
    log_lo = torch.full((L,), -math.inf, dtype=torch.float64, device=dev)  # keeps > target
    log_hi = torch.full((L,), math.inf, dtype=torch.float64, device=dev)  # keeps <= target
    log_mu = torch.zeros(L, dtype=torch.float64, device=dev)
    best_err = torch.full((L,), math.inf, dtype=torch.float64, device=dev)
    best_mu = torch.ones(L, dtype=dt, device=dev)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=iters, desc="tropfast lambda search", unit="solve", leave=False)
    for it in range(iters):
        mu = torch.exp(log_mu).to(dt)
        Ah, Bh = run(lam1 * mu, lam2 * mu)[:2]
        kept = _kept(Ah, Bh, numel)
        trace.append({"iter": it, "mu": mu.tolist(), "kept": kept.tolist()})
        err = (kept - target).abs()
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_mu = torch.where(better, mu, best_mu)
        too_dense = kept > target
        log_lo = torch.where(too_dense, log_mu, log_lo)
        log_hi = torch.where(too_dense, log_hi, log_mu)
        # Move by two decades until bracketed, then bisect in log space.
        log_mu = torch.where(
            torch.isinf(log_hi),
            log_mu + 2 * math.log(10),
            torch.where(torch.isinf(log_lo), log_mu - 2 * math.log(10), (log_lo + log_hi) / 2),
        )
        if bar is not None:
            bar.update(1)
        if bool((best_err <= tol).all()):
            break
    if bar is not None:
        bar.close()
    return best_mu
