"""pathguard detector math, classifiers and offline tooling (no serving dependencies)."""

from pathguard.models.bundle import load_classifier

__all__ = ["load_classifier"]
