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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pathguard.models.builder.config import BuildConfig
from pathguard.models.builder.supervised import fit_supervised, supervised_files
from pathguard.models.bundle import DetectionPipeline, load_classifier, npz_bytes, write_bundle
from pathguard.models.bundle.splits import training_splits
from pathguard.models.data import load_dataset
from pathguard.models.effective_path import BenignEPScore, ClassPaths, EffectivePathExtractor
from pathguard.models.networks import CLASSIFIER_FILES, TappedSequential
from pathguard.models.nic import NICDetector
from pathguard.models.verdict import FusedVerdict, SupervisedDetector

__all__ = ["build_bundle"]

OPSET = 17


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
    """Run the whole offline pipeline and write the bundle; returns a build report (timings, sizes)."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model = load_classifier(classifier_dir)
    train = load_dataset(dataset, "train")
    parts = training_splits(train, cfg.n_calib, cfg.seed, cfg.n_train)
    fit = parts["fit"] if cfg.n_ep_fit is None else parts["fit"].subset(np.arange(min(cfg.n_ep_fit, len(parts["fit"]))))
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    extractor = EffectivePathExtractor(model, theta=cfg.theta, last_k=cfg.ep_last_k)
    class_paths = ClassPaths(len(train.classes)).fit(extractor, fit.x, fit.y)
    ep_score = BenignEPScore().fit(_ep_features(extractor, class_paths, parts["ep_fit"].x))
    timings["effective_path"] = time.perf_counter() - t

    t = time.perf_counter()
    nic = NICDetector(**{"seed": cfg.seed, **cfg.nic}).fit(model, parts["fit"].x, parts["fit"].y)
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

    files = {name: (Path(classifier_dir) / name).read_bytes() for name in CLASSIFIER_FILES}
    files |= {
        "class_paths.npz": npz_bytes(class_paths.to_arrays()),
        "ep_score.npz": npz_bytes(ep_score.to_arrays()),
        "nic.npz": npz_bytes(nic.to_arrays()),
        "nic.json": (json.dumps(nic.config(), indent=2) + "\n").encode(),
        "calibration.npz": npz_bytes(verdict.to_arrays()),
    }
    threshold = verdict.threshold_for(cfg.target_fpr)
    manifest = _manifest(model, dataset, train.classes, cfg) | {
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
    if supervised is not None:
        files |= supervised_files(supervised)
    digest = write_bundle(out_dir, files, manifest)
    sizes = {n: len(b) for n, b in files.items()}
    return {"bundle": str(out_dir), "sha256": digest, "threshold": threshold, "seconds": timings, "bytes": sizes}
