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
import time
from collections import OrderedDict
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
    """Append-only JSON-lines file of flagged entries waiting for Redis (bytes values base64-encoded)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, entry: Entry) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(_encode(entry), separators=(",", ":")) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[Entry]:
        if not self.path.is_file():
            return []
        entries = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                entries.append(_decode(json.loads(line)))
            except (ValueError, TypeError, AttributeError):
                log.error("spool %s line %d is corrupt; skipped", self.path, n)
        return entries

    def rewrite(self, entries: list[Entry]) -> None:
        """Replace the spool content with ``entries`` (atomically)."""
        if not entries:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(_encode(e), separators=(",", ":")) + "\n" for e in entries))
        tmp.replace(self.path)

    def __len__(self) -> int:
        if not self.path.is_file():
            return 0
        with self.path.open("rb") as f:
            return sum(1 for _ in f)


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
        if not isinstance(value, dict) or any(
            not isinstance(value.get(k), t) or (t != (bool,) and isinstance(value.get(k), bool))
            for k, t in fields.items()
        ):
            return None, f"response part {part!r} is malformed"
    if body["model"]["bundle_sha256"] != bundle_sha256:
        return None, "written for another bundle"
    ep, nic = body["effective_path"], body["nic"]
    numbers = [*ep["rank1_similarity"], *nic["value_violation"].values(), *nic["provenance_violation"].values()]
    if len(ep["layers"]) != len(ep["rank1_similarity"]) or not all(_is_number(v) for v in numbers):
        return None, "per-layer scores are malformed"
    return body, ""


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class DetectionStore:
    """Verdict cache + flagged stream of one served bundle."""

    def __init__(self, settings: Settings, metrics: Metrics, bundle_sha256: str) -> None:
        self.settings = settings
        self.metrics = metrics
        self.bundle_sha256 = bundle_sha256
        self.spool = Spool(settings.spool_path)
        self.link: RedisLink | None = None
        self.cache: VerdictCache
        if settings.redis_url:
            self.link = RedisLink(settings.redis_url, settings.redis_timeout_s, settings.redis_retry_s, metrics)
            self.cache = RedisVerdictCache(self.link, settings.cache_ttl_s)
        else:
            self.cache = MemoryVerdictCache(settings.cache_max_entries, settings.cache_ttl_s)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._pending = len(self.spool) if self.link else 0

    @property
    def pending(self) -> int:
        """Flagged entries waiting in the spool."""
        return self._pending

    async def start(self) -> None:
        """Check Redis, replay a spool left by an earlier run, and start the background replayer."""
        if self.link is None:
            return
        if await self.link.ping():
            await self.replay()
        self._task = asyncio.create_task(self._replayer(), name="pathguard-spool-replay")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.link is not None:
            await self.link.close()

    async def get_verdict(self, image_sha256: str) -> dict[str, Any] | None:
        """Cached response for this image under the served bundle, counting hits and misses.

        Anything unusable under the key (not JSON, another schema version or bundle, a body without the parts a
        response needs) is a miss: logged, counted, and overwritten by the fresh detection."""
        key = verdict_key(self.bundle_sha256, image_sha256)
        raw = await self.cache.get(key)
        if raw is None:
            self.metrics.cache_misses.inc()
            return None
        body, why = _unwrap(raw, self.bundle_sha256)
        if body is None:
            self.metrics.cache_misses.inc()
            log.warning("verdict cache entry %s is unusable (%s); treated as a miss", key, why)
            return None
        self.metrics.cache_hits.inc()
        return body

    async def put_verdict(self, image_sha256: str, response: dict[str, Any]) -> None:
        entry = {"schema": CACHE_SCHEMA, "bundle": self.bundle_sha256, "body": response}
        raw = json.dumps(entry, separators=(",", ":")).encode()
        await self.cache.set(verdict_key(self.bundle_sha256, image_sha256), raw)

    async def flag(self, entry: Entry) -> None:
        """Record one flagged input: XADD to the stream, or the spool when Redis is unset, down or behind."""
        if self.link is None:
            log.warning("flagged input %s (no Redis configured; entry not stored)", entry.get("id"))
            return
        async with self._lock:
            if self._pending == 0 and self.link.available:
                try:
                    await self._xadd(entry)
                    return
                except (RedisError, OSError) as exc:
                    self.link.failed(exc)
            self.spool.append(entry)
            self._pending += 1

    async def replay(self) -> int:
        """Move spooled entries into the stream, oldest first; returns how many were delivered."""
        if self.link is None:
            return 0
        async with self._lock:
            entries = self.spool.read()
            sent = 0
            try:
                for entry in entries:
                    await self._xadd(entry)
                    sent += 1
            except (RedisError, OSError) as exc:
                self.link.failed(exc)
            self.spool.rewrite(entries[sent:])
            self._pending = len(entries) - sent
        if sent:
            log.info("replayed %d flagged entries from %s", sent, self.spool.path)
        return sent

    async def _xadd(self, entry: Entry) -> None:
        assert self.link is not None
        await self.link.client.xadd(
            FLAGGED_STREAM,
            dict(entry),  # type: ignore[arg-type]
            maxlen=self.settings.stream_maxlen,
            approximate=True,
        )

    async def _replayer(self) -> None:
        assert self.link is not None
        interval = min(self.settings.redis_retry_s, 1.0)
        while True:
            await asyncio.sleep(interval)
            if self._pending and self.link.available and await self.link.ping():
                await self.replay()
