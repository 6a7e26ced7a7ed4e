"""The oracle itself, against the papers' definitions written as plain loops."""
import torch
from tolerances import random_adapter

from tropfast import reference


def _generators_loops(A, B):
    d_out, r = B.shape
    d_in = A.shape[1]
    G1 = torch.zeros(d_out, r, d_in, dtype=A.dtype)
    G2 = torch.zeros(d_out, r, d_in, dtype=A.dtype)
    for j in range(d_out):
        for i in range(r):
            G1[j, i] = max(float(B[j, i]), 0.0) * A[i]
            G2[j, i] = max(-float(B[j, i]), 0.0) * A[i]
    return G1, G2


def test_generators_match_definition():
    A, B, _, _ = random_adapter(None, 4, 6, 5)
    G1, G2 = reference.generators_ref(A, B)
    E1, E2 = _generators_loops(A, B)
    assert torch.equal(G1, E1) and torch.equal(G2, E2)
    # B = relu(B) - relu(-B): the two zonotopes recombine into Diag(B_j)·A
    assert torch.allclose(G1 - G2, B.unsqueeze(-1) * A.unsqueeze(0))


def test_loss_zero_at_start_and_symmetric():
    A, B, Ah, Bh = random_adapter(None, 3, 5, 4)
    assert float(reference.hsd_loss_ref(A, B, A, B)) == 0.0
    assert torch.allclose(reference.hsd_loss_ref(A, B, Ah, Bh), reference.hsd_loss_ref(Ah, Bh, A, B))


def test_batched_reference_is_per_adapter():
    A, B, Ah, Bh = random_adapter(3, 2, 5, 4)
    batched = reference.hsd_loss_ref(A, B, Ah, Bh)
    single = torch.stack([reference.hsd_loss_ref(A[k], B[k], Ah[k], Bh[k]) for k in range(3)])
    assert torch.allclose(batched, single)


def test_soft_threshold_ref_definition():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], dtype=torch.float64)
    assert torch.equal(reference.soft_threshold_ref(x, 1.0), torch.tensor([-1.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
