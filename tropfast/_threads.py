"""torch's intra-op thread count, set for a block of work and restored after.

Two users: ``prune_saved`` runs its small per-matrix steps on one thread and its solves on
all of them (docs/design.md §7), and ``pruning.scores.tropical_lambdas`` sums on one thread
so that its λ, and with them the solution, do not depend on the thread count (a full sum or
dot of a large tensor is split over the threads, which changes its rounding).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside (None: left as it is), restored after.

    prune_saved computes its per-matrix steps (sums, abs, masks) on one thread and its solves
    on all of them: on a machine whose cores also run the reading and writing threads, an op
    on a few hundred KB spread over a team costs several times its one-thread time in waking
    the team, while a solve over a whole batch scales with the threads (docs/design.md §7).
    """
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
