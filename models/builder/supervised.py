"""Fitting a bundle's optional supervised detector (``pathguard build --supervised-attacks ...``).

Scoring lives in :mod:`pathguard.models.verdict.supervised`; fitting needs attacks (the ``eval`` extra), so it
lives with the builder, and imports the attack library only when a build asks for supervised attacks. Data
(training set only; the test set is never used): the builder's ``ep_fit`` split and the successful adversarial
examples of each requested attack run on it; calibration on the clean split ``B``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pathguard.models.bundle import npz_bytes
from pathguard.models.effective_path import SklearnDetector, make_detector
from pathguard.models.verdict.supervised import (
    FEATURE_SETS,
    SUPERVISED_DETECTORS,
    SUPERVISED_NPZ,
    LogisticDetector,
    Model,
    SupervisedDetector,
)
from pathguard.models.verdict.trees import TreeEnsemble

__all__ = ["check_supervised_config", "fit_supervised", "supervised_files"]

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


def _fit(detector: str, seed: int, x: np.ndarray, y: np.ndarray) -> Model:
    """Fit ``detector``; a scikit-learn ensemble is exported to a :class:`TreeEnsemble` at once, so the calibration
    scores come from the very numpy scorer the service runs."""
    if detector == "logistic":
        return LogisticDetector().fit(x, y)
    fitted = make_detector(detector, **({} if detector == "linear" else {"random_state": seed})).fit(x, y)
    if isinstance(fitted, SklearnDetector):
        return TreeEnsemble.from_sklearn(detector, fitted.estimator_)
    return fitted


def supervised_files(det: SupervisedDetector) -> dict[str, bytes]:
    """The bundle file of a fitted supervised detector: ``supervised.npz`` (calibration scores and the model's
    arrays under ``{detector}/``; nothing pickled)."""
    arrays = {"calib": det.calib} | {f"{det.detector}/{k}": v for k, v in det.model.to_arrays().items()}
    return {SUPERVISED_NPZ: npz_bytes(arrays)}


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
    from pathguard.models.evaluation.attacks import run_attack

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
    model = _fit(detector, seed, x, y)
    calib = np.sort(np.asarray(model.score(features(calib_x)), dtype=np.float64))
    training = {"clean": len(clean), "adversarial": n_adv, "attacks": counts}
    return SupervisedDetector(detector, feature_set, list(attacks), model, calib, training)
