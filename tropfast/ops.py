"""Every ``tropfast::`` op: schema, fake (meta) kernel, autograd, default kernel, public wrapper.

The schemas are written here and nowhere else.  The default kernel of every op is the
pure-PyTorch closed form (``backends/torch_backend.py``), registered for
``CompositeExplicitAutograd`` so it runs on any device; compiled backends add kernels for
the ``CPU`` and ``CUDA`` dispatch keys (``TORCH_LIBRARY_IMPL`` in ``csrc/``).

Op-level conventions (the raw ``torch.ops.tropfast.*`` and every backend's kernels):
    A, A_hat: (r, d_in) or (L, r, d_in);  B, B_hat: (d_out, r) or (L, d_out, r)
    lr, lam1, lam2, tau: tensors of shape () or (L,)
    float16/bfloat16 are computed in float32 and returned in the input dtype.
The public wrappers below validate their input first; the raw ops do not.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from . import _checks
from .backends import torch_backend as _cf

_NS = "tropfast"

SCHEMAS = {
    "generators": "generators(Tensor A, Tensor B) -> (Tensor, Tensor)",
    "hsd_loss": "hsd_loss(Tensor A, Tensor B, Tensor A_hat, Tensor B_hat) -> Tensor",
    "hsd_grad": "hsd_grad(Tensor A, Tensor B, Tensor A_hat, Tensor B_hat) -> (Tensor, Tensor, Tensor)",
    "soft_threshold": "soft_threshold(Tensor X, Tensor tau) -> Tensor",
    "prox_step": (
        "prox_step(Tensor A, Tensor B, Tensor A_hat, Tensor B_hat, Tensor lr, Tensor lam1, Tensor lam2)"
        " -> (Tensor, Tensor)"
    ),
    # A whole solve in one call: T iterations of method "ista", "fista" or "bcd" from
    # (A_hat, B_hat) = (A, B); the iterates of solver.py's dense loop with tol=None.
    # lr is ignored by "bcd".  Fused backends run every iteration of a hidden unit on chip.
    "solve_fused": (
        "solve_fused(Tensor A, Tensor B, Tensor lam1, Tensor lam2, Tensor lr, str method, int steps)"
        " -> (Tensor, Tensor)"
    ),
    # solve_fused in the sorted family (DESIGN §2, tropfast/family.py): one sort per hidden
    # unit, then scalar recurrences, O(log d) per unit per iteration.  The same iterates as
    # solve_fused up to rounding for "bcd" and "ista" (a unit whose ISTA iterate leaves the
    # family reruns densely); "fista" has no family form and runs the dense iteration.
    "solve_sorted": (
        "solve_sorted(Tensor A, Tensor B, Tensor lam1, Tensor lam2, Tensor lr, str method, int steps)"
        " -> (Tensor, Tensor)"
    ),
}

_LIB = torch.library.Library(_NS, "DEF")
for _schema in SCHEMAS.values():
    _LIB.define(_schema)


# ---------------------------------------------------------------------------------------
# The closed-form kernels at op level (2-D or 3-D input, any supported dtype).
# ---------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _batched(*xs: Tensor) -> tuple[bool, list[Tensor]]:
    """Add the adapter dim if missing and upcast half precision."""
    squeeze = xs[0].dim() == 2
    ct = _compute_dtype(xs[0].dtype)
    out = [(x.unsqueeze(0) if squeeze else x).to(ct) for x in xs]
    return squeeze, out


def _unbatched(squeeze: bool, dtype: torch.dtype, *ys: Tensor) -> tuple[Tensor, ...]:
    return tuple((y.squeeze(0) if squeeze else y).to(dtype) for y in ys)


def _scal(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(_compute_dtype(dtype))


def cf_generators(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    sq, (A3, B3) = _batched(A, B)
    return _unbatched(sq, A.dtype, *_cf.generators(A3, B3))  # type: ignore[return-value]


def cf_hsd_loss(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor) -> Tensor:
    sq, xs = _batched(A, B, A_hat, B_hat)
    return _unbatched(sq, A.dtype, _cf.hsd_loss(*xs))[0]


def cf_hsd_grad(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    sq, xs = _batched(A, B, A_hat, B_hat)
    return _unbatched(sq, A.dtype, *_cf.hsd_grad(*xs))  # type: ignore[return-value]


def cf_soft_threshold(X: Tensor, tau: Tensor) -> Tensor:
    ct = _compute_dtype(X.dtype)
    return _cf.soft_threshold(X.to(ct), tau.to(ct)).to(X.dtype)


def cf_prox_step(
    A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor, lr: Tensor, lam1: Tensor, lam2: Tensor
) -> tuple[Tensor, Tensor]:
    sq, xs = _batched(A, B, A_hat, B_hat)
    out = _cf.prox_step(*xs, _scal(lr, A.dtype), _scal(lam1, A.dtype), _scal(lam2, A.dtype))
    return _unbatched(sq, A.dtype, *out)  # type: ignore[return-value]


def cf_solve_fused(
    A: Tensor, B: Tensor, lam1: Tensor, lam2: Tensor, lr: Tensor, method: str, steps: int
) -> tuple[Tensor, Tensor]:
    from .solver import dense_solve

    sq, (A3, B3) = _batched(A, B)
    L = A3.shape[0]
    params = [p.to(A3.dtype).expand(L).contiguous() for p in (lam1, lam2, lr)]
    out = dense_solve(CLOSED_FORM, A3, B3, *params, method, steps)
    return _unbatched(sq, A.dtype, *out)  # type: ignore[return-value]


def cf_solve_sorted(
    A: Tensor, B: Tensor, lam1: Tensor, lam2: Tensor, lr: Tensor, method: str, steps: int
) -> tuple[Tensor, Tensor]:
    from . import family

    if steps < 0:
        raise ValueError(f"solve_sorted: steps must be >= 0, got {steps}")
    if 0 in A.shape or 0 in B.shape:  # nothing to sort: the dense loop handles empty shapes
        return cf_solve_fused(A, B, lam1, lam2, lr, method, steps)
    sq, (A3, B3) = _batched(A, B)
    L = A3.shape[0]
    params = [p.to(A3.dtype).reshape(-1).expand(L).contiguous() for p in (lam1, lam2, lr)]
    out = family.solve_sorted(A3, B3, *params, method, steps)
    return _unbatched(sq, A.dtype, *out)  # type: ignore[return-value]


class Kernels(NamedTuple):
    """One backend's implementation of every op, with op-level semantics."""

    generators: Callable[..., tuple[Tensor, Tensor]]
    hsd_loss: Callable[..., Tensor]
    hsd_grad: Callable[..., tuple[Tensor, Tensor, Tensor]]
    soft_threshold: Callable[..., Tensor]
    prox_step: Callable[..., tuple[Tensor, Tensor]]
    solve_fused: Callable[..., tuple[Tensor, Tensor]]
    solve_sorted: Callable[..., tuple[Tensor, Tensor]]


