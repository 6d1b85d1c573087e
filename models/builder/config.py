"""The parameters of one bundle build, checked before any work starts."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pathguard.models.components import DEFAULT_FUSION, REGISTRY, component_class
from pathguard.models.verdict.fusion import parse_rule
from pathguard.models.verdict.supervised import FEATURE_SETS, SUPERVISED_DETECTORS

__all__ = ["BuildConfig", "check_supervised_config"]

_LIBRARY_ATTACKS = ("gradient", "patch")  # families that run through adversarial-robustness-toolbox


def check_supervised_config(attacks: Sequence[str], detector: str, features: str = "all") -> None:
    """Fail early (before any fitting) on an unknown attack, detector or feature set, a combination that does not
    exist, or a missing ``eval`` extra."""
    from pathguard.models.evaluation.attacks import ATTACKS

    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown supervised attack(s) {unknown}; known: {sorted(ATTACKS)}")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"supervised attacks must be distinct, got {list(attacks)}")
    if detector not in SUPERVISED_DETECTORS:
        raise ValueError(f"unknown supervised detector {detector!r}; choose from {list(SUPERVISED_DETECTORS)}")
    if features not in FEATURE_SETS:
        raise ValueError(f"unknown supervised feature set {features!r}; choose from {list(FEATURE_SETS)}")
    if detector == "linear" and features != "effective_path":
        raise ValueError("the linear joint-similarity detector needs features='effective_path' (its sign constraints)")
    needs_art = [a for a in attacks if ATTACKS[a].family in _LIBRARY_ATTACKS]
    if needs_art and importlib.util.find_spec("art") is None:
        raise ValueError(
            f"supervised attack(s) {needs_art} need adversarial-robustness-toolbox: pip install 'pathguard[eval]'"
        )


@dataclass(frozen=True)
class BuildConfig:
    """Parameters of one bundle build.

    Parameters
    ----------
    name, version : str
        Bundle name and version recorded in the manifest.
    theta : float
        Effective Path selection threshold.
    ep_last_k : int, optional
        Extract only the last k weighted layers (``None`` = all).
    n_ep_fit : int, optional
        Fit-split images aggregated into class paths (``None`` = all).
    n_calib : int
        Held-out calibration images (split as ``ep_fit`` 20%, ``A`` 40%, ``B`` 40%).
    n_train : int, optional
        Use only a seeded random subset of this many training images (small test bundles).
    target_fpr : float
        Default operating point of the fused verdict.
    nic : dict
        :class:`~pathguard.models.nic.NICDetector` parameters.
    seed : int
        Seed of the splits and every fitted component.
    fusion : list of str
        Components of the fused verdict, registered names (:mod:`pathguard.models.components`): ``effective_path``,
        ``nic`` (NIC's final model), ``nic_vi`` (NIC's value invariants, two-sided), ``mahalanobis``
        (class-conditional Gaussians with a tied covariance per layer), the consistency family ``margin``,
        ``noise_flip``, ``noise_l1``, ``noise_drop`` and ``squeeze``; default: the first three.
    rule : str
        How the fused components' p-values combine: ``fisher`` (default), ``tippett``, ``harmonic``, or
        ``outer(inner)`` of them (``inner`` within each family first).
    components : dict
        Build parameters per component name (e.g. ``{"noise_flip": {"copies": 8}}``); see each component.
    mahalanobis : dict
        With ``mahalanobis`` in ``fusion``: :class:`~pathguard.models.mahalanobis.ClassGaussian` parameters
        ``layers`` (tap names, ``input`` or ``logits``; default: every tap), ``pool`` (``mean`` or
        ``mean_std``) and ``shrinkage``. Fitted on NIC's sample of the fit split, calibrated on split A.
    supervised_attacks : list of str
        Optional supervised mode: attacks run on the ``ep_fit`` split to train a supervised EP detector that
        the bundle reports beside the (unchanged, benign-only) verdict. Empty = benign only (default).
    supervised_detector : str
        ``logistic`` (default) or ``linear`` (the EP paper's joint similarity), both stored as arrays, or
        ``random_forest``, ``adaboost``, ``gradient_boosting`` (exported to plain arrays: node features,
        thresholds, children, leaf values and per-tree weights, scored with numpy).
    supervised_features : str
        ``all`` (default: EP similarities, NIC violations and the fusion components) or ``effective_path``.
    supervised_n : int, optional
        Attack only the first this many ``ep_fit`` images (``None`` = all of them).
    """

    name: str
    version: str = "1"
    theta: float = 0.5
    ep_last_k: int | None = None
    n_ep_fit: int | None = None
    n_calib: int = 5000
    n_train: int | None = None
    target_fpr: float = 0.05
    nic: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    fusion: list[str] = field(default_factory=lambda: list(DEFAULT_FUSION))
    rule: str = "fisher"
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    mahalanobis: dict[str, Any] = field(default_factory=dict)
    supervised_attacks: list[str] = field(default_factory=list)
    supervised_detector: str = "logistic"
    supervised_features: str = "all"
    supervised_n: int | None = None

    def __post_init__(self) -> None:
        known = sorted(REGISTRY) if REGISTRY else []
        unknown = [c for c in self.fusion if c not in REGISTRY]
        if unknown or not self.fusion or len(set(self.fusion)) != len(self.fusion):
            raise ValueError(f"fusion must list distinct components of {known}, got {self.fusion}")
        reported = [c for c in self.fusion if component_class(c).family == "reported"]
        if reported:
            raise ValueError(f"{reported} are reported beside the verdict, never fused: build them with their options")
        parse_rule(self.rule)
        if self.mahalanobis and "mahalanobis" not in self.fusion:
            raise ValueError("mahalanobis parameters given, but 'mahalanobis' is not among the fusion components")
        for name, params in self.component_params().items():
            if name not in REGISTRY:
                raise ValueError(f"parameters given for unknown component {name!r}; known: {known}")
            accepted = component_class(name).params
            extra = sorted(set(params) - set(accepted)) if accepted is not None else []
            if extra:
                raise ValueError(f"unknown {name} parameter(s) {extra}; known: {', '.join(accepted or ()) or 'none'}")
        if self.supervised_attacks:
            check_supervised_config(self.supervised_attacks, self.supervised_detector, self.supervised_features)
        if self.supervised_n is not None and self.supervised_n < 1:
            raise ValueError(f"supervised_n must be positive, got {self.supervised_n}")

    def component_params(self) -> dict[str, dict[str, Any]]:
        """Build parameters per component: ``components``, with ``nic`` and ``mahalanobis`` from their own fields
        and Effective Path's ``theta``, ``last_k`` and ``n_fit`` from ``theta``, ``ep_last_k`` and ``n_ep_fit``
        (its other parameters, e.g. ``selection``, from ``components``)."""
        out = {k: dict(v) for k, v in self.components.items()}
        ep = {"theta": self.theta, "last_k": self.ep_last_k, "n_fit": self.n_ep_fit}
        out["effective_path"] = {**out.get("effective_path", {}), **ep}
        out["nic"] = {**out.get("nic", {}), **self.nic}
        if self.mahalanobis:
            out["mahalanobis"] = {**out.get("mahalanobis", {}), **self.mahalanobis}
        if self.supervised_attacks:
            out["supervised"] = {"attacks": list(self.supervised_attacks), "detector": self.supervised_detector,
                                 "features": self.supervised_features, "n": self.supervised_n}  # fmt: skip
        return out

    @property
    def reported(self) -> list[str]:
        """Components built after the verdict's calibration and reported beside it, never fused."""
        return ["supervised"] if self.supervised_attacks else []
