"""Why a source could not be pruned; each is reported in the summary, the run goes on."""

from __future__ import annotations

__all__ = ["CorruptFileError", "SourceError", "UnsupportedSourceError"]


class SourceError(ValueError):
    """A source that cannot be pruned: corrupt, malformed, or holding no bottleneck pairs."""


class UnsupportedSourceError(SourceError):
    """A well-formed source of a kind that cannot be pruned (LoRA, PHM, a non-ReLU activation, ...)."""


class CorruptFileError(SourceError):
    """A weights file that cannot be read as what it claims to be."""
