"""A loaded bundle and its detection pipeline: activations -> layer checks -> scores -> verdict.

Data flows one way. The classifier's forward pass yields logits and the tapped activations. NIC's
per-layer work (reduction, value invariant, derived head) only needs that layer's activation, so
:meth:`DetectionPipeline.layer_check` can run on a worker thread while the forward pass continues.
:meth:`DetectionPipeline.finish` then does what needs the whole pass: the Effective Path extraction
(seeded at the logits), the provenance invariants, NIC's final model and the fused verdict.

The per-layer checks may also come from the served graph (``finish(..., nic_graph=...)``, computed by
:mod:`pathguard.models.nic.onnx_export` inside the onnx engine's run): the graph's reductions, value invariants and
derived heads' logits replace the checks of every layer but the softmax. The softmaxes stay torch's (of the
graph's head logits, and of the network's logits for the softmax layer's own check), and the provenance invariants
and final model run here as before: onnxruntime's softmax differs from torch's in the last bit, and the scores of
confidently classified inputs pile up so closely (358 of the MNIST bundle's 2000 softmax-layer calibration scores
within one interval 5.2e-6 wide) that a last-bit change can move a violation probability by up to 0.44.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pathguard.models.effective_path import BenignEPScore, ClassPaths, EffectivePathExtractor
from pathguard.models.mahalanobis import ClassGaussian
from pathguard.models.networks import TappedSequential
from pathguard.models.nic import INPUT, SOFTMAX, NICDetector, layer_activation
from pathguard.models.nic.onnx_export import GraphNICScores
from pathguard.models.verdict import FusedVerdict, two_sided_fisher, violation_probability
from pathguard.models.verdict.supervised import SupervisedAssessment, SupervisedDetector

__all__ = [
    "DEFAULT_FUSION",
    "FUSION_COMPONENTS",
    "DetectionPipeline",
    "DetectionResult",
    "EPPartial",
    "LayerPartial",
]

EP, NIC, NIC_VI, MAHALANOBIS = "effective_path", "nic", "nic_vi", "mahalanobis"
FUSION_COMPONENTS = (EP, NIC, NIC_VI, MAHALANOBIS)  # what a bundle's verdict may fuse
DEFAULT_FUSION = (EP, NIC, NIC_VI)  # the build default: the two papers' detectors
LEGACY_COMPONENTS = [EP, NIC]  # bundles whose manifest names no fusion components


@dataclass
class LayerPartial:
    """NIC's per-layer result for a batch: VI score (N,) and derived-head probabilities (N, K)."""

    value: torch.Tensor
    probs: torch.Tensor


@dataclass
class EPPartial:
    """Effective Path result for a batch: per-rank similarities (N, L) and the raw benign EP score (N,)."""

    sims: dict[int, np.ndarray]
    raw: np.ndarray
    seconds: float


