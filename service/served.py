"""One served model: its bundle, classifier runtime, micro-batchers, metrics and statistics.

:func:`open_model` does the slow part (verify, load, warm up) on a worker thread; :meth:`ServedModel.start` starts
its batchers on the event loop; :meth:`ServedModel.stop` stops them once the requests on it have finished. Requests
hold a model through :meth:`ServedModel.use` for as long as they work on it, so a model replaced by a newer version
finishes them before it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pathguard.models.bundle.stored import has_stored_graph, load_stored, store_command, stored_graph_spec
from pathguard.models.errors import BundleError
from pathguard.service.cache import DetectionStore, Entry
from pathguard.service.errors import NotReady
from pathguard.service.inputs import InputSpec
from pathguard.service.metrics import Metrics, ModelMetrics
from pathguard.service.runtime import MicroBatcher, StoredRuntime
from pathguard.service.settings import Settings

if TYPE_CHECKING:
    from pathguard.service.runtime import ClassifierEngine, GuardedEngine

__all__ = ["ModelStats", "ModelStore", "ServedModel", "open_model"]

log = logging.getLogger("pathguard.service")


class ModelStats:
    """Counts and cumulative durations of one model's work, in the shape of Triton's model statistics.

    Requests: ``success`` / ``fail`` (count, total duration). Stages (per image or per request as recorded):
    ``queue``, ``compute_input`` (decoding), ``compute_infer`` (the forward pass), ``compute_output`` (the checks
    after the forward pass up to the verdict), ``cache_hit`` / ``cache_miss``, and the detection's own stages
    (``effective_path``, ``nic``, ``mahalanobis``, ``consistency``, ``checks_wait``). Thread-safe."""

    TRITON_STAGES = ("queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._durations: dict[str, list[int]] = {}  # stage -> [count, ns]
        self.inference_count = 0  # images answered
        self.execution_count = 0  # batches run through the classifier
        self.last_inference_ms = 0

    def add(self, stage: str, seconds: float, count: int = 1) -> None:
        with self._lock:
            slot = self._durations.setdefault(stage, [0, 0])
            slot[0] += count
            slot[1] += int(seconds * 1e9)

    def answered(self, images: int) -> None:
        with self._lock:
            self.inference_count += images
            self.last_inference_ms = int(time.time() * 1000)

    def executed(self) -> None:
        with self._lock:
            self.execution_count += 1

    def snapshot(self, name: str, version: str) -> dict[str, Any]:
        """This model's entry of ``GET /v2/models/{name}/stats``."""
        with self._lock:
            d = {k: {"count": c, "ns": ns} for k, (c, ns) in self._durations.items()}
            counts = (self.inference_count, self.execution_count, self.last_inference_ms)
        zero = {"count": 0, "ns": 0}
        inference = {k: d.get(k, zero) for k in ("success", "fail", *self.TRITON_STAGES)}
        detection = {k: v for k, v in sorted(d.items()) if k not in inference}
        return {
            "name": name,
            "version": version,
            "last_inference": counts[2],
            "inference_count": counts[0],
            "execution_count": counts[1],
            "inference_stats": inference,
            "detection_stats": detection,
        }


# the stages of a response's timings_ms -> the statistics' names (the rest keep theirs)
_STAT_NAMES = {"decode": "compute_input", "classify": "compute_infer", "checks": "compute_output"}
_NOT_STAGES = {"total", "cache"}


class ModelStore:
    """One model's view of the server's :class:`DetectionStore`: its verdicts keyed by its bundle."""

    def __init__(self, store: DetectionStore, bundle_sha256: str, model: str) -> None:
        self.store, self.bundle_sha256, self.model = store, bundle_sha256, model

    async def get_verdict(self, image_sha256: str) -> dict[str, Any] | None:
        return await self.store.get_verdict(self.bundle_sha256, image_sha256, self.model)

    async def put_verdict(self, image_sha256: str, response: dict[str, Any]) -> None:
        await self.store.put_verdict(self.bundle_sha256, image_sha256, response)

    async def flag(self, entry: Entry) -> None:
        await self.store.flag({**entry, "model": self.model})


