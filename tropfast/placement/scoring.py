"""Gradient-rank score of every candidate connection, from one forward/backward per batch.

For a candidate c = (s, t), imagine a zero-initialised linear map W_c (d_t × d_s) that adds
``W_c h_s`` at the insertion point t.  At W_c = 0 the model is unchanged and

    G_c = ∂L/∂W_c = Σ_tokens δ_t h_sᵀ,        δ_t = ∂L/∂(insertion point t),

summed over the non-padding tokens of every batch (the same tokens for every candidate).
The score is the numerical rank of G_c: the number of singular values above
``rtol · σ_max`` (what ``torch.linalg.matrix_rank(G_c, rtol=rtol)`` returns); ties are
broken by ‖G_c‖_F.  The singular values come from one batched float64 SVD
(``torch.linalg.svdvals``) on a single thread: MKL's threaded SVD gains nothing on these
small matrices and stalls badly when the CPU is shared.

Instead of materialising one W_c per candidate, one zero tensor is added at each insertion
point, so a single backward gives every δ_t, and each G_c is one matmul of the cached δ_t
and h_s.  The backbone is frozen (no parameter gradient is computed) and
in eval mode (no dropout) while scoring.

Design choices of this project (the paper's estimator is not published): G_c is summed over
all batches before its rank is taken; the default tolerance is rtol = 1e-2 (singular values
under 1% of the largest are not counted) because with a few thousand tokens nearly every
G_c is numerically full rank at machine precision, so the torch default tolerance ranks
candidates by ‖G_c‖_F alone.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .candidates import KINDS, Candidate
from .candidates import candidates as _candidates
from .sites import Sites, find_sites

__all__ = ["DEFAULT_RTOL", "CandidateScore", "Scores", "score", "rank_from_singular_values"]

DEFAULT_RTOL = 1e-2


def rank_from_singular_values(sv: Tensor, rtol: float | None, shape: tuple[int, int] | None = None) -> int:
    """Count of singular values above rtol·σ_max, exactly as ``torch.linalg.matrix_rank`` counts them.

    rtol None: torch's default tolerance, eps(dtype)·max(m, n) for an m × n matrix (``shape``).
    """
    if sv.numel() == 0:
        return 0
    if rtol is None:
        m, n = shape if shape is not None else (sv.numel(), sv.numel())
        rtol = torch.finfo(sv.dtype).eps * max(m, n)
    tol = float(rtol) * float(sv.max())
    return int((sv > tol).sum())


@dataclass
class CandidateScore:
    """A candidate's gradient rank, ‖G‖_F and the singular values of G (descending)."""

    candidate: Candidate
    rank: int
    fro: float
    max_rank: int  # min(d_out, d_in, tokens): the largest rank G could have
    singular_values: Tensor | None = field(default=None, repr=False)
    grad: Tensor | None = field(default=None, repr=False)  # G itself, with score(..., keep_grads=True)

    @property
    def normalised_rank(self) -> float:
        return self.rank / self.max_rank if self.max_rank else 0.0

    def to_dict(self) -> dict:
        return {**self.candidate.to_dict(), "rank": self.rank, "fro": self.fro, "max_rank": self.max_rank}


