"""The micro-batcher: requests that arrive within a short window run as one batch; a bounded queue answers
"overloaded" instead of growing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from pathguard.service.errors import Overloaded, PayloadTooLarge

__all__ = ["BatchSlice", "MicroBatcher"]

log = logging.getLogger("pathguard.service")

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
        """Queue ``x`` (n, C, H, W) and wait for its share of a batch result; ``n`` above the batch size is 413
        (settings keep every request within it: no batch ever runs more than ``max_batch`` images)."""
        return await self.enqueue(x)

    def enqueue(self, x: np.ndarray) -> asyncio.Future[BatchSlice[R]]:
        """Queue ``x`` (n, C, H, W) without waiting: the future of its share of a batch result. Raises
        :class:`Overloaded` at once when the queue is full (and :class:`PayloadTooLarge` as :meth:`submit`)."""
        if len(x) > self.max_batch:
            raise PayloadTooLarge(f"at most {self.max_batch} images per request, got {len(x)}")
        fut: asyncio.Future[BatchSlice[Any]] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Item(x, fut, time.perf_counter()))
        except asyncio.QueueFull:
            raise Overloaded(f"{self.name} queue is full; retry later", self.retry_after_s) from None
        return fut

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
