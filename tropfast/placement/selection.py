"""Placements: which connections get an adapter of bottleneck width r, under a parameter budget.

* ``select``       the top candidates by gradient rank (ties by ‖G‖_F, then canonical order);
* ``random``       a seeded random choice from the extended space (seq, par, long-range) or
                   from the standard space (seq, par: what AdapterHub expresses);
* ``every_layer``  AdapterHub's default: a sequential adapter after the FFN of every layer.

The budget counts adapter parameters: ``unit="params"`` (weights and biases, the default) or
``unit="weights"`` (the A and B entries only, the unit the pruning driver reports).  The
selection walks the candidates in order and takes each one that still fits, so the total
never exceeds the budget.
"""
from __future__ import annotations

import json
import os
import random as _random
import tempfile
from dataclasses import dataclass, field
from typing import Sequence, Union

from torch import nn

from .candidates import STANDARD_KINDS, Candidate
from .candidates import candidates as _candidates
from .scoring import Scores
from .sites import Sites, find_sites

__all__ = ["FORMAT", "STRATEGIES", "Placement", "select", "random", "every_layer", "load_placement"]

FORMAT = "tropfast.placement"
VERSION = 1
STRATEGIES = ("gradient_rank", "random", "random_standard", "every_layer", "manual")
UNITS = ("params", "weights")

Pool = Union[Scores, Sites, nn.Module, Sequence[Candidate]]


@dataclass
class Placement:
    """The chosen connections, their bottleneck width r and how they were chosen."""

    connections: list[Candidate]
    r: int
    strategy: str = "manual"
    budget: int | None = None
    unit: str = "params"
    n_layers: int | None = None
    hidden: int | None = None
    info: dict = field(default_factory=dict)  # scores of the chosen connections, rtol, seed, ...

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        ids = [c.id for c in self.connections]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"connection(s) listed twice: {', '.join(dup)}")
        for c in self.connections:
            c.check(self.n_layers)

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.connections]

    def weights(self) -> int:
        return sum(c.weights(self.r) for c in self.connections)

    def params(self) -> int:
        return sum(c.params(self.r) for c in self.connections)

    def size(self, unit: str | None = None) -> int:
        return self.weights() if (unit or self.unit) == "weights" else self.params()

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "strategy": self.strategy,
            "r": self.r,
            "budget": self.budget,
            "unit": self.unit,
            "n_layers": self.n_layers,
            "hidden": self.hidden,
            "weights": self.weights(),
            "params": self.params(),
            "connections": [c.to_dict() for c in self.connections],
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Placement:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a tropfast placement (format={d.get('format')!r}, expected {FORMAT!r})")
        if int(d.get("version", 0)) > VERSION:
            raise ValueError(f"placement version {d.get('version')} is newer than this tropfast reads ({VERSION})")
        conns = [Candidate.from_dict(c) for c in d["connections"]]
        return cls(conns, int(d["r"]), d.get("strategy", "manual"), d.get("budget"), d.get("unit", "params"),
                   d.get("n_layers"), d.get("hidden"), dict(d.get("info") or {}))

    def save(self, path: str | os.PathLike) -> str:
        """Write the placement as JSON (atomically: a temporary file, then a rename)."""
        path = os.path.abspath(os.fspath(path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path

    def summary(self) -> str:
        budget = f", budget {self.budget} {self.unit}" if self.budget is not None else ""
        ids = ": " + ", ".join(self.ids) if self.connections else ""
        return (f"{self.strategy}: {len(self.connections)} adapter(s) of r={self.r}, {self.params()} parameters "
                f"({self.weights()} weights){budget}{ids}")


def load_placement(path: str | os.PathLike) -> Placement:
    """A placement written by ``Placement.save`` (or the ``tropfast place`` command)."""
    with open(os.fspath(path)) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    return Placement.from_dict(d)


def _check_budget(budget, r, unit) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be a non-negative integer number of {unit}, got {budget!r}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r}: choose 'params' or 'weights'")


def _pool(pool: Pool) -> tuple[list[Candidate], int | None, int | None]:
    if isinstance(pool, Scores):
        return [s.candidate for s in pool.items], pool.n_layers, pool.hidden
    if isinstance(pool, nn.Module):
        pool = find_sites(pool)
    if isinstance(pool, Sites):
        return _candidates(pool), pool.n_layers, pool.hidden
    cands = list(pool)
    if not all(isinstance(c, Candidate) for c in cands):
        raise TypeError("expected Scores, a model, its Sites or a list of Candidate")
    return cands, None, None


def _fill(order: Sequence[Candidate], budget: int, r: int, unit: str) -> list[Candidate]:
    out, used = [], 0
    for c in order:
        size = c.weights(r) if unit == "weights" else c.params(r)
        if used + size <= budget:
            out.append(c)
            used += size
    return out


def select(
    scores: Scores, budget: int, r: int, *, unit: str = "params", kinds: Sequence[str] | None = None
) -> Placement:
    """The best candidates by gradient rank whose adapters of width r fit in ``budget``.

    Candidates are taken best first (rank, then ‖G‖_F, then canonical order) while they fit,
    so the result is deterministic for given scores.  kinds: restrict to these kinds.
    """
    if not isinstance(scores, Scores):
        raise TypeError(f"select takes the Scores returned by tropfast.placement.score, got {type(scores).__name__}")
    _check_budget(budget, r, unit)
    ranked = [s for s in scores.ranked() if kinds is None or s.candidate.kind in kinds]
    chosen = _fill([s.candidate for s in ranked], budget, r, unit)
    keep = {c.id for c in chosen}
    info = {"rtol": scores.rtol, "tokens": scores.tokens, "batches": scores.batches,
            "scores": [s.to_dict() for s in ranked if s.candidate.id in keep]}
    return Placement(chosen, r, "gradient_rank", budget, unit, scores.n_layers, scores.hidden, info)


def random(
    pool: Pool, budget: int, r: int, *, seed: int = 0, space: str = "extended", unit: str = "params"
) -> Placement:
    """A seeded random placement under ``budget``: from the ``extended`` space (every candidate
    in ``pool``) or the ``standard`` one (seq and par only)."""
    _check_budget(budget, r, unit)
    if space not in ("extended", "standard"):
        raise ValueError(f"space={space!r}: choose 'extended' or 'standard'")
    cands, n_layers, hidden = _pool(pool)
    if space == "standard":
        cands = [c for c in cands if c.kind in STANDARD_KINDS]
    order = list(cands)
    _random.Random(int(seed)).shuffle(order)
    chosen = _fill(order, budget, r, unit)
    pos = {c.id: i for i, c in enumerate(cands)}
    chosen.sort(key=lambda c: pos[c.id])
    strategy = "random" if space == "extended" else "random_standard"
    return Placement(chosen, r, strategy, budget, unit, n_layers, hidden, {"seed": int(seed), "space": space})


def every_layer(pool: Pool, r: int, *, location: str = "ffn", kind: str = "seq") -> Placement:
    """One adapter of width r at ``location`` of every layer (default: AdapterHub's seq_bn after the FFN)."""
    if kind not in STANDARD_KINDS:
        raise ValueError(f"every_layer places seq or par adapters, not {kind!r}")
    cands, n_layers, hidden = _pool(pool)
    chosen = [c for c in cands if c.kind == kind and c.location == location]
    if not chosen:
        raise ValueError(f"no {kind} candidate at location {location!r}")
    return Placement(chosen, r, "every_layer", None, "params", n_layers, hidden, {"location": location, "kind": kind})
