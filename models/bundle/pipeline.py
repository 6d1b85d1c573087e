"""A loaded bundle and its detection pipeline: activations -> component checks -> scores -> verdict.

Data flows one way. The classifier's forward pass yields logits and the tapped activations; every registered
component of the bundle (:mod:`pathguard.models.components`) turns them into a raw score on one shared
:class:`~pathguard.models.components.Observation`, and the verdict fuses the fused ones' calibrated p-values.

NIC's per-layer work only needs that layer's activation, so :meth:`DetectionPipeline.layer_check` can run on a
worker thread while the forward pass continues, and its results (or NIC's scores computed inside the served graph,
``finish(..., nic_graph=...)``, see :mod:`pathguard.models.nic.onnx_export`) are handed to the observation.
:meth:`DetectionPipeline.finish` does the rest: the Effective Path extraction (seeded at the logits), NIC's
provenance invariants and final model, the other components and the fused verdict.

The graph's softmaxes are not used for NIC's last steps: onnxruntime's softmax differs from torch's in the last
bit, and the scores of confidently classified inputs pile up so closely (358 of the MNIST bundle's 2000
softmax-layer calibration scores within one interval 5.2e-6 wide) that a last-bit change can move a violation
probability by up to 0.44.

Randomized components (the noise response) draw each input's noise from its own generator: with ``seed`` set
(reproducible responses, the builder's calibration) seeded from the seed and the input's pixels, so an input gets
the same noise alone or in any batch; else from fresh entropy per request.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pathguard.models.bundle.result import EP, MAHALANOBIS, NIC, SUPERVISED, DetectionResult
from pathguard.models.bundle.stored import input_seeds
from pathguard.models.components import Component, Observation
from pathguard.models.components.base import GIVEN_RAW
from pathguard.models.components.consistency import PROBE, has_copies, probe_inputs
from pathguard.models.components.effective_path import EffectivePathComponent, EPPartial
from pathguard.models.components.mahalanobis import GaussianComponent
from pathguard.models.components.nic import GRAPH, PARTIALS, LayerPartial, NICComponent
from pathguard.models.components.supervised import SupervisedComponent, feature_names, features_of
from pathguard.models.networks import TappedSequential
from pathguard.models.nic.onnx_export import GraphNICScores
from pathguard.models.verdict import FusedVerdict, violation_probability
from pathguard.models.verdict.supervised import SupervisedDetector

__all__ = ["DetectionPipeline", "DetectionResult", "EPPartial", "LayerPartial", "ProbeStart"]


_STARTED = "consistency/started"  # the observation's key of a probe begun by ``start_probe``


@dataclass
class ProbeStart:
    """A batch's consistency probe begun before its forward pass (:meth:`DetectionPipeline.start_probe`): the
    inputs' generators (the observation reuses them) and the future of the copies' logits and seconds."""

    generators: list[torch.Generator]
    future: Future[tuple[dict[str, torch.Tensor], float]]


class DetectionPipeline:
    """The bundle's components + fused verdict over one classifier (all state fitted; scoring only).

    Parameters
    ----------
    classifier : TappedSequential
    components : mapping of str to Component
        Every built component, in build order (Effective Path and NIC always among them).
    verdict : FusedVerdict or None
        None only while building (before the fused calibration exists).
    target_fpr : float
        Operating point; the threshold is read from the calibration for it (and set on every component that
        decides by itself: the supervised detector, reported beside the verdict and never fused).
    calibration : mapping of str to np.ndarray
        Clean split-A raw scores of every component (for the ``score`` each reports; the fused ones' are the
        verdict's).
    seed : int, optional
        Seed of the randomized components' noise (None: fresh per batch).
    """

    def __init__(
        self,
        classifier: TappedSequential,
        components: Mapping[str, Component],
        verdict: FusedVerdict | None,
        target_fpr: float,
        calibration: Mapping[str, np.ndarray] | None = None,
        seed: int | None = None,
    ) -> None:
        self.classifier = classifier
        self.components = dict(components)
        self.verdict = verdict
        self.target_fpr = float(target_fpr)
        self.seed = seed
        self._probe_thread: ThreadPoolExecutor | None = None
        self.threshold = verdict.threshold_for(self.target_fpr) if verdict is not None else float("nan")
        calib = {k: np.asarray(v, dtype=np.float64) for k, v in (calibration or {}).items()}
        if verdict is not None:
            calib |= {k: verdict.sorted_calib(k) for k in verdict.components}
        self.calibration = {k: np.sort(v) for k, v in calib.items()}
        ep, nic = self.components[EP], self.components[NIC]
        assert isinstance(ep, EffectivePathComponent) and isinstance(nic, NICComponent)
        self._ep, self._nic = ep, nic
        self.ep_layers: list[str] = list(ep.layers)
        self.nic_value_layers: list[str] = list(nic.value_layers)
        self.nic_provenance_pairs: list[str] = list(nic.pairs)
        self.checked_taps = list(nic.checked_taps)
        self._copies = has_copies(self.components)
        for c in self.components.values():
            c.operate_at(self.target_fpr)
            c.warm_up()

    def randomize_nic_members(self) -> None:
        """Score each input's NIC with one of the bundle's randomized members, drawn per input (NIC paper III-D; see
        :meth:`NICComponent.draw_members`). NIC's per-layer checks then run in the component (they depend on the
        member), so the runtime's early per-layer checks are turned off (``checked_taps`` empty)."""
        self._nic.draw_members(self.calibration.get(NIC))
        self.checked_taps = []

    # the detectors older callers reach by name
    @property
    def extractor(self) -> Any:
        return self._ep.extractor

    @property
    def class_paths(self) -> Any:
        return self._ep.class_paths

    @property
    def ep_score(self) -> Any:
        return self._ep.ep_score

    @property
    def nic(self) -> Any:
        return self._nic.nic

    @property
    def supervised(self) -> SupervisedDetector | None:
        """The supervised detector (bundles built with supervised attacks), reported beside the verdict."""
        c = self.components.get(SUPERVISED)
        return c.detector if isinstance(c, SupervisedComponent) else None

    @property
    def supervised_threshold(self) -> float | None:
        """The supervised detector's raw-score threshold at the pipeline's target FPR (its own calibration)."""
        c = self.components.get(SUPERVISED)
        return c.threshold if isinstance(c, SupervisedComponent) else None

    @property
    def gaussian(self) -> Any:
        g = self.components.get(MAHALANOBIS)
        return g.gaussian if isinstance(g, GaussianComponent) else None

    @torch.no_grad()
    def layer_check(self, name: str, activation: torch.Tensor) -> LayerPartial:
        """NIC work of one checked layer (``"input"``, a tap name or ``"softmax"``); thread-safe."""
        return self._nic.layer_check(name, activation)

    @torch.no_grad()
    def ep_check(self, x: torch.Tensor, logits: torch.Tensor, taps: dict[str, torch.Tensor]) -> EPPartial:
        """Effective Path extraction (seeded at the logits), similarities and raw score; thread-safe."""
        return self._ep.extract(x, logits, taps)

    def observe(
        self,
        x: torch.Tensor,
        logits: torch.Tensor,
        taps: dict[str, torch.Tensor],
        partials: dict[str, LayerPartial] | None = None,
        ep: EPPartial | None = None,
        nic_graph: GraphNICScores | None = None,
        probe: ProbeStart | None = None,
    ) -> Observation:
        """The observation of a batch's forward pass, with the partial results already computed."""
        generators = probe.generators if probe is not None else self._generators(x)
        obs = Observation(x, logits, taps, self._forward, generators, self.components)
        if probe is not None:
            obs.put(_STARTED, probe.future)
        obs.put(PARTIALS, dict(partials or {}))
        if nic_graph is not None:
            obs.put(GRAPH, nic_graph)
        if ep is not None:
            obs.put(EP, ep)
        return obs

    def start_probe(self, x: torch.Tensor) -> ProbeStart | None:
        """Start the consistency copies' forward pass of a batch now, on the pipeline's own thread: it needs the
        inputs only, so it can run beside the classifier's forward pass and the layer checks. Hand the result to
        :meth:`finish` (``probe=``); None when the bundle scores no copies."""
        if not self._copies:
            return None
        generators = self._generators(x)
        future = self._prober().submit(_timed_probe, x, generators, self.components, self._forward)
        return ProbeStart(generators, future)

    def _generators(self, x: torch.Tensor) -> list[torch.Generator]:
        """One generator per input: seeded from ``seed`` and the input's pixels, or from fresh entropy."""
        return [torch.Generator().manual_seed(s) for s in input_seeds(x.detach().float().numpy(), self.seed)]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = self.classifier(x)
        return out

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
        probe: ProbeStart | None = None,
    ) -> DetectionResult:
        """Complete detection for a batch given the forward pass and any partial results already computed
        (per-layer NIC checks, the EP check, the softmax (N, K) of the logits, NIC's scores from the served
        graph, which replace the per-layer checks, or the consistency copies' pass begun by :meth:`start_probe`);
        whatever is missing is computed here."""
        obs = self.observe(x, logits, taps, partials, ep, nic_graph, probe)
        return self._result(obs, self.raw(obs), probabilities)

    def graph_observation(
        self,
        x: torch.Tensor,
        logits: torch.Tensor,
        taps: dict[str, torch.Tensor],
        generators: Sequence[torch.Generator],
    ) -> Observation:
        """The observation of a batch scored by the guarded graph (:mod:`pathguard.models.guarded`): the classifier's
        logits and taps of the originals (for the components with no in-graph form) and the generators the graph's
        noise is drawn from. Score those components with :meth:`raw_of` (e.g. on a worker thread while the graph
        runs), then :meth:`finish_graph`."""
        return Observation(x, logits, taps, self._forward, generators, self.components)

    def raw_of(self, obs: Observation, names: Collection[str]) -> dict[str, np.ndarray]:
        """(N,) raw scores of the components ``names`` on the observation (thread-safe while nothing else uses
        ``obs``)."""
        return {name: np.asarray(self.components[name].raw(obs), dtype=np.float64) for name in names}

    def finish_graph(
        self,
        obs: Observation,
        raw: Mapping[str, np.ndarray],
        nic_graph: GraphNICScores | None = None,
        probabilities: np.ndarray | None = None,
        skip: Collection[str] = (),
    ) -> DetectionResult:
        """Complete detection of :meth:`graph_observation`'s batch: ``raw`` holds the raw scores the guarded graph
        computed (every in-graph component) and any computed beside it (:meth:`raw_of`), ``nic_graph`` the graph's
        NIC outputs (provenance and final included). The components still missing run here, but those in ``skip``
        (reported ones the caller does not want: their raw score is NaN and they report nothing); the verdict's
        components must all be given."""
        if self.verdict is not None:
            missing = [k for k in self.verdict.components if k not in raw]
            if missing:
                raise ValueError(f"the verdict's components {missing} were not scored by the graph")
        unknown = sorted(set(skip) - set(self.components))
        if unknown:
            raise ValueError(f"cannot skip {unknown}: not components of this bundle")
        obs.put(GIVEN_RAW, dict(raw))
        if nic_graph is not None:
            obs.put(GRAPH, nic_graph)
        skipped = [k for k in skip if k not in raw]
        return self._result(obs, self.raw(obs, skipped), probabilities, skipped)

    def generators(self, x: torch.Tensor) -> list[torch.Generator]:
        """The inputs' generators of the randomized components (seeded per input, or fresh; see the module
        docstring)."""
        return self._generators(x)

    def raw(self, obs: Observation, skip: Collection[str] = ()) -> dict[str, np.ndarray]:
        """(N,) raw score of every component on the observation (higher = more anomalous); those given on the
        observation (the guarded graph's, :meth:`finish_graph`) are taken as they are, those in ``skip`` are NaN.

        With consistency components, their copies' forward pass runs on the pipeline's own thread while the layer
        components score here (torch's kernels release the GIL, so the two overlap on a second core)."""
        given: Mapping[str, np.ndarray] = obs.memo.get(GIVEN_RAW) or {}
        out = {name: np.asarray(v, dtype=np.float64) for name, v in given.items() if name in self.components}
        out |= {name: np.full(len(obs), np.nan) for name in skip}
        todo = [n for n in self.components if n not in out]
        consistency = [n for n in todo if self.components[n].family == "consistency"]
        pending: Future[tuple[dict[str, torch.Tensor], float]] | None = obs.memo.pop(_STARTED, None)
        if pending is None and consistency and self._copies and PROBE not in obs.memo:
            pending = self._prober().submit(_timed_probe, obs.x, obs.generators, self.components, self._forward)
        for name in [n for n in todo if n not in consistency] + consistency:
            if pending is not None and name in consistency:
                result, seconds = pending.result()
                obs.put(PROBE, result)
                obs.timings_s[PROBE] = seconds
                pending = None
            out[name] = np.asarray(self.components[name].raw(obs), dtype=np.float64)
        return {name: out[name] for name in self.components}

    def _prober(self) -> ThreadPoolExecutor:
        if self._probe_thread is None:
            self._probe_thread = ThreadPoolExecutor(1, thread_name_prefix="pathguard-consistency")
        return self._probe_thread

    def _result(
        self,
        obs: Observation,
        raw: dict[str, np.ndarray],
        probs: np.ndarray | None = None,
        skip: Collection[str] = (),
    ) -> DetectionResult:
        if self.verdict is None:
            raise RuntimeError("pipeline has no fused-verdict calibration yet")
        if probs is None:
            probs = torch.softmax(obs.logits.float(), dim=1).numpy()
        fused = self.verdict.fuse(raw)
        fields: dict[str, dict[str, Any]] = {name: {} for name in skip}  # not computed: not reported
        for name, c in self.components.items():
            if name in skip:
                continue
            calib = self.calibration.get(name)
            violation = (
                violation_probability(calib, raw[name], assume_sorted=True)
                if calib is not None
                else np.full(len(obs), np.nan)
            )
            fields[name] = c.fields(obs, violation)
        return DetectionResult.of(
            probs, fields, raw, fused, self.verdict.p_values(fused), self.threshold, self.target_fpr, obs.timings_s
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
        """Like :meth:`detect`, also returning every component's raw score (unsaturated; for ROC analysis)."""
        xt = torch.as_tensor(x, dtype=torch.float32)
        logits, taps = self.classifier.forward_with_taps(xt)
        obs = self.observe(xt, logits, taps)
        raw = self.raw(obs)
        return self._result(obs, raw), raw

    @torch.no_grad()
    def raw_components(self, x: torch.Tensor | np.ndarray, batch_size: int = 500) -> dict[str, np.ndarray]:
        """Raw score of every component (higher = more anomalous) of inputs (N, C, H, W)."""
        out: dict[str, list[np.ndarray]] = {k: [] for k in self.components}
        xt = torch.as_tensor(x, dtype=torch.float32)
        for s in range(0, len(xt), batch_size):
            xb = xt[s : s + batch_size]
            logits, taps = self.classifier.forward_with_taps(xb)
            for k, v in self.raw(self.observe(xb, logits, taps)).items():
                out[k].append(v)
        return {k: np.concatenate(v) for k, v in out.items()}

    # ------------------------------------------------------------------ supervised features
    def feature_names(self, feature_set: str) -> list[str]:
        """Column names of :meth:`supervised_features`."""
        return feature_names(feature_set, self.components)

    @torch.no_grad()
    def supervised_features(self, x: torch.Tensor | np.ndarray, feature_set: str, batch_size: int = 500) -> np.ndarray:
        """(N, F) supervised features of inputs (N, C, H, W): ``"effective_path"`` or ``"all"``."""
        out = []
        xt = torch.as_tensor(x, dtype=torch.float32)
        for s in range(0, len(xt), batch_size):
            xb = xt[s : s + batch_size]
            logits, taps = self.classifier.forward_with_taps(xb)
            out.append(features_of(self.observe(xb, logits, taps), feature_set, self.components))
        return np.concatenate(out)


def _timed_probe(x: torch.Tensor, *args: Any) -> tuple[dict[str, torch.Tensor], float]:
    t0 = time.perf_counter()
    return probe_inputs(x, *args), time.perf_counter() - t0
