"""Inference engine of the service: classifier runtimes, parallel layer checks and the micro-batcher.

Data flow for one batch (N, C, H, W):

1. the classifier engine runs the forward pass and reports every tap as soon as it exists;
2. with ``parallel_checks`` the pipeline's per-layer check of each checked tap starts at once on a worker thread
   while the forward pass continues (onnxruntime: the ONNX graph is split into stages at the checked taps;
   torch: the runtime steps through the named children of the TappedSequential), and the consistency copies'
   forward pass (bundles with noise or squeezing components) starts before it on the pipeline's own thread;
3. when the forward pass and all layer checks are done, ``pipeline.finish`` runs Effective Path (it needs the
   logits) and the fusion into the verdict.

Without ``parallel_checks`` the same checks run one after the other after the forward pass.

An engine that computes NIC in its graph (``engine.computes_nic``: the onnx engine with NIC appended to the served
graph) returns NIC's scores with the logits and taps from one run; no per-layer check is submitted then, and
``pipeline.finish`` uses those scores (``nic_graph``; it redoes only the softmax layer's checks).

With the guarded graph (``graph=``, a :class:`~pathguard.service.runtime.engines.GuardedEngine`), a batch is one run
of it (the classifier, its consistency copies and every in-graph component); the components it does not hold (less
``skip``) run on a worker thread beside it, on the taps of a plain forward pass just before, and
``pipeline.finish_graph`` fuses the verdict. In shadow mode the plain classifier answers first and the rest runs on
the background thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from pathguard.models.nic import INPUT, layer_activation
from pathguard.models.nic.onnx_export import GraphNICScores
from pathguard.service.runtime.engines import ClassifierEngine, GuardedEngine, softmax
from pathguard.service.runtime.results import BaseRuntime, Classified, Detected, ShadowStarted

__all__ = ["Classified", "Detected", "DetectionRuntime", "Pipeline", "ShadowStarted"]

log = logging.getLogger("pathguard.service")


class Pipeline(Protocol):
    """The part of ``pathguard.models.bundle.pipeline.DetectionPipeline`` the runtime drives."""

    checked_taps: list[str]
    nic_value_layers: list[str]
    components: dict[str, Any]

    def layer_check(self, name: str, activation: torch.Tensor) -> Any: ...

    def start_probe(self, x: torch.Tensor) -> Any: ...

    def generators(self, x: torch.Tensor) -> list[torch.Generator]: ...

    def graph_observation(
        self, x: torch.Tensor, logits: torch.Tensor, taps: dict[str, torch.Tensor], generators: Any
    ) -> Any: ...

    def raw_of(self, obs: Any, names: Sequence[str]) -> dict[str, np.ndarray]: ...

    def finish_graph(
        self,
        obs: Any,
        raw: dict[str, np.ndarray],
        nic_graph: GraphNICScores | None = None,
        probabilities: np.ndarray | None = None,
        skip: Sequence[str] = (),
    ) -> Any: ...

    def finish(
        self,
        x: torch.Tensor,
        logits: torch.Tensor,
        taps: dict[str, torch.Tensor],
        partials: dict[str, Any],
        *,
        probabilities: np.ndarray | None = None,
        nic_graph: GraphNICScores | None = None,
        probe: Any = None,
    ) -> Any: ...


@dataclass
class _Forward:
    """A batch's forward pass: logits, taps, the per-layer checks it started (futures in parallel mode), its wall
    time, and NIC's scores where the engine computed them in its graph."""

    logits: torch.Tensor
    taps: dict[str, torch.Tensor]
    checks: dict[str, Any]
    classify_s: float
    nic_graph: GraphNICScores | None = None
    probe: Any = None  # the consistency copies' pass, begun before the forward pass (None: the bundle has none)


