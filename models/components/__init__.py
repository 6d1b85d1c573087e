"""Verdict components: one protocol (:class:`Component`), one registry (:data:`REGISTRY`), and the built-in
detectors on it: Effective Path, NIC and its value invariants, class-conditional Gaussians, and the
prediction-consistency family (logit margin, noise response, feature squeezing)."""

import pathguard.models.components.builtin  # noqa: F401 - registers the built-in components
from pathguard.models.components.base import (
    REGISTRY,
    BuildContext,
    Component,
    FileReader,
    Observation,
    component_class,
    register,
    row_of,
)

ALWAYS_BUILT = ("effective_path", "nic")  # every bundle has them: the response's effective_path and nic parts
DEFAULT_FUSION = ("effective_path", "nic", "nic_vi")  # the build default: the two papers' detectors
LEGACY_FUSION = ("effective_path", "nic")  # bundles whose manifest names no fusion components

__all__ = [
    "ALWAYS_BUILT",
    "DEFAULT_FUSION",
    "LEGACY_FUSION",
    "REGISTRY",
    "BuildContext",
    "Component",
    "FileReader",
    "Observation",
    "build_order",
    "component_class",
    "register",
    "row_of",
]


def build_order(names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` with every component they require, each after what it requires (otherwise in the given order)."""
    out: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in out:
            return
        if name in chain:
            raise ValueError(f"components require each other: {' -> '.join((*chain, name))}")
        for dep in component_class(name).requires:
            visit(dep, (*chain, name))
        out.append(name)

    for n in names:
        visit(n, ())
    return out
