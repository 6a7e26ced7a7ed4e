"""tropfast._threads: the intra-op thread count for a block of work."""
import pytest
import torch

from tropfast._threads import intra_op_threads
from tropfast.fleet import scoring
from tropfast.pruning.scores import tropical_lambdas


def test_intra_op_threads_sets_and_restores(monkeypatch):
    state = {"n": 3}
    sets = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: state["n"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: sets.append(n) or state.update(n=n))
    with intra_op_threads(None):
        assert state["n"] == 3
    with intra_op_threads(3):  # already so: nothing set
        pass
    assert sets == []
    with intra_op_threads(1):
        assert state["n"] == 1
    assert state["n"] == 3 and sets == [1, 3]
    with pytest.raises(RuntimeError), intra_op_threads(2):
        raise RuntimeError("inside")
    assert state["n"] == 3 and sets == [1, 3, 2, 3]


def test_the_fleet_uses_the_same_helper():
    assert scoring.intra_op_threads is intra_op_threads


def test_tropical_lambdas_do_not_depend_on_the_thread_count():
    # a RoBERTa-base adapter's matrices (36,864 entries) are summed in two parts on two threads
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(48, 768, generator=g) * 0.05 for _ in range(3)]
    Bs = [torch.randn(768, 48, generator=g) * 0.05 for _ in range(3)]
    before = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            got.append(tropical_lambdas(As, Bs, 0.5))
            assert torch.get_num_threads() == n, "the thread count must be restored"
    finally:
        torch.set_num_threads(before)
    for lam1, lam2 in got[1:]:
        assert torch.equal(lam1, got[0][0]) and torch.equal(lam2, got[0][1])
