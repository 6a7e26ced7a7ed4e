"""Host launchers of the ``triton`` backend, with the op-level semantics of ``tropfast.ops``:
    A, A_hat: (r, d_in) or (L, r, d_in);  B, B_hat: (d_out, r) or (L, d_out, r)
    lr, lam1, lam2, tau: tensors of shape () or (L,)
float16/bfloat16 are computed in float32 and returned in the input dtype; float64 is
computed in float64.  The kernels live in ``kernels.py`` and ``sorted_kernels.py`` and are
imported lazily, so importing tropfast never needs triton.

``solve_fused`` is the point of this backend: one launch runs all T iterations of every
hidden unit on chip and touches the weights once (docs/design.md §3).  ``solve_sorted`` runs
the same iterations on the sorted path (docs/design.md §4; the PyTorch form in
backends/torch/sorted.py is its specification).
"""
from __future__ import annotations

import functools
import importlib
import sys

import torch
from torch import Tensor

from ... import ops
from .._batch import batch, solve_stats
from .._status import BackendUnavailable
from ..torch import sorted as sorted_path
from ._mode import interpreting

MAX_D = 16384
"""Largest d_in / d_out the unit kernels hold on chip (one tile per unit)."""

_METHODS = {"ista": 0, "fista": 1, "bcd": 2}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTERPRET_HINT = (
    "set TRITON_INTERPRET=1 before importing triton or tropfast to run the kernels on CPU tensors in the Triton interpreter"
)


# ---------------------------------------------------------------------------------------
# Availability.
# ---------------------------------------------------------------------------------------
def _triton():
    """The triton module, or the reason it cannot be imported."""
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return None, f"triton cannot be imported ({type(exc).__name__}: {exc}); pip install triton"
    return triton, ""


def _imported_interpreted(triton) -> bool | None:
    """Whether triton's own library was decorated for the interpreter (None: cannot tell)."""
    try:
        from triton.language import standard
        from triton.runtime.jit import JITFunction
    except Exception:
        return None
    return not isinstance(getattr(standard, "sum", None), JITFunction)


def status() -> tuple[bool, str]:
    """(available, reason): triton imports and there is a CUDA device or TRITON_INTERPRET=1."""
    triton, why = _triton()
    if triton is None:
        return False, why
    version = getattr(triton, "__version__", "?")
    interp = interpreting()
    # triton decorates its own library (tl.sum, ...) once, at import, for the mode of that
    # moment; kernels of the other mode cannot call it.
    imported = _imported_interpreted(triton)
    if imported is not None and imported != interp:
        if interp:
            return False, "TRITON_INTERPRET=1 was set after triton was imported; set it before importing triton or tropfast"
        return False, "triton was imported with TRITON_INTERPRET=1, which is now unset; keep it set, or unset it before importing triton"
    if interp:
        return True, f"Triton {version} interpreter (TRITON_INTERPRET=1): CPU tensors, slow, for testing"
    if torch.cuda.is_available():
        return True, f"Triton {version} on {torch.cuda.get_device_name()}"
    return False, f"Triton {version} is installed but there is no CUDA device; {_INTERPRET_HINT}"


def supports(device: torch.device | str, dtype: torch.dtype | None) -> str | None:
    """None if the kernels can run tensors of ``device`` and ``dtype``, else the reason they cannot."""
    device = torch.device(device)
    ok, why = status()
    if not ok:
        return why
    if dtype is not None and dtype not in _DTYPES:
        return f"dtype {dtype} is not supported (float16, bfloat16, float32, float64)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "the input is on a CUDA device but torch sees none"
        return None
    if device.type == "cpu":
        if interpreting():
            return None
        return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter); set it before importing triton or tropfast"
    return f"Triton runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), the input is on {device}"


def _kernels():
    """The kernel module, (re)imported so that it matches the current TRITON_INTERPRET."""
    from . import kernels as km

    if km.INTERPRETED != interpreting():
        km = importlib.reload(km)
    return km


def _check_runnable(x: Tensor) -> None:
    if x.is_cuda and x.dtype in _DTYPES and "triton" in sys.modules and not interpreting():
        return  # the common case, without the device queries of status()
    why = supports(x.device, x.dtype)
    if why is not None:
        raise BackendUnavailable(f"backend 'triton' cannot run here: {why}")