@dataclass(eq=False)
class ServedModel:
    """A loaded, warmed-up model. ``name`` is the repository's (the folder name), ``version`` the served version
    (the version folder's name, else the manifest's), ``path`` the bundle folder."""

    name: str
    version: str
    path: Path
    bundle: Any
    runtime: Any  # DetectionRuntime (its pipeline typed loosely: the bundle's DetectionPipeline)
    spec: InputSpec
    settings: Settings
    metrics: ModelMetrics
    stats: ModelStats
    spawn: Callable[[Coroutine[Any, Any, Any]], None]
    store: Any = None  # ModelStore, attached by start()
    predict_batcher: Any = None
    detect_batcher: Any = None
    _inflight: int = 0
    _idle: asyncio.Event | None = None
    _stopped: bool = False

    @property
    def sha256(self) -> str:
        return str(self.bundle.sha256)

    # ---- lifecycle (event loop) -------------------------------------------------------------------

    def start(self, store: DetectionStore) -> None:
        """Start the batchers (on the running loop) and attach the server's store."""
        s = self.settings
        self.store = ModelStore(store, self.sha256, self.name)
        wait_s = s.max_batch_wait_ms / 1000.0
        detect_work = self.runtime.detect if s.mode == "enforce" else self.runtime.detect_shadow
        self.predict_batcher = MicroBatcher(
            f"{self.name}-predict", self._counted(self.runtime.classify), s.max_batch_size, wait_s, s.queue_size,
            s.retry_after_s,
        )  # fmt: skip
        self.detect_batcher = MicroBatcher(
            f"{self.name}-detect", self._counted(detect_work), s.max_batch_size, wait_s, s.queue_size, s.retry_after_s
        )
        self.predict_batcher.start()
        self.detect_batcher.start()
        self._idle = asyncio.Event()
        self._idle.set()

    def _counted(self, work: Callable[[np.ndarray], Any]) -> Callable[[np.ndarray], Any]:
        def run(x: np.ndarray) -> Any:
            self.stats.executed()
            return work(x)

        return run

    async def stop(self, drain_s: float) -> None:
        """Wait (at most ``drain_s``) for the requests on this model to finish, then stop its batchers and free the
        runtime's threads. New requests are refused from the moment this is called."""
        self._stopped = True
        if self._idle is not None and self._inflight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), drain_s)
        for batcher in (self.predict_batcher, self.detect_batcher):
            if batcher is not None:
                await batcher.stop()
        await asyncio.to_thread(self.runtime.close)

    # ---- requests ---------------------------------------------------------------------------------

    def acquire(self) -> None:
        """One more request works on this model (raises :class:`NotReady` once it is being stopped)."""
        if self._stopped:
            raise NotReady(f"model {self.name!r} is being unloaded", self.settings.retry_after_s)
        self._inflight += 1
        if self._idle is not None:
            self._idle.clear()

    def release(self) -> None:
        self._inflight -= 1
        if self._inflight == 0 and self._idle is not None:
            self._idle.set()

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[ServedModel]:
        """Hold the model for one request and record its outcome in the statistics (an exception is a failure)."""
        self.acquire()
        t0 = time.perf_counter()
        ok = False
        try:
            yield self
            ok = True
        finally:
            self.release()
            self.stats.add("success" if ok else "fail", time.perf_counter() - t0)

    def observe(self, timings_ms: dict[str, float], images: int = 1) -> None:
        """A response's ``timings_ms`` into the statistics (each stage counted ``images`` times)."""
        self.stats.answered(images)
        for stage, ms in timings_ms.items():
            if stage in _NOT_STAGES:
                continue
            self.stats.add(_STAT_NAMES.get(stage, stage), ms / 1000.0 * images, images)


