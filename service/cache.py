"""Verdict cache and flagged-input stream: Redis when configured, in-memory cache otherwise.

Redis layout (docs/PRODUCT.md):

- ``pathguard:verdict:{bundle_sha256}:{image_sha256}`` -> ``{"schema": CACHE_SCHEMA, "bundle": bundle_sha256,
  "body": response}`` JSON, with a TTL. An entry that does not parse, has another schema version or another
  bundle sha256, or whose body lacks what a response needs is a miss (counted and logged), never an error;
- stream ``pathguard:flagged``: one entry per adversarial verdict (XADD ... MAXLEN ~ cap).

A Redis failure never fails a request: the operation is counted in ``pathguard_redis_errors_total``, Redis is
skipped for ``redis_retry_s`` (so a dead Redis costs one timeout, not one per request), and flagged entries go
to a local spool file (JSON lines). A background task pings Redis; once it answers, the spool is replayed into
the stream in order and truncated. While the spool holds entries, new ones are appended behind them, so the
stream keeps the order in which inputs were flagged. Delivery is at-least-once: a crash in the middle of a
replay can repeat entries (each carries its request ``id``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import shutil
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from pathguard.service.metrics import Metrics
from pathguard.service.settings import Settings

__all__ = [
    "CACHE_SCHEMA",
    "FLAGGED_STREAM",
    "VERDICT_PREFIX",
    "DetectionStore",
    "MemoryVerdictCache",
    "RedisLink",
    "Spool",
    "verdict_key",
]

log = logging.getLogger("pathguard.service")

VERDICT_PREFIX = "pathguard:verdict"
FLAGGED_STREAM = "pathguard:flagged"
CACHE_SCHEMA = 1  # version of the cached entry's layout; bump it when the response body changes shape
Entry = dict[str, str | bytes]


def verdict_key(bundle_sha256: str, image_sha256: str) -> str:
    """Redis key of a cached verdict."""
    return f"{VERDICT_PREFIX}:{bundle_sha256}:{image_sha256}"


class VerdictCache(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes) -> None: ...


class MemoryVerdictCache:
    """In-process LRU with per-entry expiry (used when no Redis URL is configured)."""

    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, value = item
        if expires < time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes) -> None:
        self._items[key] = (time.monotonic() + self.ttl_s, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)


class RedisLink:
    """A redis-py asyncio client behind a circuit breaker: after a failure, Redis is skipped for ``retry_s``."""

    def __init__(self, url: str, timeout_s: float, retry_s: float, metrics: Metrics) -> None:
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self.retry_s = retry_s
        self.metrics = metrics
        self._down_until = 0.0

    @property
    def available(self) -> bool:
        """False while the breaker is open."""
        return time.monotonic() >= self._down_until

    def failed(self, exc: BaseException) -> None:
        """Count a failed operation and open the breaker."""
        self.metrics.redis_errors.inc()
        if self.available:
            log.warning("redis unavailable (%s); retrying in %.1f s", exc, self.retry_s)
        self._down_until = time.monotonic() + self.retry_s

    async def ping(self) -> bool:
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            self.failed(exc)
            return False
        self._down_until = 0.0
        return True

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()


class RedisVerdictCache:
    """Verdict cache in Redis (GET / SET EX); failures degrade to misses."""

    def __init__(self, link: RedisLink, ttl_s: int) -> None:
        self.link = link
        self.ttl_s = ttl_s

    async def get(self, key: str) -> bytes | None:
        if not self.link.available:
            return None
        try:
            value = await self.link.client.get(key)
        except (RedisError, OSError) as exc:
            self.link.failed(exc)
            return None
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes) -> None:
        if not self.link.available:
            return
        try:
            await self.link.client.set(key, value, ex=self.ttl_s)
        except (RedisError, OSError) as exc:
            self.link.failed(exc)


class Spool:
    """Bounded append-only JSON-lines file of flagged entries waiting for Redis (bytes values base64-encoded).

    At most ``max_bytes`` of file and ``max_entries`` undelivered entries: an entry that does not fit is refused
    (the caller counts it). Entries are delivered from a read position that moves forward; the file is removed
    once everything in it was delivered, and compacted (the undelivered tail copied) once the delivered head is
    over half of it. Every method does blocking file I/O: call it from a worker thread, one call at a time.
    """

    def __init__(self, path: Path, max_bytes: int, max_entries: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.entries = 0  # undelivered entries
        self.size = 0  # file size in bytes
        self.offset = 0  # bytes at the head of the file already delivered

    def open(self) -> None:
        """Count what an earlier run left in the file (read line by line)."""
        self.entries = self.size = self.offset = 0
        if self.path.is_file():
            with self.path.open("rb") as f:
                for _ in f:
                    self.entries += 1
            self.size = self.path.stat().st_size

    def append(self, entries: list[Entry]) -> list[Entry]:
        """Append ``entries`` (one write, one fsync); returns those refused by the bounds."""
        lines, refused = [], []
        for entry in entries:
            line = (json.dumps(_encode(entry), separators=(",", ":")) + "\n").encode()
            if self.size + len(line) > self.max_bytes or self.entries >= self.max_entries:
                refused.append(entry)
                continue
            lines.append(line)
            self.size += len(line)
            self.entries += 1
        if lines:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as f:
                f.write(b"".join(lines))
                f.flush()
                os.fsync(f.fileno())
        return refused

    def read(self, limit: int) -> list[tuple[Entry | None, int]]:
        """Up to ``limit`` entries from the read position, each with the offset just past its line (``None``
        for a corrupt line, which is logged and then skipped like a delivered one)."""
        if self.entries == 0 or not self.path.is_file():
            return []
        out: list[tuple[Entry | None, int]] = []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            pos = self.offset
            for line in f:
                pos += len(line)
                try:
                    out.append((_decode(json.loads(line)), pos))
                except (ValueError, TypeError, AttributeError):
                    log.error("spool %s: corrupt line at byte %d skipped", self.path, pos - len(line))
                    out.append((None, pos))
                if len(out) >= limit:
                    break
        return out

    def advance(self, offset: int, count: int) -> None:
        """Mark ``count`` entries up to byte ``offset`` delivered; remove or compact the file when worth it."""
        self.offset, self.entries = offset, max(0, self.entries - count)
        if self.entries == 0 or self.offset >= self.size:
            self.path.unlink(missing_ok=True)
            self.entries = self.size = self.offset = 0
        elif self.offset > self.size // 2:
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            with self.path.open("rb") as src, tmp.open("wb") as dst:
                src.seek(self.offset)
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
            tmp.replace(self.path)
            self.size -= self.offset
            self.offset = 0

    def __len__(self) -> int:
        return self.entries


class RateLimitedLog:
    """At most one warning per ``interval_s`` on ``log``, saying how many events it stands for."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._next = 0.0
        self._count = 0

    def warn(self, message: str) -> None:
        self._count += 1
        now = time.monotonic()
        if now >= self._next:
            log.warning("%s (%d time(s) since the last such warning)", message, self._count)
            self._count, self._next = 0, now + self.interval_s