CLOSED_FORM = Kernels(
    cf_generators, cf_hsd_loss, cf_hsd_grad, cf_soft_threshold, cf_prox_step, cf_solve_fused, cf_solve_sorted
)

DISPATCHED = Kernels(
    torch.ops.tropfast.generators,
    torch.ops.tropfast.hsd_loss,
    torch.ops.tropfast.hsd_grad,
    torch.ops.tropfast.soft_threshold,
    torch.ops.tropfast.prox_step,
    torch.ops.tropfast.solve_fused,
    torch.ops.tropfast.solve_sorted,
)
"""The registered ops: the dispatcher picks the kernel of the tensors' device."""

for _name, _fn in CLOSED_FORM._asdict().items():
    torch.library.impl(f"{_NS}::{_name}", "CompositeExplicitAutograd", lib=_LIB)(_fn)


# ---------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only (torch.compile, meta tensors, opcheck).
# ---------------------------------------------------------------------------------------
def _loss_shape(A: Tensor) -> tuple[int, ...]:
    return tuple(A.shape[:-2])


@torch.library.register_fake(f"{_NS}::generators")
def _(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    shape = (*B.shape[:-1], A.shape[-2], A.shape[-1])
    return A.new_empty(shape), A.new_empty(shape)


@torch.library.register_fake(f"{_NS}::hsd_loss")
def _(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor) -> Tensor:
    return A.new_empty(_loss_shape(A))


@torch.library.register_fake(f"{_NS}::hsd_grad")
def _(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return A.new_empty(_loss_shape(A)), torch.empty_like(A_hat), torch.empty_like(B_hat)


@torch.library.register_fake(f"{_NS}::solve_fused")
def _(A: Tensor, B: Tensor, lam1: Tensor, lam2: Tensor, lr: Tensor, method: str, steps: int):
    return torch.empty_like(A), torch.empty_like(B)


@torch.library.register_fake(f"{_NS}::solve_sorted")
def _(A: Tensor, B: Tensor, lam1: Tensor, lam2: Tensor, lr: Tensor, method: str, steps: int):
    return torch.empty_like(A), torch.empty_like(B)


@torch.library.register_fake(f"{_NS}::soft_threshold")
def _(X: Tensor, tau: Tensor) -> Tensor:
    return torch.empty_like(X)


@torch.library.register_fake(f"{_NS}::prox_step")
def _(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor, lr: Tensor, lam1: Tensor, lam2: Tensor):
    return torch.empty_like(A_hat), torch.empty_like(B_hat)


# ---------------------------------------------------------------------------------------
# Autograd.  hsd_loss is symmetric in (A, B) <-> (A_hat, B_hat), so the gradient for the
# originals is hsd_grad with the roles swapped: every input gets an exact gradient.
# ---------------------------------------------------------------------------------------
def _expand_like(g: Tensor, x: Tensor) -> Tensor:
    return g.reshape(g.shape + (1,) * (x.dim() - g.dim()))


def _loss_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _loss_backward(ctx, grad):
    A, B, A_hat, B_hat = ctx.saved_tensors
    need = ctx.needs_input_grad
    gA = gB = gAh = gBh = None
    if need[2] or need[3]:
        _, gAh, gBh = torch.ops.tropfast.hsd_grad(A, B, A_hat, B_hat)
        gAh, gBh = _expand_like(grad, gAh) * gAh, _expand_like(grad, gBh) * gBh
    if need[0] or need[1]:
        _, gA, gB = torch.ops.tropfast.hsd_grad(A_hat, B_hat, A, B)
        gA, gB = _expand_like(grad, gA) * gA, _expand_like(grad, gB) * gB
    return gA, gB, gAh, gBh


torch.library.register_autograd(f"{_NS}::hsd_loss", _loss_backward, setup_context=_loss_setup)


def _st_setup(ctx, inputs, output) -> None:
    X, tau = inputs
    ctx.save_for_backward(output)


def _st_backward(ctx, grad):
    (out,) = ctx.saved_tensors
    return grad * (out != 0).to(grad.dtype), None


torch.library.register_autograd(f"{_NS}::soft_threshold", _st_backward, setup_context=_st_setup)


def _gen_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def generators_backward(A: Tensor, B: Tensor, g1: Tensor, g2: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of (G1, G2) = generators(A, B) for upstream gradients g1, g2: (gA, gB)."""
    P = torch.relu(B).unsqueeze(-1)
    N = torch.relu(-B).unsqueeze(-1)
    gA = (P * g1 + N * g2).sum(-3)
    A4 = A.unsqueeze(-3)
    gB = (B > 0).to(A.dtype) * (g1 * A4).sum(-1) - (B < 0).to(A.dtype) * (g2 * A4).sum(-1)
    return gA, gB


def _gen_backward(ctx, g1, g2):
    return generators_backward(*ctx.saved_tensors, g1, g2)


torch.library.register_autograd(f"{_NS}::generators", _gen_backward, setup_context=_gen_setup)


# ---------------------------------------------------------------------------------------
# Public wrappers: validate, pick the backend, run.
# ---------------------------------------------------------------------------------------
def _kernels(backend: str | None, ref: Tensor) -> Kernels:
    from . import backends

    return backends.kernels(backends.resolve(backend, ref.device, ref.dtype))


def _as_param(x: float | Tensor, ref: Tensor) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(device=ref.device, dtype=_compute_dtype(ref.dtype))
    return torch.tensor(float(x), device=ref.device, dtype=_compute_dtype(ref.dtype))


def _n_adapters(A: Tensor) -> int | None:
    return A.shape[0] if A.dim() == 3 else None


def generators(A: Tensor, B: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Zonotope generators G1_j = Diag(relu(B_j))·A, G2_j = Diag(relu(−B_j))·A.

    A: (r, d_in), B: (d_out, r) -> G1, G2: (d_out, r, d_in); batched: (L, d_out, r, d_in).
    Materialises d_out·r·d_in numbers per matrix: for inspection, not for optimisation.
    """
    _checks.check_adapter(A, B)
    return _kernels(backend, A).generators(A, B)


def hsd_loss(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor, *, backend: str | None = None) -> Tensor:
    """½Σ_j(‖G1_j−Ĝ1_j‖² + ‖G2_j−Ĝ2_j‖²) without the generators: () or (L,). Differentiable."""
    _checks.check_adapter(A, B)
    _checks.check_estimate(A, B, A_hat, B_hat)
    return _kernels(backend, A).hsd_loss(A, B, A_hat, B_hat)


def hsd_grad(
    A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor, *, backend: str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, ∂loss/∂A_hat, ∂loss/∂B_hat) in one pass: (), (r, d_in), (d_out, r) or batched."""
    _checks.check_adapter(A, B)
    _checks.check_estimate(A, B, A_hat, B_hat)
    args = [x.detach() for x in (A, B, A_hat, B_hat)]
    return _kernels(backend, A).hsd_grad(*args)


def soft_threshold(X: Tensor, tau: float | Tensor, *, backend: str | None = None) -> Tensor:
    """S_tau(X) = sign(X)·max(|X| − tau, 0); tau a number >= 0 or one per adapter (X: (L, …))."""
    _checks.check_tensor(X, "X")
    if isinstance(tau, Tensor) and tau.dim() == 1 and X.dim() != 3:
        raise ValueError(f"a per-adapter tau needs a batched X of shape (L, m, n), got X {tuple(X.shape)}")
    _checks.check_scalar(tau, "tau", X.shape[0] if X.dim() == 3 else None)
    return _kernels(backend, X).soft_threshold(X, _as_param(tau, X))


def prox_step(
    A: Tensor,
    B: Tensor,
    A_hat: Tensor,
    B_hat: Tensor,
    lr: float | Tensor,
    lam1: float | Tensor,
    lam2: float | Tensor,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """One step of Algorithm 1: A_hat ← S(A_hat − lr·gA, lr·lam1), B_hat ← S(B_hat − lr·gB, lr·lam2).

    Both gradients are taken at the current point.  lr > 0, lam >= 0: numbers or (L,) tensors.
    """
    _checks.check_adapter(A, B)
    _checks.check_estimate(A, B, A_hat, B_hat)
    n = _n_adapters(A)
    _checks.check_scalar(lr, "lr", n, positive=True)
    _checks.check_scalar(lam1, "lam1", n)
    _checks.check_scalar(lam2, "lam2", n)
    args = [x.detach() for x in (A, B, A_hat, B_hat)]
    params = [_as_param(p, A) for p in (lr, lam1, lam2)]
    return _kernels(backend, A).prox_step(*args, *params)
