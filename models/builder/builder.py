"""The offline builder: classifier + benign training data -> verified artifact bundle.

Splits of the training set (seeded permutation; the test set is never touched):

- *fit* (all but ``n_calib`` images): class-path bitmaps and every NIC component;
- *calibration* (``n_calib`` held-out images), cut in three disjoint parts:
  ``ep_fit`` fits the benign-only Effective Path score (training images are inside the class paths,
  so their similarity would be optimistic), ``A`` calibrates each component (NIC violation
  probabilities and the component p-values), ``B`` sets the fused threshold for the target FPR.

Supervised mode (``supervised_attacks``, optional): the ``ep_fit`` images are also attacked, a supervised
detector learns clean vs adversarial from their features, and ``B`` calibrates it
(:mod:`pathguard.models.verdict.supervised`). The fused verdict is the same benign-only one either way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pathguard.models.builder.config import BuildConfig
from pathguard.models.builder.supervised import fit_supervised, supervised_files
from pathguard.models.bundle import (
    BENIGN_RANGES,
    DetectionPipeline,
    load_bundle,
    load_classifier,
    npz_bytes,
    read_verified,
    write_bundle,
)
from pathguard.models.bundle.splits import calibration_splits, training_split_indices, training_splits
from pathguard.models.data import ImageFolder, Split, load_dataset
from pathguard.models.effective_path import BenignEPScore, ClassPaths, ClassSimilarityRanges, EffectivePathExtractor
from pathguard.models.errors import DatasetError
from pathguard.models.networks import (
    CLASSIFIER_FILES,
    ONNX_SOURCE,
    TappedSequential,
    import_onnx_tensors,
    imported_classifier_meta,
    served_onnx,
)
from pathguard.models.nic import NICDetector
from pathguard.models.verdict import FusedVerdict, SupervisedDetector

__all__ = ["add_benign_ranges", "build_bundle", "build_bundle_from_onnx", "model_files"]

OPSET = 17
FOLDER_BATCH = 512  # images of a folder read at once while the class paths stream through it


def _ranges(model: TappedSequential, features: np.ndarray, x: np.ndarray, num_classes: int) -> ClassSimilarityRanges:
    return ClassSimilarityRanges().fit(features, _predicted(model, x), num_classes)


def add_benign_ranges(bundle_dir: str | Path) -> str:
    """Add the per-class benign similarity ranges to a bundle built before they existed; returns the new bundle id.

    Computed exactly as a build does (the bundle's own class paths and extractor on its ``ep_fit`` split of the
    bundled dataset's training set); every other file is kept byte for byte, the manifest gains the file.
    """
    files = read_verified(bundle_dir)
    m = files.manifest
    if files.has(BENIGN_RANGES):
        return files.sha256
    bundle = load_bundle(bundle_dir)
    cfg = m["build"]["config"]
    ep_fit = training_splits(load_dataset(m["dataset"], "train"), cfg["n_calib"], cfg["seed"], cfg.get("n_train"))[
        "ep_fit"
    ]
    pipe = bundle.pipeline
    features = _ep_features(pipe.extractor, pipe.class_paths, ep_fit.x)
    ranges = _ranges(bundle.classifier, features, ep_fit.x, len(m["classes"]))
    blobs = dict(files.blobs) | {BENIGN_RANGES: npz_bytes(ranges.to_arrays())}
    return write_bundle(bundle_dir, blobs, {k: v for k, v in m.items() if k not in ("files", "schema_version")})


@torch.no_grad()
def _predicted(model: TappedSequential, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """(N,) the classifier's predicted classes."""
    return np.concatenate(
        [model(torch.from_numpy(x[s : s + batch])).argmax(1).numpy() for s in range(0, len(x), batch)]
    )


def _ep_features(extractor: EffectivePathExtractor, paths: ClassPaths, x: np.ndarray) -> np.ndarray:
    sims = paths.similarity(extractor.extract(torch.from_numpy(x), ranks=(1, 2)))
    return np.concatenate([sims[1], sims[2]], axis=1)  # (N, 2L)


def _manifest(model: TappedSequential, dataset: str, classes: tuple[str, ...], cfg: BuildConfig) -> dict[str, Any]:
    c = model.config
    return {
        "name": cfg.name,
        "version": cfg.version,
        "dataset": dataset,
        "architecture": c.arch,
        "classes": list(classes),
        "input": {
            "shape": list(c.input_shape),
            "dtype": "float32",
            "range": [0.0, 1.0],
            "layout": "NCHW",
            "normalization": {"mean": list(c.mean), "std": list(c.std), "applied": "inside the model"},
        },
        "tapped_layers": model.tap_names,
        "requires": {"pathguard": "0.1.0", "onnx_opset": OPSET},
    }


def build_bundle(dataset: str, classifier_dir: str | Path, out_dir: str | Path, cfg: BuildConfig) -> dict[str, Any]:
    """Build the bundle of a bundled classifier folder and dataset (``mnist``, ``cifar10``); returns a build
    report (timings, sizes)."""
    t = time.perf_counter()
    model = load_classifier(classifier_dir)
    train = load_dataset(dataset, "train")
    parts = training_splits(train, cfg.n_calib, cfg.seed, cfg.n_train)
    files = {name: (Path(classifier_dir) / name).read_bytes() for name in CLASSIFIER_FILES}
    load_s = time.perf_counter() - t
    return _build(model, dataset, train.classes, parts, files, out_dir, cfg, {"load": load_s})


def build_bundle_from_onnx(
    model_path: str | Path,
    data: str | Path,
    out_dir: str | Path,
    cfg: BuildConfig,
    calibration: str | Path | None = None,
) -> dict[str, Any]:
    """Build the bundle of a user's ONNX classifier and its training images (``data/<class>/*.png|jpg``).

    Without ``calibration``, ``cfg.n_calib`` training images are held out as for the bundled datasets; with a
    folder of images the classifier never trained on, all training images fit the detectors and that folder
    calibrates them. The bundle keeps the user's file (``source.onnx``), from which the served graph is rebuilt.

    Memory stays bounded whatever the folder's size: the class paths stream through the training images one batch
    at a time; only the calibration images and NIC's fitting sample are held at once.
    """
    if cfg.supervised_attacks:
        raise ValueError("supervised mode needs a bundled dataset (its attack budgets); build without it")
    t = time.perf_counter()
    source = Path(model_path).read_bytes()
    model, tensors = import_onnx_tensors(source)
    folder = ImageFolder.scan(data)
    if len(folder.classes) != model.config.num_classes:
        raise DatasetError(
            f"{data} has {len(folder.classes)} classes but the model has {model.config.num_classes} outputs"
        )
    shape = model.config.input_shape
    skipped: set[Path] = set()
    if calibration is None:
        idx = training_split_indices(len(folder), cfg.n_calib, cfg.seed, cfg.n_train)
        held = {k: _read(folder, shape, idx[k], skipped) for k in ("ep_fit", "calib_a", "calib_b")}
        fit = _FolderFit(folder, idx["fit"], shape, skipped)
    else:
        calib_folder = ImageFolder.scan(calibration)
        if calib_folder.classes != folder.classes:
            raise DatasetError(f"{calibration} must have the same class folders as {data}")
        calib = _read(calib_folder, shape, np.arange(len(calib_folder)), skipped)
        held = calibration_splits(calib, cfg.seed)
        order = np.random.default_rng(cfg.seed).permutation(len(folder))[: cfg.n_train]
        fit = _FolderFit(folder, order, shape, skipped)
    classifier = model_files(model, tensors, source)
    timings = {"load": time.perf_counter() - t}

    def source_entry() -> dict[str, Any]:  # after the build: the unreadable files are known only then
        return {"source": {"model": Path(model_path).name, "data": str(data), "skipped_files": len(skipped)}}

    parts = {**held, "fit": fit}
    report = _build(model, "image-folder", folder.classes, parts, classifier, out_dir, cfg, timings, source_entry)
    return report | {"skipped_files": sorted(str(p) for p in skipped)}


def _read(folder: ImageFolder, shape: tuple[int, int, int], idx: np.ndarray, skipped: set[Path]) -> Split:
    split, bad = folder.load(shape, idx)
    skipped.update(bad)
    return split


@dataclass
class _FolderFit:
    """The fit split of an image folder, read on demand (never all at once)."""

    folder: ImageFolder
    idx: np.ndarray  # a seeded permutation of the fit images
    shape: tuple[int, int, int]
    skipped: set[Path]

    def __len__(self) -> int:
        return len(self.idx)

    def batches(self, n: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for split, bad in self.folder.batches(self.shape, self.idx[:n], FOLDER_BATCH):
            self.skipped.update(bad)
            yield split.x, split.y

    def sample(self, n: int) -> Split:
        """The first ``n`` readable fit images (a random sample: the order is a seeded permutation)."""
        parts, have, start = [], 0, 0
        while have < n and start < len(self.idx):
            split = _read(self.folder, self.shape, self.idx[start : start + n - have], self.skipped)
            start += n - have
            parts.append(split)
            have += len(split)
        return Split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]), self.folder.classes)


