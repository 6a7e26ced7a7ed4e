"""The ``cpu`` and ``cuda`` backends: kernels compiled from csrc/ into ``tropfast._C``.

The extension registers CPU (and, when built with CUDA, CUDA) kernels for the
``tropfast::`` ops with ``TORCH_LIBRARY_IMPL``; loading it is all this module does.  It is
optional: when it is missing or ``TROPFAST_FORCE_FALLBACK=1`` is set, tropfast runs on the
closed form and ``status()`` says why.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType

_ext: ModuleType | None = None
_error: str | None = None
_loaded = False


def load() -> ModuleType | None:
    """Import the compiled extension once; never raises."""
    global _ext, _error, _loaded
    if _loaded:
        return _ext
    _loaded = True
    if os.environ.get("TROPFAST_FORCE_FALLBACK", "") not in ("", "0"):
        _error = "disabled by TROPFAST_FORCE_FALLBACK"
        return None
    if importlib.util.find_spec(f"{__package__.rsplit('.', 1)[0]}._C") is None:
        _error = "the compiled extension tropfast._C is not built"
    else:
        try:
            _ext = importlib.import_module(f"{__package__.rsplit('.', 1)[0]}._C")
            return _ext
        except (ImportError, OSError) as exc:
            _error = f"the compiled extension tropfast._C failed to load ({exc})"
    warnings.warn(
        f"tropfast: {_error}; running on the pure-PyTorch closed form. "
        "Reinstall with torch and a C++ compiler present (pip install --no-build-isolation .) to build it.",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


def status(name: str) -> tuple[bool, str]:
    """(available, reason) for ``name`` in {"cpu", "cuda"}."""
    ext = load()
    if ext is None:
        return False, _error or "not built"
    if name == "cpu":
        if not ext.has_cpu():
            return False, "the extension was built without CPU kernels"
        return True, f"native C++ kernels, {ext.num_threads()} OpenMP threads"
    if name == "cuda":
        if not ext.has_cuda():
            return False, "the extension was built without CUDA (no nvcc, or torch without CUDA)"
        import torch

        if not torch.cuda.is_available():
            return False, "built with CUDA but no CUDA device is visible"
        return True, f"CUDA C++ kernels on {torch.cuda.get_device_name()}"
    raise ValueError(name)