@dataclass
class Scores:
    """Scores of every candidate (canonical order) and how they were taken."""

    items: list[CandidateScore]
    rtol: float | None
    tokens: int
    batches: int
    n_layers: int
    hidden: int
    time_s: float = 0.0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def ranked(self) -> list[CandidateScore]:
        """Best first: rank descending, then ‖G‖_F descending, then canonical order."""
        order = sorted(range(len(self.items)), key=lambda i: (-self.items[i].rank, -self.items[i].fro, i))
        return [self.items[i] for i in order]

    def get(self, cid: str) -> CandidateScore:
        for s in self.items:
            if s.candidate.id == cid:
                return s
        raise KeyError(f"no candidate {cid!r} among the scores")

    def rerank(self, rtol: float | None) -> Scores:
        """The same scores at another relative tolerance (needs the stored singular values)."""
        items = []
        for s in self.items:
            if s.singular_values is None:
                raise ValueError("these scores carry no singular values (loaded from JSON?); score again")
            shape = (s.candidate.d_out, s.candidate.d_in)
            rank = rank_from_singular_values(s.singular_values, rtol, shape)
            items.append(CandidateScore(s.candidate, rank, s.fro, s.max_rank, s.singular_values))
        return Scores(items, rtol, self.tokens, self.batches, self.n_layers, self.hidden, self.time_s)

    def to_dict(self) -> dict:
        return {
            "rtol": self.rtol,
            "tokens": self.tokens,
            "batches": self.batches,
            "n_layers": self.n_layers,
            "hidden": self.hidden,
            "time_s": self.time_s,
            "candidates": [s.to_dict() for s in self.items],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scores:
        items = [CandidateScore(Candidate.from_dict(c), int(c["rank"]), float(c["fro"]), int(c["max_rank"]))
                 for c in d["candidates"]]
        return cls(items, d.get("rtol"), int(d["tokens"]), int(d["batches"]), int(d["n_layers"]), int(d["hidden"]),
                   float(d.get("time_s", 0.0)))

    def table(self, top: int | None = None, selected: Iterable[str] = ()) -> str:
        """Ranked candidates, one per line; ``*`` marks the ids in ``selected``."""
        sel = set(selected)
        rows = [("#", "candidate", "kind", "rank", "max", "‖G‖_F", "")]
        for i, s in enumerate(self.ranked()[: top or None], 1):
            rows.append((str(i), s.candidate.id, s.candidate.kind, str(s.rank), str(s.max_rank), f"{s.fro:.4g}",
                         "*" if s.candidate.id in sel else ""))
        w = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
        head = (f"gradient rank of {len(self.items)} candidates (rtol {self.rtol:g}, {self.tokens} tokens in "
                f"{self.batches} batches, {self.time_s:.2f} s)" if self.rtol is not None else
                f"gradient rank of {len(self.items)} candidates (torch default tolerance, {self.tokens} tokens)")
        lines = [head]
        for j, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w[k]) if k in (1, 2) else c.rjust(w[k]) for k, c in enumerate(r)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * x for x in w).rstrip())
        return "\n".join(lines)


