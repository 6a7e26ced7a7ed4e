"""Whether Triton runs compiled or in its interpreter (TRITON_INTERPRET=1): decided in one place."""
from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors)."""
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except (ImportError, AttributeError):  # no triton, or triton < 3.4 without knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
