"""pathguard detector math, classifiers and offline tooling (no serving dependencies).

Importing the package loads nothing heavy: ``import pathguard.models.errors`` needs neither torch, numba nor
onnx. :func:`load_classifier` is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathguard.models.bundle import load_classifier

__all__ = ["load_classifier"]


def __getattr__(name: str) -> Any:
    if name == "load_classifier":
        from pathguard.models.bundle import load_classifier

        return load_classifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
