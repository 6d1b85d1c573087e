"""Delivery of result CloudEvents to the sink URL (``PATHGUARD_EVENTS_SINK``): bounded in memory, bounded retry.

:meth:`EventSink.offer` never waits: the event, encoded once by the ``cloudevents`` SDK (binary or structured
content mode), joins a bounded backlog, and ``PATHGUARD_EVENTS_SINK_CONCURRENCY`` delivery tasks POST it. A 2xx
delivers it; a connection error, timeout, 408, 429 or 5xx is retried; any other answer drops it at once. Every
result event ends delivered or counted in ``pathguard_events_dropped_total{reason}``: ``sink_backlog_full``,
``retries_exhausted`` (``PATHGUARD_EVENTS_SINK_ATTEMPTS`` failed), ``sink_rejected``, ``shutdown``.

While the sink fails, deliveries wait an exponential backoff (``PATHGUARD_EVENTS_SINK_BACKOFF_S`` doubling up to
``PATHGUARD_EVENTS_SINK_BACKOFF_MAX_S``) and only one of them at a time probes the sink: a sink that is down costs
one attempt per backoff step, not one per waiting event, so an outage drops few events while the backlog holds the
rest. The first success restores full concurrency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import httpx
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.http import HTTPMessage, to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat

from pathguard.service.cache import RateLimitedLog
from pathguard.service.metrics import Metrics
from pathguard.service.settings import Settings

__all__ = ["EventSink"]

log = logging.getLogger("pathguard.service")

Outcome = Literal["delivered", "retry", "rejected"]


@dataclass
class _Pending:
    message: HTTPMessage
    attempts: int = 0


class EventSink:
    """Result events to one HTTP sink; see the module docstring for the delivery rules."""

    def __init__(self, url: str, settings: Settings, metrics: Metrics, client: httpx.AsyncClient | None = None):
        self.url = url
        self.settings = settings
        self.metrics = metrics
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(settings.events_sink_timeout_s))
        self._encode = to_binary if settings.events_sink_mode == "binary" else to_structured
        self._format = JSONFormat()
        self._backlog: deque[_Pending] = deque()
        self._ready = asyncio.Event()
        self._probe = asyncio.Lock()  # held by the one delivery that tries a failing sink
        self._failures = 0  # consecutive failed attempts
        self._retry_at = 0.0
        self._in_flight = 0
        self._workers: list[asyncio.Task[None]] = []
        self._closing = False
        self._warn_retry = RateLimitedLog()
        self._warn_drop = RateLimitedLog()

    @property
    def waiting(self) -> int:
        """Result events not yet delivered or dropped (in flight included)."""
        return len(self._backlog) + self._in_flight

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [
            loop.create_task(self._work(), name=f"pathguard-event-sink-{i}")
            for i in range(self.settings.events_sink_concurrency)
        ]

    def offer(self, event: BaseCloudEvent) -> None:
        """Queue ``event`` for delivery; dropped and counted when the backlog is full or the sink is closing."""
        if self._closing:
            self._drop("shutdown", "result event dropped: shutting down")
            return
        if self.waiting >= self.settings.events_sink_backlog:
            self._drop("sink_backlog_full", "result event dropped: the sink backlog is full")
            return
        self._backlog.append(_Pending(self._encode(event, self._format)))
        self._publish()
        self._ready.set()

    async def close(self, timeout_s: float) -> None:
        """Deliver what waits for at most ``timeout_s``, then stop; what is left is counted (reason ``shutdown``)."""
        deadline = time.monotonic() + timeout_s
        while self.waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._closing = True
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._backlog:
            self._backlog.popleft()
            self._drop("shutdown", "result event dropped: shutting down")
        self._publish()
        await self._client.aclose()

    # ------------------------------------------------------------------------------------------- delivery

    async def _work(self) -> None:
        while True:
            while not self._backlog:
                self._ready.clear()
                await self._ready.wait()
            item = self._backlog.popleft()
            self._in_flight += 1
            try:
                await self._deliver(item)
            except asyncio.CancelledError:
                self._drop("shutdown", "result event dropped: shutting down")
                raise
            finally:
                self._in_flight -= 1
                self._publish()

    async def _deliver(self, item: _Pending) -> None:
        """Try ``item`` until it is delivered, rejected or out of attempts (each outcome counted)."""
        s = self.settings
        while True:
            outcome = await self._attempt_when_allowed(item)
            if outcome == "delivered":
                self._failures = 0
                self.metrics.events_delivered.inc()
                return
            if outcome == "rejected":
                self._drop("sink_rejected", f"result event dropped: the sink {self.url} refused it")
                return
            item.attempts += 1
            self._failures += 1
            self.metrics.events_sink_failures.inc()
            wait = min(s.events_sink_backoff_s * 2 ** (self._failures - 1), s.events_sink_backoff_max_s)
            self._retry_at = time.monotonic() + wait
            if item.attempts >= s.events_sink_attempts:
                message = f"result event dropped: the sink {self.url} failed {item.attempts} times"
                self._drop("retries_exhausted", message)
                return

    async def _attempt_when_allowed(self, item: _Pending) -> Outcome:
        """One attempt: at once while the sink is healthy; while it fails, after the backoff and one at a time."""
        if self._failures:
            async with self._probe:
                if self._failures:
                    await asyncio.sleep(max(0.0, self._retry_at - time.monotonic()))
                    return await self._attempt(item.message)
        return await self._attempt(item.message)

    async def _attempt(self, message: HTTPMessage) -> Outcome:
        try:
            response = await self._client.post(self.url, content=message.body, headers=message.headers)
        except httpx.HTTPError as exc:  # connection refused or reset, timeouts, protocol errors
            self._warn_retry.warn(f"result event not delivered to {self.url}: {exc!r}; retrying")
            return "retry"
        code = response.status_code
        if 200 <= code < 300:
            return "delivered"
        if code in (408, 429) or code >= 500:
            self._warn_retry.warn(f"result event not delivered to {self.url}: HTTP {code}; retrying")
            return "retry"
        return "rejected"

    def _drop(self, reason: str, message: str) -> None:
        self.metrics.events_dropped.labels(reason=reason).inc()
        self._warn_drop.warn(message)

    def _publish(self) -> None:
        self.metrics.events_sink_backlog.set(self.waiting)
