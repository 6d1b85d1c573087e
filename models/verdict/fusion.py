"""Fusing the detectors into one calibrated verdict (attack-agnostic: benign data only).

Each component yields a raw anomaly score, higher = more anomalous. Bundles fuse three (named in the manifest's
``verdict.components``): the benign Effective Path score, NIC's final one-class model, and NIC's VI-only statistic
(Fisher combination of two-sided per-layer value-invariant p-values; older bundles fuse only the first two). On a clean
calibration split *A* every component score becomes an empirical p-value. The p-values are combined
with Fisher's method, ``T = -2 * sum(log p_k)``, and mapped to [0, 1] by the chi-square CDF with
``2k`` degrees of freedom: ``score = chi2.cdf(T, 2k)`` (in closed form, see :func:`fisher_score`). Under
independence and exchangeability the score of a clean input is roughly uniform, and it approaches 1 when any
component is extreme.

Fisher's sum rewards many moderately small p-values, so several weak components can drown one that is certain.
Two other rules are offered (``rule``): ``tippett``, the minimum p-value with Sidak's correction for the number of
components, ``p = 1 - (1 - min p)^k``; and ``harmonic``, the harmonic mean of the p-values (valid under dependence,
between the two). ``outer(inner)`` combines within each family of components first (``inner``) and the families'
p-values then (``outer``): ``tippett(fisher)`` keeps a certain consistency check from being diluted by the layer
statistics and vice versa. The fused score is ``1 - p`` of the combination (``chi2.cdf`` for plain Fisher, as
before).

The verdict threshold is then set on a *second*, disjoint clean split *B* (so the threshold is not
fitted on the same data as the component p-values): the smallest threshold whose false-positive rate
on *B* is at most the target FPR. The reported p-value is the empirical p-value of the fused score
among the *B* scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pathguard.models.verdict.calibration import columnwise_p_values, empirical_p_values, threshold_at_fpr

__all__ = ["RULES", "FusedVerdict", "combine_p_values", "fisher_score", "parse_rule"]

RULES = ("fisher", "tippett", "harmonic")


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

    With an even number ``2K`` of degrees of freedom the chi-square survival function has the closed form
    ``exp(-x/2) * sum_{i<K} (x/2)^i / i!`` (a Poisson tail), so no special-function library is needed.
    """
    p = np.clip(np.asarray(p_values, dtype=np.float64), 1e-300, 1.0)
    half = -np.log(p).sum(axis=1)  # (N,) x/2 with x = -2 sum(log p)
    term = np.ones_like(half)
    tail = np.ones_like(half)
    for i in range(1, p.shape[1]):
        term = term * half / i  # (x/2)^i / i!
        tail = tail + term
    return np.clip(1.0 - np.exp(-half) * tail, 0.0, 1.0)


def _fisher_sf(p: np.ndarray) -> np.ndarray:
    """(N,) combined p-value of Fisher's method over the columns of (N, K) p-values (the chi-square tail)."""
    half = -np.log(np.clip(p, 1e-300, 1.0)).sum(axis=1)
    term = np.ones_like(half)
    tail = np.ones_like(half)
    for i in range(1, p.shape[1]):
        term = term * half / i
        tail = tail + term
    return np.clip(np.exp(-half) * tail, 0.0, 1.0)


def combine_p_values(p_values: np.ndarray, rule: str) -> np.ndarray:
    """(N,) combined p-value of (N, K) p-values by ``fisher``, ``tippett`` (Sidak-corrected minimum) or
    ``harmonic`` (harmonic mean)."""
    p = np.clip(np.asarray(p_values, dtype=np.float64), 1e-300, 1.0)
    k = p.shape[1]
    if rule == "fisher":
        return _fisher_sf(p)
    if rule == "tippett":
        return -np.expm1(k * np.log1p(-np.minimum(p.min(axis=1), 1.0 - 1e-16)))  # 1 - (1 - min p)^k
    if rule == "harmonic":
        return np.asarray(k / (1.0 / p).sum(axis=1))
    raise ValueError(f"unknown combination rule {rule!r}; known: {list(RULES)}")