def torch_installed() -> bool:
    """Whether torch can be imported here (a server installed without it serves stored guarded graphs only)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a finder that refuses it
        return False


def _serves_stored(settings: Settings, path: Path) -> bool:
    """Whether the model at ``path`` is served from its stored guarded graph: PATHGUARD_DETECT_GRAPH=stored, or no
    torch here, or ``auto`` with a stored graph that holds every component the answers report (it starts faster,
    holds less memory and answers more requests than the graph built at load with Python beside it). Raises
    :class:`BundleError` when the settings require it and cannot be served that way."""
    s = settings
    if s.detect_graph in ("on", "off") and torch_installed():
        return False
    if s.detect_graph == "auto" and torch_installed():
        spec = stored_graph_spec(path)
        return (
            spec is not None
            and s.engine == "onnx"
            and s.nic_members != "random"
            and (s.reported_components != "all" or set(spec["components"]) >= set(spec["all_components"]))
        )
    why = "PATHGUARD_DETECT_GRAPH=stored" if s.detect_graph == "stored" else "this server has no torch installed"
    if s.engine == "torch":
        raise BundleError(f"{path}: {why}: the stored guarded graph runs in onnxruntime, not PATHGUARD_ENGINE=torch")
    if s.nic_members == "random":
        raise BundleError(f"{path}: {why}: NIC's drawn members (PATHGUARD_NIC_MEMBERS=random) are not in the graph")
    if not has_stored_graph(path):
        raise BundleError(
            f"{path}: {why}, so detection is served from the guarded graph stored in the bundle, and this bundle "
            f"has none; store it with: {store_command(path)}"
        )
    return True


def _open_stored(settings: Settings, path: Path, on_drop: Callable[[int], None]) -> tuple[Any, StoredRuntime]:
    s = settings
    bundle = load_stored(path, target_fpr=s.target_fpr)
    runtime = StoredRuntime(
        bundle,
        reported=s.reported_components,
        seed=s.noise_seed,
        threads=s.engine_threads,
        inter_op_threads=s.graph_inter_op_threads,
        providers=s.onnx_providers,
        shadow_backlog=s.shadow_backlog,
        on_drop=on_drop,
    )
    skipped = f"; not in it, not reported: {', '.join(runtime.skip)}" if runtime.skip else ""
    log.info("model %s: detection served from the stored guarded graph (%s%s)", bundle.name,
             ", ".join(runtime.graph.components), skipped)  # fmt: skip
    return bundle, runtime


def _graph(settings: Settings, bundle: Any, path: Path) -> tuple[GuardedEngine | None, str | None]:
    """The guarded graph's engine when detection is served from it (PATHGUARD_DETECT_GRAPH), else None and why
    not. Raises :class:`BundleError` when it is required ('on') and cannot be."""
    from pathguard.models.components.graph import NotInGraphError
    from pathguard.service.runtime import GuardedEngine

    s = settings
    if s.detect_graph == "off":
        return None, "PATHGUARD_DETECT_GRAPH=off"
    why: str | None = None
    if s.engine != "onnx":
        why = "the torch engine serves the Python pipeline (PATHGUARD_ENGINE=torch)"
    elif s.nic_members == "random":
        why = "NIC's drawn members are scored outside the graph (PATHGUARD_NIC_MEMBERS=random)"
    else:
        try:
            engine = GuardedEngine(
                bundle,
                components=_scope(s),
                beside=_beside(bundle),
                threads=s.engine_threads,
                inter_op_threads=s.graph_inter_op_threads,
                providers=s.onnx_providers,
            )
        except (NotInGraphError, ValueError) as exc:
            why = str(exc)
        except Exception as exc:  # an imported graph the guarded graph's build or onnxruntime rejects
            why = f"the guarded graph could not be built: {type(exc).__name__}: {exc}"
            log.warning("model %s: %s", bundle.name, why)
        else:
            return engine, None
    if s.detect_graph == "on":
        raise BundleError(f"{path}: PATHGUARD_DETECT_GRAPH=on, but the guarded graph cannot serve it: {why}")
    log.info("model %s: detection served by the Python pipeline: %s", bundle.name, why)
    return None, why


def _beside(bundle: Any) -> list[str]:
    """The components scored beside the guarded graph: those with no in-graph form, and those whose form outside the
    graph is the faster one (Effective Path's compiled walk)."""
    from pathguard.models.guarded import in_graph

    return [k for k, c in bundle.pipeline.components.items() if c.beside_graph or not in_graph(c)]


def _scope(settings: Settings) -> str:
    """The guarded graph's components (:func:`graph_components`) for PATHGUARD_REPORTED_COMPONENTS."""
    return "verdict" if settings.reported_components == "verdict" else "all"


def _skipped(settings: Settings, bundle: Any) -> list[str]:
    """The components left out of graph-served responses (PATHGUARD_REPORTED_COMPONENTS): 'graph', those with no
    in-graph form; 'verdict', all but the verdict's."""
    from pathguard.models.guarded import graph_components

    if settings.reported_components == "all":
        return []
    inside = set(graph_components(bundle, _scope(settings)))
    return [k for k in bundle.pipeline.components if k not in inside]


def _engine(settings: Settings, bundle: Any, graph: bool = False) -> ClassifierEngine:
    from pathguard.service.runtime import OnnxEngine, TorchEngine

    if settings.engine == "torch":
        return TorchEngine(bundle.classifier)
    if graph:  # detection runs on the guarded graph: this engine only classifies
        return OnnxEngine(bundle.onnx_bytes, [], threads=settings.engine_threads, providers=settings.onnx_providers)
    if settings.nic_in_graph:  # no tap-by-tap stages needed: NIC's checks run inside the graph
        return OnnxEngine(
            bundle.onnx_bytes,
            [],
            threads=settings.engine_threads,
            nic=bundle.pipeline.nic,
            inter_op_threads=settings.graph_inter_op_threads,
            providers=settings.onnx_providers,
        )
    return OnnxEngine(
        bundle.onnx_bytes,
        bundle.pipeline.checked_taps,
        threads=settings.engine_threads,
        providers=settings.onnx_providers,
    )


def open_model(
    name: str,
    version: str | None,
    path: Path,
    settings: Settings,
    metrics: Metrics,
    spawn: Callable[[Coroutine[Any, Any, Any]], None],
    check: Callable[[Any], None] | None = None,
) -> ServedModel:
    """Verify and load the bundle at ``path``, build its runtime and warm it up (blocking: run it on a worker
    thread). ``check(bundle)`` may refuse the loaded bundle (the sha256 pin) by raising. ``version`` None: the
    manifest's version. Raises whatever verification, loading or warm-up raised; nothing is left running then."""
    s = settings
    model_metrics = metrics.for_model(name)
    if _serves_stored(s, path):
        stored_bundle, stored = _open_stored(s, path, model_metrics.shadow_dropped.inc)
        try:
            if check is not None:
                check(stored_bundle)
            _warm_up(stored, stored_bundle, s)
        except BaseException:
            stored.close()
            raise
        return _served(name, version, path, stored_bundle, stored, s, model_metrics, spawn)
    from pathguard.models.bundle import load_bundle
    from pathguard.service.runtime import DetectionRuntime

    bundle = load_bundle(path, target_fpr=s.target_fpr, seed=s.noise_seed)
    if check is not None:
        check(bundle)
    if s.nic_members == "random":
        try:
            bundle.pipeline.randomize_nic_members()
        except ValueError as exc:
            raise BundleError(f"{path}: PATHGUARD_NIC_MEMBERS=random: {exc}") from None
    graph, why = _graph(s, bundle, path)
    runtime = DetectionRuntime(
        _engine(s, bundle, graph is not None),
        bundle.pipeline,
        s.worker_threads,
        s.parallel_checks,
        shadow_backlog=s.shadow_backlog,
        on_drop=model_metrics.shadow_dropped.inc,
        graph=graph,
        skip=_skipped(s, bundle) if graph is not None else (),
        graph_note=why if s.detect_graph != "off" else None,
    )
    if graph is not None:
        log.info("model %s: detection served from the guarded graph (%s in it; beside it: %s)", bundle.name,
                 ", ".join(graph.components), ", ".join(runtime.beside) or "nothing")  # fmt: skip
    try:
        _warm_up(runtime, bundle, s)
    except BaseException:
        runtime.close()
        raise
    return _served(name, version, path, bundle, runtime, s, model_metrics, spawn)


def _warm_up(runtime: Any, bundle: Any, settings: Settings) -> None:
    shape = tuple(int(v) for v in bundle.input_shape)
    runtime.warm_up(shape, [1], settings.warmup_rounds)
    runtime.warm_up(shape, [settings.max_batch_size], min(settings.warmup_rounds, 1))


def _served(
    name: str,
    version: str | None,
    path: Path,
    bundle: Any,
    runtime: Any,
    settings: Settings,
    model_metrics: ModelMetrics,
    spawn: Callable[[Coroutine[Any, Any, Any]], None],
) -> ServedModel:
    c, h, w = (int(v) for v in bundle.input_shape)
    return ServedModel(
        name=name,
        version=version if version is not None else str(bundle.version),
        path=path,
        bundle=bundle,
        runtime=runtime,
        spec=InputSpec(c, h, w, max_pixels=settings.max_image_pixels, policy=settings.input_policy),
        settings=settings,
        metrics=model_metrics,
        stats=ModelStats(),
        spawn=spawn,
    )
