"""The optional supervised detector as a registry component (``pathguard build --supervised-attacks ...``).

Family ``reported``: it is built, stored, loaded and served through the registry like every other component, but
it is never fused into the verdict and makes its own decision at its own threshold (the response's ``supervised``
part: detector, adversarial, score, p-value). Scoring and the models live in
:mod:`pathguard.models.verdict.supervised`; this module fits it and turns one observed batch into its features.

Fitting needs attacks (the ``eval`` extra): the builder hands its build an attack runner
(:attr:`BuildContext.run_attack`), so nothing here imports the attack library. Data (training set only; the test
set is never used): the builder's ``ep_fit`` split and the successful adversarial examples of each requested attack
run on it; calibration on the clean split ``B``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pathguard.models.components.base import (
    BuildContext,
    Component,
    FileReader,
    Observation,
    npz_blob,
    read_npz,
)
from pathguard.models.components.effective_path import EffectivePathComponent
from pathguard.models.components.nic import NICComponent
from pathguard.models.effective_path import SklearnDetector, make_detector
from pathguard.models.networks import TappedSequential
from pathguard.models.verdict.calibration import empirical_p_values
from pathguard.models.verdict.supervised import (
    FEATURE_SETS,
    SUPERVISED_DETECTORS,
    SUPERVISED_NPZ,
    LogisticDetector,
    Model,
    SupervisedAssessment,
    SupervisedDetector,
)
from pathguard.models.verdict.trees import TreeEnsemble

__all__ = [
    "SupervisedComponent",
    "feature_names",
    "features_of",
    "fit_supervised",
    "supervised_files",
]

EP, NIC, NIC_VI = "effective_path", "nic", "nic_vi"
_RAW = "supervised/raw"


# ------------------------------------------------------------------------------------------------------ features


def features_of(obs: Observation, feature_set: str, components: Mapping[str, Component]) -> np.ndarray:
    """(N, F) supervised features of one observed batch (see :mod:`pathguard.models.verdict.supervised`):
    rank-1 and rank-2 path similarity per Effective Path layer, then (``all``) NIC's value and provenance
    violations and the raw EP, NIC and NIC VI scores."""
    ep_component, nic_component = components[EP], components[NIC]
    assert isinstance(ep_component, EffectivePathComponent) and isinstance(nic_component, NICComponent)
    ep = ep_component.partial(obs)
    sims = [ep.sims[1], ep.sims[2]]
    if feature_set == "effective_path":
        return np.concatenate(sims, axis=1)
    nic = nic_component.analysis(obs)
    raws = np.stack([np.asarray(components[k].raw(obs), dtype=np.float64) for k in (EP, NIC, NIC_VI)], axis=1)
    return np.concatenate([*sims, nic.value_violation, nic.provenance_violation, raws], axis=1)


def feature_names(feature_set: str, components: Mapping[str, Component]) -> list[str]:
    """Column names of :func:`features_of`."""
    ep, nic = components[EP], components[NIC]
    assert isinstance(ep, EffectivePathComponent) and isinstance(nic, NICComponent)
    names = [f"rank{r}_similarity/{n}" for r in (1, 2) for n in ep.layers]
    if feature_set == "effective_path":
        return names
    names += [f"value_violation/{n}" for n in nic.value_layers]
    names += [f"provenance_violation/{n}" for n in nic.pairs]
    return [*names, f"raw/{EP}", f"raw/{NIC}", f"raw/{NIC_VI}"]


@torch.no_grad()
def _features(
    model: TappedSequential, components: Mapping[str, Component], feature_set: str, x: np.ndarray, batch: int = 500
) -> np.ndarray:
    """(N, F) features of images ``x`` (N, C, H, W), in batches through the classifier."""
    out = []
    xt = torch.as_tensor(x, dtype=torch.float32)
    for s in range(0, len(xt), batch):
        xb = xt[s : s + batch]
        logits, taps = model.forward_with_taps(xb)
        generators = [torch.Generator().manual_seed(0) for _ in range(len(xb))]  # no randomized feature
        out.append(features_of(Observation(xb, logits, taps, model, generators, components), feature_set, components))
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------------- fitting


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
    return {SUPERVISED_NPZ: npz_blob(arrays)}


def fit_supervised(
    run_attack: Callable[..., Any],
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
    run_attack : callable
        ``(classifier, name, dataset, x, y)`` -> an attack result (``x_adv``, ``success``, ``n_attempted``,
        ``seconds``): :func:`pathguard.models.evaluation.attacks.run_attack`.
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
    if detector not in SUPERVISED_DETECTORS or feature_set not in FEATURE_SETS:
        raise ValueError(f"unknown supervised detector {detector!r} or feature set {feature_set!r}")
    if detector == "linear" and feature_set != "effective_path":
        raise ValueError("the linear joint-similarity detector needs features='effective_path' (its sign constraints)")
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


# ----------------------------------------------------------------------------------------------------- component


class SupervisedComponent(Component):
    """The supervised detector on the registry: family ``reported`` (beside the verdict, never fused).

    Build parameters: ``attacks`` (registered attack names, required), ``detector`` (default ``logistic``),
    ``features`` (``all`` or ``effective_path``), ``n`` (``ep_fit`` images to attack; default all). The build
    context must name the bundled ``dataset`` (the attacks' budgets)."""

    name = "supervised"
    family = "reported"
    files = (SUPERVISED_NPZ,)
    requires = (EP, NIC, NIC_VI)
    params = ("attacks", "detector", "features", "n")

    def __init__(self, detector: SupervisedDetector, components: Mapping[str, Component]) -> None:
        self.detector = detector
        self.components = {k: components[k] for k in self.requires}
        self.threshold = math.inf  # no decision until the pipeline sets its operating point

    @classmethod
    def build(cls, ctx: BuildContext, params: Mapping[str, Any]) -> SupervisedComponent:
        if ctx.dataset is None or ctx.run_attack is None:
            raise ValueError("supervised mode needs a bundled dataset (its attack budgets); build without it")
        feature_set = str(params.get("features", "all"))
        parts = ctx.passes.parts
        ep_fit = parts["ep_fit"][0].read(parts["ep_fit"][1])[0]
        n = len(ep_fit.x) if params.get("n") is None else min(int(params["n"]), len(ep_fit.x))
        components = {k: ctx.built[k] for k in cls.requires}
        detector = fit_supervised(
            ctx.run_attack,
            ctx.model,
            ctx.dataset,
            lambda x: _features(ctx.model, components, feature_set, x),
            ep_fit.x[:n],
            ep_fit.y[:n],
            parts["calib_b"][0].read(parts["calib_b"][1])[0].x,
            list(params["attacks"]),
            str(params.get("detector", "logistic")),
            feature_set,
            seed=ctx.seed,
            progress=ctx.progress,
        )
        return cls(detector, components)

    def to_files(self) -> dict[str, bytes]:
        return supervised_files(self.detector)

    @classmethod
    def from_files(
        cls, read: FileReader, model: TappedSequential, built: Mapping[str, Component], entry: Mapping[str, Any]
    ) -> SupervisedComponent:
        detector = SupervisedDetector.from_verified(dict(entry), lambda name: read_npz(read(name)))
        out = cls(detector, built)
        names = feature_names(detector.features, built)
        if entry.get("feature_names", names) != names:
            raise ValueError("the supervised detector's features do not match this bundle's components")
        return out

    def manifest(self) -> dict[str, Any]:
        return self.detector.manifest() | {"feature_names": feature_names(self.detector.features, self.components)}

    def operate_at(self, target_fpr: float) -> None:
        self.threshold = self.detector.threshold_for(target_fpr)

    def raw(self, obs: Observation) -> np.ndarray:
        feature_set = self.detector.features
        out: np.ndarray = obs.get(_RAW, lambda: self.detector.raw_score(features_of(obs, feature_set, self.components)))
        return out

    def assess(self, obs: Observation) -> SupervisedAssessment:
        raw = self.raw(obs)
        p = empirical_p_values(self.detector.calib, raw, assume_sorted=True)
        return SupervisedAssessment(self.detector.detector, 1.0 - p, p, raw > self.threshold, raw)

    def fields(self, obs: Observation, violation: np.ndarray) -> dict[str, Any]:
        a = self.assess(obs)  # its own calibration (split B) and threshold, not the verdict's
        return {"detector": a.detector, "adversarial": a.adversarial, "score": a.score, "p_value": a.p_value}
