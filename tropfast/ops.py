"""The op contract: every ``tropfast::`` schema, its fake kernel, its autograd, and its rules.

This module is the bottom of the package (docs/design.md §5): it imports nothing from
tropfast.  Backends register kernels for these schemas (the pure-PyTorch one as the
``CompositeExplicitAutograd`` default, the native library for the ``CPU`` / ``CUDA`` keys)
and obey the conventions below; the public wrappers live in ``tropfast.functional``.

Op-level conventions (the raw ``torch.ops.tropfast.*`` and every backend's kernels):
    A, A_hat: (r, d_in) or (L, r, d_in);  B, B_hat: (d_out, r) or (L, d_out, r)
    lr, lam1, lam2, lam_gen, tau: tensors of shape () or (L,)
    float16/bfloat16 are computed in float32 and returned in the input dtype
    (``compute_dtype``); float32 and float64 in their own precision.
The raw ops check shapes and arguments (``solve_args`` for the whole solves) but not
finiteness; the public wrappers validate everything first.
"""
from __future__ import annotations

import functools
import importlib.abc
import sys
from typing import Callable, NamedTuple

import torch
from torch import Tensor

NAMESPACE = "tropfast"
METHODS = ("ista", "fista", "bcd")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
N_STATS = 3
"""Columns of the whole-solve ops' ``stats``: F at the start, F at the end, nonzeros of (Â, B̂)."""

SCHEMAS = {
    "generators": "generators(Tensor A, Tensor B) -> (Tensor, Tensor)",
    "hsd_loss": "hsd_loss(Tensor A, Tensor B, Tensor A_hat, Tensor B_hat) -> Tensor",
    "hsd_grad": "hsd_grad(Tensor A, Tensor B, Tensor A_hat, Tensor B_hat) -> (Tensor, Tensor, Tensor)",
    "soft_threshold": "soft_threshold(Tensor X, Tensor tau) -> Tensor",
    "prox_step": (
        "prox_step(Tensor A, Tensor B, Tensor A_hat, Tensor B_hat, Tensor lr, Tensor lam1, Tensor lam2)"
        " -> (Tensor, Tensor)"
    ),
    # A whole solve in one call (docs/design.md §3): `steps` iterations of "ista", "fista" or
    # "bcd" from (A_hat, B_hat) = (A, B) (BCD may stop early once every unit's state cycles,
    # with the same result).  lr is ignored by "bcd".  Returns (A_hat, B_hat, stats) with
    # stats: float64 of shape A.shape[:-2] + (3,) = (F at the start, F at the end,
    # nonzeros of A_hat and B_hat), summed per adapter from the kernel's own per-unit sums.
    # F at the start is λ1‖A‖₁ + λ2‖B‖₁ (+ the penalty), summed in IEEE arithmetic over every
    # entry, so it is non-finite whenever an entry of A or B is: ``solve`` checks the inputs
    # for NaN/Inf from it instead of with a pass of its own.
    # lam_gen (None: 0) weighs the generator l2,1 penalty lam_gen·Σ_i ‖Â_i‖₂‖B̂_{:,i}‖₁, which
    # F includes (see GENERATOR_PENALTY); it comes last so that calls without it stay valid.
    "solve_fused": (
        "solve_fused(Tensor A, Tensor B, Tensor lam1, Tensor lam2, Tensor lr, str method, int steps,"
        " Tensor? lam_gen=None) -> (Tensor, Tensor, Tensor)"
    ),
    # solve_fused in the sorted path (docs/design.md §4): one sort per hidden unit, then
    # scalar recurrences, O(log d) per unit per iteration; the same iterates up to rounding
    # for "bcd" and "ista" (a unit whose ISTA iterate leaves the sorted form runs densely);
    # "fista" has no sorted form and runs the dense iteration.
    "solve_sorted": (
        "solve_sorted(Tensor A, Tensor B, Tensor lam1, Tensor lam2, Tensor lr, str method, int steps,"
        " Tensor? lam_gen=None) -> (Tensor, Tensor, Tensor)"
    ),
}

