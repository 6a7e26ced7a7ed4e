"""The ``cpu`` backend (tropfast._C) against the oracle (reference.py) and the closed form."""
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import SHAPES, TORCH, assert_close, iterates, random_adapter

import tropfast
from tropfast import ops, reference, solver
from tropfast.backends import native
from tropfast.backends.torch import sorted as sorted_path

pytestmark = pytest.mark.skipif(
    not native.load(),
    reason=f"tropfast._C is not built ({native.status('cpu').reason}); build it with `pip install --no-build-isolation -e .`",
)

OPS = tuple(ops.SCHEMAS)
FULL = [torch.float64, torch.float32]
HALF = [torch.float16, torch.bfloat16]
NATIVE = iterates(ops.DISPATCHED)  # CPU tensors dispatch to the kernels registered by tropfast._C
CF = TORCH
METHODS = solver.METHODS


def _f64(xs):
    return [x.to(torch.float64) for x in xs]


def _seed(*key) -> int:
    """A seed fixed by the key, the same in every process (``hash`` of a str or a dtype is not)."""
    return zlib.crc32(repr(key).encode()) % 100_000


def _params(L, dtype, seed, per_adapter=True, scale=1.0):
    """(lr, lam1, lam2) as float64 tensors (the kernels must round them to the compute dtype)."""
    g = torch.Generator().manual_seed(seed)
    n = (L or 1) if per_adapter else 1
    lr = 0.01 + 0.04 * torch.rand(n, generator=g, dtype=torch.float64)
    lam1 = scale * (0.05 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64))
    lam2 = scale * (0.05 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64))
    if not per_adapter or L is None:
        return lr[0], lam1[0], lam2[0]
    return lr, lam1, lam2


def _at(p, k):
    return float(p) if p.dim() == 0 else float(p[k])


# ------------------------------------------------------------------------------------------
# Registration and module functions
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OPS)
def test_op_has_a_cpu_kernel(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tropfast::{name}", "CPU"), (
        f"tropfast._C is loaded but registered no CPU kernel for tropfast::{name}"
    )


def test_module_reports_its_build():
    import tropfast._C as _EXT

    assert _EXT.has_cpu() is True
    assert isinstance(_EXT.has_cuda(), bool)
    assert _EXT.num_threads() >= 1
    assert tropfast.backends.available()["cpu"].available
    # the status names the width of the solve loops the CPU runs
    loops = {"avx512": "AVX-512", "avx2": "AVX2", "generic": "compiler-vectorised"}[_EXT.simd_level()]
    assert f"{loops} solve loops" in tropfast.backends.status("cpu").reason
    assert tropfast.backends.resolve("auto", torch.device("cpu")) == "cpu"


# ------------------------------------------------------------------------------------------
# Every op against the oracle and the closed form
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FULL)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("L", [None, 1, 5])
def test_hsd_grad_and_loss(shape, dtype, L):
    xs = random_adapter(L, *shape, dtype=dtype, seed=_seed(shape, L))
    loss, gA, gB = NATIVE.hsd_grad(*xs)
    assert loss.dtype == gA.dtype == gB.dtype == dtype
    assert loss.shape == (() if L is None else (L,)) and gA.shape == xs[2].shape and gB.shape == xs[3].shape
    rl, rA, rB = reference.hsd_grad_ref(*_f64(xs))
    assert_close(loss, rl, dtype, "loss vs oracle")
    assert_close(gA, rA, dtype, "grad A_hat vs oracle")
    assert_close(gB, rB, dtype, "grad B_hat vs oracle")
    cl, cA, cB = CF.hsd_grad(*xs)
    assert_close(loss, cl, dtype, "loss vs closed form")
    assert_close(gA, cA, dtype, "grad A_hat vs closed form")
    assert_close(gB, cB, dtype, "grad B_hat vs closed form")
    assert_close(NATIVE.hsd_loss(*xs), rl, dtype, "hsd_loss vs oracle")


