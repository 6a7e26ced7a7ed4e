"""The ``triton`` backend against reference.py, TORCH and solver.dense_solve.

Without a CUDA device the kernels run in the Triton interpreter on CPU tensors.  The
interpreter is chosen when a ``triton.jit`` function is decorated, so the variable is set
before anything imports the kernel module (the backend also re-imports that module if
the setting changed after it was first imported).
"""
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from tolerances import TORCH, iterates  # noqa: E402

import tropfast  # noqa: E402
from tropfast import reference, solver  # noqa: E402
from tropfast.backends import BackendUnavailable, resolve  # noqa: E402
from tropfast.backends.torch import closed_form, dense  # noqa: E402
from tropfast.backends.triton import launch as tb  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# (atol, rtol) against the fp64 oracle on the same (rounded) inputs; atol scales with max|expected|.
TOL_REF = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-2, 2e-2),
    torch.bfloat16: (2e-1, 5e-2),
}
# (atol, rtol) against the closed form / dense solver in the same dtype: summation order
# and, for half precision, one rounding of the output.
TOL_SAME = {
    torch.float64: (1e-11, 1e-10),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

# (L, r, d_in, d_out); L=None: unbatched 2-D input.  r = 1, padded unit blocks, d not a
# power of two, d_in != d_out.
SHAPES = [(None, 1, 5, 3), (1, 3, 7, 6), (3, 5, 6, 9)]


def _ids(shape):
    return "x".join("2d" if v is None else str(v) for v in shape)


def _close(got, want, dtype, what, table=TOL_REF):
    atol, rtol = table[dtype]
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    if w.numel() == 0:
        return
    scale = max(1.0, float(w.abs().max()))
    err = (g - w).abs()
    bound = atol * scale + rtol * w.abs()
    if not bool((err <= bound).all()):
        i = int(((err - bound) / bound.clamp_min(1e-300)).flatten().argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), w.shape)) if w.dim() else ()
        raise AssertionError(
            f"{what} ({dtype}): worst mismatch at {idx}: got {float(g.flatten()[i]):.9g}, "
            f"expected {float(w.flatten()[i]):.9g}, |diff| {float(err.flatten()[i]):.3g} > "
            f"{float(bound.flatten()[i]):.3g} (atol {atol:g}·{scale:.3g}, rtol {rtol:g}); "
            f"max |diff| {float(err.max()):.3g}"
        )


def _adapter(L, r, d_in, d_out, dtype, seed=0, perturb=0.3):
    g = torch.Generator().manual_seed(seed)
    lead = () if L is None else (L,)
    A = torch.randn(*lead, r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(*lead, d_out, r, generator=g, dtype=torch.float64)
    Ah = A + perturb * torch.randn(A.shape, generator=g, dtype=torch.float64)
    Bh = B + perturb * torch.randn(B.shape, generator=g, dtype=torch.float64)
    return tuple(x.to(dtype).to(DEV) for x in (A, B, Ah, Bh))


def _up(*xs):
    return tuple(x.double().cpu() for x in xs)


def _params(L, dtype):
    """Per-adapter (L,) lr / lam1 / lam2 (scalars for an unbatched adapter)."""
    ct = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    n = 1 if L is None else L
    lr = torch.tensor([0.05, 0.03, 0.04][:n], dtype=ct, device=DEV)
    lam1 = torch.tensor([0.2, 0.0, 0.5][:n], dtype=ct, device=DEV)
    lam2 = torch.tensor([0.3, 0.1, 0.0][:n], dtype=ct, device=DEV)
    if L is None:
        lr, lam1, lam2 = lr[0], lam1[0], lam2[0]
    return lr, lam1, lam2


def _per_adapter(fn, L, tensors, scalars):
    """Run a single-adapter oracle on each adapter of a batch and stack the results."""
    if L is None:
        return fn(*tensors, *(float(s) for s in scalars))
    outs = [fn(*(t[i] for t in tensors), *(float(s[i] if s.dim() else s) for s in scalars)) for i in range(L)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs))
    return torch.stack(outs)