GENERATOR_PENALTY = """The generator l2,1 penalty (Alfarra et al.'s structured form), added to F:

    lam_gen · Σ_j (‖Ĝ1_j‖_{2,1} + ‖Ĝ2_j‖_{2,1}) = lam_gen · Σ_i ‖Â_i‖₂ · ‖B̂_{:,i}‖₁

(row i of Ĝ1_j is relu(B̂_ji)·Â_i, so its norm is relu(B̂_ji)‖Â_i‖₂, and relu(x) + relu(−x) = |x|).
Every method keeps its closed form, block by block with the other block fixed:
  Â_i:  the sparse-group-lasso prox: with Z = S_λ1(s_i A_i) (BCD) or the soft-thresholded
        gradient step U (ISTA/FISTA), Â_i = max(0, 1 − τ_g/‖Z‖₂)·Z/β̂_i with τ_g = lam_gen·‖B̂_i‖₁
        (BCD), or max(0, 1 − lr·lam_gen·‖B̂_i‖₁/‖U‖₂)·U (ISTA/FISTA);
  B̂_i:  λ2's threshold becomes λ2 + lam_gen·‖Â_i‖₂;
  the rescaling (tÂ_i, B̂_i/t) leaves ‖Â_i‖₂‖B̂_i‖₁ unchanged, so BCD's optimal t is unchanged.
ISTA and FISTA take both blocks' proximal maps at the same (current or extrapolated) point,
each with the other block's norm from that point.  lam_gen = 0 runs the same arithmetic as
without the penalty, bit for bit; whole hidden units go to zero when lam_gen > 0."""

_LIB = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    _LIB.define(_schema)


class Kernels(NamedTuple):
    """One backend's implementation of every op, with the op-level semantics above."""

    generators: Callable[..., tuple[Tensor, Tensor]]
    hsd_loss: Callable[..., Tensor]
    hsd_grad: Callable[..., tuple[Tensor, Tensor, Tensor]]
    soft_threshold: Callable[..., Tensor]
    prox_step: Callable[..., tuple[Tensor, Tensor]]
    solve_fused: Callable[..., tuple[Tensor, Tensor, Tensor]]
    solve_sorted: Callable[..., tuple[Tensor, Tensor, Tensor]]


DISPATCHED = Kernels(*(getattr(torch.ops.tropfast, name) for name in Kernels._fields))
"""The registered ops: the dispatcher picks the kernel of the tensors' device."""


def register_default(kernels: Kernels) -> None:
    """Register ``kernels`` as the CompositeExplicitAutograd kernel of every op (the torch backend)."""
    for name, fn in kernels._asdict().items():
        torch.library.impl(f"{NAMESPACE}::{name}", "CompositeExplicitAutograd", lib=_LIB)(fn)


# ---------------------------------------------------------------------------------------
# Rules shared by every backend.
# ---------------------------------------------------------------------------------------
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision an op computes in: float32 for float16/bfloat16, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class SolveArgs(NamedTuple):
    """A whole solve's checked input: batched (L, r, d_in) / (L, d_out, r) weights of one dtype
    and per-adapter (L,) parameters in the compute dtype on the weights' device."""

    A: Tensor
    B: Tensor
    lam1: Tensor
    lam2: Tensor
    lr: Tensor
    method: str
    steps: int
    squeeze: bool  # the input was one adapter (2-D)
    lam_gen: Tensor | None = None  # (L,), or None when no adapter has a generator penalty

    @property
    def has_gen(self) -> bool:
        """Whether any adapter has lam_gen > 0 (then the penalised iteration runs)."""
        return self.lam_gen is not None


def eager(fn: Callable, why: str) -> Callable:
    """``fn`` run eagerly under ``torch.compile``: one graph break, at the call, instead of one
    per data-dependent branch inside (docs/design.md §6).

    ``torch.compiler.disable`` imports torch._dynamo, which is half of ``import tropfast``'s
    time, so the disabled form is made when torch._dynamo is first imported (by
    ``torch.compile``, ``torch.export``, ...), before anything is traced; until then the
    call runs ``fn`` itself, which is what the disabled form does outside a trace.
    """
    impl = [fn]

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return impl[0](*args, **kwargs)

    _WHEN_DYNAMO.append((impl, fn, why))
    if "torch._dynamo" in sys.modules:
        _make_disabled()
    elif not any(isinstance(f, _DynamoWatch) for f in sys.meta_path):
        sys.meta_path.insert(0, _DynamoWatch())
    return call


_WHEN_DYNAMO: list = []  # (cell, fn, why) of the eager() wrappers not yet disabled