def _singular_values(stack: Tensor) -> Tensor:
    """Singular values (descending) of each matrix of a (n, m, k) float64 stack, on one thread."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return torch.linalg.svdvals(stack)
    finally:
        torch.set_num_threads(threads)


def _default_loss(model: nn.Module, batch) -> Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(*batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError("the model output has no .loss: pass loss_fn=lambda model, batch: <scalar loss>")
    return loss


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class _Probe:
    """Hooks that cache the sources and add a zero leaf at each insertion point."""

    def __init__(self, sites: Sites, cands: Sequence[Candidate]):
        self.sites = sites
        self.cache: dict[tuple, Tensor] = {}
        self.zs: dict[tuple, Tensor] = {}
        self.handles: list = []
        need_blk = sorted({c.source for c in cands if c.kind == "long"})
        need_in = sorted({(c.location, c.layer) for c in cands if c.kind == "par"})
        need_out = sorted({(c.location, c.layer) for c in cands if c.kind == "seq"})
        targets = sorted({(c.location, c.layer) for c in cands})
        for s in need_blk:
            mod = sites.embeddings if s == -1 else sites.layers[s]
            self.handles.append(mod.register_forward_hook(self._store(("blk", s))))
        for loc, layer in need_in:
            self.handles.append(
                sites.output_module(loc, layer).register_forward_pre_hook(
                    self._store_input(("in", loc, layer)), with_kwargs=True
                )
            )
        for loc, layer in need_out:
            self.handles.append(sites.output_module(loc, layer).register_forward_hook(self._store(("out", loc, layer))))
        for loc, layer in targets:
            dropout = sites.output_module(loc, layer).dropout
            self.handles.append(dropout.register_forward_hook(self._zero_leaf((loc, layer))))

    def _store(self, key):
        def hook(module, args, output):
            self.cache[key] = _first(output)

        return hook

    def _store_input(self, key):
        def hook(module, args, kwargs):
            x = args[1] if len(args) > 1 else kwargs.get("input_tensor")
            if x is None:
                raise RuntimeError(f"{type(module).__name__} was called without its residual input")
            self.cache[key] = x

        return hook

    def _zero_leaf(self, key):
        def hook(module, args, output):
            z = torch.zeros_like(output, requires_grad=True)
            self.zs[key] = z
            return output + z

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.cache.clear()
        self.zs.clear()

    def source(self, c: Candidate) -> Tensor:
        key = ("blk", c.source) if c.kind == "long" else (("in" if c.kind == "par" else "out"), c.location, c.layer)
        return self.cache[key]


def score(
    model: nn.Module,
    data: Iterable,
    *,
    loss_fn: Callable | None = None,
    batches: int = 4,
    rtol: float = DEFAULT_RTOL,
    kinds: Sequence[str] = KINDS,
    candidates: Sequence[Candidate] | None = None,
    keep_grads: bool = False,
    progress: bool = False,
) -> Scores:
    """Gradient rank of every candidate connection of ``model`` on the first ``batches`` of ``data``.

    data: an iterable of batches, each passed as ``model(**batch)`` (dict) or ``model(*batch)``;
    a dict's ``attention_mask`` marks the tokens counted (padding adds nothing to G anyway).
    loss_fn(model, batch) -> scalar tensor; default ``model(**batch).loss``.
    rtol: relative tolerance of the numerical rank (singular values above rtol·σ_max count).
    kinds / candidates: which connections to score (default: seq, par and long-range).
    keep_grads: keep each G_c (float64) on its score as ``.grad``.
    The model's parameters, their ``requires_grad`` flags and its train/eval mode are restored.
    """
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be a positive integer, got {batches!r}")
    if rtol is not None and (not isinstance(rtol, (int, float)) or not math.isfinite(rtol) or not 0 <= rtol < 1):
        raise ValueError(f"rtol must be a relative tolerance in [0, 1), got {rtol!r}")
    if data is None:
        raise ValueError("score needs data: an iterable of batches")
    sites = find_sites(model)
    cands = list(candidates) if candidates is not None else _candidates(sites, tuple(kinds))
    if not cands:
        raise ValueError("no candidate to score")
    for c in cands:
        c.check(sites.n_layers)
    loss_fn = loss_fn or _default_loss
    t0 = time.perf_counter()
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    by_target: dict[tuple, list[int]] = {}
    for i, c in enumerate(cands):
        by_target.setdefault((c.location, c.layer), []).append(i)
    G: list[Tensor | None] = [None] * len(cands)
    tokens = 0
    n = 0
    probe = _Probe(sites, cands)
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        it = data
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(data, total=batches, desc="gradient rank", unit="batch", leave=False)
        for batch in it:
            if n >= batches:
                break
            probe.cache.clear()
            probe.zs.clear()
            with torch.enable_grad():
                loss = loss_fn(model, batch)
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise ValueError("loss_fn must return a scalar tensor")
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss of batch {n} is {float(loss.detach())}; no score can be taken")
            keys = list(by_target)
            missing = [k for k in keys if k not in probe.zs]
            if missing:
                raise RuntimeError(f"the forward pass never reached the insertion point(s) {missing}")
            grads = torch.autograd.grad(loss, [probe.zs[k] for k in keys], allow_unused=True)
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            for k, g in zip(keys, grads):
                idx = by_target[k]
                if g is None:
                    g = torch.zeros_like(probe.zs[k])
                d = g.detach()
                xs = [probe.source(cands[i]).detach() for i in idx]
                if mask is not None and d.dim() == 3 and mask.shape == d.shape[:2]:
                    m = mask.to(d.device).bool()
                    d = d[m]
                    xs = [x[m] for x in xs]
                else:
                    d = d.reshape(-1, d.shape[-1])
                    xs = [x.reshape(-1, x.shape[-1]) for x in xs]
                # one matmul per insertion point: δᵀ [h_s1, h_s2, ...]
                prod = (d.T @ torch.cat(xs, dim=1).to(d.dtype)).to(torch.float64)
                off = 0
                for i, x in zip(idx, xs):
                    blk = prod[:, off : off + x.shape[1]]
                    off += x.shape[1]
                    G[i] = blk.clone() if G[i] is None else G[i] + blk
            tokens += int(mask.sum()) if mask is not None else int(d.shape[0])
            n += 1
    finally:
        probe.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    if n == 0:
        raise ValueError("data yielded no batch")
    items = []
    # singular values of every G at once per shape (usually one shape: hidden x hidden)
    shapes: dict[tuple, list[int]] = {}
    for i, g in enumerate(G):
        shapes.setdefault(tuple(g.shape), []).append(i)
    svs: list[Tensor | None] = [None] * len(cands)
    for idx in shapes.values():
        stack = torch.stack([G[i] for i in idx])
        if not torch.isfinite(stack).all():
            raise FloatingPointError("a gradient G_c is not finite")
        sv = _singular_values(stack)
        for j, i in enumerate(idx):
            svs[i] = sv[j]
    for i, c in enumerate(cands):
        g = G[i]
        max_rank = min(g.shape[0], g.shape[1], tokens)
        items.append(CandidateScore(c, rank_from_singular_values(svs[i], rtol, tuple(g.shape)),
                                    float(torch.linalg.matrix_norm(g)), max_rank, svs[i], g if keep_grads else None))
    return Scores(items, rtol, tokens, n, sites.n_layers, sites.hidden, time.perf_counter() - t0)
