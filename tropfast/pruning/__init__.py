"""Prune the bottleneck adapters of a model: discovery, scores, allocation, masks, export.

    import tropfast
    report = tropfast.prune(model, keep=0.3, score="tropical", allocation="layer")
    print(report.table())
    tropfast.export_adapter(model, "my_adapter", "out/my_adapter")
"""
from __future__ import annotations

from .allocation import ALLOCATIONS, kept_count
from .apply import AdapterReport, PruneReport, prune
from .discovery import AdapterInfo, UnsupportedAdapterError, find_adapters
from .export import export_adapter, load_sparse_adapter
from .masks import apply_masks, remove_masks
from .scores import SCORES, TROPICAL_DEFAULTS

__all__ = [
    "ALLOCATIONS",
    "AdapterInfo",
    "AdapterReport",
    "PruneReport",
    "SCORES",
    "TROPICAL_DEFAULTS",
    "UnsupportedAdapterError",
    "apply_masks",
    "export_adapter",
    "find_adapters",
    "kept_count",
    "load_sparse_adapter",
    "prune",
    "remove_masks",
]
