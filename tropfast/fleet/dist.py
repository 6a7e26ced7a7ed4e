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
of the candidates' next 16 bits (2 rounds pin a float32 value, 4 a float64 one); then the
same among the tied scores on |W|, then on the position.  That is exactly the ranking of
``tropfast.pruning.allocation`` (score desc, then |W| desc, then position asc), so the
masks are identical to one process's.  It works part by part (one per weight matrix), in
NumPy on the host: no concatenation, and positions only for the tied elements.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["Ctx", "init", "lpt", "select_top"]

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


_DIGIT = 16  # bits of the score value decided per round (a 65 536-bin histogram)


def _np(t: Tensor) -> np.ndarray:
    t = t.detach().to("cpu").reshape(-1)
    if t.dtype in (torch.bfloat16, torch.float16):  # (no NumPy bfloat16; float32 holds both exactly)
        t = t.float()
    return t.numpy()


def order_keys(x: np.ndarray) -> np.ndarray:
    """Unsigned integer keys (uint32 for float32, uint64 for float64) with the order of the
    float values (x not NaN; -0.0 counts as 0.0): the sign bit flipped for positive values,
    every bit for negative ones."""
    x = x + x.dtype.type(0)  # -0.0 + 0.0 = 0.0 (and a copy the views below may own)
    bits = 8 * x.itemsize
    it, ut = {32: (np.int32, np.uint32), 64: (np.int64, np.uint64)}[bits]
    flip = (x.view(it) >> it(bits - 1)).view(ut) | ut(1 << (bits - 1))
    return x.view(ut) ^ flip


def _kth_largest(keys: list[np.ndarray], n: int, bits: int, ctx: Ctx) -> tuple[int, int, int]:
    """The key t of the n-th largest of every rank's ``keys`` (1 <= n <= their global count),
    how many of the elements equal to t are within the top n, and how many equal t in all.

    Each round all-reduces a histogram of the candidates' next 16 bits and keeps the
    candidates whose digit is the one holding the n-th largest: bits/16 rounds, the first over
    every key, the later ones over the few left."""
    need, prefix, eq = n, 0, 0
    cand = keys
    for shift in range(bits - _DIGIT, -1, -_DIGIT):
        digits = [((c >> c.dtype.type(shift)) & c.dtype.type(0xFFFF)).astype(np.intp) for c in cand]
        hist = np.zeros(1 << _DIGIT, dtype=np.int64)
        for d in digits:
            hist += np.bincount(d, minlength=1 << _DIGIT)
        hist = ctx.all_sum(torch.from_numpy(hist)).numpy()
        rev = np.cumsum(hist[::-1])
        j = int(np.searchsorted(rev, need))  # the first digit (from the top) reaching n
        digit = (1 << _DIGIT) - 1 - j
        eq = int(hist[digit])
        need -= int(rev[j]) - eq
        prefix |= digit << shift
        cand = [c[d == digit] for c, d in zip(cand, digits)]
    return prefix, need, eq


def select_top(
    P: list[Tensor],
    S: list[Tensor],
    pos: list[int | Tensor],
    n: int,
    ctx: Ctx,
    eligible: list[Tensor] | None = None,
) -> list[Tensor]:
    """Per part, the mask of its elements in the global top ``n`` by (P desc, S desc, position asc).

    P, S: this rank's parts of the scores and of the tie-break scores (finite tensors, any
    shape; a mask has its part's shape).  pos: per part, the global position of its first
    element (its elements follow in storage order) or a tensor of its elements' positions;
    positions are unique over all ranks.  eligible: per part, the elements taking part
    (default all).  Every rank calls this with the same n (and may hold no parts).

    Scores rank in float32 when every rank's are float32 (two rounds), else in float64 (four);
    the tie-break scores and positions only for the elements tied at the cut.
    """
    Pa = [_np(p) for p in P]
    el = None if eligible is None else [_np(e).astype(bool) for e in eligible]
    count = sum(a.size for a in Pa) if el is None else sum(int(np.count_nonzero(e)) for e in el)
    wide = any(a.dtype != np.float32 for a in Pa)
    total, wide_any = (int(v) for v in ctx.all_sum(torch.tensor([count, int(wide)], dtype=torch.int64)).tolist())
    out = [np.zeros(a.size, dtype=bool) for a in Pa]
    if 0 < n < total:
        ft = np.float64 if wide_any else np.float32
        keys = [order_keys(a.astype(ft, copy=False)) for a in Pa]
        cand = keys if el is None else [k[e] for k, e in zip(keys, el)]
        t, need, eq = _kth_largest(cand, n, 8 * np.dtype(ft).itemsize, ctx)
        t = keys[0].dtype.type(t) if keys else t
        ties = []
        for m, k, e in zip(out, keys, el or [None] * len(keys)):
            np.greater(k, t, out=m)
            tie = k == t
            if e is not None:
                m &= e
                tie &= e
            ties.append(np.flatnonzero(tie))
        _break_ties(out, ties, S, pos, need, eq, ctx)
    elif n >= total:
        out = [np.ones(a.size, dtype=bool) for a in Pa] if el is None else [e.copy() for e in el]
    return [torch.from_numpy(m).view(p.shape).to(p.device) for m, p in zip(out, P)]


def _break_ties(out, ties, S, pos, need: int, eq: int, ctx: Ctx) -> None:
    """Keep ``need`` of the ``eq`` elements tied at the cut (indices ``ties`` per part): the
    best by tie-break score, then the lowest positions."""
    if need == eq:
        for m, ix in zip(out, ties):
            m[ix] = True
        return
    ks = [order_keys(_np(s)[ix].astype(np.float64)) for s, ix in zip(S, ties)]
    t, need, eq = _kth_largest(ks, need, 64, ctx)
    t = np.uint64(t)
    left = []
    for m, ix, k in zip(out, ties, ks):
        m[ix[k > t]] = True
        left.append(ix[k == t])
    if need == eq:
        for m, ix in zip(out, left):
            m[ix] = True
        return
    # the lowest positions first: the largest keys of (2^63 - 1 - position)
    top = np.iinfo(np.int64).max
    kq = [
        (top - (p + ix if isinstance(p, int) else _np(p).astype(np.int64)[ix])).astype(np.uint64)
        for p, ix in zip(pos, left)
    ]
    t, _, _ = _kth_largest(kq, need, 64, ctx)
    for m, ix, k in zip(out, left, kq):
        m[ix[k >= np.uint64(t)]] = True
