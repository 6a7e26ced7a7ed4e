"""Shared tolerance table and comparison helper for the tests (every backend vs reference.py)."""
from __future__ import annotations

import torch

import tropfast

# (atol, rtol) per dtype of the *inputs*; the comparison is against the fp64 oracle on the
# same (rounded) inputs.  Half precision is computed in fp32 and rounded once to the input
# dtype (ops.compute_dtype), so its rows are the fp32 row plus one unit in the last place of
# the half type, relative: 2**-10 for float16, 2**-7 for bfloat16 (one unit, not a half, so
# that two backends whose fp32 results round to neighbouring half values also compare).
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-4, 1e-4 + 2**-10),
    torch.bfloat16: (1e-4, 1e-4 + 2**-7),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Compare with the table above, scaled by the magnitude of the expected value."""
    atol, rtol = TOL[dtype]
    exp = expected.to(torch.float64)
    act = actual.to(torch.float64)
    assert act.shape == exp.shape, f"{what}: shape {tuple(act.shape)} != {tuple(exp.shape)}"
    scale = max(1.0, float(exp.abs().max())) if exp.numel() else 1.0
    err = (act - exp).abs()
    worst = float(err.max()) if err.numel() else 0.0
    bound = atol * scale + rtol * exp.abs()
    assert bool((err <= bound).all()), f"{what}: worst mismatch {worst:.3e} (atol {atol:g}·{scale:.3g}, rtol {rtol:g}, dtype {dtype})"


def random_adapter(L, r, d_in, d_out, dtype=torch.float64, seed=0, scale=1.0, perturb=0.3):
    """(A, B, A_hat, B_hat); L=None gives unbatched tensors.  A_hat, B_hat flip some signs."""
    g = torch.Generator().manual_seed(seed)
    lead = () if L is None else (L,)
    A = torch.randn(*lead, r, d_in, generator=g, dtype=torch.float64) * scale
    B = torch.randn(*lead, d_out, r, generator=g, dtype=torch.float64) / scale
    A_hat = A + perturb * torch.randn(A.shape, generator=g, dtype=torch.float64) * scale
    B_hat = B + perturb * torch.randn(B.shape, generator=g, dtype=torch.float64) / scale
    return tuple(x.to(dtype) for x in (A, B, A_hat, B_hat))


SHAPES = [  # (r, d_in, d_out): odd sizes, r = 1, d_in != d_out
    (1, 1, 1),
    (1, 7, 3),
    (5, 12, 9),
    (8, 33, 17),
    (3, 16, 64),
]


def iterates(kernels):
    """A backend's op table whose whole-solve ops return only (A_hat, B_hat), without the stats."""
    return kernels._replace(
        solve_fused=lambda *a: tuple(kernels.solve_fused(*a)[:2]),
        solve_sorted=lambda *a: tuple(kernels.solve_sorted(*a)[:2]),
    )


TORCH = iterates(tropfast.backends.kernels("torch"))
"""The torch backend's op-level kernels (the closed form), whole solves without stats."""
