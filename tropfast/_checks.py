"""Input validation shared by the public functions: every check runs before any work (but
one: a short solve checks NaN/Inf from the kernel's start objective, docs/design.md §3).

Shape, dtype and argument checks are plain Python on metadata.  The value checks (NaN/Inf,
signs of λ and lr given as tensors) read the data, so they run in eager mode on real
tensors only: under ``torch.compile`` and on meta/fake tensors they are skipped (docs/design.md §6).
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor

from .ops import SUPPORTED_DTYPES


def reads_values(x: Tensor) -> bool:
    """Whether checks may read x's values: eager mode and a tensor with real storage."""
    if x.device.type == "meta" or torch.compiler.is_compiling():
        return False
    return not isinstance(x, torch._subclasses.FakeTensor)


def raise_non_finite(x: Tensor, name: str) -> None:
    """Raise the NaN/Inf error for ``x`` if it has a non-finite entry (the exact, slow check)."""
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf)")


def check_finite(x: Tensor, name: str) -> None:
    """All entries finite, in one read of x: a sum is finite when every entry is (a
    non-finite sum may also be an overflow, which the exact check then tells apart)."""
    if not reads_values(x):
        return
    total = x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(total)):
        raise_non_finite(x, name)


def check_tensor(x: object, name: str, finite: bool = True) -> Tensor:
    """A floating tensor of a supported dtype, non-empty, optionally all finite."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; supported dtypes are float16, bfloat16, float32 and float64"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if finite:
        check_finite(x, name)
    return x


def check_adapter(A: object, B: object, names: Sequence[str] = ("A", "B"), finite: bool = True) -> bool:
    """Check A: (r, d_in) and B: (d_out, r), or batched (L, r, d_in) and (L, d_out, r).

    Returns True when the pair is batched.  ``finite=False`` leaves the NaN/Inf check to the caller.
    """
    na, nb = names
    check_tensor(A, na, finite=False)
    check_tensor(B, nb, finite=False)
    assert isinstance(A, Tensor) and isinstance(B, Tensor)
    if A.dim() not in (2, 3):
        raise ValueError(f"{na} must be (r, d_in) or batched (L, r, d_in), got shape {tuple(A.shape)}")
    if B.dim() != A.dim():
        raise ValueError(
            f"{nb} must have {A.dim()} dims to match {na} {tuple(A.shape)} "
            f"(expected {'(L, d_out, r)' if A.dim() == 3 else '(d_out, r)'}), got shape {tuple(B.shape)}"
        )
    if B.shape[-1] != A.shape[-2]:
        raise ValueError(
            f"bottleneck mismatch: {na} {tuple(A.shape)} has r={A.shape[-2]} rows but {nb} "
            f"{tuple(B.shape)} has {B.shape[-1]} columns (expected {nb}: (d_out, r))"
        )
    if A.dim() == 3 and A.shape[0] != B.shape[0]:
        raise ValueError(f"batch mismatch: {na} has {A.shape[0]} adapters, {nb} has {B.shape[0]}")
    if A.dtype != B.dtype:
        raise TypeError(f"{na} is {A.dtype} but {nb} is {B.dtype}; use one dtype")
    if A.device != B.device:
        raise ValueError(f"{na} is on {A.device} but {nb} is on {B.device}")
    if finite:
        check_finite(A, na)
        check_finite(B, nb)
    return A.dim() == 3


def check_estimate(A: Tensor, B: Tensor, A_hat: object, B_hat: object) -> None:
    """A_hat, B_hat must match A, B exactly in shape, dtype and device."""
    for ref, x, name in ((A, A_hat, "A_hat"), (B, B_hat, "B_hat")):
        check_tensor(x, name)
        assert isinstance(x, Tensor)
        if x.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but must match {tuple(ref.shape)}")
        if x.dtype != ref.dtype:
            raise TypeError(f"{name} is {x.dtype} but the original weights are {ref.dtype}")
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but the original weights are on {ref.device}")


def check_scalar(x: object, name: str, n_adapters: int | None, positive: bool = False) -> None:
    """A finite real >= 0 (> 0 if positive), or a tensor of such values, one per adapter."""
    what = "> 0" if positive else ">= 0"
    if isinstance(x, Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must be real, got dtype {x.dtype}")
        if x.dim() > 1 or (x.dim() == 1 and x.shape[0] != (n_adapters or 1)):
            raise ValueError(
                f"{name} must be a scalar or have one value per adapter ({n_adapters or 1}), "
                f"got shape {tuple(x.shape)}"
            )
        if not reads_values(x):
            return
        vals = x.detach().double().flatten().tolist()
    elif isinstance(x, numbers.Real) and not isinstance(x, bool):  # NumPy's reals too (not np.bool_)
        vals = [float(x)]
    else:
        raise TypeError(f"{name} must be a number or a tensor, got {type(x).__name__}")
    for v in vals:
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v}")
        if v < 0 or (positive and v == 0):
            raise ValueError(f"{name} must be {what}, got {v}")
