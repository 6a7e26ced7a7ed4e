"""Every available backend against the op contract: the same inputs refused the same way, and
the whole-solve stats equal to what the oracle computes from the returned iterate."""
import pytest
import torch
from tolerances import random_adapter

import tropfast
from tropfast import ops, reference

BACKENDS = [name for name, st in tropfast.backends.available().items() if st.available]
WHOLE = ("solve_fused", "solve_sorted")


def _kernels(name):
    return tropfast.backends.kernels(name)


def _device(name):
    return "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"


def _good(dev):
    A, B, _, _ = random_adapter(3, 4, 6, 5, seed=3)
    p = torch.tensor(0.1, dtype=torch.float64)
    return [A.to(dev), B.to(dev), p.to(dev), p.to(dev), p.to(dev), "ista", 2]


def _bad_calls(dev):
    """(what, mutate(args) -> args, exception): one table for every backend."""
    A, B, p = _good(dev)[0], _good(dev)[1], _good(dev)[2]
    return [
        ("unknown method", lambda a: a[:5] + ["newton", 2], ValueError),
        ("unknown method with 0 steps", lambda a: a[:5] + ["newton", 0], ValueError),
        ("negative steps", lambda a: a[:6] + [-1], ValueError),
        ("1-D A", lambda a: [A[0, 0]] + a[1:], ValueError),
        ("B dims differ", lambda a: [a[0], B[0]] + a[2:], ValueError),
        ("bottleneck mismatch", lambda a: [a[0], B[:, :, :3]] + a[2:], ValueError),
        ("adapter count mismatch", lambda a: [a[0], B[:2]] + a[2:], ValueError),
        ("integer weights", lambda a: [A.to(torch.int64), B.to(torch.int64)] + a[2:], TypeError),
        ("B dtype differs", lambda a: [a[0], B.float()] + a[2:], TypeError),
        ("lam1 of the wrong length", lambda a: a[:2] + [torch.ones(2, dtype=p.dtype, device=dev)] + a[3:], ValueError),
        ("2-D lam2", lambda a: a[:3] + [torch.ones(3, 1, dtype=p.dtype, device=dev)] + a[4:], ValueError),
        ("boolean lr", lambda a: a[:4] + [torch.tensor(True, device=dev)] + a[5:], TypeError),
        ("complex lam1", lambda a: a[:2] + [torch.tensor(1j, device=dev)] + a[3:], TypeError),
        ("lam_gen of the wrong length", lambda a: a + [torch.ones(2, dtype=p.dtype, device=dev)], ValueError),
        ("2-D lam_gen", lambda a: a + [torch.ones(3, 1, dtype=p.dtype, device=dev)], ValueError),
        ("boolean lam_gen", lambda a: a + [torch.tensor(True, device=dev)], TypeError),
        ("complex lam_gen", lambda a: a + [torch.tensor(1j, device=dev)], TypeError),
    ]


