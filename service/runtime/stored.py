"""The runtime of a bundle's stored guarded graph (:mod:`pathguard.models.bundle.stored`): no torch.

``/v1/predict`` runs the plain classifier (``classifier.onnx``) in onnxruntime; a detection is one run of the stored
guarded graph (classifier, consistency copies, every in-graph component, their response fields, the verdict's
fusion). Shadow mode answers with the plain classifier first and runs the graph on the background thread. It offers
what the service reads of :class:`~pathguard.service.runtime.checks.DetectionRuntime`: ``classify``, ``detect``,
``detect_shadow``, ``warm_up``, ``close`` and the ``engine``, ``graph``, ``pipeline``, ``skip`` and ``beside``
attributes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import onnxruntime as ort

from pathguard.models.bundle.result import softmax
from pathguard.models.bundle.stored import StoredBundle, StoredDetector
from pathguard.service.runtime.results import BaseRuntime, Classified, Detected, ShadowStarted
from pathguard.service.runtime.sessions import CPU, resolve_providers, session_options

__all__ = ["StoredClassifier", "StoredRuntime"]


class StoredClassifier:
    """The plain classifier in onnxruntime, logits only (what ``/v1/predict`` runs)."""

    name = "onnx"
    split_error: str | None = None  # never split: no per-layer checks run beside it
    computes_nic = False

    def __init__(self, model_bytes: bytes, threads: int = 1, providers: Sequence[str] = (CPU,)) -> None:
        self.session = ort.InferenceSession(
            model_bytes, session_options(threads), providers=resolve_providers(providers)
        )
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.session.run(None, {self.input_name: x})[0]
        return out


class StoredRuntime(BaseRuntime):
    """Classifier + stored guarded graph (see the module docstring). ``reported``: PATHGUARD_REPORTED_COMPONENTS
    (``verdict``: the verdict's components only; ``all`` and ``graph``: every one in the graph). ``seed``: the noise
    copies' seed (None: fresh per input)."""

    def __init__(
        self,
        bundle: StoredBundle,
        reported: str = "all",
        seed: int | None = None,
        threads: int = 1,
        inter_op_threads: int = 1,
        providers: Sequence[str] = (CPU,),
        shadow_backlog: int = 64,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(shadow_backlog, on_drop)
        self.engine = StoredClassifier(bundle.onnx_bytes, threads, providers)
        self.graph = StoredDetector(
            bundle, seed, session_options(threads, inter_op_threads), resolve_providers(providers)
        )
        self.pipeline = bundle.info
        # not reported: the components with no in-graph form and, by PATHGUARD_REPORTED_COMPONENTS, the rest
        verdict = set(bundle.graph["verdict"]["components"])
        self.skip = [
            c for c in bundle.info.components if c in self.graph.skipped or (reported == "verdict" and c not in verdict)
        ]
        self.beside: list[str] = []
        self.graph_note: str | None = None

    def classify(self, x: np.ndarray) -> Classified:
        t0 = time.perf_counter()
        logits = self.engine.logits(x)
        return Classified(softmax(logits), time.perf_counter() - t0)

    def detect(self, x: np.ndarray, probabilities: np.ndarray | None = None) -> Detected:
        """One run of the stored graph: ``classify_s`` is all of it (the forward passes and every component in one
        onnxruntime run), ``checks_s`` zero."""
        t0 = time.perf_counter()
        result = self.graph.detect(x, probabilities, self.skip)
        return Detected(result, result.probabilities, time.perf_counter() - t0, 0.0)

    def detect_shadow(self, x: np.ndarray) -> ShadowStarted:
        classified = self.classify(x)
        if not self._admit_shadow():
            self._dropped(len(x))
            return ShadowStarted(classified, None)
        return ShadowStarted(classified, self._in_background(lambda: self.detect(x, classified.probabilities)))