@dataclass
class DetectionResult:
    """Detection results for a batch of N inputs (numpy arrays; see PRODUCT.md for the JSON shape)."""

    probabilities: np.ndarray  # (N, K)
    predicted: np.ndarray  # (N,)
    confidence: np.ndarray  # (N,)
    ep_layers: list[str]
    rank1_similarity: np.ndarray  # (N, L)
    rank2_similarity: np.ndarray  # (N, L)
    ep_score: np.ndarray  # (N,) violation probability
    value_violation: dict[str, np.ndarray]  # layer -> (N,)
    provenance_violation: dict[str, np.ndarray]  # "a->b" -> (N,)
    nic_score: np.ndarray  # (N,) violation probability
    score: np.ndarray  # (N,) fused, in [0, 1]
    p_value: np.ndarray  # (N,)
    adversarial: np.ndarray  # (N,) bool
    threshold: float
    target_fpr: float
    timings_s: dict[str, float] = field(default_factory=dict)
    supervised: SupervisedAssessment | None = None  # bundles built with supervised attacks only
    mahalanobis_layers: list[str] = field(default_factory=list)  # bundles with the class-Gaussian component only
    mahalanobis_score: np.ndarray | None = None  # (N,) violation probability

    def __len__(self) -> int:
        return len(self.predicted)

    def row(self, i: int) -> dict[str, Any]:
        """The ``effective_path``, ``nic``, ``verdict`` (and, for supervised bundles, ``supervised``) parts of
        the /v1/detect response for input ``i``."""

        def r(v: float) -> float:
            return round(float(v), 6)

        out = {
            "effective_path": {
                "layers": list(self.ep_layers),
                "rank1_similarity": [r(v) for v in self.rank1_similarity[i]],
                "rank2_similarity": [r(v) for v in self.rank2_similarity[i]],
                "score": r(self.ep_score[i]),
            },
            "nic": {
                "value_violation": {k: r(v[i]) for k, v in self.value_violation.items()},
                "provenance_violation": {k: r(v[i]) for k, v in self.provenance_violation.items()},
                "score": r(self.nic_score[i]),
            },
            "verdict": {
                "adversarial": bool(self.adversarial[i]),
                "score": r(self.score[i]),
                "threshold": r(self.threshold),
                "p_value": r(self.p_value[i]),
                "target_fpr": float(self.target_fpr),
            },
        }
        if self.mahalanobis_score is not None:
            out["mahalanobis"] = {"layers": list(self.mahalanobis_layers), "score": r(self.mahalanobis_score[i])}
        if self.supervised is not None:
            out["supervised"] = {
                "detector": self.supervised.detector,
                "adversarial": bool(self.supervised.adversarial[i]),
                "score": r(self.supervised.score[i]),
                "p_value": r(self.supervised.p_value[i]),
            }
        return out


