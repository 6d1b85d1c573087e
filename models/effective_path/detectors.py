"""Detectors over Effective Path similarity features (Qiu et al., CVPR 2019, Sec. 4.2).

Features: per-layer image-class similarities of the rank-1 path followed by those of the rank-2 path,
``(N, 2L)`` (:func:`ep_features`). Adversarial inputs tend to have *lower* rank-1 and *higher* rank-2
similarity than benign ones.

Every detector has ``fit(...) -> self`` and ``score(features) -> (N,)`` float, higher = more adversarial.

- :class:`LinearJointSimilarity`: the paper's linear "joint similarity" ``sum_l w_l J1_l - sum_l w'_l J2_l``
  with ``w, w' >= 0`` (hinge loss, elastic net with l1_ratio 0.5), fitted by projected subgradient descent
  so the sign constraints hold exactly. Plain arrays, no pickle.
- :class:`SklearnDetector`: random forest (100 trees), AdaBoost (50), gradient boosting (100), as in the paper;
  stored as plain arrays through :class:`~pathguard.models.verdict.trees.TreeEnsemble`.
- :class:`BenignEPScore`: attack-agnostic, fitted on benign features only: one-sided robust z-scores of how far
  below the benign rank-1 similarity and above the benign rank-2 similarity an input lies. Plain arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from pathguard.models.errors import NotFittedError

__all__ = [
    "DETECTORS",
    "BenignEPScore",
    "LinearJointSimilarity",
    "NotFittedError",
    "SklearnDetector",
    "ep_features",
    "make_detector",
]


def ep_features(similarities: Mapping[int, np.ndarray]) -> np.ndarray:
    """Concatenate rank-1 and rank-2 similarities: ``{1: (N, L), 2: (N, L)}`` -> (N, 2L) float64."""
    return np.concatenate([np.asarray(similarities[1]), np.asarray(similarities[2])], axis=1).astype(np.float64)


def _orientation(n_features: int) -> np.ndarray:
    """+1 where a larger value is more adversarial: -1 on the rank-1 half, +1 on the rank-2 half."""
    if n_features % 2:
        raise ValueError(f"features must be rank-1 then rank-2 similarities (even width), got {n_features}")
    half = n_features // 2
    return np.concatenate([-np.ones(half), np.ones(half)])


def _as_2d(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, 2L), got shape {f.shape}")
    return f


class LinearJointSimilarity:
    """The paper's linear joint-similarity detector with enforced sign constraints.

    Fitted on standardized, sign-flipped features ``s = orientation * (f - mean) / std`` with non-negative
    weights ``v`` (projection after every step), so that on the raw features the joint similarity
    ``f @ coef_ + intercept_`` has ``coef_ >= 0`` on rank-1 and ``coef_ <= 0`` on rank-2 similarities.

    Parameters
    ----------
    alpha : float
        Elastic-net strength.
    l1_ratio : float
        Elastic-net mixing (paper: 0.5).
    epochs : int
        Full-batch projected subgradient steps.
    lr : float
        Initial step; step t uses ``lr / sqrt(t)``; the returned solution is the running average of iterates.
    balanced : bool
        Weight both classes equally in the hinge loss.

    Attributes
    ----------
    coef_ : np.ndarray
        (2L,) joint-similarity weights on raw features (>= 0 rank-1, <= 0 rank-2).
    intercept_ : float
        Joint similarity offset; ``score = -(f @ coef_ + intercept_)``.
    """

    def __init__(
        self, alpha: float = 1e-3, l1_ratio: float = 0.5, epochs: int = 2000, lr: float = 0.5, balanced: bool = True
    ) -> None:
        self.alpha = alpha
        self.l1_ratio = l1_ratio
        self.epochs = epochs
        self.lr = lr
        self.balanced = balanced

    def fit(self, features: np.ndarray, is_adv: np.ndarray) -> LinearJointSimilarity:
        f = _as_2d(features)
        y = np.where(np.asarray(is_adv).astype(bool), 1.0, -1.0)  # (N,)
        if len(np.unique(y)) < 2:
            raise ValueError("fit needs both benign and adversarial examples")
        orient = _orientation(f.shape[1])
        mean, std = f.mean(0), f.std(0)
        std = np.where(std > 1e-12, std, 1.0)
        s = orient * (f - mean) / std  # (N, F), larger = more adversarial
        sw = self._sample_weights(y)
        v, b = self._descend(s, y, sw)
        w_raw = orient * v / std
        self.coef_ = -w_raw
        self.intercept_ = float(-(b - np.sum(w_raw * mean)))
        return self

    def _sample_weights(self, y: np.ndarray) -> np.ndarray:
        if not self.balanced:
            return np.full(y.shape, 1.0 / y.size)
        pos = y > 0
        return np.where(pos, 0.5 / pos.sum(), 0.5 / (~pos).sum())

    def _descend(self, s: np.ndarray, y: np.ndarray, sw: np.ndarray) -> tuple[np.ndarray, float]:
        """Projected subgradient descent on weighted hinge + elastic net, v >= 0; averaged iterates."""
        v, b = np.zeros(s.shape[1]), 0.0
        v_avg, b_avg = np.zeros_like(v), 0.0
        l1, l2 = self.alpha * self.l1_ratio, self.alpha * (1.0 - self.l1_ratio)
        for t in range(1, self.epochs + 1):
            active = y * (s @ v + b) < 1.0  # hinge subgradient support
            g = -(sw * y * active)  # (N,)
            step = self.lr / np.sqrt(t)
            v = np.maximum(0.0, v - step * (s.T @ g + l1 + l2 * v))
            b -= step * g.sum()
            v_avg += (v - v_avg) / t
            b_avg += (b - b_avg) / t
        return v_avg, b_avg

    def joint_similarity(self, features: np.ndarray) -> np.ndarray:
        """(N,) the paper's joint similarity (higher = more benign)."""
        if not hasattr(self, "coef_"):
            raise NotFittedError("LinearJointSimilarity is not fitted")
        return np.asarray(_as_2d(features) @ self.coef_ + self.intercept_)

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N,) adversarial score (negated joint similarity)."""
        return -self.joint_similarity(features)

    def to_arrays(self) -> dict[str, np.ndarray]:
        if not hasattr(self, "coef_"):
            raise NotFittedError("LinearJointSimilarity is not fitted")
        return {"coef": self.coef_.copy(), "intercept": np.array(self.intercept_)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> LinearJointSimilarity:
        self = cls()
        self.coef_ = np.asarray(arrays["coef"], dtype=np.float64)
        self.intercept_ = float(arrays["intercept"])
        return self


_SKLEARN = {
    "random_forest": ("sklearn.ensemble", "RandomForestClassifier", 100),
    "adaboost": ("sklearn.ensemble", "AdaBoostClassifier", 50),
    "gradient_boosting": ("sklearn.ensemble", "GradientBoostingClassifier", 100),
}


class SklearnDetector:
    """Random forest (100), AdaBoost (50) or gradient boosting (100) on EP features, scikit-learn defaults.

    Parameters
    ----------
    kind : str
        ``"random_forest"``, ``"adaboost"`` or ``"gradient_boosting"``.
    random_state : int
        Seed of the ensemble.

    Attributes
    ----------
    estimator_ : sklearn classifier
        The fitted ensemble. Persist it as plain arrays with
        :meth:`~pathguard.models.verdict.trees.TreeEnsemble.from_sklearn` (scored with numpy to 1e-9 of
        ``predict_proba``); it is never pickled.
    """

    def __init__(self, kind: str = "random_forest", random_state: int = 0) -> None:
        self.kind = kind
        self.random_state = random_state

    def fit(self, features: np.ndarray, is_adv: np.ndarray) -> SklearnDetector:
        import importlib

        try:
            module, name, n = _SKLEARN[self.kind]
        except KeyError:
            raise ValueError(f"unknown detector kind {self.kind!r}; choose from {sorted(_SKLEARN)}") from None
        est_cls = getattr(importlib.import_module(module), name)
        self.estimator_ = est_cls(n_estimators=n, random_state=self.random_state)
        self.estimator_.fit(_as_2d(features), np.asarray(is_adv).astype(int))
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N,) probability of the adversarial class."""
        if not hasattr(self, "estimator_"):
            raise NotFittedError("SklearnDetector is not fitted")
        return np.asarray(self.estimator_.predict_proba(_as_2d(features))[:, 1])


