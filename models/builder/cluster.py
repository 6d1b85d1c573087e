"""The build's passes as Ray tasks: on a local Ray with this machine's cores, or on an existing cluster.

Needs the ``cluster`` extra (``pip install 'pathguard[cluster]'``); the only module that imports Ray. Each shard
is one task (one CPU): the worker reads its images itself, from the dataset or image folder at the same path
on every node, and returns small arrays (packed bitmaps and counts, scores), which the driver reduces as they
arrive. The classifier and the parts fitted so far go to the object store once per pass.

A task that raises or whose worker dies is retried (``retries`` times, Ray's task retries); the shard is
computed again from its images, so a retried build writes the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pathguard.models.builder.shards import Job, Progress, Shard, ShardFn, ShardResult, run_shard
from pathguard.models.errors import PathguardError

__all__ = ["RayExecutor"]

ShardHook = Callable[[Shard, int], None]


def _task(fn: ShardFn, job: Job, shard: Shard, number: int, hook: ShardHook | None) -> ShardResult:
    if hook is not None:
        hook(shard, number)
    return run_shard(fn, job, shard, number)


class RayExecutor:
    """Runs shard functions as Ray tasks.

    Parameters
    ----------
    address : str, optional
        An existing cluster (``ray://host:10001`` or ``host:6379``; ``auto`` for the one this node belongs to).
        Default: a local Ray with ``workers`` CPUs, started on :meth:`__enter__` and stopped on exit. A Ray that
        is already initialized in this process is used as it is.
    workers : int, optional
        CPUs of the local Ray (default: this machine's cores); ignored with ``address``.
    retries : int
        Attempts after the first for a failed shard (an exception, or its worker process dying).
    progress : bool
        Show the shards done and images per second of each pass.
    before_shard : callable, optional
        Called in the worker with the shard and its number before it is computed (instrumentation, fault
        injection in tests).
    """

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        retries: int = 3,
        progress: bool = True,
        before_shard: ShardHook | None = None,
    ) -> None:
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be positive, got {workers}")
        self.address = address
        self.requested = workers
        self.retries = retries
        self.progress = progress
        self.before_shard = before_shard
        self.workers = 0
        self._started = False
        self._rss: dict[int, int] = {}
        self._job_refs: dict[str, Any] = {}

    def __enter__(self) -> RayExecutor:
        try:
            import ray
        except ImportError as exc:
            raise PathguardError("the Ray build needs the cluster extra: pip install 'pathguard[cluster]'") from exc
        if not ray.is_initialized():
            if self.address is not None:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(num_cpus=self.requested or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
            self._started = True
        self.workers = int(ray.cluster_resources().get("CPU", 1))
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        self._job_refs.clear()
        if self._started:
            ray.shutdown()
            self._started = False

    def map(self, fn: ShardFn, job: Job, shards: Sequence[Shard], desc: str) -> Iterator[ShardResult]:
        import ray
        from ray.exceptions import RayTaskError

        if not self.workers:
            raise RuntimeError("use RayExecutor as a context manager: with RayExecutor(...) as ex: ...")
        if job.key not in self._job_refs:  # one copy of the classifier and fitted parts per pass
            self._job_refs = {job.key: ray.put(job)}
        task = ray.remote(num_cpus=1, max_retries=self.retries, retry_exceptions=True)(_task)
        pending = {
            task.remote(fn, self._job_refs[job.key], shard, i, self.before_shard): i for i, shard in enumerate(shards)
        }
        bar = Progress(desc, shards, self.progress)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            pending.pop(ref)
            try:
                result: ShardResult = ray.get(ref)
            except RayTaskError as exc:  # the shard failed on every attempt: raise what it raised
                cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
                if isinstance(cause, PathguardError):
                    raise cause from None
                raise
            self._rss[result.pid] = max(self._rss.get(result.pid, 0), result.peak_rss)
            bar.advance(result)
            yield result

    def peak_rss(self) -> dict[str, int]:
        import resource

        return {
            "driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "workers": max(self._rss.values(), default=0),
            "worker_processes": len(self._rss),
        }
