"""What the runtimes return (:class:`Classified`, :class:`Detected`, :class:`ShadowStarted`) and what they share
(:class:`BaseRuntime`: warm-up and the shadow backlog). No torch: the runtime of a stored guarded graph
(:mod:`pathguard.service.runtime.stored`) uses them too."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BaseRuntime", "Classified", "Detected", "ShadowStarted"]

log = logging.getLogger("pathguard.service")


@dataclass
class Classified:
    """Classification of a batch: probabilities (N, K) and the forward-pass wall time."""

    probabilities: np.ndarray
    classify_s: float


@dataclass
class Detected:
    """Detection of a batch: the pipeline's result (batch of N) and wall times.

    ``checks_s`` is the time from the end of the forward pass to the verdict, i.e. what the layer checks add.
    With NIC computed in the engine's graph, ``classify_s`` includes NIC's work and ``checks_s`` the rest.
    ``wait_s`` is the part of ``checks_s`` spent waiting for per-layer checks still running on worker threads.
    """

    result: Any
    probabilities: np.ndarray
    classify_s: float
    checks_s: float
    wait_s: float = 0.0


@dataclass
class ShadowStarted:
    """Shadow mode: the classification now, the detection later (a concurrent future of :class:`Detected`), or
    ``detection=None`` when the shadow backlog was full and this batch's verdicts were dropped."""

    classified: Classified
    detection: Future[Detected] | None


class BaseRuntime(ABC):
    """What the runtimes share: :meth:`warm_up`, and shadow mode's background finisher: one thread, at most
    ``shadow_backlog`` batches waiting for it (the one being finished included); a batch arriving beyond that has its
    verdicts dropped (``on_drop(n_images)``), so a slow finisher cannot grow memory without bound."""

    def __init__(self, shadow_backlog: int = 64, on_drop: Callable[[int], None] | None = None) -> None:
        self.shadow_backlog = shadow_backlog
        self.on_drop = on_drop
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="pathguard-shadow")
        self._shadow_lock = threading.Lock()
        self._shadow_pending = 0  # batches handed to the finisher and not yet finished
        self._shadow_full = False

    def close(self) -> None:
        self._finisher.shutdown(wait=True, cancel_futures=True)

    @abstractmethod
    def classify(self, x: np.ndarray) -> Classified: ...

    @abstractmethod
    def detect(self, x: np.ndarray) -> Detected: ...

    def warm_up(self, shape: tuple[int, int, int], batch_sizes: Sequence[int], rounds: int) -> None:
        """Run classification and detection on blank inputs so the first real request pays no setup cost."""
        for n in batch_sizes:
            x = np.zeros((n, *shape), dtype=np.float32)
            for _ in range(rounds):
                self.classify(x)
                self.detect(x)

    def _in_background(self, rest: Callable[[], Detected]) -> Future[Detected]:
        """Finish a shadow detection admitted by :meth:`_admit_shadow` on the background thread, freeing its place in
        the backlog when done."""

        def run() -> Detected:
            try:
                return rest()
            finally:
                with self._shadow_lock:
                    self._shadow_pending -= 1

        return self._finisher.submit(run)

    def _dropped(self, images: int) -> None:
        if self.on_drop is not None:
            self.on_drop(images)

    def _admit_shadow(self) -> bool:
        """Reserve a place in the shadow backlog; False (logged once per episode) when it is full."""
        with self._shadow_lock:
            if self._shadow_pending >= self.shadow_backlog:
                if not self._shadow_full:
                    log.warning("shadow backlog full (%d batches); dropping shadow verdicts", self.shadow_backlog)
                self._shadow_full = True
                return False
            self._shadow_pending += 1
            self._shadow_full = False
            return True
