"""The FastAPI application factory.

``create_app(settings)`` builds the app without touching a bundle; its lifespan starts the Redis link and the
model manager, which verifies and loads the bundles the control mode requires (``PATHGUARD_BUNDLE``, or the model
repository), creates each one's classifier engine, warms it up and starts its micro-batchers; readiness follows
from the manager. Nothing heavy happens at import time.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata, resources
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from pathguard.models.bundle import MANIFEST, BundleIntegrityError, bundle_sha256
from pathguard.service.cache import DetectionStore
from pathguard.service.errors import NotFound, install_error_handlers
from pathguard.service.events import EventRelay
from pathguard.service.grpc_server import GrpcServer
from pathguard.service.metrics import Metrics
from pathguard.service.middleware import BodyLimitMiddleware, ConcurrencyLimitMiddleware, RequestMetricsMiddleware
from pathguard.service.repository import ModelManager
from pathguard.service.routes import events, health, oip, page, repository, v1
from pathguard.service.routes import metrics as metrics_routes
from pathguard.service.served import torch_installed
from pathguard.service.settings import Settings
from pathguard.service.sink import EventSink
from pathguard.service.state import ServiceState, require_api_key

__all__ = ["check_exposure", "check_pin", "create_app", "default_torch_threads"]

log = logging.getLogger("pathguard.service")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the detection service for ``settings`` (default: from ``PATHGUARD_*`` environment variables)."""
    settings = settings if settings is not None else Settings()
    state = ServiceState(settings, Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await _start(state)
        try:
            yield
        finally:
            await _stop(state)

    app = FastAPI(
        title="pathguard",
        version=metadata.version("pathguard"),
        summary="Online adversarial-input detection (Effective Path + NIC) for image classifiers.",
        lifespan=lifespan,
        docs_url=None,  # served by _add_docs: behind the API key, or not at all
        redoc_url=None,
        openapi_url=None,
    )
    app.state.pathguard = state
    install_error_handlers(app)
    routers = (
        health.router,
        v1.router,
        oip.router,
        repository.router,
        metrics_routes.router,
        page.router,
        events.router,
    )
    for router in routers:
        app.include_router(router)
    page.mount_static(app)
    routes = [route for router in routers for route in router.routes]
    if settings.docs:
        _add_docs(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)  # inner
    # before any body is read: at most max_concurrent_requests bodies in memory at once
    app.add_middleware(
        ConcurrencyLimitMiddleware,
        limit=settings.max_concurrent_requests,
        retry_after_s=settings.retry_after_s,
        on_reject=state.metrics.rejected.inc,
    )
    # outer: also counts (and logs) the body-limit 413s, under the route they were sent to
    app.add_middleware(RequestMetricsMiddleware, metrics=state.metrics, routes=routes, log_requests=settings.access_log)
    return app


_DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}


def _add_docs(app: FastAPI) -> None:
    """``/openapi.json`` and the Swagger UI at ``/docs``, both under the API key when one is configured. The
    Swagger UI's script and style are served from the installed ``fastapi_offline`` package, not from a CDN, so
    the docs work on a machine without internet access."""
    guarded = [Depends(require_api_key)]
    assets = resources.files("fastapi_offline") / "static"

    @app.get("/openapi.json", include_in_schema=False, dependencies=guarded)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=guarded)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - API docs",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon.png",
        )

    @app.get("/docs/assets/{name}", include_in_schema=False, dependencies=guarded)
    async def docs_asset(name: str) -> FileResponse:
        if name not in _DOCS_ASSETS:
            raise NotFound(f"no docs asset {name!r}")
        return FileResponse(str(assets / name), media_type=_DOCS_ASSETS[name])


def check_exposure(settings: Settings) -> None:
    """Refuse to serve beyond loopback without an API key unless ``PATHGUARD_INSECURE=true`` says so: without a
    key every route (detection, /metrics, /docs, /openapi.json) would be open to the network.

    Raises
    ------
    ValueError
        ``settings.host`` is not a loopback address (nor ``localhost``), no API key is set and ``insecure`` is off.
    """
    if settings.api_key is not None or settings.insecure or _is_loopback(settings.host):
        return
    raise ValueError(
        f"binding {settings.host} (beyond loopback) without PATHGUARD_API_KEY would expose every route, /metrics "
        "and /docs included: set PATHGUARD_API_KEY, or PATHGUARD_INSECURE=true to accept that"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def default_torch_threads(settings: Settings) -> int:
    """Torch's intra-op threads: ``PATHGUARD_TORCH_THREADS``, else the cores available to the process shared
    among the threads that run torch at the same time (the worker threads and the batcher's), at least 1."""
    if settings.torch_threads is not None:
        return settings.torch_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // (settings.worker_threads + 1))


def check_pin(settings: Settings, loaded_sha256: str | None = None) -> None:
    """Refuse a bundle whose id differs from ``settings.bundle_sha256`` (when that pin is set)."""

    if settings.bundle_sha256 is None:
        return
    found = loaded_sha256 if loaded_sha256 is not None else bundle_sha256(settings.bundle)
    if found != settings.bundle_sha256:
        raise BundleIntegrityError(
            MANIFEST,
            f"bundle {settings.bundle}: {MANIFEST} has sha256 {found}, but PATHGUARD_BUNDLE_SHA256 pins "
            f"{settings.bundle_sha256}",
        )


async def _start(state: ServiceState) -> None:
    s = state.settings
    if torch_installed():  # a server without torch serves stored guarded graphs only
        import torch

        torch.set_num_threads(default_torch_threads(s))
    check = None
    if s.model_repository is None:  # PATHGUARD_BUNDLE: a repository of one, with its optional pin
        check_pin(s)

        def check(bundle: Any) -> None:
            check_pin(s, bundle.sha256)  # authoritative: the digest of the manifest bytes actually loaded

    state.store = DetectionStore(s, state.metrics)
    await state.store.start()
    sink = EventSink(s.events_sink, s, state.metrics) if s.events_sink else None
    if sink is not None:
        sink.start()
    state.events = EventRelay(state, sink, s.events_source)
    state.models = ModelManager(s, state.metrics, state.store, state.spawn, check)
    await state.models.start()
    if s.grpc_port:
        state.grpc = GrpcServer(state, s.host, s.grpc_port)
        await state.grpc.start()
    log.info(
        "serving %s with the %s engine, mode %s, %s",
        ", ".join(f"{m.name} v{m.version} ({m.sha256[:12]})" for m in state.models.models.values()) or "no model",
        s.engine if s.engine == "torch" else f"onnx engine ({', '.join(_providers(state))})",
        s.mode,
        "NIC in the graph" if s.nic_in_graph and s.engine == "onnx" else f"parallel checks {s.parallel_checks}",
    )


def _providers(state: ServiceState) -> list[str]:
    """The execution providers the onnx engines run on (the first model's; every model gets the same setting)."""
    for m in state.models.models.values():
        return list(getattr(m.runtime.engine, "providers", []))
    return []


async def _stop(state: ServiceState) -> None:
    if state.grpc is not None:
        await state.grpc.stop()
    if state.events is not None:  # before the models stop: pending logger events finish, results go out
        await state.events.close(state.settings.events_drain_s)
    if state.models is not None:
        await state.models.close()
    await state.drain()
    if state.store is not None:
        await state.store.close()