def _make_disabled() -> None:
    while _WHEN_DYNAMO:
        impl, fn, why = _WHEN_DYNAMO.pop()
        try:
            impl[0] = torch.compiler.disable(fn, reason=why)
        except TypeError:  # torch < 2.7 takes no reason
            impl[0] = torch.compiler.disable(fn)


class _DynamoWatch(importlib.abc.MetaPathFinder):
    """Runs ``_make_disabled`` right after torch._dynamo is imported (it finds nothing itself)."""

    def find_spec(self, name, path, target=None):
        if name != "torch._dynamo":
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        run = getattr(loader, "exec_module", None)
        if run is None:
            return spec

        def exec_module(module):
            run(module)
            _make_disabled()

        loader.exec_module = exec_module
        return spec


def check_pair(op: str, A: Tensor, B: Tensor) -> None:
    """The shape rules of an adapter pair at op level (the native kernels apply the same)."""
    if A.dim() not in (2, 3):
        raise ValueError(f"{op}: A must be (r, d_in) or (L, r, d_in), got shape {tuple(A.shape)}")
    if B.dim() != A.dim():
        raise ValueError(f"{op}: B must have {A.dim()} dims to match A {tuple(A.shape)}, got {tuple(B.shape)}")
    if B.shape[-1] != A.shape[-2]:
        raise ValueError(f"{op}: A {tuple(A.shape)} has r={A.shape[-2]} rows but B {tuple(B.shape)} has {B.shape[-1]} columns")
    if A.dim() == 3 and A.shape[0] != B.shape[0]:
        raise ValueError(f"{op}: A has {A.shape[0]} adapters, B has {B.shape[0]}")
    if A.device != B.device:
        raise ValueError(f"{op}: A is on {A.device} but B is on {B.device}")
    if A.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: A has dtype {A.dtype}; supported dtypes are float16, bfloat16, float32 and float64")
    if B.dtype != A.dtype:
        raise TypeError(f"{op}: A is {A.dtype} but B is {B.dtype}; use one dtype")


def param_vector(op: str, name: str, p: Tensor, L: int, ref: Tensor) -> Tensor:
    """A () or (L,) parameter as a contiguous (L,) tensor of the compute dtype on ref's device."""
    if p.dim() > 1 or p.numel() not in (1, L):
        raise ValueError(f"{op}: {name} must have shape () or ({L},), got {tuple(p.shape)}")
    if p.is_complex() or p.dtype == torch.bool:
        raise TypeError(f"{op}: {name} must be real, got dtype {p.dtype}")
    # rounded to the compute dtype first, as the native kernels do
    return p.reshape(-1).to(device=ref.device, dtype=compute_dtype(ref.dtype)).expand(L).contiguous()


def solve_args(
    op: str, A: Tensor, B: Tensor, lam1: Tensor, lam2: Tensor, lr: Tensor, method: str, steps: int,
    lam_gen: Tensor | None = None,
) -> SolveArgs:
    """The one argument check of ``solve_fused`` / ``solve_sorted``, in every backend.

    The native kernels (csrc/common.h ``solve_input``) implement the same rules in C++;
    tests/backends/test_contract.py runs one table of bad calls through every backend.
    ``lam_gen`` follows lam1's rules; all-zero (or None) gives ``SolveArgs.lam_gen = None``.
    """
    if method not in METHODS:
        raise ValueError(f"{op}: unknown method '{method}'; choose ista, fista or bcd")
    if steps < 0:
        raise ValueError(f"{op}: steps must be >= 0, got {steps}")
    check_pair(op, A, B)
    squeeze = A.dim() == 2
    A3, B3 = (A.unsqueeze(0), B.unsqueeze(0)) if squeeze else (A, B)
    L = A3.shape[0]
    l1, l2, eta = (param_vector(op, n, p, L, A3) for n, p in (("lam1", lam1), ("lam2", lam2), ("lr", lr)))
    lg = None if lam_gen is None else param_vector(op, "lam_gen", lam_gen, L, A3)
    if lg is not None and not bool((lg != 0).any()):
        lg = None  # no penalty anywhere: the unpenalised iteration, bit for bit
    return SolveArgs(A3.contiguous(), B3.contiguous(), l1, l2, eta, method, int(steps), squeeze, lg)


# ---------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only (torch.compile, meta tensors, opcheck).
# ---------------------------------------------------------------------------------------
def _loss_shape(A: Tensor) -> tuple[int, ...]:
    return tuple(A.shape[:-2])


