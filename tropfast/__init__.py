"""tropfast: prune bottleneck adapters by their tropical characterization.

    import tropfast
    sol = tropfast.solve(A, B, lam1=1e-3, lam2=1e-3, method="ista", steps=100)
    sol.A_hat, sol.B_hat, sol.kept_fraction

Layers, bottom up (docs/design.md §5): ``ops`` (the op contract) <- ``backends`` (torch,
native cpu/cuda, triton) <- ``functional`` (the public op wrappers) and ``solver``
(``solve``) <- ``pruning`` (the driver) <- ``demo`` and ``cli``.
"""
from __future__ import annotations

from . import backends, ops
from .backends import BackendUnavailable
from .backends import native as _native
from .fleet import FleetReport, prune_saved
from .functional import generators, hsd_grad, hsd_loss, prox_step, soft_threshold
from .pruning import PruneReport, export_adapter, find_adapters, load_sparse_adapter, prune
from .solver import Solution, pad_adapters, safe_lr, solve

# Register the compiled CPU/CUDA kernels (if built) on the ops of tropfast.ops.
_native.load()

__version__ = "0.1.0"
__all__ = [
    "BackendUnavailable",
    "FleetReport",
    "PruneReport",
    "Solution",
    "backends",
    "export_adapter",
    "find_adapters",
    "generators",
    "hsd_grad",
    "hsd_loss",
    "load_sparse_adapter",
    "ops",
    "pad_adapters",
    "prox_step",
    "prune",
    "prune_saved",
    "safe_lr",
    "soft_threshold",
    "solve",
]