class BenignEPScore:
    """Attack-agnostic Effective Path score, fitted on benign features only.

    For each feature ``j`` with orientation ``o_j`` (-1 for rank-1 similarities, where *lower* is suspicious,
    +1 for rank-2 similarities, where *higher* is suspicious), the benign median ``m_j`` and a one-sided
    scale ``s_j`` (distance from the median to the benign ``tail`` quantile on the suspicious side, divided by
    the standard-normal quantile of ``tail``, floored at ``min_scale``) give
    ``z_j = max(0, o_j * (f_j - m_j) / s_j)``. The score is the mean of ``z_j`` over features.

    Parameters
    ----------
    tail : float
        Benign quantile used for the one-sided scale (e.g. 0.05).
    min_scale : float
        Lower bound of every scale (similarities of benign inputs are often exactly 1).

    Attributes
    ----------
    median_, scale_, orientation_ : np.ndarray
        (2L,) each.
    """

    def __init__(self, tail: float = 0.05, min_scale: float = 1e-2) -> None:
        self.tail = tail
        self.min_scale = min_scale

    def fit(self, features: np.ndarray, is_adv: np.ndarray | None = None) -> BenignEPScore:
        """Fit on benign ``features`` (N, 2L). ``is_adv``, if given, selects the benign rows (False)."""
        from scipy.stats import norm

        f = _as_2d(features)
        if is_adv is not None:
            f = f[~np.asarray(is_adv).astype(bool)]
        if f.shape[0] < 10:
            raise ValueError("BenignEPScore needs at least 10 benign examples")
        orient = _orientation(f.shape[1])
        median = np.median(f, axis=0)
        low, high = np.quantile(f, self.tail, axis=0), np.quantile(f, 1.0 - self.tail, axis=0)
        spread = np.where(orient < 0, median - low, high - median)
        self.median_ = median
        self.scale_ = np.maximum(spread / norm.ppf(1.0 - self.tail), self.min_scale)
        self.orientation_ = orient
        return self

    def feature_scores(self, features: np.ndarray) -> np.ndarray:
        """(N, 2L) one-sided robust z-scores."""
        if not hasattr(self, "median_"):
            raise NotFittedError("BenignEPScore is not fitted")
        z = self.orientation_ * (_as_2d(features) - self.median_) / self.scale_
        return np.asarray(np.maximum(z, 0.0))

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N,) mean one-sided z-score; 0 for inputs at least as benign-looking as the median."""
        return np.asarray(self.feature_scores(features).mean(axis=1))

    def to_arrays(self) -> dict[str, np.ndarray]:
        if not hasattr(self, "median_"):
            raise NotFittedError("BenignEPScore is not fitted")
        return {
            "median": self.median_.copy(),
            "scale": self.scale_.copy(),
            "orientation": self.orientation_.copy(),
            "params": np.array([self.tail, self.min_scale]),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> BenignEPScore:
        tail, min_scale = (float(v) for v in np.asarray(arrays["params"], dtype=np.float64))
        self = cls(tail=tail, min_scale=min_scale)
        self.median_ = np.asarray(arrays["median"], dtype=np.float64)
        self.scale_ = np.asarray(arrays["scale"], dtype=np.float64)
        self.orientation_ = np.asarray(arrays["orientation"], dtype=np.float64)
        if not (self.median_.shape == self.scale_.shape == self.orientation_.shape):
            raise ValueError("BenignEPScore arrays have inconsistent shapes")
        return self


DETECTORS = ("linear", "random_forest", "adaboost", "gradient_boosting")


def make_detector(name: str, **kwargs: Any) -> LinearJointSimilarity | SklearnDetector:
    """A supervised detector by name: one of :data:`DETECTORS`."""
    if name == "linear":
        return LinearJointSimilarity(**kwargs)
    if name in _SKLEARN:
        return SklearnDetector(name, **kwargs)
    raise ValueError(f"unknown detector {name!r}; choose from {DETECTORS}")