class DetectionPipeline:
    """Effective Path + NIC + fused verdict over one classifier (all state fitted; scoring only).

    Parameters
    ----------
    classifier : TappedSequential
    extractor : EffectivePathExtractor
    class_paths : ClassPaths
    ep_score : BenignEPScore
        Attack-agnostic EP score over ``concat(rank1, rank2)`` similarities.
    nic : NICDetector
        Fitted and calibrated.
    verdict : FusedVerdict or None
        None only while building (before the fused calibration exists).
    target_fpr : float
        Operating point; the threshold is read from the calibration for it (and the supervised detector's).
    supervised : SupervisedDetector, optional
        Reported beside the verdict (bundles built with supervised attacks); never changes the verdict.
    gaussian : ClassGaussian, optional
        Fitted and calibrated class-conditional Gaussians (bundles whose verdict fuses ``mahalanobis``): per
        tapped layer a Mahalanobis score, its empirical p-value and Fisher's combination over the layers.
    """

    def __init__(
        self,
        classifier: TappedSequential,
        extractor: EffectivePathExtractor,
        class_paths: ClassPaths,
        ep_score: BenignEPScore,
        nic: NICDetector,
        verdict: FusedVerdict | None,
        target_fpr: float,
        supervised: SupervisedDetector | None = None,
        gaussian: ClassGaussian | None = None,
    ) -> None:
        self.classifier = classifier
        self.gaussian = gaussian
        self.extractor = extractor
        self.class_paths = class_paths
        self.ep_score = ep_score
        self.nic = nic
        self.verdict = verdict
        self.target_fpr = float(target_fpr)
        self.threshold = verdict.threshold_for(self.target_fpr) if verdict is not None else float("nan")
        self.supervised = supervised
        self.supervised_threshold = supervised.threshold_for(self.target_fpr) if supervised is not None else None
        self.ep_layers: list[str] = list(extractor.layers)
        self.nic_value_layers: list[str] = list(nic.layers_)
        self.nic_provenance_pairs: list[str] = list(nic.pairs_)
        self.checked_taps = [n for n in self.nic_value_layers if n not in (INPUT, SOFTMAX)]
        extractor.warm_up()  # compile the small-batch EP kernels now (numba JIT), not on the first request

    @torch.no_grad()
    def layer_check(self, name: str, activation: torch.Tensor) -> LayerPartial:
        """NIC work of one checked layer (``"input"``, a tap name or ``"softmax"``); thread-safe."""
        value, probs = self.nic.check_layer(name, activation)
        return LayerPartial(value, probs)

    @torch.no_grad()
    def ep_check(self, x: torch.Tensor, logits: torch.Tensor, taps: dict[str, torch.Tensor]) -> EPPartial:
        """Effective Path extraction (seeded at the logits), similarities and raw score; thread-safe.

        Needs the whole forward pass but none of NIC's work.
        """
        t0 = time.perf_counter()
        paths = self.extractor.extract_from_taps(x, logits, taps, ranks=(1, 2))
        sims = self.class_paths.similarity(paths)
        raw = self.ep_score.score(np.concatenate([sims[1], sims[2]], axis=1))
        return EPPartial(sims, raw, time.perf_counter() - t0)

    @torch.no_grad()
    def finish(
        self,
        x: torch.Tensor,
        logits: torch.Tensor,
        taps: dict[str, torch.Tensor],
        partials: dict[str, LayerPartial] | None = None,
        ep: EPPartial | None = None,
        probabilities: np.ndarray | None = None,
        nic_graph: GraphNICScores | None = None,
    ) -> DetectionResult:
        """Complete detection for a batch given the forward pass and any partial results already computed
        (per-layer NIC checks, the EP check, the softmax (N, K) of the logits, or NIC's scores from the served
        graph, which replace the per-layer checks); whatever is missing is computed here."""
        return self._result(logits, self._raw(x, logits, taps, partials, ep, nic_graph), probabilities)

    def _raw(
        self,
        x: torch.Tensor,
        logits: torch.Tensor,
        taps: dict[str, torch.Tensor],
        partials: dict[str, LayerPartial] | None,
        ep: EPPartial | None = None,
        nic_graph: GraphNICScores | None = None,
    ) -> _RawScores:
        t0 = time.perf_counter()
        if nic_graph is None:
            value, prov, final = self._nic_raw(x, logits, taps, dict(partials or {}))
        else:
            value, prov, final = self._nic_from_graph(x, logits, taps, nic_graph)
        t1 = time.perf_counter()
        if ep is None:
            ep = self.ep_check(x, logits, taps)
        v_viol = self.nic.value_violation(value.numpy())  # (N, L), reused by the response
        p_viol = self.nic.provenance_violation(prov.numpy())  # (N, L-1)
        vi = two_sided_fisher(v_viol, self.nic.calibration_size)
        timings = {NIC: t1 - t0, EP: ep.seconds}
        gauss = None
        if self.gaussian is not None:
            t2 = time.perf_counter()
            gauss = self.gaussian.score(self.gaussian_activations(x, logits, taps))
            timings[MAHALANOBIS] = time.perf_counter() - t2
        return _RawScores(ep.sims, ep.raw, v_viol, p_viol, final.numpy(), vi, timings, gauss)

    def gaussian_activations(
        self, x: torch.Tensor, logits: torch.Tensor, taps: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The activations of the class-Gaussian's layers (tap names, ``input``, ``logits``)."""
        assert self.gaussian is not None
        return {n: gaussian_activation(n, x, logits, taps) for n in self.gaussian.layers}

    def _nic_raw(
        self, x: torch.Tensor, logits: torch.Tensor, taps: dict[str, torch.Tensor], partials: dict[str, LayerPartial]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """NIC's VI (N, L), PI (N, L-1) and final (N,) scores from the per-layer checks (missing ones run here)."""
        for name in self.nic_value_layers:
            if name not in partials:
                partials[name] = self.layer_check(name, layer_activation(name, x, logits, taps))
        value = torch.stack([partials[n].value for n in self.nic_value_layers], dim=1).double()  # (N, L)
        pairs = zip(self.nic_value_layers, self.nic_value_layers[1:], strict=False)
        prov = torch.stack(
            [self.nic.provenance_score(i, partials[a].probs, partials[b].probs) for i, (a, b) in enumerate(pairs)],
            dim=1,
        ).double()  # (N, L-1)
        return value, prov, self.nic.final_score(value, prov)

    def _nic_from_graph(
        self, x: torch.Tensor, logits: torch.Tensor, taps: dict[str, torch.Tensor], graph: GraphNICScores
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """NIC's VI (N, L), PI (N, L-1) and final (N,) scores from the graph's per-layer VI scores and head logits.

        The graph's results stand in for the per-layer checks of every layer but the softmax; the derived-model
        outputs are torch's softmax of the graph's head logits, and the softmax layer's check, the PIs and the
        final model run here, as in the per-layer path."""
        partials = {  # softmax per (N, K) slice, as the heads do: one (N, L, K) softmax is parallelized by torch,
            # and waking its second thread cost 5-8 ms per request on the busy 2-core machine
            name: LayerPartial(graph.value[:, j], torch.softmax(graph.head_logits[:, j], dim=-1))
            for j, name in enumerate(self.nic_value_layers)
            if name != SOFTMAX
        }
        return self._nic_raw(x, logits, taps, partials)

    def _result(self, logits: torch.Tensor, raw: _RawScores, probs: np.ndarray | None = None) -> DetectionResult:
        if self.verdict is None:
            raise RuntimeError("pipeline has no fused-verdict calibration yet")
        if probs is None:
            probs = torch.softmax(logits.float(), dim=1).numpy()
        fused = self.verdict.fuse(raw.components)
        v_viol, p_viol = raw.value_violation, raw.provenance_violation
        gauss = None
        if raw.mahalanobis is not None and MAHALANOBIS in self.verdict.components:
            gauss = violation_probability(self.verdict.sorted_calib(MAHALANOBIS), raw.mahalanobis, assume_sorted=True)
        sup = None
        if self.supervised is not None and self.supervised_threshold is not None:
            sup = self.supervised.assess(self._features(raw, self.supervised.features), self.supervised_threshold)
        return DetectionResult(
            probabilities=probs,
            predicted=probs.argmax(1),
            confidence=probs.max(1),
            ep_layers=self.ep_layers,
            rank1_similarity=raw.sims[1],
            rank2_similarity=raw.sims[2],
            ep_score=violation_probability(self.verdict.sorted_calib(EP), raw.ep, assume_sorted=True),
            value_violation={n: v_viol[:, j] for j, n in enumerate(self.nic_value_layers)},
            provenance_violation={n: p_viol[:, j] for j, n in enumerate(self.nic_provenance_pairs)},
            nic_score=self.nic.final_violation(raw.final),
            score=fused,
            p_value=self.verdict.p_values(fused),
            adversarial=fused > self.threshold,
            threshold=self.threshold,
            target_fpr=self.target_fpr,
            timings_s=raw.timings_s,
            supervised=sup,
            mahalanobis_layers=list(self.gaussian.layers) if gauss is not None and self.gaussian else [],
            mahalanobis_score=gauss,
        )

    @torch.no_grad()
    def detect(
        self,
        x: torch.Tensor | np.ndarray,
        logits: torch.Tensor | None = None,
        taps: dict[str, torch.Tensor] | None = None,
    ) -> DetectionResult:
        """Serial convenience: run the classifier if needed, then every check."""
        x = torch.as_tensor(x, dtype=torch.float32)
        if logits is None or taps is None:
            logits, taps = self.classifier.forward_with_taps(x)
        return self.finish(x, logits, taps)

    @torch.no_grad()
    def detect_with_components(self, x: torch.Tensor | np.ndarray) -> tuple[DetectionResult, dict[str, np.ndarray]]:
        """Like :meth:`detect`, also returning the raw fusion inputs (unsaturated; for ROC analysis)."""
        xt = torch.as_tensor(x, dtype=torch.float32)
        logits, taps = self.classifier.forward_with_taps(xt)
        raw = self._raw(xt, logits, taps, None)
        return self._result(logits, raw), raw.components

    def _features(self, raw: _RawScores, feature_set: str) -> np.ndarray:
        """(N, F) supervised features (see :mod:`pathguard.models.verdict.supervised`) from one batch's raw scores."""
        ep = [raw.sims[1], raw.sims[2]]
        if feature_set == "effective_path":
            return np.concatenate(ep, axis=1)
        comps = np.stack([raw.ep, raw.final, raw.value_stat], axis=1)
        return np.concatenate([*ep, raw.value_violation, raw.provenance_violation, comps], axis=1)

    def feature_names(self, feature_set: str) -> list[str]:
        """Column names of :meth:`supervised_features`."""
        names = [f"rank{r}_similarity/{n}" for r in (1, 2) for n in self.ep_layers]
        if feature_set == "effective_path":
            return names
        names += [f"value_violation/{n}" for n in self.nic_value_layers]
        names += [f"provenance_violation/{n}" for n in self.nic_provenance_pairs]
        return [*names, f"raw/{EP}", f"raw/{NIC}", f"raw/{NIC_VI}"]

    @torch.no_grad()
    def supervised_features(self, x: torch.Tensor | np.ndarray, feature_set: str, batch_size: int = 500) -> np.ndarray:
        """(N, F) supervised features of inputs (N, C, H, W): ``"effective_path"`` or ``"all"``."""
        out = []
        xt = torch.as_tensor(x, dtype=torch.float32)
        for s in range(0, len(xt), batch_size):
            xb = xt[s : s + batch_size]
            logits, taps = self.classifier.forward_with_taps(xb)
            out.append(self._features(self._raw(xb, logits, taps, None), feature_set))
        return np.concatenate(out)

    @torch.no_grad()
    def raw_components(self, x: torch.Tensor | np.ndarray, batch_size: int = 500) -> dict[str, np.ndarray]:
        """Raw fusion inputs (EP, NIC final, NIC VI-only and, with the class Gaussians, their Fisher statistic;
        higher = more anomalous) of inputs (N, C, H, W)."""
        out: dict[str, list[np.ndarray]] = {EP: [], NIC: [], NIC_VI: []}
        if self.gaussian is not None:
            out[MAHALANOBIS] = []
        xt = torch.as_tensor(x, dtype=torch.float32)
        for s in range(0, len(xt), batch_size):
            xb = xt[s : s + batch_size]
            logits, taps = self.classifier.forward_with_taps(xb)
            for k, v in self._raw(xb, logits, taps, None).components.items():
                out[k].append(v)
        return {k: np.concatenate(v) for k, v in out.items()}


@dataclass
class _RawScores:
    sims: dict[int, np.ndarray]  # rank -> (N, L)
    ep: np.ndarray  # (N,)
    value_violation: np.ndarray  # (N, L_nic) VI violation probabilities
    provenance_violation: np.ndarray  # (N, L_nic - 1) PI violation probabilities
    final: np.ndarray  # (N,)
    value_stat: np.ndarray  # (N,) two-sided VI-only statistic
    timings_s: dict[str, float]
    mahalanobis: np.ndarray | None = None  # (N,) class-Gaussian Fisher statistic (bundles with the component)

    @property
    def components(self) -> dict[str, np.ndarray]:
        out = {EP: self.ep, NIC: self.final, NIC_VI: self.value_stat}
        if self.mahalanobis is not None:
            out[MAHALANOBIS] = self.mahalanobis
        return out


def gaussian_activation(
    name: str, x: torch.Tensor, logits: torch.Tensor, taps: dict[str, torch.Tensor]
) -> torch.Tensor:
    """A class-Gaussian layer's activation: a tap, the ``input`` or the ``logits``."""
    if name == INPUT:
        return x
    if name == "logits":
        return logits
    return taps[name]