# ---------------------------------------------------------------------------------------
# Ops against the oracle.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_loss_grad_generators_vs_reference(shape, dtype):
    L, r, d_in, d_out = shape
    A, B, Ah, Bh = _adapter(*shape, dtype)
    loss_w, gA_w, gB_w = reference.hsd_grad_ref(*_up(A, B, Ah, Bh))
    loss, gA, gB = tb.KERNELS.hsd_grad(A, B, Ah, Bh)
    assert loss.dtype == gA.dtype == gB.dtype == dtype
    _close(loss, loss_w, dtype, "hsd_grad loss")
    _close(gA, gA_w, dtype, "hsd_grad dA_hat")
    _close(gB, gB_w, dtype, "hsd_grad dB_hat")
    _close(tb.KERNELS.hsd_loss(A, B, Ah, Bh), loss_w, dtype, "hsd_loss")
    # near the start of a solve the loss is tiny: the cancellation-free form keeps it accurate
    small = Ah + 1e-3 * (A - Ah) if dtype == torch.float64 else A
    _close(tb.KERNELS.hsd_loss(A, B, small, B), reference.hsd_loss_ref(*_up(A, B, small, B)), dtype, "hsd_loss near A")
    G1, G2 = tb.KERNELS.generators(A, B)
    G1_w, G2_w = reference.generators_ref(*_up(A, B))
    _close(G1, G1_w, dtype, "G1")
    _close(G2, G2_w, dtype, "G2")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_prox_step_and_soft_threshold_vs_reference(shape, dtype):
    L = shape[0]
    A, B, Ah, Bh = _adapter(*shape, dtype)
    lr, lam1, lam2 = _params(L, dtype)
    nA, nB = tb.KERNELS.prox_step(A, B, Ah, Bh, lr, lam1, lam2)
    nA_w, nB_w = _per_adapter(reference.prox_step_ref, L, _up(A, B, Ah, Bh), (lr, lam1, lam2))
    assert nA.dtype == nB.dtype == dtype
    _close(nA, nA_w, dtype, "prox_step A_hat")
    _close(nB, nB_w, dtype, "prox_step B_hat")
    tau = 0.5 * torch.ones((), dtype=lam1.dtype, device=DEV)
    _close(tb.KERNELS.soft_threshold(Bh, tau), reference.soft_threshold_ref(_up(Bh)[0], 0.5), dtype, "soft_threshold")
    if L is not None:
        tau = lam1 + 0.25  # one threshold per adapter
        want = _per_adapter(reference.soft_threshold_ref, L, _up(Ah), (tau,))
        _close(tb.KERNELS.soft_threshold(Ah, tau), want, dtype, "soft_threshold per adapter")


# ---------------------------------------------------------------------------------------
# Ops against the closed form in the same dtype.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_match_closed_form(dtype):
    shape = (3, 5, 6, 9)
    A, B, Ah, Bh = _adapter(*shape, dtype, seed=1)
    lr, lam1, lam2 = _params(3, dtype)
    tri, cf = tb.KERNELS, TORCH
    pairs = {
        "generators": (tri.generators(A, B), cf.generators(A, B)),
        "hsd_loss": ((tri.hsd_loss(A, B, Ah, Bh),), (cf.hsd_loss(A, B, Ah, Bh),)),
        "hsd_grad": (tri.hsd_grad(A, B, Ah, Bh), cf.hsd_grad(A, B, Ah, Bh)),
        "soft_threshold": ((tri.soft_threshold(Ah, lam1),), (cf.soft_threshold(Ah, lam1),)),
        "prox_step": (tri.prox_step(A, B, Ah, Bh, lr, lam1, lam2), cf.prox_step(A, B, Ah, Bh, lr, lam1, lam2)),
    }
    for name, (got, want) in pairs.items():
        for k, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == w.dtype, f"{name}[{k}]: dtype {g.dtype} != {w.dtype}"
            _close(g, w, dtype, f"{name}[{k}]", TOL_SAME)


# ---------------------------------------------------------------------------------------
# The fused solve against solver.dense_solve.
# ---------------------------------------------------------------------------------------
def _dense(A, B, lam1, lam2, lr, method, steps):
    """solver.dense_solve on the closed form, in the compute dtype, returned in A's dtype."""
    ct = torch.float32 if A.dtype in (torch.float16, torch.bfloat16) else A.dtype
    sq = A.dim() == 2
    A3, B3 = (A.unsqueeze(0), B.unsqueeze(0)) if sq else (A, B)
    L = A3.shape[0]
    ps = [p.to(ct).reshape(-1).expand(L).contiguous() for p in (lam1, lam2, lr)]
    Ah, Bh = dense.dense_solve(closed_form.prox_step, A3.to(ct), B3.to(ct), *ps, method, steps)
    if sq:
        Ah, Bh = Ah[0], Bh[0]
    return Ah.to(A.dtype), Bh.to(A.dtype)


