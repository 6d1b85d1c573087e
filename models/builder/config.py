"""The parameters of one bundle build, checked before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pathguard.models.builder.supervised import check_supervised_config
from pathguard.models.bundle import DEFAULT_FUSION, FUSION_COMPONENTS
from pathguard.models.mahalanobis import POOLS

__all__ = ["BuildConfig"]


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
        Components of the fused verdict, a subset of ``effective_path``, ``nic`` (NIC's final model), ``nic_vi``
        (NIC's value invariants, two-sided) and ``mahalanobis`` (class-conditional Gaussians with a tied
        covariance per layer, beyond the two papers); default: the first three.
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
    mahalanobis: dict[str, Any] = field(default_factory=dict)
    supervised_attacks: list[str] = field(default_factory=list)
    supervised_detector: str = "logistic"
    supervised_features: str = "all"
    supervised_n: int | None = None

    def __post_init__(self) -> None:
        unknown = [c for c in self.fusion if c not in FUSION_COMPONENTS]
        if unknown or not self.fusion or len(set(self.fusion)) != len(self.fusion):
            raise ValueError(f"fusion must list distinct components of {list(FUSION_COMPONENTS)}, got {self.fusion}")
        unknown_keys = sorted(set(self.mahalanobis) - {"layers", "pool", "shrinkage"})
        if unknown_keys:
            raise ValueError(f"unknown mahalanobis parameter(s) {unknown_keys}; known: layers, pool, shrinkage")
        if self.mahalanobis.get("pool", "mean") not in POOLS:
            raise ValueError(f"mahalanobis pool must be one of {list(POOLS)}, got {self.mahalanobis['pool']!r}")
        if self.mahalanobis and "mahalanobis" not in self.fusion:
            raise ValueError("mahalanobis parameters given, but 'mahalanobis' is not among the fusion components")
        if self.supervised_attacks:
            check_supervised_config(self.supervised_attacks, self.supervised_detector, self.supervised_features)
        if self.supervised_n is not None and self.supervised_n < 1:
            raise ValueError(f"supervised_n must be positive, got {self.supervised_n}")
