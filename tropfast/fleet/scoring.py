"""Tropical scores for many saved adapters at once: equal shapes share one ``solve`` call.

``tropfast.prune`` scores a model's adapters with one ``solve(..., target_keep=keep)``,
whose λ search (``solver.MuSearch``) moves a multiplier per adapter on that adapter's own
kept fractions and stops probing it once it keeps within ``search_tol`` of the target.
Here a *problem* is one source's adapters (what ``prune`` would see in a model holding
that adapter): one search runs over the adapters of every problem of one padded shape,
each probe solving the adapters still searching, with the same arithmetic.  Each adapter
therefore gets ``prune``'s μ and masks, while a fleet of N files costs about as many solve
calls as one file.

A problem split across ranks (one large checkpoint under torch.distributed) takes its
stopping decision through ``all_done`` (an all-reduce), and carries the shape its whole
adapter list pads to, so that every rank's batch pads exactly as one process's would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .._threads import intra_op_threads
from ..pruning.scores import TROPICAL_DEFAULTS, all_finite, generator_lambdas, tropical_lambdas
from ..solver import MuSearch, Solution, pad_adapters, safe_lr, solve

__all__ = ["Problem", "check_tropical_options", "intra_op_threads", "tropical_batch"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Problem:
    As: list[Tensor]  # (r, d_in) in the compute dtype of prune (float64 on CPU)
    Bs: list[Tensor]  # (d_out, r)
    pad: tuple[int, int, int] | None = None  # (r, d_in, d_out) the full problem pads to, if only part is here


def check_tropical_options(opts: dict | None) -> dict:
    o = dict(TROPICAL_DEFAULTS)
    unknown = set(opts or {}) - set(o)
    if unknown:
        raise ValueError(f"unknown tropical option(s) {sorted(unknown)}; known: {sorted(o)}")
    o.update(opts or {})
    if o["dtype"] not in _DTYPES:
        raise ValueError(f"tropical dtype must be 'float32' or 'float64', got {o['dtype']!r}")
    return o


def _pad_shape(As: list[Tensor], Bs: list[Tensor]) -> tuple[int, int, int]:
    return (max(a.shape[0] for a in As), max(a.shape[1] for a in As), max(b.shape[0] for b in Bs))


def _solve(As, Bs, lam1, lam2, o, lam_gen=None, threads: int | None = None, lr=None):
    with intra_op_threads(threads):
        return solve(
            As,
            Bs,
            lam1=lam1,
            lam2=lam2,
            method=o["method"],
            steps=int(o["steps"]),
            lr=o["lr"] if lr is None else lr,
            backend=o["backend"],
            record_every=0,
            lam_gen=0.0 if lam_gen is None else lam_gen,
        )


def tropical_batch(
    problems: list[Problem],
    keep: float,
    tropical: dict | None = None,
    all_done: Callable[[list[bool]], list[bool]] | None = None,
    threads: int | None = None,
) -> list[tuple[list[Tensor], list[Tensor], dict]]:
    """(Â list, B̂ list, solver diagnostics) per problem, as ``prune``'s tropical score computes them.

    all_done: maps each problem's local "every adapter within tolerance" flag to the flag
    over all ranks (None: one process).  Every rank must pass the same problems.
    threads: torch's intra-op threads for the solves (None: as set); the rest runs as set.
    """
    o = check_tropical_options(tropical)
    dt = _DTYPES[o["dtype"]]
    target = None
    if o["target"]:
        target = min(max(float(keep), 1e-6), 1.0)
    prep = []
    buckets: dict[tuple, list[int]] = {}
    for k, p in enumerate(problems):
        As = [a.to(dt) for a in p.As]
        Bs = [b.to(dt) for b in p.Bs]
        if As:
            lam1, lam2 = tropical_lambdas(As, Bs, float(o["lam"]), float(o["lam_ratio"]))
            lg = generator_lambdas(As, Bs, float(o["lam"]), float(o["lam_gen"])) if o["lam_gen"] else torch.zeros_like(lam1)
            dev = As[0].device
        else:
            lam1 = lam2 = lg = torch.zeros(0, dtype=dt)
            dev = torch.device("cpu")
        pad = p.pad or (_pad_shape(As, Bs) if As else (0, 0, 0))
        prep.append((As, Bs, lam1, lam2, p.As[0].dtype if p.As else dt, lg))
        buckets.setdefault((pad, str(dev), p.pad is not None), []).append(k)
    results: list = [None] * len(problems)
    for (pad, dev, split), idxs in buckets.items():
        _run_bucket([prep[k] for k in idxs], idxs, pad, torch.device(dev), split, target, o, dt, all_done, results, threads)
    return results


def _run_bucket(prep, idxs, pad, dev, split, target, o, dt, all_done, results, threads) -> None:
    As = [a for p in prep for a in p[0]]
    Bs = [b for p in prep for b in p[1]]
    owner = [j for j, p in enumerate(prep) for _ in p[0]]
    L = len(As)
    lam1 = torch.cat([p[2] for p in prep]) if L else torch.zeros(0, dtype=dt)
    lam2 = torch.cat([p[3] for p in prep]) if L else torch.zeros(0, dtype=dt)
    # the generator penalty's weights (None: no adapter has one), scaled by μ like lam1 and lam2
    lg = torch.cat([p[5] for p in prep]) if L and o["lam_gen"] else None
    anchor = L > 0 and _pad_shape(As, Bs) != pad
    if anchor:
        # Only here when a split problem's local adapters pad smaller than the whole list:
        # one extra adapter of the full padded shape makes every solve pad (and so round)
        # exactly as it does on one process.  Its own results are dropped.
        r, di, do = pad
        As_run = As + [torch.ones(r, di, dtype=dt, device=dev)]
        Bs_run = Bs + [torch.ones(do, r, dtype=dt, device=dev)]
        one = torch.ones(1, dtype=dt, device=lam1.device)
        lam1_run, lam2_run = torch.cat([lam1, one]), torch.cat([lam2, one])
        lg_run = None if lg is None else torch.cat([lg, one])
    else:
        As_run, Bs_run, lam1_run, lam2_run, lg_run = As, Bs, lam1, lam2, lg
    numel = torch.tensor([a.shape[0] * (a.shape[1] + b.shape[0]) for a, b in zip(As, Bs)], dtype=torch.float64)
    batch = _uniform_batch(As_run, Bs_run, o)
    iters = [0] * len(prep)
    best = _Best(L)
    if target is not None:
        _search(
            As_run, Bs_run, lam1_run, lam2_run, L, owner, len(prep), numel, target, o, dt, all_done, iters, best, lg_run,
            threads, batch,
        )
    missing = [i for i in range(L) if best.rows[i] is None]  # no search, or no probe (search_iters=0)
    if missing:
        s_ = _solve_rows(As_run, Bs_run, lam1_run, lam2_run, lg_run, missing, best.mu[missing], L, o, dt, threads, batch)
        best.take(s_, missing, [True] * len(missing))
    Ah_all, Bh_all = [r[0] for r in best.rows], [r[1] for r in best.rows]
    start = 0
    for j, (k, p) in enumerate(zip(idxs, prep)):
        n = len(p[0])
        sl = slice(start, start + n)
        start += n
        out_dt = p[4]
        if n == 0:
            results[k] = ([], [], _diag(None, sl, o, target, iters[j]))
            continue
        Ah = [a.to(out_dt) for a in Ah_all[sl]]
        Bh = [b.to(out_dt) for b in Bh_all[sl]]
        ok = all_finite([t for a, b in zip(Ah, Bh) for t in (a, b)])
        for q in range(len(Ah)):
            if not (ok[2 * q] and ok[2 * q + 1]):
                raise FloatingPointError(f"the tropical solver returned non-finite values for adapter #{q}")
        results[k] = (Ah, Bh, _diag(best, sl, o, target, iters[j]))


def _uniform_batch(As: list[Tensor], Bs: list[Tensor], o: dict) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """(A, B, lr) stacked once for the bucket's probes when every adapter has one shape, with
    the safe step of each (None: the options give lr, or bcd takes none); None otherwise.

    A probe then takes its rows of the stack instead of stacking its list again, and the step
    is computed once instead of once per probe: the same numbers, since a solve on the padded
    batch computes both row by row (``solver.pad_adapters``, ``solver.safe_lr``)."""
    if not As or any(a.shape != As[0].shape for a in As) or any(b.shape != Bs[0].shape for b in Bs):
        return None
    A3, B3 = pad_adapters(As, Bs)  # what a solve of the lists builds (a stack: nothing to pad)
    lr = safe_lr(A3, B3) if (o["lr"] is None and o["method"] != "bcd") else None
    return A3, B3, lr


def _solve_rows(
    As, Bs, lam1, lam2, lam_gen, rows: list[int], mu: Tensor, L: int, o: dict, dt, threads=None, batch=None
) -> Solution:
    """One solve of the adapters ``rows`` at μ times their (λ1, λ2, λg), with the padding
    anchor (the adapters past the L real ones, at μ = 1) when there is one; on ``threads``.
    batch: ``_uniform_batch`` of As, Bs (None: solve the lists)."""
    extra = len(As) - L
    sel = rows + list(range(L, L + extra))
    mu_run = torch.cat([mu.to(dt), torch.ones(extra, dtype=dt)]).to(lam1.device)
    lg = None if lam_gen is None else lam_gen[sel] * mu_run
    l1, l2 = lam1[sel] * mu_run, lam2[sel] * mu_run
    if batch is None:
        return _solve([As[i] for i in sel], [Bs[i] for i in sel], l1, l2, o, lg, threads)
    A3, B3, lr = batch
    if sel != list(range(A3.shape[0])):
        ix = torch.tensor(sel, dtype=torch.long, device=A3.device)
        A3, B3, lr = A3.index_select(0, ix), B3.index_select(0, ix), None if lr is None else lr.index_select(0, ix)
    return _solve(A3, B3, l1, l2, o, lg, threads, lr=lr)


class _Best:
    """Per adapter, the outputs of the probe that gave it its best μ so far: the solve at the
    μ the search returns, so no second run is needed (as in ``solve(target_keep=...)``).
    A solve's rows do not depend on which other adapters share its padded batch.  A row is
    (Â, B̂, steps, λ1, λ2, lr, F start, F end, kept fraction), the numbers as Python's."""

    def __init__(self, L: int):
        self.rows: list = [None] * L
        self.mu = torch.ones(L, dtype=torch.float64)
        self.method = self.backend = None

    def take(self, sol, adapters: list[int], better: list[bool]) -> None:
        self.method, self.backend = sol.method, sol.backend
        n = len(adapters)
        lr = [None] * n if sol.lr is None else sol.lr[:n].tolist()
        cols = zip(
            sol.steps[:n].tolist(),
            sol.lam1[:n].tolist(),
            sol.lam2[:n].tolist(),
            lr,
            sol.objective[:n, 0].tolist(),
            sol.objective[:n, -1].tolist(),
            sol.kept_fraction[:n].tolist(),
        )
        # a batched solve's rows are views of its output: a row kept is copied, so that the
        # output is freed with the probe, as the rows of a list solve (copies already) are
        own = isinstance(sol.A_hat, Tensor)
        for j, (i, b, c) in enumerate(zip(adapters, better, cols)):
            if b:
                self.rows[i] = (sol.A_hat[j].clone(), sol.B_hat[j].clone()) if own else (sol.A_hat[j], sol.B_hat[j])
                self.rows[i] += c


