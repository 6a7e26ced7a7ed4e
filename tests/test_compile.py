"""The public API under torch.compile(fullgraph=True), torch.export, meta and fake tensors.

Graph breaks are counted with ``torch._dynamo.explain``; results are compared with eager.
On CPU the compiled graphs run through inductor's C++ backend, so these tests need a C++
compiler (they are skipped, with the reason, where there is none).
"""
from __future__ import annotations

import shutil

import pytest
import torch
from tolerances import random_adapter
from torch._subclasses.fake_tensor import FakeTensorMode

import tropfast

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="inductor needs a C++ compiler on CPU")

XS = random_adapter(2, 4, 12, 10, dtype=torch.float32, seed=3)
PUBLIC = {
    "generators": lambda A, B, Ah, Bh: tropfast.generators(A, B)[0].sum(),
    "hsd_loss": lambda A, B, Ah, Bh: tropfast.hsd_loss(A, B, Ah, Bh).sum(),
    "hsd_grad": lambda A, B, Ah, Bh: tropfast.hsd_grad(A, B, Ah, Bh)[1],
    "soft_threshold": lambda A, B, Ah, Bh: tropfast.soft_threshold(A, 0.1),
    "soft_threshold per adapter": lambda A, B, Ah, Bh: tropfast.soft_threshold(A, torch.tensor([0.1, 0.2])),
    "prox_step": lambda A, B, Ah, Bh: tropfast.prox_step(A, B, Ah, Bh, 0.05, 0.1, 0.1)[1],
    "solve ista": lambda A, B, Ah, Bh: tropfast.solve(A, B, 1e-3, 1e-3, steps=10).A_hat,
    "solve fista lr": lambda A, B, Ah, Bh: tropfast.solve(A, B, 1e-3, 1e-3, method="fista", steps=5, lr=0.05).B_hat,
    "solve bcd sorted": lambda A, B, Ah, Bh: tropfast.solve(A, B, 0.1, 0.1, method="bcd", steps=7, path="sorted").A_hat,
    "solve objective": lambda A, B, Ah, Bh: tropfast.solve(A, B, 0.1, 0.1, method="bcd", steps=7).objective,
    "solve torch backend": lambda A, B, Ah, Bh: tropfast.solve(A, B, 0.1, 0.1, steps=4, backend="torch").A_hat,
}


@pytest.mark.parametrize("name", list(PUBLIC))
def test_public_function_traces_without_graph_breaks(name):
    torch._dynamo.reset()
    fn = PUBLIC[name]
    explained = torch._dynamo.explain(fn)(*XS)
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
    assert explained.graph_count == 1
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(*XS)
    torch.testing.assert_close(got, fn(*XS))


@pytest.mark.parametrize("kw, where", [(dict(tol=1e-6), "tol"), (dict(target_keep=0.5), "target_keep")])
def test_data_dependent_features_break_once_at_a_named_place(kw, where):
    torch._dynamo.reset()
    fn = lambda A, B: tropfast.solve(A, B, 1e-3, 1e-3, steps=20, **kw).A_hat  # noqa: E731
    explained = torch._dynamo.explain(fn)(*XS[:2])
    # one break, at the named place (dynamo counts it in graph_break_count only when a graph
    # follows it, which depends on what solve does after the eager part)
    assert len(explained.break_reasons) == 1
    assert f"tropfast.solve({where}=...)" in str(explained.break_reasons[0].reason)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn)(*XS[:2]), fn(*XS[:2]))


def test_shape_errors_are_raised_while_tracing():
    A, B, Ah, Bh = XS
    with pytest.raises(Exception, match="bottleneck mismatch"):
        torch.compile(lambda a, b: tropfast.hsd_grad(a, b, a, b), fullgraph=True)(A, B[:, :, :3])


def test_eager_mode_keeps_the_value_checks():
    A, B, Ah, Bh = XS
    bad = A.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="A contains non-finite values"):
        tropfast.hsd_grad(bad, B, Ah, Bh)
    with pytest.raises(ValueError, match="A contains non-finite values"):
        tropfast.solve(bad, B, steps=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("L", [None, 3])
def test_meta_tensors_flow_through_every_public_function(dtype, L):
    lead = () if L is None else (L,)
    A = torch.empty(*lead, 4, 7, dtype=dtype, device="meta")
    B = torch.empty(*lead, 5, 4, dtype=dtype, device="meta")
    G1, _ = tropfast.generators(A, B)
    assert G1.shape == (*lead, 5, 4, 7) and G1.dtype == dtype and G1.device.type == "meta"
    assert tropfast.hsd_loss(A, B, A, B).shape == lead
    loss, gA, gB = tropfast.hsd_grad(A, B, A, B)
    assert gA.shape == A.shape and gB.shape == B.shape and gA.dtype == dtype
    assert tropfast.soft_threshold(A, 0.3).shape == A.shape
    nA, nB = tropfast.prox_step(A, B, A, B, 0.1, 0.1, 0.1)
    assert nA.shape == A.shape and nB.dtype == dtype
    for method in ("ista", "bcd"):
        for path in ("dense", "sorted"):
            sol = tropfast.solve(A, B, 0.1, 0.1, method=method, steps=3, path=path)
            assert sol.A_hat.shape == A.shape and sol.A_hat.dtype == dtype and sol.A_hat.device.type == "meta"
            assert sol.objective.shape == (L or 1, 2) and sol.kept_fraction.shape == (L or 1,)


def test_fake_tensors_flow_through_every_public_function():
    with FakeTensorMode() as mode:
        A, B, Ah, Bh = (mode.from_tensor(x) for x in XS)
        assert tropfast.generators(A, B)[0].shape == (2, 10, 4, 12)
        assert tropfast.hsd_loss(A, B, Ah, Bh).shape == (2,)
        assert tropfast.hsd_grad(A, B, Ah, Bh)[2].shape == B.shape
        assert tropfast.soft_threshold(A, 0.1).shape == A.shape
        assert tropfast.prox_step(A, B, Ah, Bh, 0.1, 0.1, 0.1)[0].shape == A.shape
        assert tropfast.solve(A, B, steps=3).B_hat.shape == B.shape


class _Step(torch.nn.Module):
    def forward(self, A, B, Ah, Bh):
        loss, gA, gB = tropfast.hsd_grad(A, B, Ah, Bh)
        nA, nB = tropfast.prox_step(A, B, Ah, Bh, 0.05, 0.1, 0.1)
        return loss.sum(), gA, nA, nB


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_runs_and_matches_eager(strict):
    program = torch.export.export(_Step(), XS, strict=strict)
    names = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("tropfast.hsd_grad" in n for n in names) and any("tropfast.prox_step" in n for n in names), names
    other = random_adapter(2, 4, 12, 10, dtype=torch.float32, seed=4)
    for got, want in zip(program.module()(*other), _Step()(*other)):
        torch.testing.assert_close(got, want)


def test_backend_resolution_is_cached_and_traceable():
    tropfast.backends.clear_cache()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(PUBLIC["hsd_grad"])(*XS)  # the first resolution happens while tracing
    assert explained.graph_break_count == 0
    assert tropfast.backends.resolve(None, torch.device("cpu"), torch.float32) in ("cpu", "torch")