@torch.library.register_fake(f"{NAMESPACE}::generators")
def _(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    shape = (*B.shape[:-1], A.shape[-2], A.shape[-1])
    return A.new_empty(shape), A.new_empty(shape)


@torch.library.register_fake(f"{NAMESPACE}::hsd_loss")
def _(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor) -> Tensor:
    return A.new_empty(_loss_shape(A))


@torch.library.register_fake(f"{NAMESPACE}::hsd_grad")
def _(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return A.new_empty(_loss_shape(A)), torch.empty_like(A_hat), torch.empty_like(B_hat)


def _solve_fake(A: Tensor, B: Tensor, lam1: Tensor, lam2: Tensor, lr: Tensor, method: str, steps: int, lam_gen=None):
    stats = A.new_empty((*_loss_shape(A), N_STATS), dtype=torch.float64)
    return torch.empty_like(A), torch.empty_like(B), stats


torch.library.register_fake(f"{NAMESPACE}::solve_fused")(_solve_fake)
torch.library.register_fake(f"{NAMESPACE}::solve_sorted")(_solve_fake)


@torch.library.register_fake(f"{NAMESPACE}::soft_threshold")
def _(X: Tensor, tau: Tensor) -> Tensor:
    return torch.empty_like(X)


@torch.library.register_fake(f"{NAMESPACE}::prox_step")
def _(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor, lr: Tensor, lam1: Tensor, lam2: Tensor):
    return torch.empty_like(A_hat), torch.empty_like(B_hat)


# ---------------------------------------------------------------------------------------
# Autograd, written once.  hsd_loss is symmetric in (A, B) <-> (A_hat, B_hat), so the
# gradient for the originals is hsd_grad with the roles swapped: every input gets an exact
# gradient.  Backends that run outside the dispatcher (Triton) pass their own hsd_grad.
# ---------------------------------------------------------------------------------------
def _expand_like(g: Tensor, x: Tensor) -> Tensor:
    return g.reshape(g.shape + (1,) * (x.dim() - g.dim()))


def hsd_loss_backward(hsd_grad: Callable, grad: Tensor, A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor, need):
    """Gradients of hsd_loss for an upstream ``grad`` of its shape: (gA, gB, gA_hat, gB_hat)."""
    gA = gB = gAh = gBh = None
    if need[2] or need[3]:
        _, gAh, gBh = hsd_grad(A, B, A_hat, B_hat)
        gAh, gBh = _expand_like(grad, gAh) * gAh, _expand_like(grad, gBh) * gBh
    if need[0] or need[1]:
        _, gA, gB = hsd_grad(A_hat, B_hat, A, B)
        gA, gB = _expand_like(grad, gA) * gA, _expand_like(grad, gB) * gB
    return gA, gB, gAh, gBh


def soft_threshold_backward(grad: Tensor, out: Tensor) -> Tensor:
    """Gradient of soft_threshold in X: 1 where the output is nonzero, else 0."""
    return grad * (out != 0).to(grad.dtype)


def generators_backward(A: Tensor, B: Tensor, g1: Tensor, g2: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of (G1, G2) = generators(A, B) for upstream gradients g1, g2: (gA, gB)."""
    P = torch.relu(B).unsqueeze(-1)
    N = torch.relu(-B).unsqueeze(-1)
    gA = (P * g1 + N * g2).sum(-3)
    A4 = A.unsqueeze(-3)
    gB = (B > 0).to(A.dtype) * (g1 * A4).sum(-1) - (B < 0).to(A.dtype) * (g2 * A4).sum(-1)
    return gA, gB


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _save_output(ctx, inputs, output) -> None:
    ctx.save_for_backward(output)


def _loss_backward(ctx, grad):
    return hsd_loss_backward(torch.ops.tropfast.hsd_grad, grad, *ctx.saved_tensors, ctx.needs_input_grad)


def _st_backward(ctx, grad):
    return soft_threshold_backward(grad, ctx.saved_tensors[0]), None


def _gen_backward(ctx, g1, g2):
    return generators_backward(*ctx.saved_tensors, g1, g2)


torch.library.register_autograd(f"{NAMESPACE}::hsd_loss", _loss_backward, setup_context=_save_inputs)
torch.library.register_autograd(f"{NAMESPACE}::soft_threshold", _st_backward, setup_context=_save_output)
torch.library.register_autograd(f"{NAMESPACE}::generators", _gen_backward, setup_context=_save_inputs)
