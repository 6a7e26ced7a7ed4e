"""The op contract (tropfast/ops.py): schemas, fake kernels, autograd formulas and the rules."""
import pytest
import torch
from tolerances import random_adapter

import tropfast
from tropfast import ops, reference


def _opcheck_cases():
    A, B, Ah, Bh = random_adapter(2, 3, 5, 4, dtype=torch.float32)
    p = torch.tensor(0.1)
    per = torch.tensor([0.1, 0.2])
    return {
        "generators": [(A.clone().requires_grad_(), B.clone().requires_grad_())],
        "hsd_loss": [tuple(x.clone().requires_grad_() for x in (A, B, Ah, Bh)), (A[0], B[0], Ah[0], Bh[0])],
        "hsd_grad": [(A, B, Ah, Bh), (A[0], B[0], Ah[0], Bh[0])],
        "soft_threshold": [(A.clone().requires_grad_(), p), (A, per)],
        "prox_step": [(A, B, Ah, Bh, p, p, p), (A, B, Ah, Bh, per, per, p)],
        "solve_fused": [(A, B, p, p, per, m, 3) for m in ("ista", "fista", "bcd")] + [(A[0], B[0], p, p, p, "bcd", 0)]
        + [(A, B, p, p, per, m, 3, per) for m in ("ista", "fista", "bcd")],
        "solve_sorted": [(A, B, p, p, per, m, 3) for m in ("ista", "fista", "bcd")] + [(A[0], B[0], p, p, p, "bcd", 2)]
        + [(A, B, p, p, per, m, 3, p) for m in ("ista", "bcd")],
    }


@pytest.mark.parametrize("name", sorted(ops.SCHEMAS))
def test_opcheck(name):
    for args in _opcheck_cases()[name]:
        torch.library.opcheck(getattr(torch.ops.tropfast, name).default, args)


def test_every_schema_has_a_kernel_table_entry_and_a_default_kernel():
    assert set(ops.SCHEMAS) == set(ops.Kernels._fields)
    for name in ops.SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tropfast::{name}", "CompositeExplicitAutograd"), name


@pytest.mark.parametrize("L", [None, 3])
def test_fake_kernels_give_shapes_and_dtypes_on_meta(L):
    lead = () if L is None else (L,)
    A = torch.empty(*lead, 4, 7, device="meta", dtype=torch.float16)
    B = torch.empty(*lead, 5, 4, device="meta", dtype=torch.float16)
    p = torch.empty((), device="meta")
    G1, G2 = torch.ops.tropfast.generators(A, B)
    assert G1.shape == (*lead, 5, 4, 7) and G1.dtype == torch.float16
    assert torch.ops.tropfast.hsd_loss(A, B, A, B).shape == lead
    loss, gA, gB = torch.ops.tropfast.hsd_grad(A, B, A, B)
    assert loss.shape == lead and gA.shape == A.shape and gB.shape == B.shape
    for name in ("solve_fused", "solve_sorted"):
        for extra in ((), (p,)):  # without and with lam_gen
            Ah, Bh, stats = getattr(torch.ops.tropfast, name)(A, B, p, p, p, "ista", 3, *extra)
            assert Ah.shape == A.shape and Bh.shape == B.shape and Ah.dtype == torch.float16
            assert stats.shape == (*lead, ops.N_STATS) and stats.dtype == torch.float64


def test_torch_compile_over_the_raw_op():
    xs = random_adapter(2, 4, 12, 10, dtype=torch.float32)

    @torch.compile(fullgraph=True)
    def step(A, B, Ah, Bh):
        loss, gA, gB = torch.ops.tropfast.hsd_grad(A, B, Ah, Bh)
        return loss.sum(), Ah - 0.1 * gA, Bh - 0.1 * gB

    got = step(*xs)
    loss, gA, gB = tropfast.hsd_grad(*xs)
    torch.testing.assert_close(got[0], loss.sum())
    torch.testing.assert_close(got[1], xs[2] - 0.1 * gA)
    torch.testing.assert_close(got[2], xs[3] - 0.1 * gB)


# --- the autograd formulas, on the torch backend's kernels (no native build needed) ----------
def test_hsd_loss_backward_formula_matches_the_oracle():
    A, B, Ah, Bh = random_adapter(2, 3, 6, 5, seed=4)
    torch_backend = tropfast.backends.kernels("torch")
    grad = torch.tensor([0.7, -1.3], dtype=torch.float64)
    got = ops.hsd_loss_backward(torch_backend.hsd_grad, grad, A, B, Ah, Bh, (True, True, True, True))
    xs = [x.clone().requires_grad_() for x in (A, B, Ah, Bh)]
    (reference.hsd_loss_ref(*xs) * grad).sum().backward()
    for g, x, name in zip(got, xs, ("A", "B", "A_hat", "B_hat")):
        torch.testing.assert_close(g, x.grad, msg=name)
    only_hat = ops.hsd_loss_backward(torch_backend.hsd_grad, grad, A, B, Ah, Bh, (False, False, True, False))
    assert only_hat[0] is None and only_hat[1] is None and only_hat[2] is not None


