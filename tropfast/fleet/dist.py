"""torch.distributed for ``prune_saved``: the process group, sharding, and the exact global cut.

Under ``torchrun`` every rank runs ``prune_saved`` with the same arguments.  Rank 0 plans
(finds the sources, reads the resume state) and broadcasts the plan; sources go to ranks
greedily by size (largest first, each to the least-loaded rank); rank 0 gathers the
per-source records and writes the summary.  Each rank computes on ``cuda:LOCAL_RANK``
with nccl when GPUs exist, else on the CPU with gloo.

One large checkpoint is split over the ranks by adapter.  Its class-blind allocation
(``global``, or ``structured`` with ``structured_scope="global"``) needs the exact cut
over every rank's scores.  ``select_top`` finds it without moving scores: a bisection on
the bits of the score value, 16 bits per round, where each round all-reduces a histogram
of the candidates' next 16 bits (4 rounds pin a 64-bit value); then the same among the
tied scores on |W|, then on the position.  That is exactly the ranking of
``tropfast.pruning.allocation`` (score desc, then |W| desc, then position asc), so the
masks are identical to one process's.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Ctx", "init", "lpt", "select_top"]

_INT64_MIN = -(2**63)


@dataclass
class Ctx:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    created: bool = False  # this module initialised the process group (it is destroyed at exit)

    @property
    def is_dist(self) -> bool:
        return self.world > 1

    def _dev(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def all_sum(self, t: Tensor) -> Tensor:
        if not self.is_dist:
            return t
        import torch.distributed as dist

        x = t.to(self._dev())
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x.to(t.device)

    def all_true(self, flags: list[bool]) -> list[bool]:
        if not self.is_dist or not flags:
            return list(flags)
        import torch.distributed as dist

        x = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int64, device=self._dev())
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
        return [bool(v) for v in x.tolist()]

    def broadcast(self, obj):
        if not self.is_dist:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's obj on rank 0 (None elsewhere)."""
        if not self.is_dist:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_gather(self, obj) -> list:
        if not self.is_dist:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.is_dist:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Nothing to do per call: a group this module started lives until the process exits
        (re-initialising one under torchrun fails), and is destroyed then."""


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def init(distributed: bool | None = None, device: str | torch.device | None = None) -> Ctx:
    """The process context: joins (or starts, under torchrun) a process group when there is one.

    distributed: None detects (an initialised group, or WORLD_SIZE > 1 in the environment);
    False forces one process; True requires a group.
    """
    import torch.distributed as dist

    want = distributed
    if want is None:
        want = (dist.is_available() and dist.is_initialized()) or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not want:
        dev = (
            torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        return Ctx(device=dev)
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise RuntimeError(
                "distributed=True needs torchrun (or RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in the environment)"
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
        created = True
        atexit.register(_destroy)
    backend = dist.get_backend()
    if device is not None:
        dev = torch.device(device)
    elif backend == "nccl":
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda" and backend == "nccl":
        torch.cuda.set_device(dev)
    return Ctx(dist.get_rank(), dist.get_world_size(), local, dev, backend, created)


def lpt(sizes: list[int], world: int) -> list[list[int]]:
    """Greedy by size: largest first, each to the least-loaded rank (ties: lowest rank). Indices per rank, ascending."""
    load = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += sizes[i]
    return [sorted(x) for x in out]


def order_key(x: Tensor) -> Tensor:
    """int64 keys with the order of the float values (x finite; -0.0 counts as 0.0)."""
    b = (x.to(torch.float64) + 0.0).view(torch.int64)
    return torch.where(b >= 0, b, b ^ 0x7FFFFFFFFFFFFFFF)


def _kth_largest(keys: Tensor, n: int, ctx: Ctx) -> tuple[int, int, int]:
    """The key t of the n-th largest over all ranks (1 <= n <= global count), how many of the
    elements equal to t are within the top n, and how many equal t in all."""
    u = keys ^ _INT64_MIN  # unsigned order in the bits: digits can be read off by shifts
    cand = u
    need = n
    prefix = 0
    eq = 0
    for shift in (48, 32, 16, 0):
        d = (cand >> shift) & 0xFFFF
        hist = ctx.all_sum(torch.bincount(d, minlength=65536).to(torch.int64))
        rev = hist.flip(0).cumsum(0)
        j = int(torch.searchsorted(rev, torch.tensor([need], dtype=rev.dtype, device=rev.device)).item())
        digit = 65535 - j
        eq = int(hist[digit])
        need -= int(rev[j]) - eq
        cand = cand[d == digit]
        prefix |= digit << shift
    t = torch.tensor(prefix - (1 << 64) if prefix >= 1 << 63 else prefix, dtype=torch.int64) ^ _INT64_MIN
    return int(t), need, eq


def select_top(P: Tensor, S: Tensor, pos: Tensor, n: int, ctx: Ctx, eligible: Tensor | None = None) -> Tensor:
    """Local mask of the elements in the global top ``n`` by (P desc, S desc, pos asc).

    P, S: this rank's scores (1-D, finite); pos: their global positions (int64, unique
    over all ranks); eligible: the elements taking part (default all).  Every rank calls
    this with the same n.
    """
    el = torch.ones_like(P, dtype=torch.bool) if eligible is None else eligible
    total = int(ctx.all_sum(el.sum().reshape(1).to(torch.int64)).item())
    if n <= 0:
        return torch.zeros_like(el)
    if n >= total:
        return el.clone()
    kp = order_key(P)
    t1, need, eq = _kth_largest(kp[el], n, ctx)
    mask = el & (kp > t1)
    tie = el & (kp == t1)
    if need == eq:
        return mask | tie
    ks = order_key(S)
    t2, need, eq = _kth_largest(ks[tie], need, ctx)
    mask |= tie & (ks > t2)
    tie = tie & (ks == t2)
    if need == eq:
        return mask | tie
    # remaining ties on both: lowest positions first (position desc = key of -pos)
    kq = -pos.to(torch.int64)
    t3, _, _ = _kth_largest(kq[tie], need, ctx)
    return mask | (tie & (kq >= t3))
