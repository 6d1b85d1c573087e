"""pathguard detector math, classifiers and offline tooling (no serving dependencies)."""

from models.io import load_classifier

__all__ = ["load_classifier"]