def _search(
    As, Bs, lam1, lam2, L, owner, P, numel, target, o, dt, all_done, iters, best: _Best, lam_gen=None, threads=None,
    batch=None,
) -> None:
    """``solver.MuSearch`` over every problem's adapters; ``best`` receives each real
    adapter's μ and the outputs of its best probe.

    Each probe solves the adapters not yet within tolerance, whatever problem they belong
    to: an adapter's μ depends on its own solves only, so it is the μ ``prune`` finds.  A
    problem counts the probes until all its adapters are done (over all ranks through
    ``all_done``), as ``prune``'s search trace does.
    lam_gen: the generator penalty's weights (None: none), scaled by μ with lam1 and lam2.
    threads: as in ``tropical_batch``.  batch: ``_uniform_batch`` of As, Bs (None: none)."""
    # float64 like solve's tolerance: a float32 0.02 is not the float64 0.02
    tol = float(o["search_tol"]) if o["search_tol"] is not None else 0.5 / numel
    search = MuSearch(L, target, tol, dt, torch.device("cpu"))
    own = torch.tensor(owner, dtype=torch.long)
    active = [True] * P
    for it in range(int(o["search_iters"])):
        idx = (~search.done()).nonzero().flatten()
        if idx.numel():
            sol = _solve_rows(As, Bs, lam1, lam2, lam_gen, idx.tolist(), search.mu(idx), L, o, dt, threads, batch)
            better = search.update(idx, sol.kept_fraction[: idx.numel()].to("cpu", torch.float64))
            best.take(sol, idx.tolist(), better.tolist())
        within = search.done()
        flags = []
        for j in range(P):
            if not active[j]:
                flags.append(True)
                continue
            iters[j] = it + 1
            flags.append(bool(within[own == j].all()))
        if all_done is not None:
            flags = all_done(flags)
        for j in range(P):
            if active[j] and flags[j]:
                active[j] = False
        if not any(active):
            break
    best.mu = search.best_mu.to(torch.float64)


def _diag(best: _Best | None, sl: slice, o: dict, target, iters: int) -> dict:
    """The solver diagnostics of the adapters ``sl`` (from their best probes), as prune's."""
    if best is None:
        return {
            "method": o["method"],
            "backend": None,
            "search_iters": iters,
            "options": dict(o),
            "target_keep": target,
        }
    _, _, steps, l1, l2, lr, f0, f1, kept = zip(*best.rows[sl])
    return {
        "method": best.method,
        "backend": best.backend,
        "steps": list(steps),
        "lam1": list(l1),
        "lam2": list(l2),
        "lr": None if lr[0] is None else list(lr),
        "objective_start": list(f0),
        "objective_end": list(f1),
        "solver_kept_fraction": list(kept),
        "search_iters": iters,
        "options": dict(o),
        "target_keep": target,
    }