@pytest.mark.parametrize("dtype", FULL)
def test_loss_is_accurate_near_the_start(dtype):
    A, B, _, _ = random_adapter(2, 16, 64, 48, dtype=dtype, seed=3)
    Ah = A + 1e-4 * torch.randn(A.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    got = NATIVE.hsd_loss(A, B, Ah, B)
    want = reference.hsd_loss_ref(A.double(), B.double(), Ah.double(), B.double())
    rel = float(((got.double() - want) / want).abs().max())
    assert rel < (1e-10 if dtype == torch.float64 else 1e-3), f"relative error {rel:.3e} near Â = A"


@pytest.mark.parametrize("dtype", FULL)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("L", [None, 2])
def test_generators(shape, dtype, L):
    A, B, _, _ = random_adapter(L, *shape, dtype=dtype, seed=_seed(shape, "gen"))
    G1, G2 = NATIVE.generators(A, B)
    R1, R2 = reference.generators_ref(A.double(), B.double())
    assert G1.dtype == dtype and G1.shape == R1.shape
    assert_close(G1, R1, dtype, "G1")
    assert_close(G2, R2, dtype, "G2")


@pytest.mark.parametrize("dtype", FULL + HALF)
@pytest.mark.parametrize("per_adapter", [False, True])
def test_soft_threshold(dtype, per_adapter):
    g = torch.Generator().manual_seed(5)
    X = torch.randn(5, 7, 33, generator=g, dtype=torch.float64).to(dtype)
    tau = torch.rand(5 if per_adapter else (), generator=g, dtype=torch.float64)
    got = NATIVE.soft_threshold(X, tau)
    assert got.dtype == dtype and got.shape == X.shape
    want = torch.stack(
        [reference.soft_threshold_ref(X[k].double(), _at(tau.to(ops.compute_dtype(dtype)), k)) for k in range(5)]
    )
    assert_close(got, want, dtype, "soft_threshold vs oracle")
    assert_close(got, CF.soft_threshold(X, tau), dtype, "soft_threshold vs closed form")
    flat = NATIVE.soft_threshold(X[0, :, :5].t(), tau[0] if per_adapter else tau)  # non-contiguous 2-D
    assert_close(flat, CF.soft_threshold(X[0, :, :5].t(), tau[0] if per_adapter else tau), dtype, "2-D view")
    if dtype in FULL:
        # several parallel chunks per adapter boundary; elementwise, in the SIMD clone the CPU
        # picks: the closed form's values exactly
        big = torch.randn(3, 300, 257, generator=g, dtype=torch.float64).to(dtype)
        tb = torch.rand(3 if per_adapter else (), generator=g)
        assert torch.equal(NATIVE.soft_threshold(big, tb), CF.soft_threshold(big, tb))


@pytest.mark.parametrize("dtype", FULL)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("L", [None, 1, 5])
def test_prox_step(shape, dtype, L):
    xs = random_adapter(L, *shape, dtype=dtype, seed=_seed(shape, L, "prox"))
    lr, lam1, lam2 = _params(L, dtype, _seed(shape, L))
    nA, nB = NATIVE.prox_step(*xs, lr, lam1, lam2)
    assert nA.dtype == nB.dtype == dtype and nA.shape == xs[2].shape and nB.shape == xs[3].shape
    cA, cB = CF.prox_step(*xs, lr, lam1, lam2)
    assert_close(nA, cA, dtype, "A_hat vs closed form")
    assert_close(nB, cB, dtype, "B_hat vs closed form")
    ref = _f64(xs)
    ct = ops.compute_dtype(dtype)
    lr_c, l1_c, l2_c = (p.to(ct) for p in (lr, lam1, lam2))
    for k in range(L or 1):
        sl = (lambda x: x) if L is None else (lambda x, k=k: x[k])
        rA, rB = reference.prox_step_ref(*(sl(x) for x in ref), _at(lr_c, k), _at(l1_c, k), _at(l2_c, k))
        assert_close(sl(nA), rA, dtype, f"A_hat vs oracle, adapter {k}")
        assert_close(sl(nB), rB, dtype, f"B_hat vs oracle, adapter {k}")


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_single_ops_are_the_float_ops_rounded_once(dtype):
    """Half and bfloat16 weights run through the float passes (csrc/cpu/ops.cpp widens each
    pass's rows into float buffers): each output is the float op's on the widened inputs,
    rounded once, in the input's layout."""
    xs = random_adapter(3, 20, 37, 29, dtype=dtype, seed=12)
    xs = (xs[0], xs[1], xs[2].transpose(1, 2).contiguous().transpose(1, 2), xs[3])  # a strided A_hat
    wide = tuple(x.float() for x in xs)
    lr, lam1, lam2 = _params(3, dtype, 12)
    pairs = {
        "hsd_loss": ((NATIVE.hsd_loss(*xs),), (NATIVE.hsd_loss(*wide),)),
        "hsd_grad": (NATIVE.hsd_grad(*xs), NATIVE.hsd_grad(*wide)),
        "prox_step": (NATIVE.prox_step(*xs, lr, lam1, lam2), NATIVE.prox_step(*wide, lr, lam1, lam2)),
        "soft_threshold": ((NATIVE.soft_threshold(xs[2], lam1),), (NATIVE.soft_threshold(wide[2], lam1),)),
    }
    for name, (outs, wants) in pairs.items():
        for i, (o, w) in enumerate(zip(outs, wants)):
            assert o.dtype == dtype, f"{name}[{i}] returned {o.dtype}"
            assert torch.equal(o, w.to(dtype)), f"{name}[{i}] is not the float result rounded once"
    assert NATIVE.hsd_grad(*xs)[1].stride() == xs[2].stride(), "the gradient of a strided A_hat keeps its layout"


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_computed_in_fp32(dtype):
    xs = random_adapter(3, 4, 10, 6, dtype=dtype, seed=11)
    lr, lam1, lam2 = _params(3, dtype, 11)
    got = {
        "generators": NATIVE.generators(*xs[:2]),
        "hsd_loss": (NATIVE.hsd_loss(*xs),),
        "hsd_grad": NATIVE.hsd_grad(*xs),
        "prox_step": NATIVE.prox_step(*xs, lr, lam1, lam2),
    }
    want = {
        "generators": CF.generators(*xs[:2]),
        "hsd_loss": (CF.hsd_loss(*xs),),
        "hsd_grad": CF.hsd_grad(*xs),
        "prox_step": CF.prox_step(*xs, lr, lam1, lam2),
    }
    for name, outs in got.items():
        for i, (o, w) in enumerate(zip(outs, want[name])):
            assert o.dtype == dtype, f"{name}[{i}] returned {o.dtype}"
            assert_close(o, w, dtype, f"{name}[{i}] vs closed form")
    rl, rA, rB = reference.hsd_grad_ref(*_f64(xs))
    assert_close(got["hsd_grad"][1], rA, dtype, "grad A_hat vs oracle")
    assert_close(got["hsd_grad"][2], rB, dtype, "grad B_hat vs oracle")


def test_parameters_are_read_robustly():
    xs = random_adapter(3, 5, 12, 9, dtype=torch.float32, seed=2)
    want = CF.prox_step(*xs, torch.tensor(0.02), torch.tensor(0.1), torch.tensor(0.2))
    variants = [
        (torch.tensor(0.02, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.2)),
        (torch.full((3,), 0.02), torch.full((1,), 0.1), torch.tensor(0.2, dtype=torch.float16).float()),
        (torch.full((6,), 0.02)[::2], torch.tensor([0.1] * 3, dtype=torch.float64), torch.tensor(0.2)),
    ]
    for lr, l1, l2 in variants:
        got = NATIVE.prox_step(*xs, lr, l1, l2)
        assert_close(got[0], want[0], torch.float32, "A_hat")
        assert_close(got[1], want[1], torch.float32, "B_hat")
    with pytest.raises(ValueError, match="lr must have shape"):
        NATIVE.prox_step(*xs, torch.full((2,), 0.02), torch.tensor(0.1), torch.tensor(0.1))


def test_non_contiguous_inputs():
    A, B, Ah, Bh = random_adapter(2, 6, 20, 11, dtype=torch.float64, seed=9)
    At = A.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major storage
    Bht = Bh.transpose(1, 2).contiguous().transpose(1, 2)
    assert not At.is_contiguous() and not Bht.is_contiguous()
    loss, gA, gB = NATIVE.hsd_grad(At, B, Ah, Bht)
    cl, cA, cB = CF.hsd_grad(A, B, Ah, Bh)
    assert gB.stride() == torch.empty_like(Bht).stride(), "output layout differs from the fake kernel's"
    for got, want, what in ((loss, cl, "loss"), (gA, cA, "gA"), (gB, cB, "gB")):
        assert_close(got, want, torch.float64, what)


def test_losses_do_not_depend_on_the_thread_count():
    xs = random_adapter(4, 32, 96, 80, dtype=torch.float32, seed=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = NATIVE.hsd_grad(*xs)
        torch.set_num_threads(max(2, before))
        many = NATIVE.hsd_grad(*xs)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert torch.equal(a, b), "results changed with the number of threads"


def test_empty_and_degenerate_inputs():
    A = torch.zeros(2, 3, 5, dtype=torch.float64)
    B = torch.zeros(2, 4, 3, dtype=torch.float64)
    p = torch.tensor(0.1, dtype=torch.float64)
    loss, gA, gB = NATIVE.hsd_grad(A, B, A, B)
    assert float(loss.abs().max()) == 0 and float(gA.abs().max()) == 0 and float(gB.abs().max()) == 0
    for m in METHODS:
        sA, sB = NATIVE.solve_fused(A, B, p, p, p, m, 3)
        assert float(sA.abs().max()) == 0 and float(sB.abs().max()) == 0, m
    A0 = torch.zeros(0, 3, 5)
    B0 = torch.zeros(0, 4, 3)
    assert NATIVE.hsd_loss(A0, B0, A0, B0).shape == (0,)
    assert NATIVE.solve_fused(A0, B0, p, p, p, "ista", 2)[0].shape == (0, 3, 5)


# ------------------------------------------------------------------------------------------
# solve_fused against solver.dense_solve on the closed form
# ------------------------------------------------------------------------------------------
SOLVE_SHAPES = [(1, 1, 1), (1, 7, 3), (5, 12, 9), (8, 33, 17), (3, 16, 64)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SOLVE_SHAPES)
@pytest.mark.parametrize("L", [None, 1, 5])
def test_solve_fused_matches_dense_solve_fp64(method, shape, L):
    A, B, _, _ = random_adapter(L, *shape, dtype=torch.float64, seed=_seed(shape, L, method))
    A3, B3 = (A, B) if L is not None else (A[None], B[None])
    lr = solver.safe_lr(A3, B3)
    scale = float((A3 * A3).sum(-1).mean() + (B3 * B3).sum(-2).mean()) ** 0.5
    lam1 = scale * torch.linspace(0.05, 0.3, A3.shape[0], dtype=torch.float64)
    lam2 = scale * torch.linspace(0.2, 0.1, A3.shape[0], dtype=torch.float64)
    if L is None:
        lr, lam1, lam2 = lr[0], lam1[0], lam2[0]
    steps = 60
    nA, nB = NATIVE.solve_fused(A, B, lam1, lam2, lr, method, steps)
    cA, cB = CF.solve_fused(A, B, lam1, lam2, lr, method, steps)
    assert nA.shape == A.shape and nB.shape == B.shape
    assert_close(nA, cA, torch.float64, f"{method} A_hat")
    assert_close(nB, cB, torch.float64, f"{method} B_hat")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
def test_solve_fused_low_precision(method, dtype):
    A, B, _, _ = random_adapter(3, 6, 24, 20, dtype=dtype, seed=_seed(method, "lp"))
    lr = solver.safe_lr(A.float(), B.float())
    lam = torch.tensor([0.5, 1.0, 2.0])
    nA, nB = NATIVE.solve_fused(A, B, lam, lam, lr, method, 15)
    cA, cB = CF.solve_fused(A, B, lam, lam, lr, method, 15)
    assert nA.dtype == nB.dtype == dtype
    assert_close(nA, cA, dtype, f"{method} A_hat")
    assert_close(nB, cB, dtype, f"{method} B_hat")


def test_solve_fused_zero_steps_and_bad_method():
    A, B, _, _ = random_adapter(2, 3, 8, 5, dtype=torch.float64, seed=1)
    p = torch.tensor(0.1, dtype=torch.float64)
    nA, nB = NATIVE.solve_fused(A, B, p, p, p, "fista", 0)
    assert torch.equal(nA, A) and torch.equal(nB, B)
    assert nA.data_ptr() != A.data_ptr(), "the output must not alias the input"
    with pytest.raises(ValueError, match="unknown method"):
        NATIVE.solve_fused(A, B, p, p, p, "newton", 3)


# ------------------------------------------------------------------------------------------
# The vector widths of the ISTA and FISTA loops (csrc/cpu/ista_x86.h)
# ------------------------------------------------------------------------------------------
LEVELS = ("avx512", "avx2", "generic")


def _levels():
    """The levels this CPU runs, widest first (set_simd_level never goes wider than the CPU)."""
    import tropfast._C as _EXT

    top = _EXT.simd_level()
    return LEVELS[LEVELS.index(top):]


@pytest.fixture
def simd_level():
    """Set a level for one test and restore the detected one after it."""
    import tropfast._C as _EXT

    before = _EXT.simd_level()
    yield _EXT.set_simd_level
    assert _EXT.set_simd_level(before) == before


def test_simd_level_reports_and_clamps(simd_level):
    import tropfast._C as _EXT

    levels = _levels()
    assert levels[0] in LEVELS and levels[-1] == "generic"
    for want in LEVELS:
        got = simd_level(want)
        assert got == _EXT.simd_level()
        # never wider than the CPU runs: a level the CPU lacks falls to the widest it has
        assert got == (want if want in levels else levels[0])
    simd_level(levels[0])
    with pytest.raises(ValueError, match="unknown level 'sse9'"):
        simd_level("sse9")
    assert _EXT.simd_level() == levels[0], "a refused level must leave the level in use alone"


# shapes whose sizes are not multiples of the vector widths, d_in != d_out
LEVEL_CASES = [(3, 7, 37, 53, torch.float64), (2, 5, 16, 16, torch.float64), (6, 24, 96, 80, torch.float32),
               (2, 4, 20, 9, torch.float32), (2, 4, 20, 9, torch.bfloat16), (1, 1, 1, 1, torch.float64)]


@pytest.mark.parametrize("method", ["ista", "fista"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", LEVEL_CASES, ids=str)
def test_every_simd_level_matches_dense_solve(simd_level, level, case, method):
    # To the tolerance of the dtype.  FISTA restarts where a sum changes sign, so a rounding
    # difference can flip one restart; on about 1.5 % of random float32 inputs the iterates
    # then part by more than the tolerance (at every level alike).  _seed fixes the inputs.
    if level not in _levels():
        pytest.skip(f"this CPU does not run {level}")
    L, r, d_in, d_out, dtype = case
    A, B, _, _ = random_adapter(L, r, d_in, d_out, dtype=dtype, seed=_seed(case, "lv"))
    lr = solver.safe_lr(A.double(), B.double())
    lam1 = torch.linspace(0.02, 0.2, L, dtype=torch.float64)
    lam2 = torch.linspace(0.3, 0.05, L, dtype=torch.float64)
    assert simd_level(level) == level
    nA, nB, stats = ops.DISPATCHED.solve_fused(A, B, lam1, lam2, lr, method, 40)
    cA, cB = CF.solve_fused(A, B, lam1, lam2, lr, method, 40)
    assert_close(nA, cA, dtype, f"{level} A_hat")
    assert_close(nB, cB, dtype, f"{level} B_hat")
    assert torch.isfinite(stats).all()


@pytest.mark.parametrize("method", ["ista", "fista"])
@pytest.mark.parametrize("case", LEVEL_CASES, ids=str)
@pytest.mark.parametrize("lr_mul", [1.0, 40.0])  # 40: a diverging solve, whose NaNs must land alike
def test_vector_levels_are_bit_identical(simd_level, case, lr_mul, method):
    """The AVX-512 and AVX2 loops run the same operations on the same lanes: equal bits."""
    vector = [lv for lv in _levels() if lv != "generic"]
    if len(vector) < 2:
        pytest.skip(f"needs two vector levels, this CPU runs {_levels()}")
    L, r, d_in, d_out, dtype = case
    A, B, _, _ = random_adapter(L, r, d_in, d_out, dtype=dtype, seed=_seed(case, "bits"))
    lr = lr_mul * solver.safe_lr(A.double(), B.double())
    lam = torch.full((L,), 0.05, dtype=torch.float64)
    outs = []
    for level in vector:
        assert simd_level(level) == level
        outs.append(ops.DISPATCHED.solve_fused(A, B, lam, lam, lr, method, 60))
    for got, want in zip(outs[1], outs[0]):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))


def test_ista_equals_a_loop_of_prox_steps():
    A, B, _, _ = random_adapter(2, 7, 30, 25, dtype=torch.float64, seed=8)
    lr, lam1, lam2 = solver.safe_lr(A, B), torch.tensor([0.5, 2.0], dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    Ah, Bh = A.clone(), B.clone()
    for _ in range(25):
        Ah, Bh = NATIVE.prox_step(A, B, Ah, Bh, lr, lam1, lam2)
    fA, fB = NATIVE.solve_fused(A, B, lam1, lam2, lr, "ista", 25)
    assert_close(fA, Ah, torch.float64, "A_hat")
    assert_close(fB, Bh, torch.float64, "B_hat")


@settings(max_examples=25, deadline=None)
@given(
    L=st.integers(1, 4),
    r=st.integers(1, 9),
    d_in=st.integers(1, 40),
    d_out=st.integers(1, 40),
    method=st.sampled_from(METHODS),
    seed=st.integers(0, 10_000),
)
def test_random_shapes_match_closed_form(L, r, d_in, d_out, method, seed):
    xs = random_adapter(L, r, d_in, d_out, dtype=torch.float64, seed=seed)
    for got, want, what in zip(NATIVE.hsd_grad(*xs), CF.hsd_grad(*xs), ("loss", "gA", "gB")):
        assert_close(got, want, torch.float64, what)
    lr = solver.safe_lr(xs[0], xs[1])
    lam = torch.rand(L, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for got, want, what in zip(NATIVE.prox_step(*xs, lr, lam, lam), CF.prox_step(*xs, lr, lam, lam), ("A", "B")):
        assert_close(got, want, torch.float64, f"prox {what}")
    got = NATIVE.solve_fused(xs[0], xs[1], lam, lam, lr, method, 10)
    want = CF.solve_fused(xs[0], xs[1], lam, lam, lr, method, 10)
    assert_close(got[0], want[0], torch.float64, f"{method} A_hat")
    assert_close(got[1], want[1], torch.float64, f"{method} B_hat")


# ------------------------------------------------------------------------------------------
# torch.library.opcheck and the public solver
# ------------------------------------------------------------------------------------------
def _opcheck_cases():
    A, B, Ah, Bh = random_adapter(2, 3, 6, 5, dtype=torch.float64, seed=12)
    p = torch.tensor([0.05, 0.02], dtype=torch.float64)
    lam = torch.tensor(0.1, dtype=torch.float64)

    def g(*xs):  # fresh leaves that require grad, for the ops with registered autograd
        return [x.clone().requires_grad_(True) for x in xs]

    return [
        ("generators", (A, B)),
        ("generators", tuple(g(A[0], B[0]))),
        ("hsd_loss", (A, B, Ah, Bh)),
        ("hsd_loss", tuple(g(A, B, Ah, Bh))),
        ("hsd_grad", (A, B, Ah, Bh)),
        ("hsd_grad", (A[0], B[0], Ah[0], Bh[0])),
        ("soft_threshold", (Ah, p)),
        ("soft_threshold", (g(Ah)[0], lam)),
        ("prox_step", (A, B, Ah, Bh, p, lam, p)),
        ("solve_fused", (A, B, lam, p, p, "ista", 3)),
        ("solve_fused", (A, B, lam, p, p, "fista", 3)),
        ("solve_fused", (A[0], B[0], lam, lam, lam, "bcd", 3)),
        ("solve_sorted", (A, B, lam, p, p, "ista", 3)),
        ("solve_sorted", (A[0], B[0], lam, lam, lam, "bcd", 3)),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.tropfast, name).default, args)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fused", [None, False])
def test_public_solve_on_cpu_backend_matches_torch(method, fused):
    A, B, _, _ = random_adapter(3, 8, 40, 24, dtype=torch.float64, seed=_seed(method, "solve"))
    kw = dict(lam1=0.5, lam2=torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64), method=method, steps=40, fused=fused)
    nat = tropfast.solve(A, B, backend="cpu", **kw)
    ref = tropfast.solve(A, B, backend="torch", **kw)
    assert nat.backend == "cpu" and ref.backend == "torch"
    assert_close(nat.A_hat, ref.A_hat, torch.float64, "A_hat")
    assert_close(nat.B_hat, ref.B_hat, torch.float64, "B_hat")
    assert_close(nat.final_objective, ref.final_objective, torch.float64, "objective")
    assert torch.equal(nat.kept_fraction, ref.kept_fraction)


def test_public_solve_list_of_adapters_on_cpu():
    As = [torch.randn(4, 10, dtype=torch.float64), torch.randn(6, 7, dtype=torch.float64)]
    Bs = [torch.randn(9, 4, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)]
    nat = tropfast.solve(As, Bs, lam1=0.3, lam2=0.3, method="bcd", steps=20, backend="cpu")
    ref = tropfast.solve(As, Bs, lam1=0.3, lam2=0.3, method="bcd", steps=20, backend="torch")
    for k in range(2):
        assert_close(nat.A_hat[k], ref.A_hat[k], torch.float64, f"A_hat[{k}]")
        assert_close(nat.B_hat[k], ref.B_hat[k], torch.float64, f"B_hat[{k}]")


# ------------------------------------------------------------------------------------------
# solve_sorted (csrc/sorted.h) against the dense iterates, with test_torch_sorted's measure
# ------------------------------------------------------------------------------------------
from test_torch_sorted import LAM_SCALES, _adapter, _assert_iterates, _dense, _lams, adversarial_case  # noqa: E402

SORTED_SHAPES = [(2, 8, 24, 40), (1, 1, 7, 5), (3, 5, 1, 9)]


def _sorted(A, B, lam1, lam2, lr, method, T):
    lr = lr if lr is not None else torch.ones((), dtype=A.dtype)
    return NATIVE.solve_sorted(A, B, lam1, lam2, lr, method, T)


@pytest.mark.parametrize("method", ["bcd", "ista"])
@pytest.mark.parametrize("shape", SORTED_SHAPES)
@pytest.mark.parametrize("scale", LAM_SCALES)
def test_solve_sorted_matches_dense_fp64(method, shape, scale):
    A, B = _adapter(*shape, seed=int(scale * 10) + len(method))
    lam1, lam2 = _lams(shape[0], A.dtype, scale, zero_one=True)
    lr = solver.safe_lr(A, B)
    for T in [1, 2, 5, 30, 200]:
        want = _dense(A, B, lam1, lam2, lr, method, T)
        _assert_iterates(_sorted(A, B, lam1, lam2, lr, method, T), want, A.dtype, f"{method} T={T}", (A, B))


def test_solve_sorted_bcd_cycles_land_in_phase():
    # At large T every unit's BCD state cycles and the kernel jumps to the end; the result
    # must be the iterate of exactly T sweeps, for consecutive T (phase of a period > 1).
    # Small units over a range of λ: many states end in cycles of period 2 or 3.
    A, B = _adapter(64, 4, 12, 9, seed=9)
    lam1 = torch.logspace(-2, 1.5, 64, dtype=A.dtype)
    lam2 = 0.7 * lam1
    for T in [20, 31, 300, 301, 302, 303]:
        want = _dense(A, B, lam1, lam2, None, "bcd", T)
        _assert_iterates(_sorted(A, B, lam1, lam2, None, "bcd", T), want, A.dtype, f"bcd T={T}", (A, B))


@pytest.mark.parametrize("method", ["bcd", "ista"])
def test_solve_sorted_adversarial_inputs(method):
    # test_torch_sorted's case: an entry exactly on its threshold must be zero, as in the dense loop.
    A, B, lam1, lam2, lr = adversarial_case()
    dt = A.dtype
    for T in [1, 2, 5, 30]:
        got = _sorted(A, B, lam1, lam2, lr, method, T)
        _assert_iterates(got, _dense(A, B, lam1, lam2, lr, method, T), dt, f"{method} T={T}", (A, B))
        assert bool((got[0][A == 0] == 0).all()) and bool((got[1][B == 0] == 0).all())
    if method == "bcd":
        Ah, _ = _sorted(A, B, lam1, lam2, lr, "bcd", 1)
        assert bool((Ah[0, 4][A[0, 4].abs() == 2] == 0).all())


def test_solve_sorted_ista_leaves_the_sorted_form_and_still_matches():
    # λ2 = 0 lets B̂ grow until 1 − lr·β̂ < 0: that unit leaves the sorted form (torch's form
    # flags it too) and is solved densely; the result is the dense iterate all the same.
    # The dense iteration is unstable there and amplifies the order of summation, so the
    # comparison is with the native dense loop, which that unit now runs.


    A, B = _adapter(2, 8, 24, 40, seed=4)
    lam1 = torch.tensor([30.0, 15.0], dtype=A.dtype)
    lam2 = torch.tensor([30.0, 0.0], dtype=A.dtype)
    lr = solver.safe_lr(A, B) * 3
    *_, bad = sorted_path._ista_state(A, B, lam1, lam2, lr, 200, 16)
    assert bool(bad.any()), "the case no longer leaves the sorted form: pick another"
    got = _sorted(A, B, lam1, lam2, lr, "ista", 200)
    want = NATIVE.solve_fused(A, B, lam1, lam2, lr, "ista", 200)
    _assert_iterates(got, want, A.dtype, "ista fallback", (A, B))


@pytest.mark.parametrize("method", ["bcd", "ista"])
@pytest.mark.parametrize("dtype", [torch.float32] + HALF)
def test_solve_sorted_low_precision(method, dtype):
    A, B = _adapter(3, 16, 96, 80, dtype=dtype, seed=8)
    lam1, lam2 = _lams(3, torch.float32, 15.0, zero_one=True)
    lr = solver.safe_lr(A.float(), B.float())
    for T in [1, 5, 30]:
        got = _sorted(A, B, lam1, lam2, lr, method, T)
        assert got[0].dtype == got[1].dtype == dtype
        if dtype == torch.float32:
            want = _dense(A, B, lam1, lam2, lr, method, T)
            _assert_iterates(got, want, torch.float32, f"{method} T={T}", (A, B))
        else:  # the fp32 solve of the upcast weights, rounded once
            want = _sorted(A.float(), B.float(), lam1, lam2, lr, method, T)
            for g_, w_ in zip(got, want):
                assert torch.equal(g_, w_.to(dtype)), f"{method} {dtype} T={T}"


def test_solve_sorted_mixed_shapes_and_conventions():
    A1, B1 = _adapter(1, 5, 11, 9, seed=5)
    A2, B2 = _adapter(1, 8, 24, 40, seed=6)
    A, B = solver.pad_adapters([A1[0], A2[0]], [B1[0], B2[0]])
    lam1 = torch.tensor([4.0, 9.0], dtype=A.dtype)
    lam2 = torch.tensor([6.0, 7.0], dtype=A.dtype)
    lr = torch.minimum(solver.safe_lr(A, B), torch.tensor(0.01, dtype=A.dtype))
    for method in ("bcd", "ista"):
        Ah, Bh = _sorted(A, B, lam1, lam2, lr, method, 20)
        assert bool((Ah[0, 5:] == 0).all()) and bool((Ah[0, :, 11:] == 0).all())
        assert bool((Bh[0, 9:] == 0).all()) and bool((Bh[0, :, 5:] == 0).all())
        own = _sorted(A1[0], B1[0], lam1[0], lam2[0], lr[0], method, 20)  # 2-D, 0-dim params
        assert own[0].shape == A1[0].shape and own[1].shape == B1[0].shape
        _assert_iterates((Ah[:1, :5, :11], Bh[:1, :9, :5]), (own[0][None], own[1][None]), A.dtype, method, (A1, B1))
    # fista has no sorted form: the dense iteration, exactly as solve_fused
    p = torch.tensor(0.05, dtype=A.dtype)
    for got, want in zip(NATIVE.solve_sorted(A, B, lam1, lam2, p, "fista", 7), NATIVE.solve_fused(A, B, lam1, lam2, p, "fista", 7)):
        assert torch.equal(got, want)
    z = NATIVE.solve_sorted(A, B, lam1, lam2, p, "bcd", 0)
    assert torch.equal(z[0], A) and torch.equal(z[1], B) and z[0].data_ptr() != A.data_ptr()
    with pytest.raises(ValueError, match="unknown method"):
        NATIVE.solve_sorted(A, B, lam1, lam2, p, "newton", 3)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        NATIVE.solve_sorted(A, B, lam1, lam2, p, "bcd", -1)
    A0, B0 = torch.zeros(0, 3, 5, dtype=A.dtype), torch.zeros(0, 4, 3, dtype=A.dtype)
    assert NATIVE.solve_sorted(A0, B0, p, p, p, "ista", 3)[0].shape == (0, 3, 5)


@pytest.mark.parametrize("method", ["bcd", "ista"])
def test_public_solve_sorted_path_on_cpu_backend(method):
    A, B = _adapter(3, 6, 40, 30, seed=2)
    kw = dict(lam1=0.05, lam2=0.08, method=method, steps=40, path="sorted")
    nat = tropfast.solve(A, B, backend="cpu", **kw)
    ref = tropfast.solve(A, B, backend="torch", **kw)
    assert nat.backend == "cpu" and ref.backend == "torch"
    _assert_iterates((nat.A_hat, nat.B_hat), (ref.A_hat, ref.B_hat), A.dtype, method, (A, B))
    keep = tropfast.solve(A, B, 1e-3, 1e-3, method=method, steps=40, path="sorted", target_keep=0.4, backend="cpu")
    assert bool(((keep.kept_fraction - 0.4).abs() < 0.03).all())


@settings(max_examples=60, deadline=None)
@given(
    method=st.sampled_from(["bcd", "ista"]),
    L=st.integers(1, 3),
    r=st.integers(1, 5),
    d_in=st.integers(1, 13),
    d_out=st.integers(1, 13),
    T=st.integers(1, 40),
    log_lam=st.floats(-2.0, 1.5),
    lr_mul=st.sampled_from([0.5, 1.0, 3.0]),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_solve_sorted_property(method, L, r, d_in, d_out, T, log_lam, lr_mul, ties, seed):
    A, B = _adapter(L, r, d_in, d_out, seed=seed)
    if ties:
        A, B = torch.round(A * 2), torch.round(B * 2)
    lam1, lam2 = _lams(L, A.dtype, 10.0**log_lam, zero_one=True)
    lr = solver.safe_lr(A, B) * lr_mul
    want = _dense(A, B, lam1, lam2, lr, method, T)
    _assert_iterates(_sorted(A, B, lam1, lam2, lr, method, T), want, A.dtype, f"{method} T={T}", (A, B))


@pytest.mark.parametrize("op", ["solve_fused", "solve_sorted"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", FULL + HALF)
def test_solve_with_lam_gen_matches_the_closed_form(op, method, dtype):
    """The generator penalty in the native kernels (solve_simd.h's *_gen loops, sorted.h) against
    the torch backend's dense loop, every dtype, one adapter without the penalty."""
    A, B, _, _ = random_adapter(3, 6, 24, 20, dtype=dtype, seed=5)
    s = torch.linspace(0.3, 1.5, 6, dtype=torch.float64)
    A, B = (A.double() * s[:, None]).to(dtype), (B.double() * s[None, :]).to(dtype)
    lr = 0.5 * solver.safe_lr(A.double(), B.double())
    lam = torch.tensor([0.5, 1.0, 2.0])
    lam_gen = torch.tensor([0.0, 20.0, 10.0])
    nA, nB = getattr(NATIVE, op)(A, B, lam, lam, lr, method, 15, lam_gen)
    cA, cB = CF.solve_fused(A, B, lam, lam, lr, method, 15, lam_gen)
    assert nA.dtype == nB.dtype == dtype
    assert_close(nA, cA, dtype, f"{op} {method} A_hat")
    assert_close(nB, cB, dtype, f"{op} {method} B_hat")
    if dtype == torch.float64:
        # the penalty acts: whole units are removed that the unpenalised solve keeps
        pA, _ = CF.solve_fused(A, B, lam, lam, lr, method, 15)
        assert int((nA == 0).all(-1).sum()) > int((pA == 0).all(-1).sum())
        # and the adapter without it is solved exactly as without the argument
        wA, wB = getattr(NATIVE, op)(A[:1], B[:1], lam[:1], lam[:1], lr[:1], method, 15)
        assert torch.equal(nA[:1], wA) and torch.equal(nB[:1], wB)