class DetectionRuntime(BaseRuntime):
    """Classifier engine + detection pipeline + worker threads for the per-layer checks.

    Shadow mode finishes detections on one background thread. At most ``shadow_backlog`` batches may wait for it
    (the one being finished included); the verdicts of a batch arriving beyond that are dropped (its layer checks
    cancelled where they have not started, ``on_drop(n_images)`` called) so a slow finisher cannot grow memory
    without bound. The prediction is answered either way.
    """

    def __init__(
        self,
        engine: ClassifierEngine,
        pipeline: Pipeline,
        worker_threads: int,
        parallel: bool,
        shadow_backlog: int = 64,
        on_drop: Callable[[int], None] | None = None,
        graph: GuardedEngine | None = None,
        skip: Sequence[str] = (),
        graph_note: str | None = None,
    ) -> None:
        self.engine = engine
        self.graph = graph
        self.skip = list(skip)
        # the components the graph does not hold and the answers report: computed beside the graph
        inside = set(graph.components) if graph is not None else set(pipeline.components)
        self.beside = [k for k in pipeline.components if k not in inside and k not in self.skip]
        self.graph_note = graph_note  # why detection is not served from the graph
        self.pipeline = pipeline
        self.parallel = parallel
        self.checked = set(pipeline.checked_taps)
        super().__init__(shadow_backlog, on_drop)
        self._workers = ThreadPoolExecutor(worker_threads, thread_name_prefix="pathguard-check")
        # Effective Path needs the logits and runs in ``pipeline.finish`` on the calling thread. A dedicated EP thread
        # beside NIC's checks was measured slower (MNIST batch 1: 14.5 vs 11.5 ms): both are chains of tiny torch ops
        # that hold the GIL between ops, so running them side by side only adds GIL hand-offs.

    def close(self) -> None:
        self._workers.shutdown(wait=True, cancel_futures=True)
        super().close()

    def classify(self, x: np.ndarray) -> Classified:
        """Forward pass only. ``x``: float32 (N, C, H, W) in [0, 1]."""
        t0 = time.perf_counter()
        logits = self.engine.logits(x)
        return Classified(softmax(logits), time.perf_counter() - t0)

    def _forward(self, x: np.ndarray) -> _Forward:
        """Forward pass; returns logits, taps, per-layer checks (futures when parallel) and the forward time.

        In parallel mode the input's check starts before the forward pass, each tap's check as soon as the tap
        exists, and the remaining checked layers (e.g. the softmax) as soon as the logits exist. An engine that
        computes NIC returns its scores instead (no per-layer checks).
        """
        xt = torch.from_numpy(x)
        # the consistency copies need the inputs only: in parallel mode their pass runs beside the forward pass
        probe = self.pipeline.start_probe(xt) if self.parallel else None
        if self.engine.computes_nic:
            t0 = time.perf_counter()
            logits, taps, nic_graph = self.engine.forward_with_nic(x)
            return _Forward(logits, taps, {}, time.perf_counter() - t0, nic_graph, probe)
        checks: dict[str, Any] = {}

        def launch(name: str, activation: torch.Tensor) -> None:
            if name in self.checked:
                checks[name] = self._workers.submit(self.pipeline.layer_check, name, activation)

        t0 = time.perf_counter()
        if not self.parallel:
            logits, taps = self.engine.forward(x, None)
            return _Forward(logits, taps, checks, time.perf_counter() - t0, probe=probe)
        if INPUT in self.pipeline.nic_value_layers:
            checks[INPUT] = self._workers.submit(self.pipeline.layer_check, INPUT, xt)
        logits, taps = self.engine.forward(x, launch)
        classify_s = time.perf_counter() - t0
        for name in self.pipeline.nic_value_layers:
            if name not in checks:
                checks[name] = self._workers.submit(
                    self.pipeline.layer_check, name, layer_activation(name, xt, logits, taps)
                )
        return _Forward(logits, taps, checks, classify_s, probe=probe)

    def _finish(self, x: np.ndarray, fwd: _Forward, probabilities: np.ndarray) -> tuple[Any, float]:
        """Collect the layer checks (serial mode: the pipeline runs them itself) and compute the verdict; returns
        the result and the seconds spent waiting for the checks still running."""
        t0 = time.perf_counter()
        partials = {name: fut.result() for name, fut in fwd.checks.items()}
        wait_s = time.perf_counter() - t0
        result = self.pipeline.finish(
            torch.from_numpy(x), fwd.logits, fwd.taps, partials, probabilities=probabilities, nic_graph=fwd.nic_graph,
            probe=fwd.probe,
        )  # fmt: skip
        return result, wait_s

    def _detect_graph(
        self,
        x: np.ndarray,
        probabilities: np.ndarray | None = None,
        forward: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None,
    ) -> Detected:
        """One run of the guarded graph (classifier, copies and every in-graph component) and, on a worker thread
        beside it, the components it does not hold (less ``skip``) on the plain classifier's taps; then the verdict
        in the pipeline. ``classify_s`` is the two forward passes (the graph's noise drawn included), ``checks_s``
        the rest, ``wait_s`` its part spent waiting for the components beside the graph. ``forward``: the plain
        classifier's logits and taps of ``x`` when the caller has them already."""
        assert self.graph is not None
        xt = torch.from_numpy(x)
        generators = self.pipeline.generators(xt)
        t0 = time.perf_counter()
        beside: Future[dict[str, np.ndarray]] | None = None
        if self.beside:  # their taps from the plain classifier: they run while the graph does (it frees the GIL)
            logits, taps = forward if forward is not None else self.engine.forward(x, None)
            obs = self.pipeline.graph_observation(xt, logits, taps, generators)
            beside = self._workers.submit(self.pipeline.raw_of, obs, self.beside)
        run = self.graph.run(x, generators)
        classify_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        raw = dict(run.raw)
        if beside is None:
            obs = self.pipeline.graph_observation(xt, run.logits, {}, generators)
        else:
            raw |= beside.result()
        wait_s = time.perf_counter() - t1
        probs = softmax(obs.logits.numpy()) if probabilities is None else probabilities
        result = self.pipeline.finish_graph(obs, raw, nic_graph=run.nic, probabilities=probs, skip=self.skip)
        return Detected(result, probs, classify_s, time.perf_counter() - t1, wait_s)

    def detect(self, x: np.ndarray) -> Detected:
        """Forward pass with the layer checks (parallel or serial), then the verdict. ``x``: (N, C, H, W).

        The softmax is computed once here and shared with the pipeline's result. With the guarded graph: one run
        of it, then what it does not hold."""
        if self.graph is not None:
            return self._detect_graph(x)
        fwd = self._forward(x)
        t0 = time.perf_counter()
        probabilities = softmax(fwd.logits.numpy())
        result, wait_s = self._finish(x, fwd, probabilities)
        return Detected(result, probabilities, fwd.classify_s, time.perf_counter() - t0, wait_s)

    def detect_shadow(self, x: np.ndarray) -> ShadowStarted:
        """Forward pass now (layer checks already started); the rest of the detection on a background thread,
        unless the shadow backlog is full (then ``detection`` is None and the verdicts are dropped). With the guarded
        graph the prediction comes from the plain classifier and the graph runs on the background thread."""
        if self.graph is not None:
            return self._shadow_graph(x)
        fwd = self._forward(x)
        probabilities = softmax(fwd.logits.numpy())
        classified = Classified(probabilities, fwd.classify_s)
        if not self._admit_shadow():
            for fut in fwd.checks.values():
                fut.cancel()
            if fwd.probe is not None:
                fwd.probe.future.cancel()
            self._dropped(len(x))
            return ShadowStarted(classified, None)

        def rest() -> Detected:
            t0 = time.perf_counter()
            result, wait_s = self._finish(x, fwd, probabilities)
            return Detected(result, probabilities, fwd.classify_s, time.perf_counter() - t0, wait_s)

        return ShadowStarted(classified, self._in_background(rest))

    def _shadow_graph(self, x: np.ndarray) -> ShadowStarted:
        t0 = time.perf_counter()
        forward = self.engine.forward(x, None) if self.beside else None  # the taps the components beside it read
        logits = forward[0].numpy() if forward is not None else self.engine.logits(x)
        classified = Classified(softmax(logits), time.perf_counter() - t0)
        if not self._admit_shadow():
            self._dropped(len(x))
            return ShadowStarted(classified, None)

        def rest() -> Detected:
            return self._detect_graph(x, classified.probabilities, forward)

        return ShadowStarted(classified, self._in_background(rest))
