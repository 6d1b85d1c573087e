"""A build's passes over images, cut into shards that any process can run: on this machine or on a cluster.

Every pass over images (class paths over the fit split, NIC's sample, the Effective Path features and the
calibration scores of the held-out splits) is a function of one :class:`Shard`: a run of consecutive positions
of one split, read by whoever runs it from an :data:`ImageSource` (a bundled dataset or an image folder, both
addressed by position, so a shard is a few numbers, never pixels). A shard is cut into chunks of
:data:`CHUNK` positions on a grid fixed by the split alone, and every forward pass runs on one chunk's readable
images: the same batches whatever the number of shards or workers, hence the same bytes.

What a shard returns is small (packed bitmaps and counts, scores, the unreadable files); the caller reduces the
results (:class:`~pathguard.models.effective_path.PathCounts` by OR and sum, the rest by concatenation in shard
order). :class:`LocalExecutor` runs the shards one after the other in this process;
:class:`~pathguard.models.builder.cluster.RayExecutor` runs them as Ray tasks.
"""

from __future__ import annotations

import hashlib
import io
import json
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import torch

from pathguard.models.bundle.format import EP_THRESHOLDS, MAHALANOBIS_FILE
from pathguard.models.components.base import one_torch_thread
from pathguard.models.data import ImageFolder, Split, dataset_info, load_dataset
from pathguard.models.effective_path import ClassPaths, EffectivePathExtractor
from pathguard.models.effective_path.extractor import read_thresholds_document
from pathguard.models.errors import DatasetError
from pathguard.models.mahalanobis import ClassGaussian
from pathguard.models.networks import TappedSequential, classifier_from_files
from pathguard.models.nic import NICDetector

__all__ = [
    "CHUNK",
    "DatasetSource",
    "Executor",
    "FolderSource",
    "Job",
    "LocalExecutor",
    "Shard",
    "shards_of",
]

CHUNK = 512  # positions per forward pass: the grid every pass is computed on
SHARD_CHUNKS = 8  # chunks per shard (4,096 images): a lost worker costs at most this much work


# ------------------------------------------------------------------------------------------------ image sources


@dataclass(frozen=True)
class DatasetSource:
    """The training set of a bundled dataset (``mnist``, ``cifar10``), read from the data directory."""

    name: str

    @property
    def classes(self) -> tuple[str, ...]:
        return dataset_info(self.name, "train")[1]

    def __len__(self) -> int:
        return dataset_info(self.name, "train")[0]

    def read(self, idx: np.ndarray) -> tuple[Split, list[str]]:
        return _train_set(self.name).subset(idx), []


@lru_cache(maxsize=2)
def _train_set(name: str) -> Split:
    return load_dataset(name, "train")


@dataclass(frozen=True)
class FolderSource:
    """An image folder as it was when the build started: its file list is pinned by count and digest, so a
    worker that sees a different folder (a file added, renamed or removed) refuses to read it."""

    root: str
    shape: tuple[int, int, int]
    n_files: int
    digest: str

    @classmethod
    def of(cls, folder: ImageFolder, shape: tuple[int, int, int]) -> FolderSource:
        return cls(str(folder.root), tuple(shape), len(folder), _folder_digest(folder))  # type: ignore[arg-type]

    @property
    def classes(self) -> tuple[str, ...]:
        return self.folder().classes

    def __len__(self) -> int:
        return self.n_files

    def folder(self) -> ImageFolder:
        return _verified_folder(self.root, self.n_files, self.digest)

    def read(self, idx: np.ndarray) -> tuple[Split, list[str]]:
        folder = self.folder()
        try:
            split, bad = folder.load(self.shape, idx)
        except DatasetError:  # only unreadable files
            empty = Split(np.empty((0, *self.shape), np.float32), np.empty(0, np.int64), folder.classes)
            return empty, [str(folder.files[i]) for i in idx]
        return split, [str(p) for p in bad]


@lru_cache(maxsize=4)
def _verified_folder(root: str, n_files: int, digest: str) -> ImageFolder:
    """The folder at ``root`` scanned and checked against the build's file list, once per process (a failed check
    is not cached: it raises)."""
    folder = ImageFolder.scan(root)
    if len(folder) != n_files or _folder_digest(folder) != digest:
        raise DatasetError(
            f"image folder {root} changed during the build ({len(folder)} files now, {n_files} at "
            "the start), or this machine sees another folder under that path"
        )
    return folder