@pytest.mark.parametrize("method", ["ista", "fista", "bcd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_solve_fused_matches_dense_solve(method, dtype):
    A, B, _, _ = _adapter(3, 5, 6, 9, dtype, seed=2)
    ct = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    lr = solver.safe_lr(A.to(ct), B.to(ct))  # (L,)
    lam1 = torch.tensor([0.3, 0.0, 1.0], dtype=ct, device=DEV)  # lam = 0: bcd skips the rescaling
    lam2 = torch.tensor([0.5, 0.2, 0.0], dtype=ct, device=DEV)
    steps = 20
    Ah, Bh = iterates(tb.KERNELS).solve_fused(A, B, lam1, lam2, lr, method, steps)
    Ah_w, Bh_w = _dense(A, B, lam1, lam2, lr, method, steps)
    assert Ah.dtype == Bh.dtype == dtype
    _close(Ah, Ah_w, dtype, f"{method} A_hat", TOL_SAME)
    _close(Bh, Bh_w, dtype, f"{method} B_hat", TOL_SAME)
    assert bool((Ah_w == 0).any() or (Bh_w == 0).any()), "the test should exercise the thresholds"


@pytest.mark.parametrize("method", ["ista", "fista", "bcd"])
def test_solve_fused_unbatched_and_scalar_params(method):
    A, B, _, _ = _adapter(None, 3, 10, 4, torch.float64, seed=3)
    lr = solver.safe_lr(A[None], B[None])[0]
    lam1, lam2 = torch.tensor(0.4, dtype=torch.float64, device=DEV), torch.tensor(0.2, dtype=torch.float64, device=DEV)
    for steps in (0, 17):
        Ah, Bh = iterates(tb.KERNELS).solve_fused(A, B, lam1, lam2, lr, method, steps)
        Ah_w, Bh_w = _dense(A, B, lam1, lam2, lr, method, steps)
        _close(Ah, Ah_w, torch.float64, f"{method} A_hat T={steps}", TOL_SAME)
        _close(Bh, Bh_w, torch.float64, f"{method} B_hat T={steps}", TOL_SAME)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fista_per_unit_restart(dtype):
    g = torch.Generator().manual_seed(7)
    A = torch.randn(2, 3, 5, generator=g, dtype=torch.float64).to(dtype).to(DEV)
    B = torch.randn(2, 4, 3, generator=g, dtype=torch.float64).to(dtype).to(DEV)
    lr = 2 * solver.safe_lr(A, B)
    lam1 = torch.tensor([0.3, 0.1], dtype=dtype, device=DEV)
    lam2 = torch.tensor([0.2, 0.4], dtype=dtype, device=DEV)
    steps = 40
    # the oracle run must restart some units (else this test checks nothing about restarts)
    st, restarts = dense.start(A, B), 0
    for _ in range(steps):
        new = dense.fista_step(TORCH.prox_step, A, B, st, lr, lam1, lam2)
        restarts += int(((new.mom == 1) & (st.mom > 0)).sum())
        st = new
    Ah, Bh = st.Ah, st.Bh
    assert restarts >= 3
    got = iterates(tb.KERNELS).solve_fused(A, B, lam1, lam2, lr, "fista", steps)
    _close(got[0], Ah, dtype, "fista restart A_hat", TOL_SAME)
    _close(got[1], Bh, dtype, "fista restart B_hat", TOL_SAME)


def test_solve_fused_matches_the_closed_form_op():
    A, B, _, _ = _adapter(2, 3, 5, 4, torch.float32, seed=4)
    lam1, lam2 = torch.tensor(0.2, device=DEV), torch.tensor([0.1, 0.3], device=DEV)
    lr = torch.tensor(0.05, device=DEV)
    got = iterates(tb.KERNELS).solve_fused(A, B, lam1, lam2, lr, "fista", 12)
    want = TORCH.solve_fused(A, B, lam1, lam2, lr, "fista", 12)
    for g, w, n in zip(got, want, ("A_hat", "B_hat")):
        _close(g, w, torch.float32, f"solve_fused {n}", TOL_SAME)


# ---------------------------------------------------------------------------------------
# Through the public API.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ista", "fista", "bcd"])
def test_public_solve_triton_matches_torch(method):
    A, B, _, _ = _adapter(2, 4, 7, 5, torch.float32, seed=5)
    kw = dict(lam1=0.3, lam2=0.2, method=method, steps=15)
    got = tropfast.solve(A, B, backend="triton", **kw)
    want = tropfast.solve(A, B, backend="torch", **kw)
    assert got.backend == "triton"
    _close(got.A_hat, want.A_hat, torch.float32, "solve A_hat", TOL_SAME)
    _close(got.B_hat, want.B_hat, torch.float32, "solve B_hat", TOL_SAME)
    _close(got.final_objective, want.final_objective, torch.float32, "solve objective", TOL_SAME)
    _close(got.kept_fraction, want.kept_fraction, torch.float32, "solve kept", TOL_SAME)


def test_public_solve_unfused_and_ragged_list():
    As = [torch.randn(3, 5, dtype=torch.float64, device=DEV), torch.randn(2, 7, dtype=torch.float64, device=DEV)]
    Bs = [torch.randn(4, 3, dtype=torch.float64, device=DEV), torch.randn(6, 2, dtype=torch.float64, device=DEV)]
    for fused in (True, False):
        kw = dict(lam1=0.2, lam2=0.1, method="ista", steps=6, fused=fused)
        got = tropfast.solve(As, Bs, backend="triton", **kw)
        want = tropfast.solve(As, Bs, backend="torch", **kw)
        for k in range(2):
            _close(got.A_hat[k], want.A_hat[k], torch.float64, f"list A_hat[{k}] fused={fused}", TOL_SAME)
            _close(got.B_hat[k], want.B_hat[k], torch.float64, f"list B_hat[{k}] fused={fused}", TOL_SAME)
        _close(got.objective, want.objective, torch.float64, f"objective fused={fused}", TOL_SAME)


def test_public_ops_and_autograd():
    A, B, Ah, Bh = _adapter(2, 3, 5, 4, torch.float64, seed=6)
    A, B, Ah, Bh = (x.clone().requires_grad_(True) for x in (A, B, Ah, Bh))
    loss = tropfast.hsd_loss(A, B, Ah, Bh, backend="triton")
    grads = torch.autograd.grad((loss * torch.tensor([1.0, 2.0], dtype=torch.float64, device=DEV)).sum(), (A, B, Ah, Bh))
    loss_w = tropfast.hsd_loss(A, B, Ah, Bh, backend="torch")
    grads_w = torch.autograd.grad((loss_w * torch.tensor([1.0, 2.0], dtype=torch.float64, device=DEV)).sum(), (A, B, Ah, Bh))
    _close(loss, loss_w, torch.float64, "public hsd_loss", TOL_SAME)
    for n, g, w in zip(("A", "B", "A_hat", "B_hat"), grads, grads_w):
        _close(g, w, torch.float64, f"d loss / d {n}", TOL_SAME)
    X = Ah.detach().clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(tropfast.soft_threshold(X, 0.5, backend="triton").sum(), X)
    _close(gx, (X.detach().abs() > 0.5).double(), torch.float64, "soft_threshold grad", TOL_SAME)
    nA, nB = tropfast.prox_step(A, B, Ah, Bh, 0.05, 0.1, 0.2, backend="triton")
    nA_w, nB_w = tropfast.prox_step(A, B, Ah, Bh, 0.05, 0.1, 0.2, backend="torch")
    _close(nA, nA_w, torch.float64, "public prox_step A_hat", TOL_SAME)
    _close(nB, nB_w, torch.float64, "public prox_step B_hat", TOL_SAME)


# ---------------------------------------------------------------------------------------
# Availability and errors.
# ---------------------------------------------------------------------------------------
def test_status_and_supports():
    ok, why = tb.status()
    assert ok, why
    assert tb.supports(DEV, torch.float32) is None
    assert tb.supports(DEV, torch.float64) is None
    assert "not supported" in tb.supports(DEV, torch.int32)
    assert resolve("triton", DEV, torch.float16) == "triton"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a CUDA device triton is available without the interpreter")
def test_cpu_without_interpreter_is_refused_with_the_reason(monkeypatch):
    """Unset after triton was imported under the interpreter (a fresh process: test_kernels_compile_for_sm90)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    why = tb.supports(torch.device("cpu"), torch.float32)
    assert why is not None and "TRITON_INTERPRET=1" in why
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        resolve("triton", torch.device("cpu"), torch.float32)
    A, B = torch.randn(2, 3), torch.randn(4, 2)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        tb.KERNELS.hsd_grad(A, B, A, B)
    # the kernel module follows the setting: compiled-mode functions now ...
    assert tb._kernels().INTERPRETED is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # ... and interpreted ones again once it is back
    assert tb._kernels().INTERPRETED is True
    _close(tb.KERNELS.soft_threshold(A, torch.tensor(0.5)), reference.soft_threshold_ref(A, 0.5), torch.float32, "after reload")


def test_invalid_arguments_are_refused():
    A, B, _, _ = _adapter(None, 2, 3, 4, torch.float32)
    one = torch.tensor(1.0, device=DEV)
    with pytest.raises(ValueError, match="unknown method"):
        iterates(tb.KERNELS).solve_fused(A, B, one, one, one, "adam", 3)
    wide = torch.zeros(1, tb.MAX_D + 1, device=DEV)
    with pytest.raises(ValueError, match="d_in <= 16384"):
        tb.KERNELS.hsd_grad(wide, torch.zeros(2, 1, device=DEV), wide, torch.zeros(2, 1, device=DEV))


def test_gpu_launch_config(monkeypatch):
    monkeypatch.setattr(tb, "interpreting", lambda: False)
    monkeypatch.setattr(tb, "_n_sm", lambda device: 132)
    x32 = torch.empty(1, dtype=torch.float32)
    x64 = torch.empty(1, dtype=torch.float64)
    for L, r, d_in, d_out in [(24, 64, 768, 768), (1, 64, 768, 3072), (32, 16, 4096, 4096), (100, 3, 7, 5)]:
        for x in (x32, x64):
            for per_thread, max_warps in ((16, 4), (20, 4), (16, 8)):
                cfg = tb._unit_config(x, L, r, d_in, d_out, per_thread, max_warps)
                assert cfg["BLOCK_I"] >= d_in and cfg["BLOCK_O"] >= d_out
                assert 1 <= cfg["BLOCK_R"] <= max(1, 2 ** (r - 1).bit_length())
                assert cfg["num_warps"] in (1, 2, 4, 8, 16)
                held = cfg["BLOCK_R"] * (cfg["BLOCK_I"] + cfg["BLOCK_O"]) / (32 * cfg["num_warps"])
                limit = per_thread // (2 if x is x64 else 1)
                assert held <= limit or cfg["num_warps"] == 16, (L, r, d_in, d_out, x.dtype, cfg)


_COMPILE_SCRIPT = r"""
import re
import sys
import torch
try:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
except ImportError as exc:
    print(f"no Triton CUDA backend: {exc}")
    sys.exit(77)
from tropfast.backends import BackendUnavailable, resolve
from tropfast.backends.triton import kernels as km

if not torch.cuda.is_available():
    try:
        resolve("triton", torch.device("cpu"), torch.float32)
    except BackendUnavailable as exc:
        print(f"refused: {exc}")
assert not km.INTERPRETED
target = GPUTarget("cuda", 90, 32)


def compile_(fn, types, consts, num_warps=4):
    sig = {name: types.get(name, "i32") for name in fn.arg_names if name not in consts}
    sig.update({name: "constexpr" for name in consts})
    try:
        return triton.compile(triton.compiler.ASTSource(fn, sig, consts), target=target, options={"num_warps": num_warps})
    except Exception as exc:
        if "ptxas" in str(exc).lower() and "not found" in str(exc).lower():
            print(f"ptxas unavailable: {exc}")
            sys.exit(77)
        raise


tiny32, tiny64 = torch.finfo(torch.float32).tiny, torch.finfo(torch.float64).tiny
for io, ct, tiny in (("*bf16", tl.float32, tiny32), ("*fp32", tl.float32, tiny32), ("*fp64", tl.float64, tiny64)):
    cp = "*fp64" if ct == tl.float64 else "*fp32"
    names = ("A_ptr", "B_ptr", "Ah_ptr", "Bh_ptr", "outA_ptr", "outB_ptr", "gA_ptr", "gB_ptr", "G1_ptr", "G2_ptr", "X_ptr", "Y_ptr")
    ptrs = {n: io for n in names}
    ptrs.update({n: cp for n in ("lr_ptr", "lam1_ptr", "lam2_ptr", "loss_ptr", "tau_ptr")})
    ptrs["stats_ptr"] = "*fp64"
    blocks = dict(BLOCK_R=2, BLOCK_I=64, BLOCK_O=128)
    for method, carried in ((0, 2), (1, 5), (2, 2)):
        k = compile_(km._solve_kernel, ptrs, dict(METHOD=method, CT=ct, TINY=tiny, **blocks))
        # The compiler decides what the step loop carries (the interpreter just runs Python):
        # (Ah, Bh), plus (dA, dB, momentum) for FISTA.
        loops = re.findall(r"scf\.for [^\n]*?iter_args\((.*?)\) ->", k.asm["ttir"])
        assert [a.count(" = ") for a in loops] == [carried], (method, loops)
    if io == "*bf16":
        compile_(km._hsd_kernel, ptrs, dict(WITH_GRAD=True, CT=ct, **blocks))
        compile_(km._prox_step_kernel, ptrs, dict(CT=ct, **blocks))
        compile_(km._generators_kernel, ptrs, dict(CT=ct, BLOCK=256))
        compile_(km._soft_threshold_kernel, ptrs, dict(BLOCK=256))
# r == 1 arrives as a compile-time constant
compile_(km._solve_kernel, ptrs, dict(r=1, METHOD=2, CT=tl.float64, TINY=tiny64, BLOCK_R=1, BLOCK_I=8, BLOCK_O=4), num_warps=1)

# The sorted path (sorted_kernels.py): recurrences on sorted rows, then materialisation.
from tropfast.backends.triton import sorted_kernels as kf

assert not kf.INTERPRETED
for ct, cp in ((tl.float32, "*fp32"), (tl.float64, "*fp64")):
    fam = {n: cp for n in ("negA_ptr", "negB_ptr", "lam1_ptr", "lam2_ptr", "lr_ptr", "kA_ptr", "mA_ptr", "lowA_ptr", "lowB_ptr", "lowP_ptr")}
    fam.update({n: "*fp64" for n in ("PA_ptr", "PB_ptr", "kP_ptr", "mP_ptr")})
    fam.update({"sweeps_ptr": "*i32", "cnt_ptr": "*i32", "bad_ptr": "*i8"})
    common = dict(CT=ct, TINY=tiny64, WINDOW=4)
    for early in (True, False):
        k = compile_(kf._bcd_sorted_kernel, dict(fam, kB_ptr=cp, mB_ptr=cp), dict(EARLY_EXIT=early, BLOCK_U=32, **common), num_warps=1)
        # the sweeps run in a loop that a program leaves once all its units are done
        assert "scf.while" in k.asm["ttir"], early
    compile_(kf._bcd_sorted_kernel, dict(fam, kB_ptr=cp, mB_ptr=cp), dict(nA=1, steps=1, EARLY_EXIT=True, BLOCK_U=32, **common), num_warps=1)
    for pieces, ps in ((16, 16), (1, 1), (5, 8)):
        compile_(kf._ista_sorted_kernel, dict(fam, kB_ptr="*fp64", mB_ptr="*fp64"), dict(MAX_PIECES=pieces, PS=ps, BLOCK_U=32, **common))
    for io in (("*bf16", "*fp16", "*fp32") if ct == tl.float32 else ("*fp64",)):
        for axis, np_, cnt, kt in ((1, 1, False, cp), (2, 1, False, cp), (1, 16, True, "*fp64"), (1, 1, True, "*fp64"), (2, 1, False, "*fp64")):
            mt = {"X_ptr": io, "Y_ptr": io, "k_ptr": kt, "m_ptr": kt, "low_ptr": cp, "cnt_ptr": "*i32" if cnt else kt}
            compile_(kf._materialise_kernel, mt, dict(UNIT_AXIS=axis, NP=np_, HAS_CNT=cnt, CT=ct, BLOCK_M=4, BLOCK_N=256))
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """Lower every kernel to an sm_90 binary (no GPU needed): what the interpreter accepts, the compiler must too.

    Also: without TRITON_INTERPRET and without a GPU, backend "triton" is refused with the reason.

    In a fresh process: once triton was imported under TRITON_INTERPRET=1 its own library
    functions are interpreted ones and cannot be compiled.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore"
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode == 77:
        pytest.skip(out.stdout.strip())
    assert out.returncode == 0, f"compiling for sm_90 failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    assert "compiled" in out.stdout
    if not torch.cuda.is_available():  # a fresh process without TRITON_INTERPRET and without a GPU
        assert "refused: backend 'triton' is not available" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout
