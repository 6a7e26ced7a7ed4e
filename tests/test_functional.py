"""Every public op (the default ``torch`` closed form) against the materialising oracle."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import SHAPES, TOL, assert_close, random_adapter

import tropfast
from tropfast import reference

DTYPES = [torch.float64, torch.float32]
HALF = [torch.float16, torch.bfloat16]


def _ref_inputs(xs):
    return [x.to(torch.float64) for x in xs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("L", [None, 1, 3])
def test_hsd_grad_matches_reference(shape, dtype, L):
    xs = random_adapter(L, *shape, dtype=dtype, seed=hash(shape) % 1000)
    loss, gA, gB = tropfast.hsd_grad(*xs, backend="torch")
    rl, rA, rB = reference.hsd_grad_ref(*_ref_inputs(xs))
    assert loss.dtype == dtype and gA.shape == xs[2].shape and gB.shape == xs[3].shape
    assert_close(loss, rl, dtype, "loss")
    assert_close(gA, rA, dtype, "grad A_hat")
    assert_close(gB, rB, dtype, "grad B_hat")


@pytest.mark.parametrize("backend", ["torch", None])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("L", [None, 2])
def test_generators_and_loss_match_reference(shape, dtype, backend, L):
    A, B, Ah, Bh = random_adapter(L, *shape, dtype=dtype)
    G1, G2 = tropfast.generators(A, B, backend=backend)
    R1, R2 = reference.generators_ref(A.double(), B.double())
    assert G1.dtype == G2.dtype == dtype and G1.shape == R1.shape
    assert_close(G1, R1, dtype, "G1")
    assert_close(G2, R2, dtype, "G2")
    loss = tropfast.hsd_loss(A, B, Ah, Bh, backend=backend)
    assert loss.dtype == dtype and loss.shape == (() if L is None else (L,))
    assert_close(loss, reference.hsd_loss_ref(*_ref_inputs((A, B, Ah, Bh))), dtype, "loss")


@pytest.mark.parametrize("backend", ["torch", None])
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_computed_in_fp32(dtype, backend):
    # The contract (ops.compute_dtype): half-precision input is computed in fp32 and the result
    # rounded once to the input dtype.  So every output is exactly the fp32 result on the same
    # (upcast) input, cast to half: bit for bit, whatever the backend.
    xs = random_adapter(2, 4, 10, 6, dtype=dtype)
    f32 = [x.float() for x in xs]
    lr, lam1, lam2 = 0.05, 0.01, 0.02
    got = {
        "generators": tropfast.generators(*xs[:2], backend=backend),
        "hsd_loss": (tropfast.hsd_loss(*xs, backend=backend),),
        "hsd_grad": tropfast.hsd_grad(*xs, backend=backend),
        "prox_step": tropfast.prox_step(*xs, lr, lam1, lam2, backend=backend),
        "soft_threshold": (tropfast.soft_threshold(xs[2], 0.3, backend=backend),),
    }
    want = {
        "generators": tropfast.generators(*f32[:2], backend=backend),
        "hsd_loss": (tropfast.hsd_loss(*f32, backend=backend),),
        "hsd_grad": tropfast.hsd_grad(*f32, backend=backend),
        "prox_step": tropfast.prox_step(*f32, lr, lam1, lam2, backend=backend),
        "soft_threshold": (tropfast.soft_threshold(f32[2], 0.3, backend=backend),),
    }
    counts = {"generators": 2, "hsd_loss": 1, "hsd_grad": 3, "prox_step": 2, "soft_threshold": 1}
    for name, outs in got.items():
        assert len(outs) == len(want[name]) == counts[name], name
        for i, (o, w) in enumerate(zip(outs, want[name])):
            assert o.dtype == dtype, f"{name}[{i}] returned {o.dtype}"
            assert torch.equal(o, w.to(dtype)), f"{name}[{i}] is not the fp32 result rounded to {dtype}"
    # and the fp32 results round to the oracle's values within one unit of the half type
    ref = _ref_inputs(xs)
    rl, rA, rB = reference.hsd_grad_ref(*ref)
    for o, w, what in zip(got["hsd_grad"], (rl, rA, rB), ("loss", "grad A_hat", "grad B_hat")):
        assert_close(o, w, dtype, what)
    pA, pB = reference.prox_step_ref(*ref, lr, lam1, lam2)
    assert_close(got["prox_step"][0], pA, dtype, "prox_step A_hat")
    assert_close(got["prox_step"][1], pB, dtype, "prox_step B_hat")


def test_loss_is_accurate_near_the_start():
    # Â = A + tiny perturbation: ½Σ(βa − 2sc + β̂â) would lose every digit here.
    A, B, _, _ = random_adapter(1, 16, 64, 64, dtype=torch.float32)
    Ah = A + 1e-4 * torch.randn_like(A)
    got = tropfast.hsd_loss(A, B, Ah, B)
    want = reference.hsd_loss_ref(A.double(), B.double(), Ah.double(), B.double())
    assert abs(float(got) - float(want)) <= 1e-3 * float(want)


def test_batched_equals_one_by_one():
    A, B, Ah, Bh = random_adapter(4, 5, 11, 7)
    loss, gA, gB = tropfast.hsd_grad(A, B, Ah, Bh)
    nA, nB = tropfast.prox_step(A, B, Ah, Bh, 0.1, 0.02, 0.03)
    for k in range(4):
        lk, gAk, gBk = tropfast.hsd_grad(A[k], B[k], Ah[k], Bh[k])
        assert lk.dim() == 0
        torch.testing.assert_close(loss[k], lk)
        torch.testing.assert_close(gA[k], gAk)
        torch.testing.assert_close(gB[k], gBk)
        nAk, nBk = tropfast.prox_step(A[k], B[k], Ah[k], Bh[k], 0.1, 0.02, 0.03)
        torch.testing.assert_close(nA[k], nAk)
        torch.testing.assert_close(nB[k], nBk)


@pytest.mark.parametrize("backend", ["torch", None])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_prox_step_matches_reference(shape, dtype, backend):
    xs = random_adapter(2, *shape, dtype=dtype, seed=3)
    nA, nB = tropfast.prox_step(*xs, 0.05, 0.1, 0.2, backend=backend)
    rA, rB = reference.prox_step_ref(*_ref_inputs(xs), 0.05, 0.1, 0.2)
    assert_close(nA, rA, dtype, "A_hat")
    assert_close(nB, rB, dtype, "B_hat")


@pytest.mark.parametrize("backend", ["torch", None])
def test_prox_step_per_adapter_parameters(backend):
    A, B, Ah, Bh = random_adapter(3, 4, 9, 6)
    lr = torch.tensor([0.01, 0.05, 0.1], dtype=torch.float64)
    lam1 = torch.tensor([0.0, 0.1, 0.3], dtype=torch.float64)
    lam2 = torch.tensor([0.2, 0.0, 0.05], dtype=torch.float64)
    nA, nB = tropfast.prox_step(A, B, Ah, Bh, lr, lam1, lam2, backend=backend)
    for k in range(3):
        rA, rB = reference.prox_step_ref(A[k], B[k], Ah[k], Bh[k], float(lr[k]), float(lam1[k]), float(lam2[k]))
        assert_close(nA[k], rA, torch.float64, f"A_hat[{k}]")
        assert_close(nB[k], rB, torch.float64, f"B_hat[{k}]")


def test_hsd_loss_autograd_matches_reference_for_all_inputs():
    xs = [x.requires_grad_(True) for x in random_adapter(2, 3, 6, 5)]
    tropfast.hsd_loss(*xs).sum().backward()
    got = [x.grad.clone() for x in xs]
    ys = [x.detach().clone().requires_grad_(True) for x in xs]
    reference.hsd_loss_ref(*ys).sum().backward()
    for g, y, name in zip(got, ys, ("A", "B", "A_hat", "B_hat")):
        assert_close(g, y.grad, torch.float64, f"d loss / d {name}")


def test_hsd_loss_gradcheck():
    xs = [x.requires_grad_(True) for x in random_adapter(2, 2, 4, 3)]
    assert torch.autograd.gradcheck(lambda *a: tropfast.hsd_loss(*a), xs)


def test_generators_gradcheck():
    A, B, _, _ = random_adapter(None, 2, 3, 4)
    assert torch.autograd.gradcheck(lambda a, b: tropfast.generators(a, b), (A.requires_grad_(), B.requires_grad_()))


@pytest.mark.parametrize("backend", ["torch", None])
def test_soft_threshold_per_adapter_and_grad(backend):
    X = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor([0.0, 0.5, 10.0], dtype=torch.float64)
    Y = tropfast.soft_threshold(X, tau, backend=backend)
    for k in range(3):
        torch.testing.assert_close(Y[k], reference.soft_threshold_ref(X[k].detach(), float(tau[k])))
    assert torch.equal(Y[2], torch.zeros_like(Y[2]))
    Y.sum().backward()
    assert torch.equal(X.grad, (Y != 0).to(X.dtype))


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=40), st.floats(0, 1e3), st.floats(0, 1e3))
def test_soft_threshold_properties(values, tau, tau2):
    x = torch.tensor(values, dtype=torch.float64)
    y = tropfast.soft_threshold(x, tau)
    assert bool((y.abs() <= x.abs()).all())  # shrinks
    assert bool(((y == 0) | (torch.sign(y) == torch.sign(x))).all())  # never flips a sign
    assert torch.equal(y == 0, x.abs() <= tau)  # zero exactly inside the threshold
    torch.testing.assert_close((x - y).abs(), torch.minimum(x.abs(), torch.tensor(tau, dtype=torch.float64)))
    # S_a ∘ S_b = S_{a+b}; S_0 is the identity
    torch.testing.assert_close(tropfast.soft_threshold(y, tau2), tropfast.soft_threshold(x, tau + tau2))
    assert torch.equal(tropfast.soft_threshold(x, 0.0), x)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 5), st.integers(1, 9), st.integers(1, 9),
    st.integers(0, 3), st.integers(0, 4), st.integers(0, 4), st.integers(0, 10_000),
)
def test_zero_padding_is_exact(r, d_in, d_out, pr, pi, po, seed):
    A, B, Ah, Bh = random_adapter(None, r, d_in, d_out, seed=seed)
    pad = lambda X, rows, cols: torch.nn.functional.pad(X, (0, cols, 0, rows))  # noqa: E731
    P = [pad(A, pr, pi), pad(B, po, pr), pad(Ah, pr, pi), pad(Bh, po, pr)]
    loss, gA, gB = tropfast.hsd_grad(A, B, Ah, Bh)
    ploss, pgA, pgB = tropfast.hsd_grad(*P)
    torch.testing.assert_close(ploss, loss)
    torch.testing.assert_close(pgA[:r, :d_in], gA)
    torch.testing.assert_close(pgB[:d_out, :r], gB)
    assert not pgA[r:].any() and not pgA[:, d_in:].any() and not pgB[d_out:].any() and not pgB[:, r:].any()
    nA, nB = tropfast.prox_step(*P, 0.05, 0.1, 0.1)
    assert not nA[r:].any() and not nA[:, d_in:].any() and not nB[d_out:].any() and not nB[:, r:].any()


# --- bad input ------------------------------------------------------------------------------
def _good():
    return random_adapter(2, 3, 5, 4)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda A, B, Ah, Bh: (A, B[:, :, :2], Ah, Bh), ValueError, "bottleneck mismatch"),
        (lambda A, B, Ah, Bh: (A, B[0], Ah, Bh), ValueError, "B must have 3 dims"),
        (lambda A, B, Ah, Bh: (A[:1], B, Ah, Bh), ValueError, "batch mismatch"),
        (lambda A, B, Ah, Bh: (A.unsqueeze(0), B.unsqueeze(0), Ah, Bh), ValueError, r"A must be \(r, d_in\)"),
        (lambda A, B, Ah, Bh: (A, B, Ah[:, :2], Bh), ValueError, "A_hat has shape"),
        (lambda A, B, Ah, Bh: (A, B, Ah, Bh.float()), TypeError, "B_hat is torch.float32"),
        (lambda A, B, Ah, Bh: (A.float(), B, Ah, Bh), TypeError, "A is torch.float32 but B"),
        (lambda A, B, Ah, Bh: (A.long(), B.long(), Ah, Bh), TypeError, "A has dtype torch.int64"),
        (lambda A, B, Ah, Bh: (A.to(torch.complex128), B, Ah, Bh), TypeError, "A has dtype"),
        (lambda A, B, Ah, Bh: (A.numpy(), B, Ah, Bh), TypeError, "A must be a torch.Tensor"),
        (lambda A, B, Ah, Bh: (A[:, :, :0], B, Ah, Bh), ValueError, "A is empty"),
        (lambda A, B, Ah, Bh: (A, B.index_fill(1, torch.tensor([0]), float("nan")), Ah, Bh), ValueError, "B contains non-finite"),
        (lambda A, B, Ah, Bh: (A, B, Ah.index_fill(2, torch.tensor([1]), float("inf")), Bh), ValueError, "A_hat contains non-finite"),
    ],
)
def test_bad_adapter_input(mutate, exc, match):
    args = mutate(*_good())
    for fn in (tropfast.hsd_grad, tropfast.hsd_loss, lambda *a: tropfast.prox_step(*a, 0.1, 0.1, 0.1)):
        with pytest.raises(exc, match=match):
            fn(*args)


@pytest.mark.parametrize(
    "params, match",
    [
        ((0.0, 0.1, 0.1), "lr must be > 0"),
        ((-0.1, 0.1, 0.1), "lr must be > 0"),
        ((0.1, -1.0, 0.1), "lam1 must be >= 0"),
        ((0.1, 0.1, float("nan")), "lam2 must be finite"),
        ((0.1, float("inf"), 0.1), "lam1 must be finite"),
        ((torch.tensor([0.1, 0.1, 0.1]), 0.1, 0.1), "lr must be a scalar or have one value per adapter"),
        ((0.1, "0.1", 0.1), "lam1 must be a number or a tensor"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tropfast.prox_step(*_good(), *params)


def test_bad_threshold_and_generators_input():
    X = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="tau must be >= 0"):
        tropfast.soft_threshold(X, -1.0)
    with pytest.raises(ValueError, match="per-adapter tau needs a batched X"):
        tropfast.soft_threshold(X[0], torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="X contains non-finite"):
        tropfast.soft_threshold(torch.tensor([1.0, float("nan")]), 0.1)
    with pytest.raises(ValueError, match="bottleneck mismatch"):
        tropfast.generators(torch.randn(3, 5), torch.randn(4, 2))


def test_bad_input_changes_nothing():
    A, B, Ah, Bh = _good()
    before = [x.clone() for x in (A, B, Ah, Bh)]
    with pytest.raises(ValueError):
        tropfast.prox_step(A, B, Ah, Bh, 0.1, -1.0, 0.1)
    for x, y in zip((A, B, Ah, Bh), before):
        assert torch.equal(x, y)


def test_tolerance_table_covers_supported_dtypes():
    from tropfast._checks import SUPPORTED_DTYPES

    assert set(SUPPORTED_DTYPES) == set(TOL)