def test_soft_threshold_and_generators_backward_formulas():
    X = torch.tensor([[-2.0, -0.5, 0.0, 0.5, 2.0]], dtype=torch.float64)
    out = reference.soft_threshold_ref(X, 1.0)
    g = torch.arange(5, dtype=torch.float64).view(1, 5) + 1
    assert ops.soft_threshold_backward(g, out).tolist() == [[1.0, 0.0, 0.0, 0.0, 5.0]]
    A, B, _, _ = random_adapter(None, 3, 4, 5, seed=2)
    g1, g2 = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(5, 3, 4, dtype=torch.float64)
    gA, gB = ops.generators_backward(A, B, g1, g2)
    a, b = A.clone().requires_grad_(), B.clone().requires_grad_()
    G1, G2 = reference.generators_ref(a, b)
    ((G1 * g1).sum() + (G2 * g2).sum()).backward()
    torch.testing.assert_close(gA, a.grad)
    torch.testing.assert_close(gB, b.grad)


def test_registered_autograd_uses_the_shared_formulas():
    # Through the dispatcher (whatever kernel is registered for CPU) against the oracle.
    A, B, Ah, Bh = (x.requires_grad_() for x in random_adapter(2, 3, 6, 5, seed=5))
    torch.ops.tropfast.hsd_loss(A, B, Ah, Bh).sum().backward()
    xs = [x.detach().clone().requires_grad_() for x in (A, B, Ah, Bh)]
    reference.hsd_loss_ref(*xs).sum().backward()
    for x, y in zip((A, B, Ah, Bh), xs):
        torch.testing.assert_close(x.grad, y.grad)


# --- the rules --------------------------------------------------------------------------------
def test_compute_dtype():
    assert ops.compute_dtype(torch.float16) == ops.compute_dtype(torch.bfloat16) == torch.float32
    assert ops.compute_dtype(torch.float32) == torch.float32 and ops.compute_dtype(torch.float64) == torch.float64


def test_solve_args_normalises():
    A, B, _, _ = random_adapter(None, 3, 4, 5, seed=1)
    a = ops.solve_args("op", A, B, torch.tensor(0.5), torch.tensor([0.25]), torch.tensor(1, dtype=torch.int32), "bcd", 2)
    assert a.squeeze and a.A.shape == (1, 3, 4) and a.B.shape == (1, 5, 3)
    assert a.lam1.tolist() == [0.5] and a.lam2.tolist() == [0.25] and a.lr.tolist() == [1.0]
    assert a.lam1.dtype == torch.float64 and a.steps == 2 and a.method == "bcd"
    # the generator penalty: absent or zero everywhere -> None (the unpenalised solve); else (L,)
    assert a.lam_gen is None and not a.has_gen
    z = ops.solve_args("op", A, B, torch.tensor(0.5), torch.tensor(0.5), torch.tensor(1.0), "bcd", 2, torch.zeros(1))
    assert z.lam_gen is None
    g = ops.solve_args("op", A, B, torch.tensor(0.5), torch.tensor(0.5), torch.tensor(1.0), "bcd", 2, torch.tensor(2))
    assert g.has_gen and g.lam_gen.tolist() == [2.0] and g.lam_gen.dtype == torch.float64
    with pytest.raises(ValueError, match=r"op: lam_gen must have shape \(\) or \(1,\)"):
        ops.solve_args("op", A, B, torch.tensor(0.5), torch.tensor(0.5), torch.tensor(1.0), "bcd", 2, torch.ones(2))


def test_eager_wraps_a_function_for_torch_compile():
    calls = []
    f = ops.eager(lambda x, y=0: calls.append((x, y)) or x + y, "a graph break here")
    assert f(1, y=2) == 3 and calls == [(1, 2)]


_FRESH = r"""
import sys
import torch
import tropfast
assert "torch._dynamo" not in sys.modules, "import tropfast loaded torch._dynamo"
A = torch.randn(2, 4, 16, dtype=torch.float64)
B = torch.randn(2, 12, 4, dtype=torch.float64)
eager = tropfast.solve(A, B, 1e-3, 1e-3, steps=5, tol=1e-9).A_hat  # the plain function runs
assert "torch._dynamo" not in sys.modules
import torch._dynamo  # noqa: E402 - after tropfast, as a user's torch.compile does
fn = lambda A, B: tropfast.solve(A, B, 1e-3, 1e-3, steps=5, tol=1e-9).A_hat  # noqa: E731
explained = torch._dynamo.explain(fn)(A, B)
reasons = [str(b.reason) for b in explained.break_reasons]
assert len(reasons) == 1 and "tropfast.solve(tol=...)" in reasons[0], reasons
torch.testing.assert_close(torch.compile(fn)(A, B), eager)
print("ok")
"""


def test_import_leaves_dynamo_alone_and_a_later_compile_breaks_at_the_named_place():
    """``import tropfast`` does not import torch._dynamo (half its time); torch.compile, which
    imports it later, still finds the eager parts disabled, with their reasons."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(tropfast.__file__))] + sys.path))
    r = subprocess.run([sys.executable, "-c", _FRESH], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_eager_runs_the_function_until_dynamo_and_its_disabled_form_after(monkeypatch):
    import sys

    made = []
    monkeypatch.setattr(ops, "_WHEN_DYNAMO", [])
    monkeypatch.setattr(torch.compiler, "disable", lambda fn, reason=None: made.append(reason) or (lambda *a: ("disabled", fn(*a))))
    monkeypatch.delitem(sys.modules, "torch._dynamo", raising=False)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))  # the watcher eager() adds goes with the test
    f = ops.eager(lambda x: x + 1, "why")
    assert f(1) == 2 and made == []
    assert sum(isinstance(m, ops._DynamoWatch) for m in sys.meta_path) == 1
    ops._make_disabled()
    assert made == ["why"] and f(1) == ("disabled", 2)
    ops._make_disabled()  # once only
    assert made == ["why"]
