"""The ``cpu`` and ``cuda`` backends: kernels compiled from csrc/ into ``tropfast._C``.

The extension registers CPU (and, when built with CUDA, CUDA) kernels for the
``tropfast::`` ops with ``TORCH_LIBRARY_IMPL``; the dispatcher then routes
``torch.ops.tropfast.*`` to them by device, so this backend's op table is
``ops.DISPATCHED``.  The extension is optional: when it is missing or
``TROPFAST_FORCE_FALLBACK=1`` is set, tropfast runs on the torch backend and ``status()``
says why.  What was built is read once, at load, so that later status queries call
nothing opaque (``torch.compile`` traces through them).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

from .. import ops
from ._status import BackendStatus

KERNELS = ops.DISPATCHED

_EXT = f"{__package__.rsplit('.', 1)[0]}._C"
_state: dict = {}


def load() -> bool:
    """Import the compiled extension once (registering its kernels); never raises."""
    if _state:
        return _state["loaded"]
    _state.update(loaded=False, error=None, has_cpu=False, has_cuda=False, threads=0, simd="generic")
    if os.environ.get("TROPFAST_FORCE_FALLBACK", "") not in ("", "0"):
        _state["error"] = "disabled by TROPFAST_FORCE_FALLBACK"
        return False
    if importlib.util.find_spec(_EXT) is None:
        _state["error"] = "the compiled extension tropfast._C is not built"
    else:
        try:
            ext = importlib.import_module(_EXT)
        except (ImportError, OSError) as exc:
            _state["error"] = f"the compiled extension tropfast._C failed to load ({exc})"
        else:
            _state.update(loaded=True, has_cpu=bool(ext.has_cpu()), has_cuda=bool(ext.has_cuda()))
            _state["threads"] = int(ext.num_threads())
            # the vector width of the ISTA/FISTA loops the CPU runs (csrc/cpu/ista_x86.h)
            _state["simd"] = str(ext.simd_level()) if hasattr(ext, "simd_level") else "generic"
            return True
    warnings.warn(
        f"tropfast: {_state['error']}; running on the pure-PyTorch kernels. "
        "Reinstall with torch and a C++ compiler present (pip install --no-build-isolation .) to build it.",
        RuntimeWarning,
        stacklevel=2,
    )
    return False


def available(name: str) -> bool:
    """Whether ``name`` ("cpu" or "cuda") can run here; reads only values kept at load (and,
    for cuda, whether a device is visible), so a ``torch.compile`` trace passes through it."""
    if not load():
        return False
    if name == "cpu":
        return _state["has_cpu"]
    return _state["has_cuda"] and torch.cuda.is_available()


def status(name: str) -> BackendStatus:
    """Whether ``name`` ("cpu" or "cuda") can run here, and why not."""
    if not load():
        return BackendStatus(name, False, _state["error"] or "not built")
    if name == "cpu":
        if not _state["has_cpu"]:
            return BackendStatus(name, False, "the extension was built without CPU kernels")
        loops = {"avx512": "AVX-512", "avx2": "AVX2"}.get(_state.get("simd", ""), "compiler-vectorised")
        return BackendStatus(name, True, f"native C++ kernels, {torch.get_num_threads()} OpenMP threads, {loops} solve loops")
    if name == "cuda":
        if not _state["has_cuda"]:
            return BackendStatus(name, False, "the extension was built without CUDA (no nvcc, or torch without CUDA)")
        if not torch.cuda.is_available():
            return BackendStatus(name, False, "built with CUDA but no CUDA device is visible")
        return BackendStatus(name, True, f"CUDA C++ kernels on {torch.cuda.get_device_name()}")
    raise ValueError(name)


def supports(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` handles tensors on ``device``, else the reason it does not."""
    if device.type != name:
        return f"it runs on {name.upper()} tensors, the input is on {device}"
    return None
