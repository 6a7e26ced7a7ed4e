"""The torch backend's op kernels: op-level semantics (docs/design.md §5) over the closed form.

Each function takes 2-D or 3-D input of any supported dtype, computes in the compute dtype
(``ops.compute_dtype``) and returns the input dtype.  ``KERNELS`` is registered as the
``CompositeExplicitAutograd`` kernel of every ``tropfast::`` op, so it runs on any device
and is what the dispatcher falls back to where no native kernel is registered.
"""
from __future__ import annotations

import functools

from torch import Tensor

from ... import ops
from .._batch import batch, solve_stats, unbatch
from . import closed_form, dense
from . import sorted as sorted_path


def generators(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    sq, (A3, B3) = batch(A, B, dtype=ops.compute_dtype(A.dtype))
    return unbatch(sq, A.dtype, *closed_form.generators(A3, B3))  # type: ignore[return-value]


def hsd_loss(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor) -> Tensor:
    sq, xs = batch(A, B, A_hat, B_hat, dtype=ops.compute_dtype(A.dtype))
    return unbatch(sq, A.dtype, closed_form.hsd_loss(*xs))[0]


def hsd_grad(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    sq, xs = batch(A, B, A_hat, B_hat, dtype=ops.compute_dtype(A.dtype))
    return unbatch(sq, A.dtype, *closed_form.hsd_grad(*xs))  # type: ignore[return-value]


def soft_threshold(X: Tensor, tau: Tensor) -> Tensor:
    ct = ops.compute_dtype(X.dtype)
    return closed_form.soft_threshold(X.to(ct), tau.to(ct)).to(X.dtype)


def prox_step(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor, lr: Tensor, lam1: Tensor, lam2: Tensor):
    ct = ops.compute_dtype(A.dtype)
    sq, xs = batch(A, B, A_hat, B_hat, dtype=ct)
    out = closed_form.prox_step(*xs, lr.to(ct), lam1.to(ct), lam2.to(ct))
    return unbatch(sq, A.dtype, *out)


def _whole(op: str, run, A: Tensor, B: Tensor, lam1, lam2, lr, method: str, steps: int, lam_gen=None):
    """Check (``ops.solve_args``), run ``run(A3, B3, l1, l2, lr, method, steps, lam_gen)`` in the
    compute dtype, and add the stats."""
    a = ops.solve_args(op, A, B, lam1, lam2, lr, method, steps, lam_gen)
    ct = ops.compute_dtype(A.dtype)
    A3, B3 = a.A.to(ct), a.B.to(ct)
    Ah, Bh = run(A3, B3, a.lam1, a.lam2, a.lr, a.method, a.steps, a.lam_gen)
    stats = solve_stats(A3, B3, Ah, Bh, a.lam1, a.lam2, closed_form.hsd_loss, a.lam_gen)
    return unbatch(a.squeeze, A.dtype, Ah, Bh) + unbatch(a.squeeze, None, stats)


def _dense(A3, B3, l1, l2, lr, method, steps, lam_gen=None):
    return dense.dense_solve(
        closed_form.prox_step, A3, B3, l1, l2, lr, method, steps, lam_gen, closed_form.prox_step_gen
    )


def _sorted(A3, B3, l1, l2, lr, method, steps, lam_gen=None, units=None):
    if steps == 0 or 0 in A3.shape or 0 in B3.shape:
        # nothing to sort (or to do): the dense loop handles empty shapes and steps = 0
        return _dense(A3, B3, l1, l2, lr, method, steps, lam_gen)
    return sorted_path.solve_sorted(A3, B3, l1, l2, lr, method, steps, units=units, lam_gen=lam_gen)


def solve_fused(A: Tensor, B: Tensor, lam1: Tensor, lam2: Tensor, lr: Tensor, method: str, steps: int, lam_gen=None):
    return _whole("solve_fused", _dense, A, B, lam1, lam2, lr, method, steps, lam_gen)


def solve_sorted(A: Tensor, B: Tensor, lam1: Tensor, lam2: Tensor, lr: Tensor, method: str, steps: int, lam_gen=None):
    return _whole("solve_sorted", _sorted, A, B, lam1, lam2, lr, method, steps, lam_gen)


def prepare_sorted(A3: Tensor, B3: Tensor):
    """``solve_sorted`` for repeated solves of the same weights (a λ search): the units are
    sorted once, here, instead of in every call.  A3, B3: batched, in the compute dtype."""
    if 0 in A3.shape or 0 in B3.shape:
        return solve_sorted
    units = sorted_path.sort_units(A3, B3)
    return functools.partial(_whole, "solve_sorted", functools.partial(_sorted, units=units))


KERNELS = ops.Kernels(generators, hsd_loss, hsd_grad, soft_threshold, prox_step, solve_fused, solve_sorted)
