"""Pure-ASGI middlewares: the request body limit and the per-route request metrics."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pathguard.service.errors import PayloadTooLarge
from pathguard.service.metrics import Metrics

__all__ = ["BodyLimitMiddleware", "RequestMetricsMiddleware"]


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


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestMetricsMiddleware:
    """``pathguard_requests_total{route,status}``, ``pathguard_request_duration_seconds{route}`` (until the
    response starts) and ``pathguard_inflight_requests``. ``route`` is the matched route template
    (e.g. ``/v2/models/{name}/infer``) or ``unmatched``: never a raw path."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}
        recorded = False

        def record() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            route = _route_template(scope)
            self.metrics.requests.labels(route=route, status=str(status["code"])).inc()
            self.metrics.request_duration.labels(route=route).observe(time.perf_counter() - start)

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                record()
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, observed)
        finally:
            self.metrics.inflight.dec()
            record()


def _route_template(scope: Scope) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