def parse_rule(rule: str) -> tuple[str, str | None]:
    """``"tippett"`` -> ``("tippett", None)``; ``"tippett(fisher)"`` -> ``("tippett", "fisher")`` (outer, within
    each family)."""
    outer, _, inner = rule.partition("(")
    inner = inner.rstrip(")") if inner else ""
    if outer not in RULES or (inner and inner not in RULES) or (_ and not rule.endswith(")")):
        raise ValueError(f"fusion rule must be one of {list(RULES)} or 'outer(inner)' of them, got {rule!r}")
    return outer, inner or None


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
    rule : str
        ``fisher`` (default, the bundles' rule before the others existed), ``tippett``, ``harmonic`` or
        ``outer(inner)`` (see the module docstring).
    families : dict[str, str]
        Component -> family, for a rule that combines within families first.
    """

    component_calib: dict[str, np.ndarray]
    fused_calib: np.ndarray
    target_fpr: float
    rule: str = "fisher"
    families: dict[str, str] = field(default_factory=dict)
    _sorted: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)
    _stacked: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def fit(
        cls,
        calib_a: dict[str, np.ndarray],
        calib_b: dict[str, np.ndarray],
        target_fpr: float = 0.05,
        rule: str = "fisher",
        families: dict[str, str] | None = None,
    ) -> FusedVerdict:
        """Calibrate from raw component scores on two disjoint clean splits (same component keys)."""
        parse_rule(rule)
        verdict = cls(
            {k: np.sort(np.asarray(v, dtype=np.float64)) for k, v in calib_a.items()},
            np.empty(0),
            target_fpr,
            rule,
            dict(families or {}),
        )
        verdict.fused_calib = np.sort(verdict.fuse(calib_b))
        verdict.threshold_for(target_fpr)  # fail early on a target the calibration split cannot support
        return verdict

    @property
    def components(self) -> list[str]:
        return list(self.component_calib)

    def sorted_calib(self, name: str) -> np.ndarray:
        """Split-A calibration scores of component ``name``, sorted ascending (computed once)."""
        if name not in self._sorted:
            self._sorted[name] = np.sort(np.asarray(self.component_calib[name], dtype=np.float64))
        return self._sorted[name]

    def component_p_values(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Empirical p-value of every component's raw score against its split-A calibration scores."""
        return {
            k: empirical_p_values(self.sorted_calib(k), np.asarray(raw[k]), assume_sorted=True) for k in self.components
        }

    def _stacked_calib(self) -> np.ndarray | None:
        """(n, C) sorted split-A scores of all components when they have the same length (else None)."""
        if self._stacked is None and len({len(v) for v in self.component_calib.values()}) == 1:
            self._stacked = np.stack([self.sorted_calib(k) for k in self.components], axis=1)
        return self._stacked

    def fuse(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        """(N,) fused score in [0, 1] from raw component scores (dict of (N,) arrays)."""
        stacked = self._stacked_calib()
        if stacked is None:
            p = self.component_p_values(raw)
            pv = np.stack([p[k] for k in self.components], axis=1)
        else:
            scores = np.stack([np.asarray(raw[k], dtype=np.float64).reshape(-1) for k in self.components], axis=1)
            pv = columnwise_p_values(stacked, scores)  # one lookup for all components
        return self.combine(pv)

    def combine(self, p_values: np.ndarray) -> np.ndarray:
        """(N,) fused score of (N, C) component p-values (columns in :attr:`components` order) by the rule."""
        outer, inner = parse_rule(self.rule)
        if inner is None:
            return fisher_score(p_values) if outer == "fisher" else 1.0 - combine_p_values(p_values, outer)
        fams: dict[str, list[int]] = {}
        for j, name in enumerate(self.components):
            fams.setdefault(self.families.get(name, name), []).append(j)
        per_family = np.stack([combine_p_values(p_values[:, cols], inner) for cols in fams.values()], axis=1)
        return 1.0 - combine_p_values(per_family, outer)

    def family_scores(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """(N,) score of each family's fused components alone, combined as the rule combines within a family (its
        inner rule, else the rule itself): what each family contributes, for reports."""
        outer, inner = parse_rule(self.rule)
        p = self.component_p_values(raw)
        fams: dict[str, list[str]] = {}
        for name in self.components:
            fams.setdefault(self.families.get(name, "layer"), []).append(name)
        rule = inner or outer
        out = {}
        for fam, names in fams.items():
            pv = np.stack([p[k] for k in names], axis=1)
            out[fam] = fisher_score(pv) if rule == "fisher" else 1.0 - combine_p_values(pv, rule)
        return out

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
    def from_arrays(
        cls,
        arrays: dict[str, np.ndarray],
        components: list[str],
        target_fpr: float,
        rule: str = "fisher",
        families: dict[str, str] | None = None,
    ) -> FusedVerdict:
        parse_rule(rule)
        calib = {k: arrays[f"calib_a/{k}"] for k in components}
        return cls(calib, arrays["calib_b/fused"], target_fpr, rule, dict(families or {}))
