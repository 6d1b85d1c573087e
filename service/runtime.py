"""Inference engine of the service: classifier runtimes, parallel layer checks and the micro-batcher.

Data flow for one batch (N, C, H, W):

1. the classifier engine runs the forward pass and reports every tap as soon as it exists;
2. with ``parallel_checks`` the pipeline's per-layer check of each checked tap starts at once on a worker thread
   while the forward pass continues (onnxruntime: the ONNX graph is split into stages at the checked taps;
   torch: the runtime steps through the named children of the TappedSequential);
3. when the forward pass and all layer checks are done, ``pipeline.finish`` runs Effective Path (it needs the
   logits) and the fusion into the verdict.

Without ``parallel_checks`` the same checks run one after the other after the forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
import torch
from torch import nn

from models.classifiers import TappedSequential, tap_points
from models.nic import INPUT, layer_activation
from service.errors import Overloaded

__all__ = [
    "BatchSlice",
    "Classified",
    "ClassifierEngine",
    "Detected",
    "DetectionRuntime",
    "MicroBatcher",
    "OnnxEngine",
    "TorchEngine",
    "softmax",
]

log = logging.getLogger("pathguard.service")

TapCallback = Callable[[str, torch.Tensor], None]


class Pipeline(Protocol):
    """The part of ``models.pipeline.DetectionPipeline`` the runtime drives."""

    checked_taps: list[str]
    nic_value_layers: list[str]

    def layer_check(self, name: str, activation: torch.Tensor) -> Any: ...

    def finish(
        self,
        x: torch.Tensor,
        logits: torch.Tensor,
        taps: dict[str, torch.Tensor],
        partials: dict[str, Any],
    ) -> Any: ...


class ClassifierEngine(Protocol):
    """A classifier runtime: logits only, or logits plus every tap (reported in forward order)."""

    name: str

    def logits(self, x: np.ndarray) -> np.ndarray: ...

    def forward(
        self, x: np.ndarray, on_tap: TapCallback | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits, float32."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------------------------------- engines


class TorchEngine:
    """The bundle's TappedSequential in torch, stepping through its named children to report taps."""

    name = "torch"

    def __init__(self, model: TappedSequential) -> None:
        self.model = model.eval()
        self._points = tap_points(model)
        self._children: list[nn.Module] = list(model.children())

    @torch.no_grad()
    def logits(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.model(torch.from_numpy(x)).numpy()
        return out

    @torch.no_grad()
    def forward(self, x: np.ndarray, on_tap: TapCallback | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = torch.from_numpy(x)
        taps: dict[str, torch.Tensor] = {}
        for i, module in enumerate(self._children):
            t = module(t)
            name = self._points.get(i)
            if name is not None:
                taps[name] = t
                if on_tap is not None:
                    on_tap(name, t)
        return t, taps


@dataclass(frozen=True)
class _Stage:
    input_name: str
    outputs: list[str]
    session: ort.InferenceSession


class OnnxEngine:
    """onnxruntime on the classifier's ONNX export (outputs ``["logits", *taps]``, input ``"input"``).

    For tap-by-tap execution the graph is cut into stages at ``split_at`` (the taps whose checks may start early):
    stage k reads the previous cut tensor and yields the taps up to the next cut. Models that cannot be cut into
    a chain of single-input stages run as one stage (taps then arrive together at the end).
    """

    name = "onnx"

    def __init__(self, model_bytes: bytes, split_at: Sequence[str], threads: int = 1) -> None:
        model = onnx.load_from_string(model_bytes)
        self.input_name = model.graph.input[0].name
        self.tap_names = [o.name for o in model.graph.output if o.name != "logits"]
        self._options = ort.SessionOptions()
        self._options.intra_op_num_threads = threads
        self._options.inter_op_num_threads = 1
        self._options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._full = self._session(model_bytes)
        self.stages = self._split(model, [t for t in self.tap_names if t in set(split_at)])

    def _session(self, model_bytes: bytes) -> ort.InferenceSession:
        return ort.InferenceSession(model_bytes, self._options, providers=["CPUExecutionProvider"])

    def _split(self, model: onnx.ModelProto, cuts: list[str]) -> list[_Stage]:
        whole = [_Stage(self.input_name, ["logits", *self.tap_names], self._full)]
        if not cuts:
            return whole
        ancestors = _ancestors(model.graph)
        outputs = ["logits", *self.tap_names]
        groups: list[list[str]] = [[] for _ in range(len(cuts) + 1)]
        for out in outputs:  # stage index = number of cuts strictly upstream of the output
            groups[sum(c in ancestors[out] for c in cuts)].append(out)
        inputs = [self.input_name, *cuts]
        extractor = onnx.utils.Extractor(model)
        stages = []
        try:
            for inp, outs in zip(inputs, groups, strict=True):
                if not outs:
                    continue
                sub = extractor.extract_model([inp], [o for o in outputs if o in outs])
                stages.append(_Stage(inp, [o for o in outputs if o in outs], self._session(sub.SerializeToString())))
        except Exception as exc:  # any graph that is not a chain of single-input stages
            log.warning("ONNX graph cannot be split at %s (%s); taps will arrive after the full pass", cuts, exc)
            return whole
        return stages

    def logits(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._full.run(["logits"], {self.input_name: x})[0]
        return out

    def forward(self, x: np.ndarray, on_tap: TapCallback | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values: dict[str, np.ndarray] = {self.input_name: x}
        if on_tap is None:  # serial: one run of the full graph is cheapest
            outs = self._full.run(["logits", *self.tap_names], {self.input_name: x})
            values.update(zip(["logits", *self.tap_names], outs, strict=True))
        else:
            for stage in self.stages:
                outs = stage.session.run(stage.outputs, {stage.input_name: values[stage.input_name]})
                for name, value in zip(stage.outputs, outs, strict=True):
                    values[name] = value
                    if name != "logits":
                        on_tap(name, torch.from_numpy(value))
        taps = {n: torch.from_numpy(values[n]) for n in self.tap_names}
        return torch.from_numpy(values["logits"]), taps


def _ancestors(graph: onnx.GraphProto) -> dict[str, set[str]]:
    """Tensor name -> every tensor it (transitively) depends on; nodes are topologically sorted in ONNX."""
    anc: dict[str, set[str]] = {i.name: set() for i in graph.input}
    for node in graph.node:
        deps: set[str] = set()
        for inp in node.input:
            if inp:
                deps |= {inp} | anc.get(inp, set())
        for out in node.output:
            anc[out] = deps
    return anc


# --------------------------------------------------------------------------------------------------- runtime


@dataclass
class Classified:
    """Classification of a batch: probabilities (N, K) and the forward-pass wall time."""

    probabilities: np.ndarray
    classify_s: float


@dataclass
class Detected:
    """Detection of a batch: the pipeline's result (batch of N) and wall times.

    ``checks_s`` is the time from the end of the forward pass to the verdict, i.e. what the layer checks add.
    """

    result: Any
    probabilities: np.ndarray
    classify_s: float
    checks_s: float


@dataclass
class ShadowStarted:
    """Shadow mode: the classification now, the detection later (a concurrent future of :class:`Detected`)."""

    classified: Classified
    detection: Future[Detected]


class DetectionRuntime:
    """Classifier engine + detection pipeline + worker threads for the per-layer checks."""

    def __init__(self, engine: ClassifierEngine, pipeline: Pipeline, worker_threads: int, parallel: bool) -> None:
        self.engine = engine
        self.pipeline = pipeline
        self.parallel = parallel
        self.checked = set(pipeline.checked_taps)
        self._workers = ThreadPoolExecutor(worker_threads, thread_name_prefix="pathguard-check")
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="pathguard-shadow")
        # Effective Path needs the logits and runs in ``pipeline.finish`` on the calling thread. A dedicated EP thread
        # beside NIC's checks was measured slower (MNIST batch 1: 14.5 vs 11.5 ms): both are chains of tiny torch ops
        # that hold the GIL between ops, so running them side by side only adds GIL hand-offs.

    def close(self) -> None:
        self._workers.shutdown(wait=True, cancel_futures=True)
        self._finisher.shutdown(wait=True, cancel_futures=True)

    def classify(self, x: np.ndarray) -> Classified:
        """Forward pass only. ``x``: float32 (N, C, H, W) in [0, 1]."""
        t0 = time.perf_counter()
        logits = self.engine.logits(x)
        return Classified(softmax(logits), time.perf_counter() - t0)

    def _forward(self, x: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any], float]:
        """Forward pass; returns logits, taps, per-layer checks (futures when parallel) and the forward time.

        In parallel mode the input's check starts before the forward pass, each tap's check as soon as the tap
        exists, and the remaining checked layers (e.g. the softmax) as soon as the logits exist.
        """
        checks: dict[str, Any] = {}
        xt = torch.from_numpy(x)

        def launch(name: str, activation: torch.Tensor) -> None:
            if name in self.checked:
                checks[name] = self._workers.submit(self.pipeline.layer_check, name, activation)

        t0 = time.perf_counter()
        if not self.parallel:
            logits, taps = self.engine.forward(x, None)
            return logits, taps, checks, time.perf_counter() - t0
        if INPUT in self.pipeline.nic_value_layers:
            checks[INPUT] = self._workers.submit(self.pipeline.layer_check, INPUT, xt)
        logits, taps = self.engine.forward(x, launch)
        classify_s = time.perf_counter() - t0
        for name in self.pipeline.nic_value_layers:
            if name not in checks:
                checks[name] = self._workers.submit(
                    self.pipeline.layer_check, name, layer_activation(name, xt, logits, taps)
                )
        return logits, taps, checks, classify_s

    def _finish(
        self, x: np.ndarray, logits: torch.Tensor, taps: dict[str, torch.Tensor], checks: Mapping[str, Any]
    ) -> Any:
        """Collect the layer checks (serial mode: the pipeline runs them itself) and compute the verdict."""
        partials = {name: fut.result() for name, fut in checks.items()}
        return self.pipeline.finish(torch.from_numpy(x), logits, taps, partials)

    def detect(self, x: np.ndarray) -> Detected:
        """Forward pass with the layer checks (parallel or serial), then the verdict. ``x``: (N, C, H, W)."""
        logits, taps, checks, classify_s = self._forward(x)
        t0 = time.perf_counter()
        result = self._finish(x, logits, taps, checks)
        return Detected(result, softmax(logits.numpy()), classify_s, time.perf_counter() - t0)

    def detect_shadow(self, x: np.ndarray) -> ShadowStarted:
        """Forward pass now (layer checks already started); the rest of the detection on a background thread."""
        logits, taps, checks, classify_s = self._forward(x)
        probabilities = softmax(logits.numpy())

        def rest() -> Detected:
            t0 = time.perf_counter()
            result = self._finish(x, logits, taps, checks)
            return Detected(result, probabilities, classify_s, time.perf_counter() - t0)

        return ShadowStarted(Classified(probabilities, classify_s), self._finisher.submit(rest))

    def warm_up(self, shape: tuple[int, int, int], batch_sizes: Sequence[int], rounds: int) -> None:
        """Run classification and detection on blank inputs so the first real request pays no setup cost."""
        for n in batch_sizes:
            x = np.zeros((n, *shape), dtype=np.float32)
            for _ in range(rounds):
                self.classify(x)
                self.detect(x)


# --------------------------------------------------------------------------------------------------- batching

R = TypeVar("R")


@dataclass
class BatchSlice(Generic[R]):
    """One request's share of a batch result: rows ``start:start+count`` of ``batch``."""

    batch: R
    start: int
    count: int
    queue_s: float
    batch_size: int

    @property
    def rows(self) -> range:
        return range(self.start, self.start + self.count)


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future[BatchSlice[Any]]
    enqueued: float


class MicroBatcher(Generic[R]):
    """Collects requests into batches of at most ``max_batch`` images and runs ``work`` on one thread.

    A batch takes every request queued while the previous batch ran (plus, if ``max_wait_s`` > 0, those arriving
    within ``max_wait_s`` of the first one). The queue holds at most ``queue_size`` requests; beyond that
    :meth:`submit` raises :class:`Overloaded` (503 + Retry-After) instead of growing memory.
    """

    def __init__(
        self,
        name: str,
        work: Callable[[np.ndarray], R],
        max_batch: int,
        max_wait_s: float,
        queue_size: int,
        retry_after_s: int = 1,
    ) -> None:
        self.name = name
        self.work = work
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.retry_after_s = retry_after_s
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=queue_size)
        self._carry: _Item | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"pathguard-{name}")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"pathguard-batcher-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, x: np.ndarray) -> BatchSlice[R]:
        """Queue ``x`` (n, C, H, W) and wait for its share of a batch result."""
        fut: asyncio.Future[BatchSlice[Any]] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Item(x, fut, time.perf_counter()))
        except asyncio.QueueFull:
            raise Overloaded(f"{self.name} queue is full; retry later", self.retry_after_s) from None
        return await fut

    async def _next(self, timeout: float | None) -> _Item | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout is None:
            return await self._queue.get()
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            if timeout <= 0:
                return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def _collect(self) -> list[_Item]:
        first = await self._next(None)
        assert first is not None
        batch, n = [first], len(first.x)
        deadline = time.perf_counter() + self.max_wait_s
        while n < self.max_batch:
            item = await self._next(max(0.0, deadline - time.perf_counter()))
            if item is None:
                break
            if n + len(item.x) > self.max_batch:
                self._carry = item
                break
            batch.append(item)
            n += len(item.x)
        return [i for i in batch if not i.future.done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            started = time.perf_counter()
            x = batch[0].x if len(batch) == 1 else np.concatenate([i.x for i in batch])  # (N, C, H, W)
            try:
                result = await loop.run_in_executor(self._executor, self.work, x)
            except Exception as exc:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            start = 0
            for item in batch:
                if not item.future.done():
                    item.future.set_result(BatchSlice(result, start, len(item.x), started - item.enqueued, len(x)))
                start += len(item.x)
