"""Pure-ASGI middlewares: the request body limit, and the per-route request metrics and access log."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pathguard.service.errors import PayloadTooLarge
from pathguard.service.metrics import Metrics

__all__ = [
    "REQUEST_ID_STATE",
    "BodyLimitMiddleware",
    "ConcurrencyLimitMiddleware",
    "RequestMetricsMiddleware",
    "access_log",
    "safe_request_id",
]

access_log = logging.getLogger("pathguard.access")
REQUEST_ID_STATE = "pathguard_request_id"  # key in the request's scope["state"]: the id this request answers with


class BodyLimitMiddleware:
    """413 for a declared Content-Length over the limit. A body without one (``Transfer-Encoding: chunked``) is
    cut off once it passes the limit: the handler's read raises :class:`PayloadTooLarge`, and whatever the app
    answers to a body cut off there (a 413 from our handlers, a 400 from a framework body parser that wraps the
    error) is replaced by the 413, so a too-large body is always 413 whatever route and parser read it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _send_error(send, 413, f"request body of {declared} bytes exceeds the limit of {self.max_bytes}")
            return
        seen = 0
        exceeded = started = False
        message = f"request body exceeds the limit of {self.max_bytes} bytes"

        async def limited() -> Message:
            nonlocal seen, exceeded
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    raise PayloadTooLarge(message)
            return msg

        async def guarded(msg: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to the cut-off body; the 413 below replaces it
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited, guarded)
        except Exception:
            if not exceeded or started:
                raise
        if exceeded and not started:
            await _send_error(send, 413, message)


class ConcurrencyLimitMiddleware:
    """503 + Retry-After, before the body is read, for a request that carries a body (POST, PUT, PATCH) while
    ``limit`` such requests are already being processed: request bodies in memory stay under ``limit`` times the
    body limit, whatever the number of connections. GETs (health, metrics, metadata, the page) are never refused."""

    _WITH_BODY = frozenset({"POST", "PUT", "PATCH"})

    def __init__(self, app: ASGIApp, limit: int, retry_after_s: int = 1, on_reject: Callable[[], None] | None = None):
        self.app = app
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.on_reject = on_reject
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in self._WITH_BODY:
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            if self.on_reject is not None:
                self.on_reject()
            retry = [(b"retry-after", str(self.retry_after_s).encode())]
            await _send_error(send, 503, f"more than {self.limit} requests in flight; retry later", retry)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_error(send: Send, status: int, message: str, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestMetricsMiddleware:
    """Per request: ``pathguard_requests_total{route,status}``, ``pathguard_request_duration_seconds{route}`` (until
    the response starts), ``pathguard_inflight_requests``, an ``X-Request-ID`` header on every answer, and (with
    ``log_requests``) one access-log line on the ``pathguard.access`` logger once the response is sent.

    ``route`` is the route template (e.g. ``/v2/models/{name}/infer``), also for answers sent before routing
    (a body-limit 413), or ``unmatched`` when no route matches the path: never a raw path. The request id is the
    client's ``X-Request-ID`` when it is a safe token, else a fresh one, unless the handler answers with its own
    (an Open Inference Protocol request ``id``). The log line carries no image data and no query string.
    """

    def __init__(
        self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute] = (), log_requests: bool = True
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = list(routes)  # the app's routes, to name the route of an answer sent before routing
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}
        rid = safe_request_id(_header(scope, b"x-request-id")) or uuid.uuid4().hex
        scope.setdefault("state", {})[REQUEST_ID_STATE] = rid
        answered = {"rid": rid}
        recorded = False

        def record() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            route = _route_template(scope, self.routes)
            self.metrics.requests.labels(route=route, status=str(status["code"])).inc()
            self.metrics.request_duration.labels(route=route).observe(time.perf_counter() - start)

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers", []))
                given = [v for k, v in headers if k.lower() == b"x-request-id"]
                if given:
                    answered["rid"] = given[0].decode("latin-1")
                else:
                    message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
                record()
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, observed)
        finally:
            self.metrics.inflight.dec()
            record()
            if self.log_requests:
                access_log.info(
                    "%s %s %d %.1f ms id=%s",
                    scope.get("method", "-"),
                    _route_template(scope, self.routes),
                    status["code"],
                    (time.perf_counter() - start) * 1000.0,
                    answered["rid"],
                )


def safe_request_id(rid: str | None) -> str | None:
    """``rid`` when it is a short safe token (up to 64 ASCII letters, digits, '-', '_', '.'), else None."""
    if rid and len(rid) <= 64 and rid.isascii() and all(c.isalnum() or c in "-_." for c in rid):
        return rid
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _route_template(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The template of the route that handled the request, or that would have (an answer sent before routing)."""
    route: Any = scope.get("route")
    if route is None:
        route = _matching_route(scope, routes)
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def _matching_route(scope: Scope, routes: Sequence[BaseRoute]) -> BaseRoute | None:
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return route
        if match == Match.PARTIAL and partial is None:  # the path matches, the method does not (405)
            partial = route
    return partial