def _folder_digest(folder: ImageFolder) -> str:
    h = hashlib.sha256()
    for path, label in zip(folder.files, folder.labels.tolist(), strict=True):
        h.update(f"{path.relative_to(folder.root).as_posix()}\t{label}\n".encode())
    return h.hexdigest()


ImageSource = DatasetSource | FolderSource


# ------------------------------------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    """Positions ``start .. start + len(idx)`` of split ``split``; ``idx`` are the source's image indices."""

    source: ImageSource
    split: str
    start: int
    idx: np.ndarray = field(repr=False)

    def chunks(self) -> Iterator[np.ndarray]:
        for s in range(0, len(self.idx), CHUNK):
            yield self.idx[s : s + CHUNK]

    def read(self) -> Iterator[tuple[Split, list[str]]]:
        for idx in self.chunks():
            yield self.source.read(idx)


def shards_of(source: ImageSource, split: str, idx: np.ndarray, chunks_per_shard: int | None = None) -> list[Shard]:
    """``idx`` cut into shards of ``chunks_per_shard`` chunks (default :data:`SHARD_CHUNKS`; the last may be
    shorter)."""
    size = CHUNK * (SHARD_CHUNKS if chunks_per_shard is None else chunks_per_shard)
    return [Shard(source, split, s, np.asarray(idx[s : s + size])) for s in range(0, len(idx), size)]