# ---------------------------------------------------------------------------------------
# Launch configuration.
# ---------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _pow2_floor(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n).bit_length() - 1)


def _block(d: int, what: str) -> int:
    if d > MAX_D:
        raise ValueError(
            f"the triton backend holds one hidden unit on chip and supports {what} <= {MAX_D}, got {d}; "
            "use backend='torch' for wider adapters"
        )
    return _pow2(d)


def _n_sm(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _unit_config(x: Tensor, L: int, r: int, d_in: int, d_out: int, per_thread: int, max_warps: int) -> dict:
    """BLOCK_R / BLOCK_I / BLOCK_O / num_warps for the unit kernels.

    ``per_thread``: tile elements (of A-tile + B-tile) one thread may hold in fp32 without
    spilling; measured on sm_90 from ptxas register counts: the FISTA loop needs about 8
    registers per element (16 elements -> ~126 registers), ISTA / BCD / one-pass ops ~6.
    fp64 needs twice the registers per element.
    """
    bi, bo = _block(d_in, "d_in"), _block(d_out, "d_out")
    per_unit = bi + bo
    br_max = _pow2(r)
    if interpreting():
        # Each interpreted program has a fixed cost: as few programs as possible.
        br = min(br_max, max(1, _pow2_floor((1 << 16) // per_unit)))
        return dict(BLOCK_R=br, BLOCK_I=bi, BLOCK_O=bo, num_warps=4)
    if ops.compute_dtype(x.dtype) == torch.float64:
        per_thread = max(1, per_thread // 2)
    cap = per_thread * 32 * max_warps  # elements of one program at the largest warp count
    br = 1
    while br * 2 <= br_max and br * 2 * per_unit <= cap:
        br *= 2
    # Keep about two programs per SM when the problem allows it (units are independent).
    n_sm = _n_sm(x.device)
    while br > 1 and L * -(-r // br) < 2 * n_sm:
        br //= 2
    num_warps = min(16, max(1, _pow2(-(-br * per_unit // (32 * per_thread)))))
    return dict(BLOCK_R=br, BLOCK_I=bi, BLOCK_O=bo, num_warps=num_warps)


def _flat_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the elementwise kernels over rows of n elements."""
    if interpreting():
        return min(_pow2(n), 1 << 16), 4
    block = min(_pow2(n), 4096)
    return block, max(1, min(8, block // 256))


# ---------------------------------------------------------------------------------------
# Host-side shapes and dtypes.
# ---------------------------------------------------------------------------------------
def _tl_ct(km, dtype: torch.dtype):
    return km.tl.float64 if ops.compute_dtype(dtype) == torch.float64 else km.tl.float32


def _params(ps, L: int, ref: Tensor, names=("lam1", "lam2", "lr"), op: str = "triton") -> list[Tensor]:
    """Per-adapter parameters as (L,) tensors in the compute dtype (``ops.param_vector``)."""
    return [ops.param_vector(op, n, torch.as_tensor(p, device=ref.device), L, ref) for n, p in zip(names, ps)]


def _dims(A3: Tensor, B3: Tensor) -> tuple[int, int, int, int]:
    L, r, d_in = A3.shape
    return L, r, d_in, B3.shape[1]


# ---------------------------------------------------------------------------------------
# Launchers (op-level semantics).
# ---------------------------------------------------------------------------------------
def _generators(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    _check_runnable(A)
    km = _kernels()
    sq, (A3, B3) = batch(A, B)
    L, r, d_in, d_out = _dims(A3, B3)
    G1 = torch.empty((L, d_out, r, d_in), device=A.device, dtype=A.dtype)
    G2 = torch.empty_like(G1)
    if G1.numel():
        block, nw = _flat_config(r * d_in)
        n_blocks = -(-(r * d_in) // block)
        km._generators_kernel[(L * d_out * n_blocks,)](
            A3, B3, G1, G2, r, d_in, d_out, n_blocks, CT=_tl_ct(km, A.dtype), BLOCK=block, num_warps=nw
        )
    return (G1[0], G2[0]) if sq else (G1, G2)


def _soft_threshold_raw(X: Tensor, tau: Tensor) -> Tensor:
    _check_runnable(X)
    km = _kernels()
    tau = torch.as_tensor(tau, device=X.device).to(ops.compute_dtype(X.dtype))
    if tau.dim() > 1 or (tau.dim() == 1 and tau.numel() > 1 and (X.dim() != 3 or X.shape[0] != tau.numel())):
        raise ValueError(f"tau must be a scalar or one value per adapter of X (L, m, n); got tau {tuple(tau.shape)}, X {tuple(X.shape)}")
    if tau.dim() == 1 and X.dim() != 3:
        raise ValueError("a per-adapter tau needs a batched X of shape (L, m, n)")
    Xc = X.contiguous()
    Y = torch.empty_like(Xc)
    if X.numel() == 0:
        return Y
    per_adapter = tau.dim() == 1 and tau.numel() > 1
    rows = X.shape[0] if per_adapter else 1
    M = X.numel() // rows
    tau = tau.reshape(-1).contiguous()
    block, nw = _flat_config(M)
    n_blocks = -(-M // block)
    km._soft_threshold_kernel[(rows * n_blocks,)](Xc, tau, Y, M, n_blocks, 1 if per_adapter else 0, BLOCK=block, num_warps=nw)
    return Y


def _hsd(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor, with_grad: bool):
    _check_runnable(A)
    km = _kernels()
    sq, (A3, B3, Ah3, Bh3) = batch(A, B, A_hat, B_hat)
    L, r, d_in, d_out = _dims(A3, B3)
    ct = ops.compute_dtype(A.dtype)
    per_unit = torch.empty((L, r), device=A.device, dtype=ct)
    gA = torch.empty(Ah3.shape, device=A.device, dtype=A.dtype) if with_grad else per_unit
    gB = torch.empty(Bh3.shape, device=A.device, dtype=A.dtype) if with_grad else per_unit
    cfg = _unit_config(A3, L, r, d_in, d_out, per_thread=16, max_warps=8)
    grid = (L, -(-r // cfg["BLOCK_R"]))
    km._hsd_kernel[grid](A3, B3, Ah3, Bh3, per_unit, gA, gB, r, d_in, d_out, WITH_GRAD=with_grad, CT=_tl_ct(km, A.dtype), **cfg)
    loss = (0.5 * per_unit.sum(-1)).to(A.dtype)
    if sq:
        loss = loss[0]
        if with_grad:
            gA, gB = gA[0], gB[0]
    return loss, gA, gB


def _prox_step_raw(A, B, A_hat, B_hat, lr, lam1, lam2) -> tuple[Tensor, Tensor]:
    _check_runnable(A)
    km = _kernels()
    sq, (A3, B3, Ah3, Bh3) = batch(A, B, A_hat, B_hat)
    L, r, d_in, d_out = _dims(A3, B3)
    lr_t, l1_t, l2_t = _params((lr, lam1, lam2), L, A3, ("lr", "lam1", "lam2"), "prox_step")
    outA = torch.empty(Ah3.shape, device=A.device, dtype=A.dtype)
    outB = torch.empty(Bh3.shape, device=A.device, dtype=A.dtype)
    cfg = _unit_config(A3, L, r, d_in, d_out, per_thread=16, max_warps=8)
    grid = (L, -(-r // cfg["BLOCK_R"]))
    km._prox_step_kernel[grid](A3, B3, Ah3, Bh3, lr_t, l1_t, l2_t, outA, outB, r, d_in, d_out, CT=_tl_ct(km, A.dtype), **cfg)
    return (outA[0], outB[0]) if sq else (outA, outB)


def _sum_stats(per_unit: Tensor, L: int, r: int, squeeze: bool) -> Tensor:
    """Per-unit stats (L·r, 3) summed per adapter in unit order: (L, 3) float64, or (3,)."""
    stats = per_unit.view(L, r, 3).sum(1)
    return stats[0] if squeeze else stats


def solve_fused(A: Tensor, B: Tensor, lam1: Tensor, lam2: Tensor, lr: Tensor, method: str, steps: int):
    """T iterations of ista / fista / bcd from (A, B) in one launch: (Â, B̂, stats)."""
    a = ops.solve_args("solve_fused", A, B, lam1, lam2, lr, method, steps)
    _check_runnable(A)
    km = _kernels()
    L, r, d_in, d_out = _dims(a.A, a.B)
    outA = torch.empty(a.A.shape, device=A.device, dtype=A.dtype)
    outB = torch.empty(a.B.shape, device=A.device, dtype=A.dtype)
    per_unit = torch.zeros((L * r, 3), device=A.device, dtype=torch.float64)
    if outA.numel() or outB.numel():
        cfg = _unit_config(a.A, L, r, d_in, d_out, per_thread=16 if method == "fista" else 20, max_warps=4)
        grid = (L, -(-r // cfg["BLOCK_R"]))
        km._solve_kernel[grid](
            a.A, a.B, a.lam1, a.lam2, a.lr, outA, outB, per_unit, r, d_in, d_out, a.steps,
            METHOD=_METHODS[method], CT=_tl_ct(km, A.dtype), TINY=torch.finfo(ops.compute_dtype(A.dtype)).tiny, **cfg,
        )
    stats = _sum_stats(per_unit, L, r, a.squeeze)
    return (outA[0], outB[0], stats) if a.squeeze else (outA, outB, stats)


# ---------------------------------------------------------------------------------------
# Autograd for the ops that ops.py declares differentiable: the formulas of ops.py, with
# this backend's kernels (the dispatcher's autograd would run another backend's).
# ---------------------------------------------------------------------------------------
def _hsd_grad_raw(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor):
    return _hsd(A, B, A_hat, B_hat, with_grad=True)


class _HsdLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, B, A_hat, B_hat):
        ctx.save_for_backward(A, B, A_hat, B_hat)
        return _hsd(A, B, A_hat, B_hat, with_grad=False)[0]

    @staticmethod
    def backward(ctx, grad):
        return ops.hsd_loss_backward(_hsd_grad_raw, grad, *ctx.saved_tensors, ctx.needs_input_grad)


class _SoftThreshold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, tau):
        out = _soft_threshold_raw(X, tau)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return ops.soft_threshold_backward(grad, ctx.saved_tensors[0]), None


class _Generators(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, B):
        ctx.save_for_backward(A, B)
        return _generators(A, B)

    @staticmethod
    def backward(ctx, g1, g2):
        return ops.generators_backward(*ctx.saved_tensors, g1, g2)


def _needs_grad(*xs: Tensor) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in xs)


def generators(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """G1 = Diag(relu(B_j))·A, G2 = Diag(relu(−B_j))·A: (d_out, r, d_in) each, or (L, d_out, r, d_in)."""
    if _needs_grad(A, B):
        return _Generators.apply(A, B)
    return _generators(A, B)


def hsd_loss(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor) -> Tensor:
    """Smooth part of F: () or (L,).  Differentiable in all four inputs."""
    if _needs_grad(A, B, A_hat, B_hat):
        return _HsdLoss.apply(A, B, A_hat, B_hat)
    return _hsd(A, B, A_hat, B_hat, with_grad=False)[0]


def hsd_grad(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, ∂/∂A_hat, ∂/∂B_hat): (), (r, d_in), (d_out, r), or batched."""
    return _hsd(*(x.detach() for x in (A, B, A_hat, B_hat)), with_grad=True)


def soft_threshold(X: Tensor, tau: Tensor) -> Tensor:
    """sign(X)·max(|X| − tau, 0); tau () or (L,) for X: (L, m, n)."""
    if _needs_grad(X):
        return _SoftThreshold.apply(X, tau)
    return _soft_threshold_raw(X, tau)


def prox_step(A, B, A_hat, B_hat, lr, lam1, lam2) -> tuple[Tensor, Tensor]:
    """One step of Algorithm 1: (Â', B̂') like (A_hat, B_hat) in A's dtype."""
    return _prox_step_raw(*(x.detach() for x in (A, B, A_hat, B_hat)), lr, lam1, lam2)


# ---------------------------------------------------------------------------------------
# The sorted path (docs/design.md §4, backends/torch/sorted.py): sort once, then scalar
# recurrences.
# ---------------------------------------------------------------------------------------
_MAX_PIECES = 16
"""Pieces of Â per unit in the ISTA kernel (sorted.ista_sorted's max_pieces)."""


def _sorted_kernels():
    """The sorted-path kernel module, (re)imported so that it matches the current TRITON_INTERPRET."""
    from . import sorted_kernels as kf

    if kf.INTERPRETED != interpreting():
        kf = importlib.reload(kf)
    return kf


def _sorted_config(x: Tensor, U: int, per_warp: int) -> tuple[int, int]:
    """(BLOCK_U, num_warps) of the recurrence kernels: ``per_warp`` units per warp.

    A unit's recurrence is a chain of dependent gathers (latency, not bandwidth): spread the
    units over the SMs, at most 4 warps a program, fewer while that leaves SMs idle.
    """
    if interpreting():
        # Each interpreted program has a fixed cost: as few programs as possible.
        return min(_pow2(U), 1024), 4
    n_sm = _n_sm(x.device)
    nw = 4
    while nw > 1 and -(-U // (per_warp * nw)) < 2 * n_sm:
        nw //= 2
    return per_warp * nw, nw


def _materialise_config(M: int, N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the materialisation over (M, N) matrices."""
    if interpreting():
        bn = min(_pow2(N), 1 << 12)
        return max(1, min(_pow2(M), (1 << 16) // bn)), bn, 4
    bn = min(_pow2(N), 256)
    return max(1, min(_pow2(M), 1024 // bn)), bn, 4


def _materialise(kf, X3: Tensor, r: int, unit_axis: int, k: Tensor, m: Tensor, low: Tensor, cnt: Tensor | None) -> Tensor:
    """Â (unit_axis 1) or B̂ (unit_axis 2) from per-unit pieces: X3 (L, M, N) -> like X3."""
    L, M, N = X3.shape
    Y = torch.empty_like(X3)
    bm, bn, nw = _materialise_config(M, N)
    NP = k.shape[-1] if k.dim() == 2 else 1
    grid = (L, -(-M // bm), -(-N // bn))
    kf._materialise_kernel[grid](
        X3, Y, k, m, low, cnt if cnt is not None else k, r, M, N,
        UNIT_AXIS=unit_axis, NP=NP, HAS_CNT=cnt is not None, CT=_tl_ct(kf, X3.dtype), BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
    )
    return Y


def _sorted_dense_fallback(A3: Tensor, B3: Tensor, params: list[Tensor], steps: int, adapters: Tensor):
    """The dense ISTA kernel on the adapters whose iterates left the sorted form."""
    Ah, Bh, _ = solve_fused(A3[adapters], B3[adapters], *(p[adapters] for p in params), "ista", steps)
    return Ah, Bh


def _sorted_state(A3: Tensor, B3: Tensor, params: list[Tensor], method: str, steps: int, *, max_pieces: int = _MAX_PIECES, early_exit: bool = True) -> dict:
    """Sort the units and run the recurrence kernel: the per-unit state, as a dict of (U, …) tensors.

    A3 (L, r, d_in), B3 (L, d_out, r) contiguous, d_in, d_out >= 1; params (lam1, lam2, lr), each (L,) in
    the compute dtype; steps >= 1.  bcd: kA mA lowA kB mB lowB sweeps; ista: kP mP lowP cnt kB mB lowB bad.
    """
    kf = _sorted_kernels()
    L, r, d_in, d_out = _dims(A3, B3)
    U = L * r
    ct = ops.compute_dtype(A3.dtype)
    # The O(d log d) part: a segmented sort of every row of A and column of B (torch.sort) and
    # the fp64 prefix sums, exactly sorted.py's.
    SA, SB = sorted_path.sort_units(A3.to(ct), B3.to(ct))
    dev = A3.device
    lam1, lam2, lr = params
    common = dict(CT=_tl_ct(kf, ct), TINY=torch.finfo(torch.float64).tiny, WINDOW=sorted_path._WINDOW)
    dims = (U, r, d_in, d_out, d_in.bit_length(), d_out.bit_length(), steps)
    if method == "bcd":
        out = {n: torch.empty(U, dtype=ct, device=dev) for n in ("kA", "mA", "lowA", "kB", "mB", "lowB")}
        out["sweeps"] = torch.empty(U, dtype=torch.int32, device=dev)
        bu, nw = _sorted_config(A3, U, 32)
        kf._bcd_sorted_kernel[(-(-U // bu),)](
            SA.neg, SA.P, SB.neg, SB.P, lam1, lam2,
            out["kA"], out["mA"], out["lowA"], out["kB"], out["mB"], out["lowB"], out["sweeps"], *dims,
            EARLY_EXIT=early_exit, BLOCK_U=bu, num_warps=nw, **common,
        )
        return out
    PS = _pow2(max_pieces)
    f64 = dict(dtype=torch.float64, device=dev)
    out = dict(
        kP=torch.empty(U, PS, **f64), mP=torch.empty(U, PS, **f64), lowP=torch.empty(U, PS, dtype=ct, device=dev),
        cnt=torch.empty(U, dtype=torch.int32, device=dev), kB=torch.empty(U, **f64), mB=torch.empty(U, **f64),
        lowB=torch.empty(U, dtype=ct, device=dev), bad=torch.empty(U, dtype=torch.int8, device=dev),
    )
    # 8 units a warp: a unit's PS = 16 slots spread over 4 lanes, 4 slots (~12 registers each) a lane.
    bu, nw = _sorted_config(A3, U, 8)
    kf._ista_sorted_kernel[(-(-U // bu),)](
        SA.neg, SA.P, SB.neg, SB.P, lam1, lam2, lr,
        out["kP"], out["mP"], out["lowP"], out["cnt"], out["kB"], out["mB"], out["lowB"], out["bad"], *dims,
        MAX_PIECES=max_pieces, PS=PS, BLOCK_U=bu, num_warps=nw, **common,
    )
    return out


def _solve_sorted(A, B, lam1, lam2, lr, method: str, steps: int, *, max_pieces: int = _MAX_PIECES, early_exit: bool = True):
    """``solve_sorted`` with the sorted path's knobs (tests): max_pieces (ISTA), early_exit (BCD cycle shortcut)."""
    a = ops.solve_args("solve_sorted", A, B, lam1, lam2, lr, method, steps)
    if method == "fista" or a.steps == 0 or a.A.numel() == 0 or a.B.numel() == 0:
        # fista has no sorted form; steps = 0 or an empty dimension leave nothing to sort
        return solve_fused(A, B, lam1, lam2, lr, method, steps)
    _check_runnable(A)
    A3, B3 = a.A, a.B
    L, r, d_in, d_out = _dims(A3, B3)
    params = [a.lam1, a.lam2, a.lr]
    kf = _sorted_kernels()
    st = _sorted_state(A3, B3, params, method, a.steps, max_pieces=max_pieces, early_exit=early_exit)
    if method == "bcd":
        Ah = _materialise(kf, A3, r, 1, st["kA"], st["mA"], st["lowA"], None)
    else:
        Ah = _materialise(kf, A3, r, 1, st["kP"], st["mP"], st["lowP"], st["cnt"])
    Bh = _materialise(kf, B3, r, 2, st["kB"], st["mB"], st["lowB"], None)
    if method == "ista":
        adapters = st["bad"].view(L, r).any(-1).nonzero().squeeze(-1)
        if adapters.numel():
            Ah[adapters], Bh[adapters] = _sorted_dense_fallback(A3, B3, params, a.steps, adapters)
    # the recurrences keep no per-unit loss: the stats take extra passes here
    ct = ops.compute_dtype(A.dtype)
    stats = solve_stats(A3.to(ct), B3.to(ct), Ah.to(ct), Bh.to(ct), a.lam1, a.lam2, _hsd_loss_raw)
    return (Ah[0], Bh[0], stats[0]) if a.squeeze else (Ah, Bh, stats)


def _hsd_loss_raw(A: Tensor, B: Tensor, A_hat: Tensor, B_hat: Tensor) -> Tensor:
    return _hsd(A, B, A_hat, B_hat, with_grad=False)[0]


def solve_sorted(A: Tensor, B: Tensor, lam1: Tensor, lam2: Tensor, lr: Tensor, method: str, steps: int):
    """``solve_fused`` on the sorted path: one sort per unit, then O(log d) per unit per iteration.

    bcd and ista run the recurrences of ``sorted_kernels.py``; an ISTA adapter with a unit that
    leaves the sorted form is rerun by the dense kernel; fista has no sorted form and runs densely.
    """
    return _solve_sorted(A, B, lam1, lam2, lr, method, steps)


KERNELS = ops.Kernels(generators, hsd_loss, hsd_grad, soft_threshold, prox_step, solve_fused, solve_sorted)
