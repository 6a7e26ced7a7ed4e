"""Adapter placement by gradient rank (after Nowak et al. 2024): candidates, scores, selection, installation.

    from tropfast import placement
    scores = placement.score(model, batches, rtol=1e-2)        # every candidate, one backward per batch
    plan = placement.select(scores, budget=30_000, r=8)          # the best that fit in the budget
    inst = placement.apply(model, plan, name="place")            # AdapterHub adapters + hook adapters
    tropfast.prune(model, keep=0.3, pattern=inst.pattern)        # prune them all together
    placement.save(model, "out/place", name="place")

Candidates are sequential and parallel adapters after attention and after the FFN of every
layer (what AdapterHub expresses) and long-range connections from the embeddings or an
earlier block's output to a later layer's FFN.  Recurrent connections are not offered.
The paper publishes no code: the estimator details (G summed over the batches, the rank
tolerance, the insertion points of long-range connections) are this project's choices and
are documented where they are made.
"""
from __future__ import annotations

from typing import Sequence, Union

from torch import nn

from .candidates import KINDS, STANDARD_KINDS, Candidate, parse_id
from .candidates import candidates as _candidates
from .install import CONTAINER, InstalledPlacement, PlacedAdapter, apply, installed, load, remove, save
from .scoring import DEFAULT_RTOL, CandidateScore, Scores, rank_from_singular_values, score
from .selection import STRATEGIES, Placement, every_layer, load_placement, random, select
from .sites import Sites, UnsupportedModelError, find_sites

__all__ = [
    "CONTAINER",
    "DEFAULT_RTOL",
    "KINDS",
    "STANDARD_KINDS",
    "STRATEGIES",
    "Candidate",
    "CandidateScore",
    "InstalledPlacement",
    "PlacedAdapter",
    "Placement",
    "Scores",
    "Sites",
    "UnsupportedModelError",
    "apply",
    "candidates",
    "every_layer",
    "find_sites",
    "installed",
    "load",
    "load_placement",
    "parse_id",
    "random",
    "rank_from_singular_values",
    "remove",
    "save",
    "score",
    "select",
]


def candidates(model: Union[nn.Module, Sites], kinds: Sequence[str] = KINDS) -> list[Candidate]:
    """Every candidate connection of ``model`` of the given kinds (seq, par, long), in canonical order."""
    sites = model if isinstance(model, Sites) else find_sites(model)
    return _candidates(sites, tuple(kinds))
