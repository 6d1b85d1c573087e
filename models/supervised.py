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

Files: ``supervised.npz`` always (calibration scores; the weights of ``logistic`` and ``linear``). The ensembles
are scikit-learn objects and can only be stored pickled, in ``supervised.joblib``; that file is unpickled only
from bytes whose sha256 matched the manifest (:func:`models.bundle.read_verified`).
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.calibration import empirical_p_values, threshold_at_fpr
from models.ep_detectors import LinearJointSimilarity, SklearnDetector, make_detector

__all__ = [
    "FEATURE_SETS",
    "SUPERVISED_DETECTORS",
    "SUPERVISED_JOBLIB",
    "SUPERVISED_NPZ",
    "LogisticDetector",
    "SupervisedAssessment",
    "SupervisedDetector",
    "check_supervised_config",
    "fit_supervised",
]

SUPERVISED_NPZ = "supervised.npz"
SUPERVISED_JOBLIB = "supervised.joblib"
SUPERVISED_DETECTORS = ("logistic", "linear", "random_forest", "adaboost", "gradient_boosting")
FEATURE_SETS = ("all", "effective_path")
_LIBRARY_ATTACKS = ("gradient", "patch")  # families that run through adversarial-robustness-toolbox


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


Model = LogisticDetector | LinearJointSimilarity | SklearnDetector
_ARRAY_MODELS: dict[str, type[LogisticDetector] | type[LinearJointSimilarity]] = {
    "logistic": LogisticDetector,
    "linear": LinearJointSimilarity,
}


def _make(detector: str, seed: int) -> Model:
    if detector == "logistic":
        return LogisticDetector()
    return make_detector(detector, **({} if detector == "linear" else {"random_state": seed}))


def check_supervised_config(attacks: Sequence[str], detector: str, features: str = "all") -> None:
    """Fail early (before any fitting) on an unknown attack, detector or feature set, a combination that does not
    exist, or a missing ``eval`` extra."""
    from models.attacks import ATTACKS

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
        One of :data:`FEATURE_SETS` (computed by :meth:`models.pipeline.DetectionPipeline.supervised_features`).
    attacks : list of str
        Attacks whose adversarial examples it was trained on.
    model : LogisticDetector, LinearJointSimilarity or SklearnDetector
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
        files = [SUPERVISED_NPZ] + ([] if self.detector in _ARRAY_MODELS else [SUPERVISED_JOBLIB])
        return {
            "detector": self.detector,
            "features": self.features,
            "attacks": list(self.attacks),
            "training": self.training,
            "n_calibration": len(self.calib),
            "files": files,
        }

    def files(self) -> dict[str, bytes]:
        from models.pipeline import npz_bytes

        arrays = {"calib": self.calib}
        out = {}
        if isinstance(self.model, LogisticDetector | LinearJointSimilarity):
            arrays |= {f"{self.detector}/{k}": v for k, v in self.model.to_arrays().items()}
        else:
            import joblib

            buf = io.BytesIO()
            joblib.dump(self.model.estimator_, buf)
            out[SUPERVISED_JOBLIB] = buf.getvalue()
        out[SUPERVISED_NPZ] = npz_bytes(arrays)
        return out

    @classmethod
    def from_verified(
        cls, entry: dict[str, Any], npz: Callable[[str], dict[str, np.ndarray]], blob: Callable[[str], bytes]
    ) -> SupervisedDetector:
        """Load from a manifest ``supervised`` entry and *verified* bundle files (``npz(name)``, ``blob(name)``)."""
        detector, features = str(entry["detector"]), str(entry.get("features", "effective_path"))
        if detector not in SUPERVISED_DETECTORS or features not in FEATURE_SETS:
            raise ValueError(
                f"unknown supervised detector {detector!r} or feature set {features!r}; this pathguard knows "
                f"{list(SUPERVISED_DETECTORS)} and {list(FEATURE_SETS)}"
            )
        arrays = npz(SUPERVISED_NPZ)
        model: Model
        if detector in _ARRAY_MODELS:
            prefix = f"{detector}/"
            model = _ARRAY_MODELS[detector].from_arrays(
                {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
            )
        else:
            import joblib

            model = SklearnDetector(detector)
            model.estimator_ = joblib.load(io.BytesIO(blob(SUPERVISED_JOBLIB)))  # digest checked by read_verified
        calib = np.sort(np.asarray(arrays["calib"], dtype=np.float64))
        return cls(detector, features, list(entry["attacks"]), model, calib, dict(entry.get("training", {})))


def fit_supervised(
    classifier: Any,
    dataset: str,
    features: Callable[[np.ndarray], np.ndarray],
    train_x: np.ndarray,
    train_y: np.ndarray,
    calib_x: np.ndarray,
    attacks: Sequence[str],
    detector: str = "logistic",
    feature_set: str = "all",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> SupervisedDetector:
    """Attack ``train_x`` with every attack, fit ``detector`` on clean vs successful adversarial features,
    and calibrate it on the clean ``calib_x``.

    Parameters
    ----------
    classifier : nn.Module
        The bundle's classifier (inputs in [0, 1], logits out).
    dataset : str
        Selects the attacks' default parameters.
    features : callable
        (N, C, H, W) images -> (N, F) features of ``feature_set`` (recorded in the manifest).
    train_x, train_y : np.ndarray
        Clean training images and labels (held out from the class paths).
    calib_x : np.ndarray
        Clean calibration images, disjoint from ``train_x``.
    """
    from models.attacks import run_attack

    check_supervised_config(attacks, detector, feature_set)
    clean = features(train_x)
    adv_parts, counts = [], {}
    for name in attacks:
        r = run_attack(classifier, name, dataset, train_x, train_y)
        ok = np.flatnonzero(r.success)
        if len(ok):
            adv_parts.append(features(r.x_adv[ok]))
        counts[name] = {"attempted": r.n_attempted, "successful": len(ok), "seconds": round(r.seconds, 1)}
        if progress is not None:
            progress(f"{name}: {len(ok)}/{r.n_attempted} successful ({r.seconds:.0f} s)")
    n_adv = sum(len(a) for a in adv_parts)
    if n_adv < 10:
        raise ValueError(f"the supervised attacks {list(attacks)} produced {n_adv} adversarial examples; need 10")
    x = np.concatenate([clean, *adv_parts])
    y = np.r_[np.zeros(len(clean)), np.ones(n_adv)]
    model = _make(detector, seed).fit(x, y)
    calib = np.sort(np.asarray(model.score(features(calib_x)), dtype=np.float64))
    training = {"clean": len(clean), "adversarial": n_adv, "attacks": counts}
    return SupervisedDetector(detector, feature_set, list(attacks), model, calib, training)
