"""Prune many saved adapters from their files, without loading a backbone.

    import tropfast
    report = tropfast.prune_saved(["adapters/"], "pruned/", keep=0.3, score="tropical")
    print(report.table())

Sources, output formats and the distributed mode: see ``engine``, ``sources``,
``writers`` and ``dist``.
"""

from __future__ import annotations

from .engine import DATA_FREE_SCORES, FleetReport, parse_memory, prune_saved
from .sources import DEFAULT_DOWN_KEY, DEFAULT_UP_KEY, SourceError, UnsupportedSourceError, discover

__all__ = [
    "DATA_FREE_SCORES",
    "DEFAULT_DOWN_KEY",
    "DEFAULT_UP_KEY",
    "FleetReport",
    "SourceError",
    "UnsupportedSourceError",
    "discover",
    "parse_memory",
    "prune_saved",
]
