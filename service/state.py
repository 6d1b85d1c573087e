"""Per-app state (created by ``create_app``, filled by the lifespan) and the request dependencies on it."""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from pathguard.service.errors import NotReady, Unauthorized
from pathguard.service.metrics import Metrics
from pathguard.service.middleware import REQUEST_ID_STATE, safe_request_id
from pathguard.service.served import ServedModel
from pathguard.service.settings import Settings

__all__ = [
    "ServiceState",
    "check_api_key",
    "get_state",
    "ready_state",
    "request_id",
    "requested_model",
    "require_api_key",
]

log = logging.getLogger("pathguard.service")


@dataclass
class ServiceState:
    """Everything a request handler needs; ``models`` and ``store`` are set by the lifespan."""

    settings: Settings
    metrics: Metrics
    models: Any = None  # the ModelManager: the served models by name
    store: Any = None  # the DetectionStore: verdict cache and flagged stream, shared by the models
    grpc: Any = None  # the gRPC server, when PATHGUARD_GRPC_PORT is not 0
    events: Any = None  # the EventRelay of POST / (payload-logger CloudEvents)
    _background: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def ready(self) -> bool:
        """Every model the control mode requires is loaded and warmed up."""
        return self.models is not None and bool(self.models.ready)

    def model(self, name: str | None) -> ServedModel:
        """The served model ``name`` (None: the only one); 503 before start-up, 404 for an unknown name."""
        if self.models is None:
            raise NotReady("no model is loaded yet", self.settings.retry_after_s)
        served: ServedModel = self.models.get(name)
        return served

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` after the response (cache writes, stream entries, shadow verdicts); errors are logged.

        At most ``max_background_tasks`` run at once: beyond that ``coro`` is not started, and counted."""
        if len(self._background) >= self.settings.max_background_tasks:
            coro.close()
            self.metrics.background_dropped.inc()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def drain(self) -> None:
        """Wait for every background task (at shutdown, so no flagged entry is dropped)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.pathguard
    return state


def ready_state(request: Request) -> ServiceState:
    """The state, or 503 + Retry-After while the models are not loaded and warmed up."""
    state = get_state(request)
    if not state.ready:
        raise NotReady("bundle is not loaded yet", state.settings.retry_after_s)
    return state


MODEL_HEADER = "x-pathguard-model"


def requested_model(request: Request) -> str | None:
    """The model a /v1 request names: query parameter ``model``, else header ``X-Pathguard-Model``, else None
    (the server's only model)."""
    name = request.query_params.get("model") or request.headers.get(MODEL_HEADER)
    return name or None


def require_api_key(request: Request) -> None:
    """When an API key is configured: 'Authorization: Bearer <key>' or 'X-API-Key: <key>', compared in constant time."""
    check_api_key(get_state(request).settings, request.headers.get("x-api-key"), request.headers.get("authorization"))


def check_api_key(settings: Settings, x_api_key: str | None, authorization: str | None) -> None:
    """Raise :class:`Unauthorized` unless no key is configured or one of the two headers carries it."""
    key = settings.api_key
    if key is None:
        return
    given, auth = x_api_key, authorization or ""
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    if given is None or not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise Unauthorized("missing or invalid API key")


def request_id(request: Request, proposed: str | None = None) -> str:
    """``proposed`` (e.g. an OIP request id) or the client's X-Request-ID when it is a short safe token (up to 64
    ASCII letters, digits, '-', '_', '.'), else the id the request middleware gave this request (the one in the
    access log), else a fresh random id."""
    for rid in (proposed, request.headers.get("x-request-id")):
        safe = safe_request_id(rid)
        if safe is not None:
            return safe
    given = getattr(request.state, REQUEST_ID_STATE, None)
    return given if isinstance(given, str) else uuid.uuid4().hex