def _encode(entry: Entry) -> dict[str, Any]:
    return {k: {"b64": base64.b64encode(v).decode()} if isinstance(v, bytes) else v for k, v in entry.items()}


def _decode(obj: dict[str, Any]) -> Entry:
    return {k: base64.b64decode(v["b64"]) if isinstance(v, dict) else str(v) for k, v in obj.items()}


# The parts of a cached body that answering from the cache reads (detection.py: _record, _flag_entry, the
# threshold check), with their JSON types.
_BODY_PARTS: dict[str, dict[str, tuple[type, ...]]] = {
    "model": {"name": (str,), "bundle_sha256": (str,)},
    "prediction": {"class_index": (int,), "label": (str,), "confidence": (int, float), "probabilities": (list,)},
    "effective_path": {"layers": (list,), "rank1_similarity": (list,), "score": (int, float)},
    "nic": {"value_violation": (dict,), "provenance_violation": (dict,), "score": (int, float)},
    "verdict": {"adversarial": (bool,), "score": (int, float), "threshold": (int, float), "p_value": (int, float)},
}


# parts a server may leave out of its answers (PATHGUARD_REPORTED_COMPONENTS): null in the body
_OPTIONAL_PARTS = ("effective_path", "nic")


def _unwrap(raw: bytes, bundle_sha256: str) -> tuple[dict[str, Any] | None, str]:
    """The response body of a cache entry, or None and why it cannot be used."""
    try:
        entry = json.loads(raw)
    except (ValueError, RecursionError):  # not UTF-8 or not JSON; absurdly deep nesting
        return None, "not JSON"
    if not isinstance(entry, dict) or entry.get("schema") != CACHE_SCHEMA:
        found = entry.get("schema") if isinstance(entry, dict) else type(entry).__name__
        return None, f"schema {found!r}, expected {CACHE_SCHEMA}"
    if entry.get("bundle") != bundle_sha256:
        return None, "written for another bundle"
    body = entry.get("body")
    if not isinstance(body, dict):
        return None, "no response body"
    for part, fields in _BODY_PARTS.items():
        value = body.get(part)
        if value is None and part in _OPTIONAL_PARTS:
            continue
        if not isinstance(value, dict) or any(
            not isinstance(value.get(k), t) or (t != (bool,) and isinstance(value.get(k), bool))
            for k, t in fields.items()
        ):
            return None, f"response part {part!r} is malformed"
    if body["model"]["bundle_sha256"] != bundle_sha256:
        return None, "written for another bundle"
    ep = body["effective_path"] or {"layers": [], "rank1_similarity": []}
    nic = body["nic"] or {"value_violation": {}, "provenance_violation": {}}
    numbers = [*ep["rank1_similarity"], *nic["value_violation"].values(), *nic["provenance_violation"].values()]
    if len(ep["layers"]) != len(ep["rank1_similarity"]) or not all(_is_number(v) for v in numbers):
        return None, "per-layer scores are malformed"
    return body, ""


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class DetectionStore:
    """Verdict cache + flagged stream of the server (every model's verdicts keyed by its bundle's sha256).

    :meth:`flag` never blocks: it puts the entry into a bounded backlog in memory, and one delivery task moves
    the backlog into the stream (XADD) or, while Redis is down or the spool still holds entries, into the spool
    (appended on a worker thread, one fsync per group). Entries beyond the backlog's or the spool's bounds, and
    every entry when no Redis is configured, are counted in ``pathguard_flagged_dropped_total{reason}`` and
    reported by a rate-limited warning. Below the bounds nothing is lost: :meth:`close` delivers the backlog.
    """

    _GROUP = 256  # entries per spool write / replay read

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.spool = Spool(settings.spool_path, settings.spool_max_bytes, settings.spool_max_entries)
        self.link: RedisLink | None = None
        self.cache: VerdictCache
        if settings.redis_url:
            self.link = RedisLink(settings.redis_url, settings.redis_timeout_s, settings.redis_retry_s, metrics)
            self.cache = RedisVerdictCache(self.link, settings.cache_ttl_s)
        else:
            self.cache = MemoryVerdictCache(settings.cache_max_entries, settings.cache_ttl_s)
        self._backlog: deque[tuple[Entry, int]] = deque()
        self._backlog_bytes = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._dropped = RateLimitedLog()

    @property
    def pending(self) -> int:
        """Flagged entries waiting in the spool."""
        return self.spool.entries

    async def start(self) -> None:
        """Count what an earlier run left in the spool, check Redis, and start the delivery task."""
        if self.link is None:
            return
        await asyncio.to_thread(self.spool.open)
        self._publish_spool()
        await self.link.ping()
        self._task = asyncio.create_task(self._deliver(), name="pathguard-flagged-delivery")

    async def close(self) -> None:
        """Deliver the backlog (stream or spool), then stop."""
        if self._task is not None:
            self._closing = True
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=30.0)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self.link is not None:
            await self.link.close()

    async def get_verdict(self, bundle_sha256: str, image_sha256: str, model: str) -> dict[str, Any] | None:
        """Cached response for this image under bundle ``bundle_sha256``, counting hits and misses of ``model``.

        Anything unusable under the key (not JSON, another schema version or bundle, a body without the parts a
        response needs) is a miss: logged, counted, and overwritten by the fresh detection."""
        key = verdict_key(bundle_sha256, image_sha256)
        raw = await self.cache.get(key)
        if raw is None:
            self.metrics.cache_misses.labels(model=model).inc()
            return None
        body, why = _unwrap(raw, bundle_sha256)
        if body is None:
            self.metrics.cache_misses.labels(model=model).inc()
            log.warning("verdict cache entry %s is unusable (%s); treated as a miss", key, why)
            return None
        self.metrics.cache_hits.labels(model=model).inc()
        return body

    async def put_verdict(self, bundle_sha256: str, image_sha256: str, response: dict[str, Any]) -> None:
        entry = {"schema": CACHE_SCHEMA, "bundle": bundle_sha256, "body": response}
        raw = json.dumps(entry, separators=(",", ":")).encode()
        await self.cache.set(verdict_key(bundle_sha256, image_sha256), raw)

    async def flag(self, entry: Entry) -> None:
        """Record one flagged input: queued for the stream (or the spool); never waits for I/O."""
        if self.link is None:
            self._drop("no_redis", "flagged input not stored: no Redis configured (PATHGUARD_REDIS_URL)")
            return
        size = sum(len(v) for v in entry.values()) + 64 * len(entry)
        s = self.settings
        if len(self._backlog) >= s.flag_backlog or self._backlog_bytes + size > s.flag_backlog_bytes:
            self._drop("backlog_full", "flagged input dropped: the delivery backlog is full")
            return
        self._backlog.append((entry, size))
        self._backlog_bytes += size
        self._wake.set()

    async def replay(self) -> int:
        """Move spooled entries into the stream, oldest first, while Redis takes them; returns how many."""
        if self.link is None:
            return 0
        sent = 0
        while self.spool.entries and self.link.available:
            group = await asyncio.to_thread(self.spool.read, self._GROUP)
            if not group:
                break
            done, end = 0, self.spool.offset
            try:
                for entry, offset in group:
                    if entry is not None:
                        await self._xadd(entry)
                        sent += 1
                    done, end = done + 1, offset
            except (RedisError, OSError) as exc:
                self.link.failed(exc)
            await asyncio.to_thread(self.spool.advance, end, done)
            self._publish_spool()
            await self._drain_backlog()  # new entries go behind the spooled ones, in order
        if sent:
            log.info("replayed %d flagged entries from %s", sent, self.spool.path)
        return sent

    def _drop(self, reason: str, message: str) -> None:
        self.metrics.flagged_dropped.labels(reason=reason).inc()
        self._dropped.warn(message)

    def _publish_spool(self) -> None:
        self.metrics.spool_entries.set(self.spool.entries)
        self.metrics.spool_bytes.set(self.spool.size)

    def _take(self, limit: int) -> list[Entry]:
        out: list[Entry] = []
        while self._backlog and len(out) < limit:
            entry, size = self._backlog.popleft()
            self._backlog_bytes -= size
            out.append(entry)
        return out

    async def _drain_backlog(self) -> None:
        """Everything in the backlog into the stream, or into the spool while Redis is down or behind."""
        assert self.link is not None
        while self._backlog:
            group = self._take(self._GROUP)
            if self.spool.entries == 0 and self.link.available:
                try:
                    while group:
                        await self._xadd(group[0])
                        group.pop(0)
                except (RedisError, OSError) as exc:
                    self.link.failed(exc)
            if group:
                try:
                    refused = await asyncio.to_thread(self.spool.append, group)
                except OSError as exc:  # the spool's disk
                    log.error("flagged spool %s cannot be written: %s", self.spool.path, exc)
                    for _ in group:
                        self._drop("spool_error", "flagged input dropped: the spool cannot be written")
                    continue
                for _ in refused:
                    self._drop("spool_full", f"flagged input dropped: the spool {self.spool.path} is full")
                self._publish_spool()

    async def _deliver(self) -> None:
        """The delivery task: drain the backlog when woken; replay the spool once Redis answers again."""
        assert self.link is not None
        interval = min(self.settings.redis_retry_s, 1.0)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                if self.spool.entries and not self._closing and self.link.available and await self.link.ping():
                    await self.replay()
            except OSError as exc:  # reading the spool: its entries stay there for the next try
                log.error("flagged spool %s cannot be read: %s", self.spool.path, exc)
            await self._drain_backlog()
            if self._closing and not self._backlog:
                return

    async def _xadd(self, entry: Entry) -> None:
        assert self.link is not None
        await self.link.client.xadd(
            FLAGGED_STREAM,
            dict(entry),  # type: ignore[arg-type]
            maxlen=self.settings.stream_maxlen,
            approximate=True,
        )
