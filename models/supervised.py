"""A bundle's optional supervised detector (``pathguard build --supervised-attacks ...``).

The default verdict is attack-agnostic: every component is fitted on benign data only. A bundle built in
supervised mode additionally carries one of the Effective Path paper's supervised detectors (Qiu et al., Sec. 4.2:
the linear joint-similarity model, or a random forest / AdaBoost / gradient boosting ensemble) trained on the
rank-1 + rank-2 similarity features of clean images and of adversarial examples generated from them. It is
reported beside the verdict and never replaces it: it can only be as good as the attacks it was shown.

Data (training set only; the test set is never used):

- training: the builder's ``ep_fit`` split (held out from the class paths, like the benign EP score) and
  the successful adversarial examples of each requested attack run on its correctly classified images;
- calibration: the clean split ``B`` (disjoint from the training images): its scores give the empirical
  p-values and the threshold for the bundle's target FPR, exactly as for the fused verdict.

Files: ``supervised.npz`` always (calibration scores; the linear model's weights). The ensembles are
scikit-learn objects and can only be stored pickled, in ``supervised.joblib``; that file is unpickled only from
bytes whose sha256 matched the manifest (:func:`models.bundle.read_verified`).
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.calibration import empirical_p_values, threshold_at_fpr
from models.ep_detectors import DETECTORS, LinearJointSimilarity, SklearnDetector, make_detector

__all__ = [
    "SUPERVISED_JOBLIB",
    "SUPERVISED_NPZ",
    "SupervisedAssessment",
    "SupervisedDetector",
    "check_supervised_config",
    "fit_supervised",
]

SUPERVISED_NPZ = "supervised.npz"
SUPERVISED_JOBLIB = "supervised.joblib"
_LIBRARY_ATTACKS = ("gradient", "patch")  # families that run through adversarial-robustness-toolbox


def check_supervised_config(attacks: Sequence[str], detector: str) -> None:
    """Fail early (before any fitting) on an unknown attack or detector, or a missing ``eval`` extra."""
    from models.attacks import ATTACKS

    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown supervised attack(s) {unknown}; known: {sorted(ATTACKS)}")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"supervised attacks must be distinct, got {list(attacks)}")
    if detector not in DETECTORS:
        raise ValueError(f"unknown supervised detector {detector!r}; choose from {list(DETECTORS)}")
    needs_art = [a for a in attacks if ATTACKS[a].family in _LIBRARY_ATTACKS]
    if needs_art and importlib.util.find_spec("art") is None:
        raise ValueError(
            f"supervised attack(s) {needs_art} need adversarial-robustness-toolbox: pip install 'pathguard[eval]'"
        )


@dataclass
class SupervisedAssessment:
    """Per-input supervised results for a batch of N inputs."""

    score: np.ndarray  # (N,) violation probability in [0, 1] against the clean calibration scores
    p_value: np.ndarray  # (N,) empirical p-value among the clean calibration scores
    adversarial: np.ndarray  # (N,) bool: raw score above the threshold for the target FPR


@dataclass
class SupervisedDetector:
    """A fitted supervised EP detector with its clean calibration scores.

    Attributes
    ----------
    detector : str
        One of :data:`models.ep_detectors.DETECTORS`.
    attacks : list of str
        Attacks whose adversarial examples it was trained on.
    model : LinearJointSimilarity or SklearnDetector
        Scores (N, 2L) rank-1 + rank-2 similarity features, higher = more adversarial.
    calib : np.ndarray
        Sorted raw scores of the clean calibration split.
    training : dict
        Counts of the training data (clean images; per attack: attempted and successful).
    """

    detector: str
    attacks: list[str]
    model: LinearJointSimilarity | SklearnDetector
    calib: np.ndarray
    training: dict[str, Any] = field(default_factory=dict)

    def raw_score(self, features: np.ndarray) -> np.ndarray:
        """(N,) raw detector score of rank-1 + rank-2 similarity features (N, 2L)."""
        return np.asarray(self.model.score(features), dtype=np.float64)

    def threshold_for(self, target_fpr: float) -> float:
        """Raw-score threshold with clean FPR <= ``target_fpr`` on the calibration split."""
        return threshold_at_fpr(self.calib, target_fpr)

    def assess(self, features: np.ndarray, threshold: float) -> SupervisedAssessment:
        raw = self.raw_score(features)
        p = empirical_p_values(self.calib, raw, assume_sorted=True)
        return SupervisedAssessment(score=1.0 - p, p_value=p, adversarial=raw > threshold)

    def manifest(self) -> dict[str, Any]:
        """The manifest's ``supervised`` entry."""
        files = [SUPERVISED_NPZ] + ([] if self.detector == "linear" else [SUPERVISED_JOBLIB])
        return {
            "detector": self.detector,
            "attacks": list(self.attacks),
            "features": "effective_path rank-1 + rank-2 similarity",
            "training": self.training,
            "n_calibration": len(self.calib),
            "files": files,
        }

    def files(self) -> dict[str, bytes]:
        from models.pipeline import npz_bytes

        arrays = {"calib": self.calib}
        out = {}
        if isinstance(self.model, LinearJointSimilarity):
            arrays |= {f"linear/{k}": v for k, v in self.model.to_arrays().items()}
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
        detector = str(entry["detector"])
        if detector not in DETECTORS:
            raise ValueError(f"unknown supervised detector {detector!r}; this pathguard knows {list(DETECTORS)}")
        arrays = npz(SUPERVISED_NPZ)
        model: LinearJointSimilarity | SklearnDetector
        if detector == "linear":
            model = LinearJointSimilarity.from_arrays({k.split("/", 1)[1]: v for k, v in arrays.items() if "/" in k})
        else:
            import joblib

            model = SklearnDetector(detector)
            model.estimator_ = joblib.load(io.BytesIO(blob(SUPERVISED_JOBLIB)))  # digest checked by read_verified
        calib = np.sort(np.asarray(arrays["calib"], dtype=np.float64))
        return cls(detector, list(entry["attacks"]), model, calib, dict(entry.get("training", {})))


def fit_supervised(
    classifier: Any,
    dataset: str,
    features: Callable[[np.ndarray], np.ndarray],
    train_x: np.ndarray,
    train_y: np.ndarray,
    calib_x: np.ndarray,
    attacks: Sequence[str],
    detector: str = "linear",
    seed: int = 0,
    clean_features: np.ndarray | None = None,
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
        (N, C, H, W) images -> (N, 2L) rank-1 + rank-2 similarity features.
    train_x, train_y : np.ndarray
        Clean training images and labels (held out from the class paths).
    calib_x : np.ndarray
        Clean calibration images, disjoint from ``train_x``.
    clean_features : np.ndarray, optional
        ``features(train_x)`` if already computed.
    """
    from models.attacks import run_attack

    check_supervised_config(attacks, detector)
    clean = features(train_x) if clean_features is None else clean_features
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
    kwargs: dict[str, Any] = {} if detector == "linear" else {"random_state": seed}
    model = make_detector(detector, **kwargs).fit(x, y)
    calib = np.sort(np.asarray(model.score(features(calib_x)), dtype=np.float64))
    training = {"clean": len(clean), "adversarial": n_adv, "attacks": counts}
    return SupervisedDetector(detector, list(attacks), model, calib, training)