def model_files(model: TappedSequential, tensors: dict[str, str], source: bytes) -> dict[str, bytes]:
    """Bundle files of an imported classifier: the user's ONNX, its description, and the served ONNX (the user's
    graph with the logits and every tap as outputs)."""
    meta = (json.dumps(imported_classifier_meta(model, tensors), indent=2) + "\n").encode()
    return {"classifier.json": meta, ONNX_SOURCE: source, "classifier.onnx": served_onnx(source, tensors)}


def _build(
    model: TappedSequential,
    dataset: str,
    classes: tuple[str, ...],
    parts: dict[str, Any],
    files: dict[str, bytes],
    out_dir: str | Path,
    cfg: BuildConfig,
    timings: dict[str, float],
    extra: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Fit every detector on ``parts``, calibrate the verdict and write the bundle with ``files``.

    ``parts["fit"]`` is a :class:`Split` in memory or a :class:`_FolderFit` read in batches; ``extra`` adds
    manifest entries (a callable: evaluated once the fit images were read, e.g. to count unreadable files).
    """
    nic = NICDetector(**{"seed": cfg.seed, **cfg.nic})
    source = parts["fit"]
    t = time.perf_counter()
    extractor = EffectivePathExtractor(model, theta=cfg.theta, last_k=cfg.ep_last_k)
    if isinstance(source, Split):
        fit = source if cfg.n_ep_fit is None else source.subset(np.arange(min(cfg.n_ep_fit, len(source))))
        class_paths = ClassPaths(len(classes)).fit(extractor, fit.x, fit.y)
        nic_fit = source
    else:
        class_paths = ClassPaths(len(classes)).fit_batches(extractor, source.batches(cfg.n_ep_fit))
        nic_fit = source.sample(max(nic.n_head, nic.holdout + nic.n_fit + nic.n_final))
    ep_features = _ep_features(extractor, class_paths, parts["ep_fit"].x)
    ep_score = BenignEPScore().fit(ep_features)
    ranges = _ranges(model, ep_features, parts["ep_fit"].x, len(classes))
    timings["effective_path"] = time.perf_counter() - t

    t = time.perf_counter()
    nic.fit(model, nic_fit.x, nic_fit.y)
    nic.calibrate(model, parts["calib_a"].x)
    timings["nic"] = time.perf_counter() - t

    t = time.perf_counter()
    pipeline = DetectionPipeline(model, extractor, class_paths, ep_score, nic, None, cfg.target_fpr)
    raw = {k: pipeline.raw_components(parts[k].x) for k in tqdm(["calib_a", "calib_b"], desc="calibration")}
    calib_a, calib_b = ({c: raw[k][c] for c in cfg.fusion} for k in ("calib_a", "calib_b"))
    verdict = FusedVerdict.fit(calib_a, calib_b, cfg.target_fpr)
    timings["calibration"] = time.perf_counter() - t

    supervised: SupervisedDetector | None = None
    if cfg.supervised_attacks:
        t = time.perf_counter()
        n = len(parts["ep_fit"]) if cfg.supervised_n is None else min(cfg.supervised_n, len(parts["ep_fit"]))
        supervised = fit_supervised(
            model,
            dataset,
            lambda x: pipeline.supervised_features(x, cfg.supervised_features),
            parts["ep_fit"].x[:n],
            parts["ep_fit"].y[:n],
            parts["calib_b"].x,
            cfg.supervised_attacks,
            cfg.supervised_detector,
            cfg.supervised_features,
            seed=cfg.seed,
            progress=lambda msg: tqdm.write(f"supervised {msg}"),
        )
        supervised.threshold_for(cfg.target_fpr)  # the calibration split must support the target FPR
        timings["supervised"] = time.perf_counter() - t

    files = dict(files) | {
        "class_paths.npz": npz_bytes(class_paths.to_arrays()),
        "ep_score.npz": npz_bytes(ep_score.to_arrays()),
        BENIGN_RANGES: npz_bytes(ranges.to_arrays()),
        "nic.npz": npz_bytes(nic.to_arrays()),
        "nic.json": (json.dumps(nic.config(), indent=2) + "\n").encode(),
        "calibration.npz": npz_bytes(verdict.to_arrays()),
    }
    threshold = verdict.threshold_for(cfg.target_fpr)
    manifest = (
        _manifest(model, dataset, classes, cfg)
        | (extra() if extra is not None else {})
        | {
            "effective_path": {"theta": cfg.theta, "last_k": cfg.ep_last_k, "layers": extractor.layers},
            "ep_layer_count": len(extractor.layers),
            "nic": {"layers": list(nic.layers_), "pairs": list(nic.pairs_), "head_accuracy": nic.head_accuracy_},
            "verdict": {
                "target_fpr": cfg.target_fpr,
                "threshold": threshold,
                "fusion": f"fisher({', '.join(verdict.components)})",
                "components": verdict.components,
            },
            "calibration": {k: len(v) for k, v in parts.items()},
            **(
                {"supervised": supervised.manifest() | {"feature_names": pipeline.feature_names(supervised.features)}}
                if supervised is not None
                else {}
            ),
            "build": {"config": asdict(cfg), "seconds": {k: round(v, 1) for k, v in timings.items()}},
        }
    )
    if supervised is not None:
        files |= supervised_files(supervised)
    digest = write_bundle(out_dir, files, manifest)
    sizes = {n: len(b) for n, b in files.items()}
    return {"bundle": str(out_dir), "sha256": digest, "threshold": threshold, "seconds": timings, "bytes": sizes}