# ---------------------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    """What a worker needs to run a pass: the classifier's files, the extractor's settings, the parts fitted so far
    as the bundle stores them (npz/JSON bytes) and, once all are fitted, the components' names in build order.
    ``key`` names the content (workers cache by it)."""

    classifier: dict[str, bytes]
    theta: float
    last_k: int | None
    fitted: dict[str, bytes] = field(default_factory=dict)
    key: str = ""
    components: tuple[str, ...] = ()

    @classmethod
    def make(
        cls,
        classifier: dict[str, bytes],
        theta: float,
        last_k: int | None,
        fitted: dict[str, bytes] | None = None,
        components: tuple[str, ...] = (),
    ) -> Job:
        h = hashlib.sha256(json.dumps([theta, last_k, list(components)]).encode())
        for name, blob in sorted({**classifier, **(fitted or {})}.items()):
            h.update(name.encode() + b"\0" + hashlib.sha256(blob).digest())
        return cls(dict(classifier), theta, last_k, dict(fitted or {}), h.hexdigest(), tuple(components))

    def with_fitted(self, **blobs: bytes) -> Job:
        return Job.make(self.classifier, self.theta, self.last_k, {**self.fitted, **blobs}, self.components)

    def with_components(self, names: tuple[str, ...]) -> Job:
        return Job.make(self.classifier, self.theta, self.last_k, self.fitted, names)


@dataclass
class Context:
    """A :class:`Job` made into objects (once per process and job)."""

    model: TappedSequential
    extractor: EffectivePathExtractor
    class_paths: ClassPaths | None
    nic: NICDetector | None
    gaussian: ClassGaussian | None = None
    job: Job | None = None
    _pipeline: Any = None

    def pipeline(self) -> Any:
        """The detection pipeline of the job's components (no verdict yet), built once; the noise of randomized
        components is seeded, so every executor computes the same calibration scores."""
        from pathguard.models.bundle import DetectionPipeline
        from pathguard.models.components import component_class

        if self._pipeline is None:
            assert self.job is not None and self.job.components, "the job names no components yet"
            fitted = self.job.fitted

            def read(name: str) -> bytes:
                return fitted[name]

            built: dict[str, Any] = {}
            for name in self.job.components:
                built[name] = component_class(name).from_files(read, self.model, built, _entry(name, self.job))
            self._pipeline = DetectionPipeline(self.model, built, None, 0.05, seed=0)
        return self._pipeline


def _entry(name: str, job: Job) -> dict[str, Any]:
    """The manifest entry a component reads back (only Effective Path needs one: the extractor's settings)."""
    return {"theta": job.theta, "last_k": job.last_k} if name == "effective_path" else {}


_CONTEXTS: dict[str, Context] = {}


def context(job: Job) -> Context:
    """The objects of ``job``, built on first use in this process (the two most recent jobs are kept)."""
    if job.key not in _CONTEXTS:
        if len(_CONTEXTS) >= 2:
            _CONTEXTS.pop(next(iter(_CONTEXTS)))
        model = classifier_from_files(job.classifier["classifier.json"], job.classifier.__getitem__)
        f = job.fitted
        thresholds, relative = (
            read_thresholds_document(json.loads(f[EP_THRESHOLDS])) if EP_THRESHOLDS in f else (None, False)
        )
        _CONTEXTS[job.key] = Context(
            model,
            EffectivePathExtractor(model, theta=job.theta, last_k=job.last_k, thresholds=thresholds, relative=relative),
            ClassPaths.from_arrays(_npz(f["class_paths.npz"])) if "class_paths.npz" in f else None,
            NICDetector.from_arrays(_npz(f["nic.npz"]), json.loads(f["nic.json"])) if "nic.npz" in f else None,
            ClassGaussian.from_arrays(_npz(f[MAHALANOBIS_FILE])) if MAHALANOBIS_FILE in f else None,
            job,
        )
    return _CONTEXTS[job.key]


def _npz(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------------------------- shard results


@dataclass
class ShardResult:
    """What one shard returns: its payload, the unreadable files, the images it read and who ran it."""

    shard: int
    value: Any
    skipped: list[str]
    images: int
    seconds: float
    pid: int = 0
    peak_rss: int = 0  # bytes, the running process's peak resident set so far


ShardFn = Callable[[Context, Shard], tuple[Any, list[str], int]]


def run_shard(fn: ShardFn, job: Job, shard: Shard, number: int) -> ShardResult:
    """Run ``fn`` on one shard in this process (the body of a cluster task as well)."""
    import os

    t = time.perf_counter()
    value, skipped, images = fn(context(job), shard)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return ShardResult(number, value, skipped, images, time.perf_counter() - t, os.getpid(), rss)


def sample_pass(ctx: Context, shard: Shard) -> tuple[tuple[np.ndarray, np.ndarray], list[str], int]:
    """The readable images of a shard (NIC's fitting sample), in position order."""
    xs, ys, skipped = [], [], []
    for split, bad in shard.read():
        xs.append(split.x)
        ys.append(split.y)
        skipped.extend(bad)
    x, y = np.concatenate(xs), np.concatenate(ys)
    return (x, y), skipped, len(x)


@one_torch_thread
@torch.no_grad()
def components_pass(ctx: Context, shard: Shard) -> tuple[dict[str, np.ndarray], list[str], int]:
    """Every component's raw score of a shard of clean images."""
    pipeline = ctx.pipeline()
    parts: list[dict[str, np.ndarray]] = []
    skipped: list[str] = []
    for split, bad in shard.read():
        skipped.extend(bad)
        if len(split):
            parts.append(pipeline.raw_components(split.x, batch_size=CHUNK))
    if not parts:
        return {}, skipped, 0
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return out, skipped, len(next(iter(out.values())))


# ------------------------------------------------------------------------------------------------------ executors


class Executor(Protocol):
    """Runs shard functions; results come back as they finish (``ShardResult.shard`` says which)."""

    workers: int

    def map(self, fn: ShardFn, job: Job, shards: Sequence[Shard], desc: str) -> Iterator[ShardResult]: ...

    def peak_rss(self) -> dict[str, int]:
        """Peak resident bytes: ``driver``, ``workers`` (the largest worker process, if any) and
        ``worker_processes``."""
        ...


class LocalExecutor:
    """Every shard in this process, one after the other (the single-machine build)."""

    workers = 1

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def map(self, fn: ShardFn, job: Job, shards: Sequence[Shard], desc: str) -> Iterator[ShardResult]:
        bar = Progress(desc, shards, self.progress)
        for i, shard in enumerate(shards):
            result = run_shard(fn, job, shard, i)
            bar.advance(result)
            yield result

    def peak_rss(self) -> dict[str, int]:
        return {"driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "worker_processes": 0}


class Progress:
    """Shards done and images per second of one pass, on stderr."""

    def __init__(self, desc: str, shards: Sequence[Shard], enabled: bool) -> None:
        from tqdm import tqdm

        self.sizes = [len(s.idx) for s in shards]
        self.bar = tqdm(total=sum(self.sizes), desc=desc, unit="img", disable=not enabled, leave=False)
        self.done = 0

    def advance(self, result: ShardResult) -> None:
        self.done += 1
        self.bar.update(self.sizes[result.shard])
        self.bar.set_postfix_str(f"{self.done}/{len(self.sizes)} shards")
        if self.done == len(self.sizes):
            self.bar.close()
