"""Fusing the detectors into one calibrated verdict (attack-agnostic: benign data only).

Each component yields a raw anomaly score, higher = more anomalous. Bundles fuse three (named in the manifest's
``verdict.components``): the benign Effective Path score, NIC's final one-class model, and NIC's VI-only statistic
(Fisher combination of two-sided per-layer value-invariant p-values; older bundles fuse only the first two). On a clean
calibration split *A* every component score becomes an empirical p-value. The p-values are combined
with Fisher's method, ``T = -2 * sum(log p_k)``, and mapped to [0, 1] by the chi-square CDF with
``2k`` degrees of freedom: ``score = chi2.cdf(T, 2k)``. Under independence and exchangeability the
score of a clean input is roughly uniform, and it approaches 1 when any component is extreme.

The verdict threshold is then set on a *second*, disjoint clean split *B* (so the threshold is not
fitted on the same data as the component p-values): the smallest threshold whose false-positive rate
on *B* is at most the target FPR. The reported p-value is the empirical p-value of the fused score
among the *B* scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2

from pathguard.models.verdict.calibration import empirical_p_values, threshold_at_fpr

__all__ = ["FusedVerdict", "fisher_score"]


def fisher_score(p_values: np.ndarray) -> np.ndarray:
    """Fisher-combine per-component p-values into a score in [0, 1].

    Parameters
    ----------
    p_values : np.ndarray
        (N, K) p-values in (0, 1], one column per component.

    Returns
    -------
    np.ndarray
        (N,) ``chi2.cdf(-2 * sum(log p), 2K)``; higher = more anomalous.
    """
    p = np.clip(np.asarray(p_values, dtype=np.float64), 1e-300, 1.0)
    stat = -2.0 * np.log(p).sum(axis=1)  # (N,)
    return chi2.cdf(stat, df=2 * p.shape[1])


@dataclass
class FusedVerdict:
    """Component calibration (split A) + fused threshold (split B).

    Attributes
    ----------
    component_calib : dict[str, np.ndarray]
        Clean raw scores of each component on split A, keyed by component name.
    fused_calib : np.ndarray
        Clean fused scores on split B.
    target_fpr : float
        False-positive rate the threshold is set for.
    """

    component_calib: dict[str, np.ndarray]
    fused_calib: np.ndarray
    target_fpr: float

    @classmethod
    def fit(
        cls, calib_a: dict[str, np.ndarray], calib_b: dict[str, np.ndarray], target_fpr: float = 0.05
    ) -> FusedVerdict:
        """Calibrate from raw component scores on two disjoint clean splits (same component keys)."""
        verdict = cls(
            {k: np.sort(np.asarray(v, dtype=np.float64)) for k, v in calib_a.items()}, np.empty(0), target_fpr
        )
        verdict.fused_calib = np.sort(verdict.fuse(calib_b))
        verdict.threshold_for(target_fpr)  # fail early on a target the calibration split cannot support
        return verdict

    @property
    def components(self) -> list[str]:
        return list(self.component_calib)

    def component_p_values(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Empirical p-value of every component's raw score against its split-A calibration scores."""
        return {k: empirical_p_values(self.component_calib[k], np.asarray(raw[k])) for k in self.components}

    def fuse(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        """(N,) fused score in [0, 1] from raw component scores (dict of (N,) arrays)."""
        p = self.component_p_values(raw)
        return fisher_score(np.stack([p[k] for k in self.components], axis=1))

    def threshold_for(self, target_fpr: float) -> float:
        """Smallest fused-score threshold with clean FPR <= ``target_fpr`` on split B."""
        return threshold_at_fpr(self.fused_calib, target_fpr)

    def p_values(self, fused: np.ndarray) -> np.ndarray:
        """Empirical p-values of fused scores among the split-B clean scores."""
        return empirical_p_values(self.fused_calib, fused)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {f"calib_a/{k}": v for k, v in self.component_calib.items()}
        out["calib_b/fused"] = self.fused_calib
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], components: list[str], target_fpr: float) -> FusedVerdict:
        return cls({k: arrays[f"calib_a/{k}"] for k in components}, arrays["calib_b/fused"], target_fpr)
