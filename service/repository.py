"""The model repository: which bundles a server serves, loading, hot reload and unloading.

A repository is a folder of bundles, one per model: ``DIR/<name>/`` (a bundle) or ``DIR/<name>/<version>/`` (the
highest integer version is served), as in Triton's model repository; the folder name is the model's name.
``PATHGUARD_BUNDLE`` alone is a repository of one, named after its manifest.

:class:`ModelManager` keeps the served models. A (re)load verifies, loads and warms the new bundle on a worker
thread beside the old one, then swaps it in with one assignment on the event loop: a request that already holds the
old model finishes on it, the next one gets the new one. A load that fails leaves the old version serving and is
reported (log, ``pathguard_model_loads_total{outcome="failed"}``, the index's ``reason``, the load API's error).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pathguard.models.bundle import MANIFEST, bundle_sha256
from pathguard.service.cache import DetectionStore
from pathguard.service.errors import BadInput, NotFound, NotReady
from pathguard.service.metrics import Metrics
from pathguard.service.served import ServedModel, open_model
from pathguard.service.settings import Settings

__all__ = ["ModelManager", "ModelSource", "RepositoryError", "scan_repository"]

log = logging.getLogger("pathguard.service")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED = {"stats"}  # /v2/models/stats lists every model's statistics
State = Literal["LOADING", "READY", "UNAVAILABLE", "UNLOADING"]


class RepositoryError(BadInput):
    """A load or unload the repository cannot do (400 with the reason)."""


@dataclass(frozen=True)
class ModelSource:
    """A model as the repository holds it: the bundle folder to serve and its version."""

    name: str
    path: Path
    version: str | None  # the version folder's name; None: the manifest's

    def sha256(self) -> str | None:
        """The bundle id (sha256 of its manifest) now on disk; None when there is no manifest to read."""
        try:
            return bundle_sha256(self.path)
        except OSError:
            return None


def _source(root: Path, name: str) -> ModelSource | None:
    folder = root / name
    if (folder / MANIFEST).is_file():
        return ModelSource(name, folder, None)
    versions = [p for p in folder.iterdir() if p.name.isdigit() and (p / MANIFEST).is_file()]
    if not versions:
        return None
    latest = max(versions, key=lambda p: int(p.name))
    return ModelSource(name, latest, str(int(latest.name)))


def scan_repository(root: Path) -> dict[str, ModelSource]:
    """The models in repository ``root``: every sub-folder with a valid model name that holds a bundle or
    integer-named version folders with one. Other entries are skipped (names starting with '.', among them the
    staging folders of an atomic bundle write)."""
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a folder")
    found = {}
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or not NAME.match(entry.name):
            continue
        if entry.name in RESERVED:
            log.warning("model repository %s: %r is a reserved name (a route of its own); skipped", root, entry.name)
            continue
        src = _source(root, entry.name)
        if src is not None:
            found[entry.name] = src
    return found


def _single_source(path: Path) -> ModelSource:
    """``PATHGUARD_BUNDLE``: a repository of one, the model named after the bundle's manifest."""
    try:
        name = json.loads((path / MANIFEST).read_text())["name"]
    except (OSError, ValueError, KeyError, TypeError):
        name = path.resolve().name  # the load itself reports what is wrong with the bundle
    return ModelSource(str(name), path, None)


def _trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc keeps it otherwise), so an unload shows in the RSS."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc is not None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc).malloc_trim(0)


@dataclass
class _Status:
    state: State
    reason: str = ""
    version: str | None = None
    failed_sha256: str | None = None  # poll mode: this content failed; not retried until it changes