@pytest.mark.parametrize("op", WHOLE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_refuses_the_same_solve_inputs(backend, op):
    fn = getattr(_kernels(backend), op)
    dev = _device(backend)
    for what, mutate, exc in _bad_calls(dev):
        with pytest.raises(exc):
            fn(*mutate(_good(dev)))
            pytest.fail(f"{backend}.{op} accepted: {what}")


@pytest.mark.parametrize("op", WHOLE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_accepts_the_same_solve_inputs(backend, op):
    fn = getattr(_kernels(backend), op)
    dev = _device(backend)
    A, B = _good(dev)[:2]
    p = torch.tensor(0.1, dtype=torch.float64, device=dev)
    per = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float32, device=dev)
    accepted = [
        (A, B, p, p, p, "bcd", 0),  # zero steps: a copy
        (A, B, per, p, torch.tensor(1, device=dev), "fista", 1),  # integer lr, per-adapter lam1
        (A[0], B[0], p, p, p, "ista", 1),  # one adapter
        (A, B, p.view(1), p, p, "bcd", 2),  # a (1,) parameter
    ]
    for args in accepted:
        Ah, Bh, stats = fn(*args)
        assert Ah.shape == args[0].shape and Bh.shape == args[1].shape
        assert stats.shape == (*args[0].shape[:-2], ops.N_STATS) and stats.dtype == torch.float64
    Ah, Bh, _ = fn(A, B, p, p, p, "bcd", 0)
    assert torch.equal(Ah, A) and torch.equal(Bh, B) and Ah.data_ptr() != A.data_ptr()
    # lam_gen: absent, None, a zero scalar or zero per adapter are the same solve, bit for bit;
    # an integer lam_gen and a (1,) one are accepted like the other parameters
    for method in ops.METHODS:
        want = fn(A, B, p, p, p, method, 3)
        for lg in (None, torch.tensor(0.0, device=dev), torch.zeros(3, dtype=torch.float32, device=dev)):
            got = fn(A, B, p, p, p, method, 3, lg)
            assert all(torch.equal(x, y) for x, y in zip(got, want)), (method, lg)
        for lg in (torch.tensor(1, device=dev), per.view(3).double(), p.view(1)):
            Ah, Bh, stats = fn(A, B, p, p, p, method, 3, lg)
            assert Ah.shape == A.shape and stats.shape == (3, ops.N_STATS)


@pytest.mark.parametrize("gen", [False, True], ids=["plain", "lam_gen"])
@pytest.mark.parametrize("path", WHOLE)
@pytest.mark.parametrize("method", ops.METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_are_the_objective_and_nonzeros_of_the_returned_iterate(backend, dtype, method, path, gen):
    if path == "solve_sorted" and method == "fista":
        pytest.skip("fista has no sorted form (it runs solve_fused)")
    dev = _device(backend)
    A, B, _, _ = random_adapter(3, 5, 9, 7, seed=11)
    lam1 = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)
    lam2 = torch.tensor([0.5, 0.8, 0.0], dtype=torch.float64)
    lr = tropfast.safe_lr(A, B)
    # the generator penalty: on for two adapters, off for the third (F must hold it per adapter)
    lam_gen = torch.tensor([0.0, 0.7, 1.5], dtype=torch.float64) if gen else None
    extra = (lam_gen.to(dev),) if gen else ()
    Ah, Bh, stats = getattr(_kernels(backend), path)(
        A.to(dtype).to(dev), B.to(dtype).to(dev), lam1.to(dev), lam2.to(dev), lr.to(dev), method, 12, *extra
    )
    Ah, Bh, stats = Ah.cpu().double(), Bh.cpu().double(), stats.cpu()
    Ad, Bd = A.to(dtype).double(), B.to(dtype).double()
    lg = lam_gen.to(dtype).double() if gen else 0.0
    gk = [float(lg[k]) if gen else 0.0 for k in range(3)]
    F = reference.objective_ref
    start = torch.stack([F(Ad[k], Bd[k], Ad[k], Bd[k], lam1[k], lam2[k], gk[k]) for k in range(3)])
    end = torch.stack([F(Ad[k], Bd[k], Ah[k], Bh[k], lam1[k], lam2[k], gk[k]) for k in range(3)])
    nnz = (Ah != 0).sum((-2, -1)) + (Bh != 0).sum((-2, -1))
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(stats[:, 0], start, rtol=rtol, atol=rtol)
    torch.testing.assert_close(stats[:, 1], end, rtol=rtol, atol=rtol)
    assert stats[:, 2].tolist() == nnz.double().tolist()
    assert bool((nnz < A[0].numel() + B[0].numel()).any()), "nothing was pruned: the nonzero count went untested"


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_adapter_stats_are_squeezed(backend):
    dev = _device(backend)
    A, B, _, _ = random_adapter(None, 4, 6, 5, seed=2)
    p = torch.tensor(0.4, dtype=torch.float64, device=dev)
    _, _, stats = _kernels(backend).solve_fused(A.to(dev), B.to(dev), p, p, p, "bcd", 5)
    _, _, batched = _kernels(backend).solve_fused(A[None].to(dev), B[None].to(dev), p, p, p, "bcd", 5)
    assert stats.shape == (ops.N_STATS,)
    torch.testing.assert_close(stats.cpu(), batched[0].cpu())


@pytest.mark.parametrize("op", WHOLE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_start_objective_is_non_finite_when_an_input_entry_is(backend, op):
    # solve's NaN/Inf check reads F at the start (stats[:, 0]) instead of passing over the
    # weights: every backend must make it non-finite for a NaN, +Inf or -Inf anywhere in A
    # or B, whatever λ (0 · Inf is NaN), and keep it finite for the other adapters
    dev = _device(backend)
    A, B, _, _ = random_adapter(3, 4, 6, 5, seed=5)
    lams = [
        (torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.2, 0.1, 0.4])),
        (torch.zeros(3), torch.zeros(3)),  # λ = 0: the entry's term is 0 · Inf or 0 · NaN
    ]
    where = [("A", (1, 2, 3)), ("A", (1, 0, 0)), ("B", (1, 4, 3)), ("B", (1, 0, 2))]
    for method in ("bcd", "ista"):
        if op == "solve_sorted" and method == "fista":
            continue
        for lam1, lam2 in lams:
            for name, idx in where:
                for bad in (float("nan"), float("inf"), -float("inf")):
                    Ab, Bb = A.clone(), B.clone()
                    (Ab if name == "A" else Bb)[idx] = bad
                    lr = torch.tensor(0.01)
                    _, _, stats = getattr(_kernels(backend), op)(
                        Ab.to(dev), Bb.to(dev), lam1.to(dev), lam2.to(dev), lr.to(dev), method, 3
                    )
                    f0 = stats[:, 0].cpu()
                    what = (method, lam1.tolist(), name, idx, bad)
                    assert not bool(torch.isfinite(f0[1])), what
                    assert bool(torch.isfinite(f0[[0, 2]]).all()), what
