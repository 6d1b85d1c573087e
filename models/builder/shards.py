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

import functools
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

from pathguard.models.bundle.format import MAHALANOBIS_FILE
from pathguard.models.data import ImageFolder, Split, dataset_info, load_dataset
from pathguard.models.effective_path import BenignEPScore, ClassPaths, EffectivePathExtractor, PathCounts
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
    """What a worker needs to run a pass: the classifier's files, the extractor's settings, and the parts fitted
    so far as the bundle stores them (npz/JSON bytes). ``key`` names the content (workers cache by it)."""

    classifier: dict[str, bytes]
    theta: float
    last_k: int | None
    fitted: dict[str, bytes] = field(default_factory=dict)
    key: str = ""

    @classmethod
    def make(
        cls, classifier: dict[str, bytes], theta: float, last_k: int | None, fitted: dict[str, bytes] | None = None
    ) -> Job:
        h = hashlib.sha256(json.dumps([theta, last_k]).encode())
        for name, blob in sorted({**classifier, **(fitted or {})}.items()):
            h.update(name.encode() + b"\0" + hashlib.sha256(blob).digest())
        return cls(dict(classifier), theta, last_k, dict(fitted or {}), h.hexdigest())

    def with_fitted(self, **blobs: bytes) -> Job:
        return Job.make(self.classifier, self.theta, self.last_k, {**self.fitted, **blobs})


@dataclass
class Context:
    """A :class:`Job` made into objects (once per process and job)."""

    model: TappedSequential
    extractor: EffectivePathExtractor
    class_paths: ClassPaths | None
    ep_score: BenignEPScore | None
    nic: NICDetector | None
    gaussian: ClassGaussian | None = None
    _pipeline: Any = None

    def pipeline(self) -> Any:
        """The detection pipeline of the fitted parts (no verdict yet), built once."""
        from pathguard.models.bundle import DetectionPipeline

        if self._pipeline is None:
            assert self.class_paths is not None and self.ep_score is not None and self.nic is not None
            self._pipeline = DetectionPipeline(
                self.model, self.extractor, self.class_paths, self.ep_score, self.nic, None, 0.05,
                gaussian=self.gaussian if self.gaussian is not None and hasattr(self.gaussian, "calib_") else None,
            )  # fmt: skip
        return self._pipeline


_CONTEXTS: dict[str, Context] = {}


def context(job: Job) -> Context:
    """The objects of ``job``, built on first use in this process (the two most recent jobs are kept)."""
    if job.key not in _CONTEXTS:
        if len(_CONTEXTS) >= 2:
            _CONTEXTS.pop(next(iter(_CONTEXTS)))
        model = classifier_from_files(job.classifier["classifier.json"], job.classifier.__getitem__)
        f = job.fitted
        _CONTEXTS[job.key] = Context(
            model,
            EffectivePathExtractor(model, theta=job.theta, last_k=job.last_k),
            ClassPaths.from_arrays(_npz(f["class_paths.npz"])) if "class_paths.npz" in f else None,
            BenignEPScore.from_arrays(_npz(f["ep_score.npz"])) if "ep_score.npz" in f else None,
            NICDetector.from_arrays(_npz(f["nic.npz"]), json.loads(f["nic.json"])) if "nic.npz" in f else None,
            ClassGaussian.from_arrays(_npz(f[MAHALANOBIS_FILE])) if MAHALANOBIS_FILE in f else None,
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


def _one_thread(fn: Callable[[Context, Shard], Any]) -> Callable[[Context, Shard], Any]:
    """Run a pass that returns scores on one torch thread, whatever the process's setting: float32 matrix
    products sum in an order that depends on the thread count, so a driver with all cores and a cluster worker
    with one would otherwise write bundles that differ in the last bits of their calibration scores."""

    @functools.wraps(fn)
    def run(ctx: Context, shard: Shard) -> Any:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(ctx, shard)
        finally:
            torch.set_num_threads(before)

    return run


@torch.no_grad()
def paths_pass(ctx: Context, shard: Shard) -> tuple[PathCounts, list[str], int]:
    """Class-path counts (rank-1 paths of the correctly predicted images) of a shard of the fit split."""
    skipped: list[str] = []
    images = 0

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        nonlocal images
        for split, bad in shard.read():
            skipped.extend(bad)
            images += len(split)
            yield split.x, split.y

    counts = ClassPaths(ctx.model.config.num_classes).accumulate(ctx.extractor, batches())
    return counts, skipped, images


def sample_pass(ctx: Context, shard: Shard) -> tuple[tuple[np.ndarray, np.ndarray], list[str], int]:
    """The readable images of a shard (NIC's fitting sample), in position order."""
    xs, ys, skipped = [], [], []
    for split, bad in shard.read():
        xs.append(split.x)
        ys.append(split.y)
        skipped.extend(bad)
    x, y = np.concatenate(xs), np.concatenate(ys)
    return (x, y), skipped, len(x)


@_one_thread
@torch.no_grad()
def ep_pass(ctx: Context, shard: Shard) -> tuple[tuple[np.ndarray, np.ndarray], list[str], int]:
    """(N, 2L) Effective Path features (rank-1 then rank-2 similarities) and (N,) predicted classes."""
    assert ctx.class_paths is not None
    feats, preds, skipped = [], [], []
    for split, bad in shard.read():
        skipped.extend(bad)
        if len(split):
            pb = ctx.extractor.extract(torch.from_numpy(split.x), ranks=(1, 2))
            sims = ctx.class_paths.similarity(pb)
            feats.append(np.concatenate([sims[1], sims[2]], axis=1))
            preds.append(pb.classes[1].numpy())
    width = 2 * len(ctx.extractor.layers)
    f = np.concatenate(feats) if feats else np.empty((0, width))
    p = np.concatenate(preds) if preds else np.empty(0, np.int64)
    return (f, p), skipped, len(f)


@_one_thread
@torch.no_grad()
def nic_pass(ctx: Context, shard: Shard) -> tuple[list[list[tuple[np.ndarray, ...]]], list[str], int]:
    """NIC's raw scores of every member, per chunk (what :meth:`NICDetector.calibrate_scores` takes)."""
    assert ctx.nic is not None
    out, skipped, images = [], [], 0
    for split, bad in shard.read():
        skipped.extend(bad)
        if len(split):
            out.append(ctx.nic.calibration_scores(ctx.model, split.x))
            images += len(split)
    return out, skipped, images


@_one_thread
@torch.no_grad()
def gaussian_pass(ctx: Context, shard: Shard) -> tuple[np.ndarray, list[str], int]:
    """(N, L) per-layer Mahalanobis scores of the class Gaussians (their calibration scores)."""
    from pathguard.models.bundle.pipeline import gaussian_activation

    assert ctx.gaussian is not None
    out, skipped = [], []
    for split, bad in shard.read():
        skipped.extend(bad)
        if len(split):
            x = torch.from_numpy(split.x)
            logits, taps = ctx.model.forward_with_taps(x)
            out.append(
                ctx.gaussian.layer_scores({n: gaussian_activation(n, x, logits, taps) for n in ctx.gaussian.layers})
            )
    scores = np.concatenate(out) if out else np.empty((0, len(ctx.gaussian.layers)))
    return scores, skipped, len(scores)


@_one_thread
@torch.no_grad()
def components_pass(ctx: Context, shard: Shard) -> tuple[dict[str, np.ndarray], list[str], int]:
    """The verdict's raw components (EP, NIC final, NIC VI-only) of a shard of clean images."""
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
