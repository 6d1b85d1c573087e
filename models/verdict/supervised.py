"""A bundle's optional supervised detector (``pathguard build --supervised-attacks ...``).

The default verdict is attack-agnostic: every component is fitted on benign data only. A bundle built in
supervised mode additionally carries a detector trained on clean images *and* adversarial examples generated from
them. It is reported beside the verdict and never replaces it: it can only be as good as the attacks it was shown.

Features (``features``):

- ``all`` (default): everything the bundle computes per input: rank-1 and rank-2 path similarity per Effective
  Path layer, NIC's value- and provenance-violation probability per layer (pair), and the three raw fusion
  components (benign EP score, NIC final model, two-sided VI statistic);
- ``effective_path``: the rank-1 + rank-2 similarities only, as in the Effective Path paper (Qiu et al., Sec. 4.2).

Detectors (``detector``): ``logistic`` (default; standardized, class-balanced L2 logistic regression, plain
arrays), ``linear`` (the EP paper's joint similarity with its sign constraints; ``effective_path`` features only),
or a ``random_forest`` / ``adaboost`` / ``gradient_boosting`` ensemble as in the EP paper.

Data (training set only; the test set is never used):

- training: the builder's ``ep_fit`` split (held out from the class paths, like the benign EP score) and
  the successful adversarial examples of each requested attack run on its correctly classified images;
- calibration: the clean split ``B`` (disjoint from the training images): its scores give the empirical
  p-values and the threshold for the bundle's target FPR, exactly as for the fused verdict.

Files: ``supervised.npz`` only: the calibration scores and the model as plain arrays, under ``{detector}/``: the
weights of ``logistic`` and ``linear``, the trees of the ensembles (node features, thresholds, children, leaf
values, per-tree weights; :class:`~pathguard.models.verdict.trees.TreeEnsemble`, scored with numpy). Nothing is
pickled. Bundles from older versions that stored an ensemble pickled (``supervised.joblib``) are refused at load
(:func:`pickled_ensemble_error`): rebuild them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pathguard.models.effective_path.detectors import LinearJointSimilarity
from pathguard.models.errors import BundleCompatibilityError
from pathguard.models.verdict.calibration import empirical_p_values, threshold_at_fpr
from pathguard.models.verdict.trees import TREE_KINDS, TreeEnsemble

__all__ = [
    "FEATURE_SETS",
    "SUPERVISED_DETECTORS",
    "SUPERVISED_JOBLIB",
    "SUPERVISED_NPZ",
    "LogisticDetector",
    "Model",
    "SupervisedAssessment",
    "SupervisedDetector",
    "pickled_ensemble_error",
]

SUPERVISED_NPZ = "supervised.npz"
SUPERVISED_JOBLIB = "supervised.joblib"  # a pickled ensemble, written by earlier versions; refused at load
SUPERVISED_DETECTORS = ("logistic", "linear", *TREE_KINDS)
FEATURE_SETS = ("all", "effective_path")


class LogisticDetector:
    """Standardized, class-balanced L2 logistic regression (fitted with scikit-learn), kept as plain arrays.

    ``score`` is the logit ``((f - mean) / scale) @ coef + intercept``: higher = more adversarial.
    """

    def __init__(self, C: float = 1.0) -> None:
        self.C = C

    def fit(self, features: np.ndarray, is_adv: np.ndarray) -> LogisticDetector:
        from sklearn.linear_model import LogisticRegression

        f = np.asarray(features, dtype=np.float64)
        y = np.asarray(is_adv).astype(int)
        if f.ndim != 2 or len(np.unique(y)) < 2:
            raise ValueError("fit needs (N, F) features with both benign and adversarial examples")
        mean, std = f.mean(0), f.std(0)
        self.mean_, self.scale_ = mean, np.where(std > 1e-12, std, 1.0)
        lr = LogisticRegression(C=self.C, class_weight="balanced", max_iter=5000)
        lr.fit((f - self.mean_) / self.scale_, y)
        self.coef_ = np.asarray(lr.coef_[0], dtype=np.float64)
        self.intercept_ = float(lr.intercept_[0])
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        f = np.asarray(features, dtype=np.float64)
        return np.asarray((f - self.mean_) / self.scale_ @ self.coef_ + self.intercept_)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean_, "scale": self.scale_, "coef": self.coef_, "intercept": np.array(self.intercept_)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> LogisticDetector:
        self = cls()
        self.mean_, self.scale_, self.coef_ = (
            np.asarray(arrays[k], dtype=np.float64) for k in ("mean", "scale", "coef")
        )
        self.intercept_ = float(arrays["intercept"])
        if not (self.mean_.shape == self.scale_.shape == self.coef_.shape):
            raise ValueError("LogisticDetector arrays have inconsistent shapes")
        return self


Model = LogisticDetector | LinearJointSimilarity | TreeEnsemble


def _model_from_arrays(detector: str, arrays: dict[str, np.ndarray]) -> Model:
    if detector == "logistic":
        return LogisticDetector.from_arrays(arrays)
    if detector == "linear":
        return LinearJointSimilarity.from_arrays(arrays)
    return TreeEnsemble.from_arrays(detector, arrays)


def pickled_ensemble_error(path: object, manifest: dict[str, Any], present: bool) -> BundleCompatibilityError | None:
    """The error for a bundle whose supervised ensemble is pickled (``supervised.joblib`` present or listed in its
    manifest), with the command that rebuilds it; None for any other bundle."""
    sup = manifest.get("supervised")
    entry: dict[str, Any] = sup if isinstance(sup, dict) else {}
    listed = SUPERVISED_JOBLIB in (entry.get("files") or []) or SUPERVISED_JOBLIB in manifest.get("files", {})
    if not (present or listed):
        return None
    attacks = ",".join(str(a) for a in entry.get("attacks") or []) or "ATTACKS"
    detector = str(entry.get("detector") or "DETECTOR")
    return BundleCompatibilityError(
        f"bundle {path}: its supervised detector is a pickled scikit-learn object ({SUPERVISED_JOBLIB}), which "
        f"pathguard no longer loads (no pickle anywhere); rebuild the bundle to store it as plain arrays: pathguard "
        f"build ... --supervised-attacks {attacks} --supervised-detector {detector}"
    )


@dataclass
class SupervisedAssessment:
    """Per-input supervised results for a batch of N inputs."""

    detector: str  # the model's name (one of SUPERVISED_DETECTORS)
    score: np.ndarray  # (N,) violation probability in [0, 1] against the clean calibration scores
    p_value: np.ndarray  # (N,) empirical p-value among the clean calibration scores
    adversarial: np.ndarray  # (N,) bool: raw score above the threshold for the target FPR
    raw: np.ndarray  # (N,) the detector's raw score (higher = more adversarial)


@dataclass
class SupervisedDetector:
    """A fitted supervised detector with its clean calibration scores.

    Attributes
    ----------
    detector : str
        One of :data:`SUPERVISED_DETECTORS`.
    features : str
        One of :data:`FEATURE_SETS`, computed by
        :meth:`~pathguard.models.bundle.DetectionPipeline.supervised_features`.
    attacks : list of str
        Attacks whose adversarial examples it was trained on.
    model : LogisticDetector, LinearJointSimilarity or TreeEnsemble
        Scores (N, F) features, higher = more adversarial.
    calib : np.ndarray
        Sorted raw scores of the clean calibration split.
    training : dict
        Counts of the training data (clean images; per attack: attempted and successful).
    """

    detector: str
    features: str
    attacks: list[str]
    model: Model
    calib: np.ndarray
    training: dict[str, Any] = field(default_factory=dict)

    def raw_score(self, features: np.ndarray) -> np.ndarray:
        """(N,) raw detector score of features (N, F)."""
        return np.asarray(self.model.score(features), dtype=np.float64)

    def threshold_for(self, target_fpr: float) -> float:
        """Raw-score threshold with clean FPR <= ``target_fpr`` on the calibration split."""
        return threshold_at_fpr(self.calib, target_fpr)

    def assess(self, features: np.ndarray, threshold: float) -> SupervisedAssessment:
        raw = self.raw_score(features)
        p = empirical_p_values(self.calib, raw, assume_sorted=True)
        return SupervisedAssessment(self.detector, score=1.0 - p, p_value=p, adversarial=raw > threshold, raw=raw)

    def manifest(self) -> dict[str, Any]:
        """The manifest's ``supervised`` entry."""
        return {
            "detector": self.detector,
            "features": self.features,
            "attacks": list(self.attacks),
            "training": self.training,
            "n_calibration": len(self.calib),
            "files": [SUPERVISED_NPZ],
        }

    @classmethod
    def from_verified(cls, entry: dict[str, Any], npz: Callable[[str], dict[str, np.ndarray]]) -> SupervisedDetector:
        """Load from a manifest ``supervised`` entry and *verified* bundle files (``npz(name)``)."""
        detector, features = str(entry["detector"]), str(entry.get("features", "effective_path"))
        if detector not in SUPERVISED_DETECTORS or features not in FEATURE_SETS:
            raise ValueError(
                f"unknown supervised detector {detector!r} or feature set {features!r}; this pathguard knows "
                f"{list(SUPERVISED_DETECTORS)} and {list(FEATURE_SETS)}"
            )
        arrays = npz(SUPERVISED_NPZ)
        prefix = f"{detector}/"
        model = _model_from_arrays(
            detector, {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
        )
        calib = np.sort(np.asarray(arrays["calib"], dtype=np.float64))
        return cls(detector, features, list(entry["attacks"]), model, calib, dict(entry.get("training", {})))