class ModelManager:
    """The models a server serves and their load / unload / swap, under the repository's control mode."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        store: DetectionStore,
        spawn: Callable[[Any], None],
        check: Callable[[Any], None] | None = None,
    ) -> None:
        self.settings, self.metrics, self.store, self.spawn, self.check = settings, metrics, store, spawn, check
        self.root = settings.model_repository
        self.mode = settings.model_control_mode if self.root is not None else "none"
        self.models: dict[str, ServedModel] = {}
        self._status: dict[str, _Status] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._required: set[str] = set()
        self._started = False
        self._poller: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    # ---- what the repository holds ----------------------------------------------------------------

    def sources(self) -> dict[str, ModelSource]:
        if self.root is None:
            src = _single_source(self.settings.bundle)
            return {src.name: src}
        return scan_repository(self.root)

    # ---- start / stop -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load what the control mode loads at start. ``none``: every model, and any failure fails the start;
        ``poll``: every model, failures logged (readiness stays false until they load); ``explicit``:
        ``PATHGUARD_LOAD_MODELS`` (a failure fails the start)."""
        sources = await asyncio.to_thread(self.sources)
        if self.mode == "explicit":
            unknown = sorted(set(self.settings.load_models) - set(sources))
            if unknown:
                raise FileNotFoundError(f"PATHGUARD_LOAD_MODELS names {unknown}, not in the repository {self.root}")
            names = list(dict.fromkeys(self.settings.load_models))
        else:
            if self.root is not None and not sources:
                log.warning("model repository %s holds no bundle", self.root)
            names = list(sources)
        self._required = set(names)
        for name in names:
            try:
                await self.load(name, sources[name])
            except Exception:
                if self.mode != "poll":
                    raise
        self._started = True
        if self.mode == "poll":
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="pathguard-repository-poll")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        models, self.models = list(self.models.values()), {}
        for m in models:
            self.metrics.drop_bundle(m.name)
        await asyncio.gather(*(m.stop(self.settings.unload_drain_s) for m in models), *self._retiring)

    @property
    def ready(self) -> bool:
        """Every model the control mode requires is serving: after start, the start's models, and in poll mode
        every model in the repository at the last scan."""
        return self._started and all(name in self.models for name in self._required)

    # ---- lookups ----------------------------------------------------------------------------------

    def get(self, name: str | None) -> ServedModel:
        """The served model ``name``; None: the only one served. NotFound / BadInput / NotReady otherwise."""
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            if not self.models:
                raise NotReady("no model is loaded yet", self.settings.retry_after_s)
            names = ", ".join(sorted(self.models))
            raise BadInput(f"this server serves several models ({names}): name one with ?model= or X-Pathguard-Model")
        model = self.models.get(name)
        if model is not None:
            return model
        status = self._status.get(name)
        if status is not None and status.state == "LOADING":
            raise NotReady(f"model {name!r} is loading", self.settings.retry_after_s)
        raise NotFound(f"unknown model {name!r}; served: {sorted(self.models)}")

    async def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """The repository index (``POST /v2/repository/index``): every model in the repository and every model
        loaded, with its state (READY, LOADING, UNLOADING, UNAVAILABLE) and, after a failure, the reason. The
        folder is scanned on a worker thread (a repository may sit on a slow volume)."""
        try:
            on_disk = await asyncio.to_thread(self.sources)
        except OSError as exc:
            log.warning("cannot scan the model repository: %s", exc)
            on_disk = {}
        rows = []
        for name in sorted(set(on_disk) | set(self.models) | set(self._status)):
            served, status = self.models.get(name), self._status.get(name)
            state: State = status.state if status is not None else "UNAVAILABLE"
            if served is not None and state != "LOADING":
                state = "READY"
            if ready_only and state != "READY":
                continue
            row: dict[str, Any] = {"name": name, "state": state, "reason": status.reason if status else ""}
            version = served.version if served is not None else (status.version if status else None)
            if version is not None:
                row["version"] = version
            rows.append(row)
        return rows

    # ---- load / unload ----------------------------------------------------------------------------

    def check_explicit(self, action: str) -> None:
        """Loads and unloads through the API are for the explicit control mode only, as in Triton."""
        if self.mode != "explicit":
            raise RepositoryError(
                f"cannot {action} through the API in model control mode {self.mode!r}: set "
                "PATHGUARD_MODEL_CONTROL_MODE=explicit (poll mode follows the repository folder)"
            )

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load(self, name: str, source: ModelSource | None = None) -> ServedModel:
        """(Re)load ``name`` from the repository: verify, load and warm it up beside what serves now, then swap.

        Raises :class:`RepositoryError` when the model is not in the repository or its bundle fails; the version
        serving before (if any) keeps serving then."""
        if source is None and name not in await asyncio.to_thread(self.sources):
            raise RepositoryError(f"model {name!r} is not in the repository")  # before any state is kept for it
        async with self._lock(name):
            if source is None:  # again under the lock: the folder may have changed while waiting for it
                source = (await asyncio.to_thread(self.sources)).get(name)
            if source is None:
                raise RepositoryError(f"model {name!r} is not in the repository")
            status = self._status.setdefault(name, _Status("LOADING"))
            status.state, status.version = "LOADING", source.version
            sha = await asyncio.to_thread(source.sha256)
            try:
                model = await asyncio.to_thread(
                    open_model, name, source.version, source.path, self.settings, self.metrics, self.spawn, self.check
                )
            except Exception as exc:
                self.metrics.model_loads.labels(model=name, outcome="failed").inc()
                reason = f"{type(exc).__name__}: {exc}"
                old = self.models.get(name)
                status.state = "READY" if old is not None else "UNAVAILABLE"
                status.reason, status.failed_sha256 = f"load failed: {reason}", sha
                log.error(
                    "model %s: loading %s failed (%s); %s",
                    name,
                    source.path,
                    reason,
                    f"version {old.version} keeps serving" if old is not None else "not served",
                )
                raise RepositoryError(f"model {name!r}: loading {source.path.name} failed: {reason}") from exc
            model.start(self.store)
            old = self.models.get(name)
            self.models[name] = model  # the swap: requests from now on get the new one
            self.metrics.set_bundle(name, model.bundle.name, str(model.bundle.version), model.sha256)
            self.metrics.model_loads.labels(model=name, outcome="success").inc()
            self.metrics.onnx_split_failed.labels(model=name).set(0 if model.runtime.engine.split_error is None else 1)
            status.state, status.reason, status.version, status.failed_sha256 = "READY", "", model.version, None
            log.info(
                "model %s: serving %s v%s (%s)%s",
                name,
                model.bundle.name,
                model.version,
                model.sha256[:12],
                f", replacing v{old.version} ({old.sha256[:12]})" if old is not None else "",
            )
            if old is not None:
                self._retire(old)
            return model

    async def unload(self, name: str) -> None:
        """Stop serving ``name``; the requests already on it finish first (within PATHGUARD_UNLOAD_DRAIN_S)."""
        if name not in self.models:
            raise RepositoryError(f"model {name!r} is not loaded")  # before any state is kept for it
        async with self._lock(name):
            model = self.models.pop(name, None)
            if model is None:
                raise RepositoryError(f"model {name!r} is not loaded")
            self._required.discard(name)
            self.metrics.drop_bundle(name)
            status = self._status.setdefault(name, _Status("UNLOADING"))
            status.state, status.reason = "UNLOADING", ""
            await model.stop(self.settings.unload_drain_s)
            del model
            await asyncio.to_thread(_trim_heap)
            status.state, status.reason = "UNAVAILABLE", "unloaded"
            log.info("model %s: unloaded", name)

    def _retire(self, old: ServedModel) -> None:
        """Stop a replaced model once the requests on it have finished (in the background)."""

        async def retire() -> None:
            await old.stop(self.settings.unload_drain_s)
            await asyncio.to_thread(_trim_heap)

        task = asyncio.get_running_loop().create_task(retire(), name=f"pathguard-retire-{old.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # ---- poll mode --------------------------------------------------------------------------------

    async def poll_once(self) -> None:
        """One scan: load new models, reload changed ones (another manifest, or a newer version folder), unload
        removed ones. A bundle that failed is tried again only once its manifest changes."""
        try:
            sources = await asyncio.to_thread(self.sources)
        except OSError as exc:
            log.error("cannot scan the model repository: %s", exc)
            return
        self._required = set(sources)
        for name in [n for n in self.models if n not in sources]:
            await self.unload(name)
        for name, src in sources.items():
            sha = await asyncio.to_thread(src.sha256)
            served, status = self.models.get(name), self._status.get(name)
            if served is not None and served.sha256 == sha and str(served.path) == str(src.path):
                continue
            if status is not None and status.failed_sha256 is not None and status.failed_sha256 == sha:
                continue
            with contextlib.suppress(RepositoryError):  # logged and counted; the old version (if any) keeps serving
                await self.load(name, src)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.poll_once()
            except Exception:
                log.exception("model repository poll failed")
