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
from pathguard.models.builder.shards import (
    DatasetSource,
    Executor,
    FolderSource,
    ImageSource,
    Job,
    LocalExecutor,
    ShardFn,
    ShardResult,
    components_pass,
    sample_pass,
    shards_of,
)
from pathguard.models.bundle import (
    BENIGN_RANGES,
    load_classifier,
    npz_bytes,
    read_verified,
    write_bundle,
)
from pathguard.models.bundle.loading import built_components, fused_components, load_components
from pathguard.models.bundle.splits import calibration_split_indices, training_split_indices
from pathguard.models.bundle.stored import GUARDED_JSON, GUARDED_ONNX
from pathguard.models.components import ALWAYS_BUILT, BuildContext, Component, build_order, component_class
from pathguard.models.components.effective_path import ep_features
from pathguard.models.data import ImageFolder
from pathguard.models.effective_path import ClassSimilarityRanges
from pathguard.models.errors import DatasetError
from pathguard.models.networks import (
    CLASSIFIER_FILES,
    ONNX_SOURCE,
    TappedSequential,
    import_onnx_tensors,
    imported_classifier_meta,
    onnx_of_module,
    served_onnx,
)
from pathguard.models.verdict import FusedVerdict

__all__ = [
    "add_benign_ranges",
    "build_bundle",
    "build_bundle_from_onnx",
    "build_bundle_from_torch",
    "model_files",
    "refit_bundle",
]

OPSET = 17
_DATASET_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def add_benign_ranges(bundle_dir: str | Path) -> str:
    """Add the per-class benign similarity ranges to a bundle built before they existed; returns the new bundle id.

    Computed exactly as a build does (the bundle's own class paths and extractor on its ``ep_fit`` split of the
    bundled dataset's training set); every other file is kept byte for byte, the manifest gains the file.
    """
    files = read_verified(bundle_dir)
    m = files.manifest
    if files.has(BENIGN_RANGES):
        return files.sha256
    cfg, ep = m["build"]["config"], m["effective_path"]
    source = DatasetSource(m["dataset"])
    idx = training_split_indices(len(source), cfg["n_calib"], cfg["seed"], cfg.get("n_train"))
    job = Job.make({n: files.bytes(n) for n in CLASSIFIER_FILES}, ep["theta"], ep.get("last_k"))
    job = job.with_fitted(**{"class_paths.npz": files.bytes("class_paths.npz")})
    features, predicted = ep_features(_Passes(LocalExecutor(), {"ep_fit": (source, idx["ep_fit"])}, set()), job)
    ranges = ClassSimilarityRanges().fit(features, predicted, len(m["classes"]))
    blobs = dict(files.blobs) | {BENIGN_RANGES: npz_bytes(ranges.to_arrays())}
    return write_bundle(bundle_dir, blobs, {k: v for k, v in m.items() if k not in ("files", "schema_version")})


def refit_bundle(
    bundle_dir: str | Path,
    params: dict[str, dict[str, Any]],
    out_dir: str | Path | None = None,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Fit again, with new parameters, components of a bundle that its verdict does not read; returns a build report.

    ``params`` maps each component to refit to its changed build parameters, merged over those the bundle was
    built with (Effective Path's ``theta``, ``last_k`` and ``n_fit`` included). The components are fitted as a build
    fits them, on the same splits of the bundled dataset's training set (the manifest's seed and sizes), and
    calibrated on split A. Everything else is kept byte for byte: the classifier, the other components, the verdict,
    its threshold and every calibration array it reads, so the bundle's verdict id
    (:func:`~pathguard.models.bundle.verdict_sha256`) and the reports that name it still hold. The manifest records
    the refit (``build.refit``: the bundle it came from, the components, the seconds) and the new build config.
    Written to ``out_dir`` (default: the bundle itself, replaced atomically). A stored guarded graph is dropped (it
    holds the old components; the report's ``had_stored_graph`` says so, and ``pathguard refit`` stores it again).

    Refused (ValueError, nothing written): a component the bundle does not hold; one the verdict fuses or needs
    (rebuild the bundle to change the verdict); one another kept component needs (the supervised detector needs
    Effective Path and NIC); a bundle of a user's image folder (its images are not in the bundle; rebuild it).
    """
    t = time.perf_counter()
    files = read_verified(bundle_dir)
    m = files.manifest
    held = built_components(m)
    wanted = list(params)
    verdict_reads = set(build_order(fused_components(m)))
    for name in wanted:
        if name not in held:
            raise ValueError(f"bundle {bundle_dir} holds no component {name!r}; it holds {', '.join(held)}")
        if name in verdict_reads:
            raise ValueError(
                f"the verdict of {bundle_dir} reads {name!r}: refitting it would change the verdict; rebuild the "
                "bundle (pathguard build) instead"
            )
    for other in held:
        needs = set(build_order([other])) - {other}
        if other not in wanted and needs & set(wanted):
            raise ValueError(f"component {other!r} needs {sorted(needs & set(wanted))}: refit it too, or rebuild")
    if m.get("dataset") not in _DATASET_SHAPES:
        raise ValueError(
            f"bundle {bundle_dir} was built on a folder of images ({m.get('dataset')!r}), which it does not hold: "
            "rebuild it with pathguard build"
        )
    try:
        old = BuildConfig(**m["build"]["config"])
    except (KeyError, TypeError) as exc:
        msg = f"bundle {bundle_dir} does not record the build config a refit needs ({exc}): rebuild it"
        raise ValueError(msg) from None
    cfg = _with_params(old, params)
    model = load_classifier(bundle_dir)
    source = DatasetSource(m["dataset"])
    idx = training_split_indices(len(source), cfg.n_calib, cfg.seed, cfg.n_train)
    passes = _Passes(executor or LocalExecutor(), {k: (source, v) for k, v in idx.items()}, set())
    classifier = {n: files.bytes(n) for n in (*CLASSIFIER_FILES, ONNX_SOURCE) if files.has(n)}
    kept = {k: c for k, c in load_components(files, model).items() if k not in wanted}
    names = [n for n in build_order(wanted) if n in wanted]
    # kept components the refitted ones read, and those every pipeline holds (the calibration pass runs one)
    needed = ({n for w in names for n in build_order([w])} | set(ALWAYS_BUILT)) - set(wanted)
    job = Job.make(classifier, cfg.theta, cfg.ep_last_k)
    job = job.with_fitted(**{k: v for n in needed for k, v in kept[n].to_files().items()})
    timings: dict[str, float] = {"load": time.perf_counter() - t}
    ctx = BuildContext(
        model, len(m["classes"]), cfg.seed, _Sampler(passes, job), built={n: kept[n] for n in needed}, passes=passes,
        job=job, timings=timings, dataset=m["dataset"], progress=lambda msg: tqdm.write(msg), run_attack=_run_attack,
    )  # fmt: skip
    params_of = cfg.component_params()
    for name in names:
        component_class(name).check(model, params_of.get(name, {}))
    refitted = {n: c for n, c in _build_components(ctx, names, params_of).items() if n in wanted}
    ctx.sample.release()  # type: ignore[attr-defined]
    t = time.perf_counter()
    assert ctx.job is not None  # the refitted components' files, as the workers saw them
    job = ctx.job.with_components(tuple(build_order([*sorted(needed), *names])))
    done = [r for r in passes.ordered(components_pass, job, "calib_a", "calibration calib_a") if r.images]
    calib = files.npz("calibration.npz") | {
        f"calib_a/{n}": np.sort(np.concatenate([r.value[n] for r in done])) for n in refitted
    }
    timings["calibration"] = time.perf_counter() - t

    fitted = {k: v for c in refitted.values() for k, v in c.to_files().items()}
    # the refitted components' old files go (one the new form lacks too), and a stored guarded graph, which holds them
    owned = {f for n in wanted for f in component_class(n).files} | set(fitted) | {GUARDED_ONNX, GUARDED_JSON}
    blobs = {k: v for k, v in files.blobs.items() if k not in owned} | fitted
    blobs["calibration.npz"] = npz_bytes(calib)
    entries = {n: c.manifest() for n, c in refitted.items()}
    manifest = {k: v for k, v in m.items() if k not in ("files", "schema_version", "created_at")}
    manifest["components"] = {
        n: ({"family": refitted[n].family, **entries[n]} if n in refitted else e)
        for n, e in m.get("components", {}).items()
    }
    for name, entry in entries.items():  # the published sections a component's loader reads first
        if isinstance(m.get(name), dict):
            manifest[name] = entry
    if "effective_path" in entries:
        manifest["ep_layer_count"] = len(entries["effective_path"]["layers"])
    refit = {"from": files.sha256, "components": names, "seconds": {k: round(v, 1) for k, v in timings.items()}}
    manifest["build"] = {**m["build"], "config": asdict(cfg), "refit": refit}
    digest = write_bundle(out_dir if out_dir is not None else bundle_dir, blobs, manifest)
    return {"bundle": str(out_dir or bundle_dir), "sha256": digest, "refit": refit,
            "had_stored_graph": files.has(GUARDED_ONNX)}  # fmt: skip


def _with_params(cfg: BuildConfig, params: dict[str, dict[str, Any]]) -> BuildConfig:
    """``cfg`` with each component's ``params`` merged over its build parameters (where the config keeps them)."""
    new = asdict(cfg)
    for name, p in params.items():
        p = dict(p)
        if name == "effective_path":
            for key, field_name in (("theta", "theta"), ("last_k", "ep_last_k"), ("n_fit", "n_ep_fit")):
                if key in p:
                    new[field_name] = p.pop(key)
        if name in ("nic", "mahalanobis"):
            new[name] = {**new[name], **p}
        elif p:
            new["components"] = {**new["components"], name: {**new["components"].get(name, {}), **p}}
    return BuildConfig(**new)


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


def build_bundle(
    dataset: str,
    classifier_dir: str | Path,
    out_dir: str | Path,
    cfg: BuildConfig,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Build the bundle of a classifier and a bundled dataset (``mnist``, ``cifar10``); returns a build report
    (timings, sizes, the executor's workers and peak memory).

    ``classifier_dir`` is a classifier folder of a bundled architecture, or an ONNX file (``*.onnx``), which is
    imported as :func:`build_bundle_from_onnx` imports a user's file and kept in the bundle the same way; the
    calibration images are the ``n_calib`` training images held out by the seeded split (those that
    ``pathguard train`` never trains on). ``executor`` runs the passes over images (default: this process; a
    :class:`~pathguard.models.builder.cluster.RayExecutor` spreads them over a Ray cluster, with the same bytes).
    """
    t = time.perf_counter()
    source = DatasetSource(dataset)
    extra: Callable[[], dict[str, Any]] | None = None
    if Path(classifier_dir).suffix.lower() == ".onnx":
        source_bytes = Path(classifier_dir).read_bytes()
        model, tensors = import_onnx_tensors(source_bytes)
        files = model_files(model, tensors, source_bytes)
        entry = {"source": {"model": Path(classifier_dir).name, "data": dataset, "skipped_files": 0}}
        extra = lambda: entry  # noqa: E731
    else:
        model = load_classifier(classifier_dir)
        files = {name: (Path(classifier_dir) / name).read_bytes() for name in CLASSIFIER_FILES}
    shape = _DATASET_SHAPES.get(dataset)
    if model.config.input_shape != shape or model.config.num_classes != len(source.classes):
        raise DatasetError(
            f"{classifier_dir} takes {model.config.input_shape} inputs with {model.config.num_classes} outputs; "
            f"{dataset} has {shape} images of {len(source.classes)} classes"
        )
    idx = training_split_indices(len(source), cfg.n_calib, cfg.seed, cfg.n_train)
    parts: dict[str, tuple[ImageSource, np.ndarray]] = {k: (source, v) for k, v in idx.items()}
    timings = {"load": time.perf_counter() - t}
    executor = executor or LocalExecutor()
    return _build(model, dataset, source.classes, parts, files, out_dir, cfg, timings, executor, extra)


def build_bundle_from_onnx(
    model_path: str | Path,
    data: str | Path,
    out_dir: str | Path,
    cfg: BuildConfig,
    calibration: str | Path | None = None,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Build the bundle of a user's ONNX classifier and its training images (``data/<class>/*.png|jpg``).

    Without ``calibration``, ``cfg.n_calib`` training images are held out as for the bundled datasets; with a
    folder of images the classifier never trained on, all training images fit the detectors and that folder
    calibrates them. The bundle keeps the user's file (``source.onnx``), from which the served graph is rebuilt.

    Memory stays bounded whatever the folder's size: every pass reads the images in chunks of
    :data:`~pathguard.models.builder.shards.CHUNK`; only NIC's fitting sample is held at once. ``executor`` as
    in :func:`build_bundle`.
    """
    t = time.perf_counter()
    source_bytes = Path(model_path).read_bytes()
    return _build_from_onnx(source_bytes, Path(model_path).name, data, out_dir, cfg, calibration, executor, t)


def build_bundle_from_torch(
    module: torch.nn.Module,
    input_shape: tuple[int, int, int],
    data: str | Path,
    out_dir: str | Path,
    cfg: BuildConfig,
    calibration: str | Path | None = None,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """:func:`build_bundle_from_onnx` for a torch image classifier (input (N, C, H, W) = ``input_shape`` in
    [0, 1], output logits or probabilities): exported to ONNX in eval mode
    (:func:`~pathguard.models.networks.onnx_of_module`), then imported like any user's file, which the bundle
    keeps."""
    t = time.perf_counter()
    source_bytes = onnx_of_module(module, input_shape, OPSET)
    return _build_from_onnx(source_bytes, "module.onnx", data, out_dir, cfg, calibration, executor, t)


def _build_from_onnx(
    source_bytes: bytes,
    source_name: str,
    data: str | Path,
    out_dir: str | Path,
    cfg: BuildConfig,
    calibration: str | Path | None,
    executor: Executor | None,
    t: float,
) -> dict[str, Any]:
    if cfg.supervised_attacks:
        raise ValueError("supervised mode needs a bundled dataset (its attack budgets); build without it")
    model, tensors = import_onnx_tensors(source_bytes)
    folder = ImageFolder.scan(data)
    if len(folder.classes) != model.config.num_classes:
        raise DatasetError(
            f"{data} has {len(folder.classes)} classes but the model has {model.config.num_classes} outputs"
        )
    train = FolderSource.of(folder, model.config.input_shape)
    parts: dict[str, tuple[ImageSource, np.ndarray]]
    if calibration is None:
        idx = training_split_indices(len(folder), cfg.n_calib, cfg.seed, cfg.n_train)
        parts = {k: (train, v) for k, v in idx.items()}
    else:
        calib_folder = ImageFolder.scan(calibration)
        if calib_folder.classes != folder.classes:
            raise DatasetError(f"{calibration} must have the same class folders as {data}")
        calib = FolderSource.of(calib_folder, model.config.input_shape)
        parts = {k: (calib, v) for k, v in calibration_split_indices(len(calib_folder), cfg.seed).items()}
        parts["fit"] = (train, np.random.default_rng(cfg.seed).permutation(len(folder))[: cfg.n_train])
    classifier = model_files(model, tensors, source_bytes)
    timings = {"load": time.perf_counter() - t}
    skipped: set[str] = set()

    def source_entry() -> dict[str, Any]:  # after the build: the unreadable files are known only then
        return {"source": {"model": source_name, "data": str(data), "skipped_files": len(skipped)}}

    report = _build(
        model, "image-folder", folder.classes, parts, classifier, out_dir, cfg, timings,
        executor or LocalExecutor(), source_entry, skipped,
    )  # fmt: skip
    return report | {"skipped_files": sorted(skipped)}


def model_files(model: TappedSequential, tensors: dict[str, str], source: bytes) -> dict[str, bytes]:
    """Bundle files of an imported classifier: the user's ONNX, its description, and the served ONNX (the user's
    graph with the logits and every tap as outputs)."""
    meta = (json.dumps(imported_classifier_meta(model, tensors), indent=2) + "\n").encode()
    return {"classifier.json": meta, ONNX_SOURCE: source, "classifier.onnx": served_onnx(source, tensors)}


def _build(
    model: TappedSequential,
    dataset: str,
    classes: tuple[str, ...],
    parts: dict[str, tuple[ImageSource, np.ndarray]],
    files: dict[str, bytes],
    out_dir: str | Path,
    cfg: BuildConfig,
    timings: dict[str, float],
    executor: Executor,
    extra: Callable[[], dict[str, Any]] | None = None,
    skipped: set[str] | None = None,
) -> dict[str, Any]:
    """Fit every component on ``parts`` (split name -> image source and its positions), calibrate the verdict and
    write the bundle with ``files``.

    The components are built one after the other through the registry (:func:`_build_components`), the verdict is
    calibrated on splits A and B (:func:`_calibrate`), and the optional supervised detector is trained last. The
    passes over images run on ``executor``; ``extra`` adds manifest entries (a callable: evaluated once every image
    was read, e.g. to count the unreadable files, which are collected in ``skipped``).
    """
    passes = _Passes(executor, parts, set() if skipped is None else skipped)
    names = build_order([*ALWAYS_BUILT, "nic_vi", *cfg.fusion])
    params = cfg.component_params()
    for name in [*names, *cfg.reported]:  # a misnamed layer or parameter fails now, before any image is read
        component_class(name).check(model, params.get(name, {}))
    job = Job.make(files, cfg.theta, cfg.ep_last_k)
    ctx = BuildContext(
        model, len(classes), cfg.seed, _Sampler(passes, job), passes=passes, job=job, timings=timings,
        dataset=dataset if dataset in _DATASET_SHAPES else None, progress=lambda msg: tqdm.write(msg),
        run_attack=_run_attack,
    )  # fmt: skip
    components = _build_components(ctx, names, params)
    ctx.sample.release()  # type: ignore[attr-defined]
    job = ctx.job = ctx.job.with_components(tuple(components)) if ctx.job is not None else job

    t = time.perf_counter()
    verdict, calibration, held = _calibrate(passes, job, components, cfg)
    timings["calibration"] = time.perf_counter() - t
    if cfg.reported:  # the supervised detector: its attacks run here, on the held-out images read into memory
        components |= _build_components(ctx, cfg.reported, params)

    fitted = {k: v for c in components.values() for k, v in c.to_files().items()}
    files = dict(files) | {k: job.fitted.get(k, v) for k, v in fitted.items()}  # the bytes the workers saw
    files["calibration.npz"] = npz_bytes(verdict.to_arrays() | {f"calib_a/{k}": v for k, v in calibration.items()})
    threshold = verdict.threshold_for(cfg.target_fpr)
    entries = {name: c.manifest() for name, c in components.items()}
    manifest = (
        _manifest(model, dataset, classes, cfg)
        | (extra() if extra is not None else {})
        | {
            "effective_path": entries["effective_path"],
            "ep_layer_count": len(entries["effective_path"]["layers"]),
            "nic": entries["nic"],
            **({"mahalanobis": entries["mahalanobis"]} if "mahalanobis" in entries else {}),
            "components": {name: {"family": components[name].family, **e} for name, e in entries.items()},
            "verdict": {
                "target_fpr": cfg.target_fpr,
                "threshold": threshold,
                "fusion": f"{cfg.rule}({', '.join(verdict.components)})",
                "rule": cfg.rule,
                "components": verdict.components,
            },
            "calibration": {"fit": len(parts["fit"][1]), "ep_fit": ctx.report.get("ep_fit", 0), **held},
            **({"supervised": entries["supervised"]} if "supervised" in entries else {}),
            "build": {"config": asdict(cfg), "seconds": {k: round(v, 1) for k, v in timings.items()}},
        }
    )
    digest = write_bundle(out_dir, files, manifest)
    sizes = {n: len(b) for n, b in files.items()}
    fit_images = ctx.report.get("fit_images", 0)
    cluster = {
        "workers": executor.workers,
        "shards": passes.shards,
        "fit_images": fit_images,
        "fit_images_per_s": round(fit_images / max(ctx.report.get("paths_s", 0.0), 1e-9), 1),
        "peak_rss_bytes": executor.peak_rss(),
    }
    return {
        "bundle": str(out_dir),
        "sha256": digest,
        "threshold": threshold,
        "seconds": timings,
        "bytes": sizes,
        "executor": cluster,
    }


def _build_components(ctx: BuildContext, names: list[str], params: dict[str, dict[str, Any]]) -> dict[str, Component]:
    """Fit each component in build order; the worker job gains each one's files as soon as it is fitted."""
    assert ctx.job is not None
    for name in names:
        t = time.perf_counter()
        component = component_class(name).build(ctx, params.get(name, {}))
        ctx.built[name] = component
        ctx.job = ctx.job.with_fitted(**component.to_files())
        ctx.timings[name] = ctx.timings.get(name, 0.0) + time.perf_counter() - t
    return dict(ctx.built)


def _calibrate(
    passes: _Passes, job: Job, components: dict[str, Component], cfg: BuildConfig
) -> tuple[FusedVerdict, dict[str, np.ndarray], dict[str, int]]:
    """Every component's raw scores on the clean splits A and B; the verdict fitted on them (fused components:
    p-values on A, threshold on B), and every component's split-A scores."""
    raw, held = {}, {}
    for k in ("calib_a", "calib_b"):
        done = [r for r in passes.ordered(components_pass, job, k, f"calibration {k}") if r.images]
        if not done:
            raise DatasetError(f"none of the {len(passes.parts[k][1])} {k} calibration images could be read")
        raw[k] = {c: np.concatenate([r.value[c] for r in done]) for c in components}
        held[k] = sum(r.images for r in done)
    families = {n: components[n].family for n in cfg.fusion}
    fused = {k: {c: raw[k][c] for c in cfg.fusion} for k in raw}
    verdict = FusedVerdict.fit(fused["calib_a"], fused["calib_b"], cfg.target_fpr, cfg.rule, families)
    return verdict, {c: np.sort(v) for c, v in raw["calib_a"].items() if c not in cfg.fusion}, held


def _run_attack(*args: Any, **kwargs: Any) -> Any:
    """:func:`pathguard.models.evaluation.attacks.run_attack`, imported on first use (the ``eval`` extra)."""
    from pathguard.models.evaluation.attacks import run_attack

    return run_attack(*args, **kwargs)


class _Sampler:
    """The benign labelled sample of the fit split that components fit on: the first ``n`` readable fit images
    (a seeded permutation), read once by the executor's workers and grown when a later component asks for more."""

    DEFAULT = 10000

    def __init__(self, passes: _Passes, job: Job) -> None:
        self.passes = passes
        self.job = job
        self.x: np.ndarray | None = None
        self.y: np.ndarray | None = None

    def __call__(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        want = n if n is not None else (len(self.x) if self.x is not None else self.DEFAULT)
        if self.x is None or self.y is None or (len(self.x) < want and self._more_available()):
            self.x, self.y = _sample(self.passes, self.job, want)
        return self.x[:want], self.y[:want]

    def _more_available(self) -> bool:
        return self.x is not None and len(self.x) < len(self.passes.parts["fit"][1])

    def release(self) -> None:
        self.x = self.y = None


@dataclass
class _Passes:
    """The build's passes over images: shards of the named parts, run on the executor; the unreadable files
    they met are collected in ``skipped``."""

    executor: Executor
    parts: dict[str, tuple[ImageSource, np.ndarray]]
    skipped: set[str]
    shards: int = 0

    def run(
        self,
        fn: ShardFn,
        job: Job,
        part: str,
        desc: str,
        idx: np.ndarray | None = None,
        chunks_per_shard: int | None = None,
    ) -> Iterator[ShardResult]:
        """Results as the shards finish (positions ``idx`` of the part; default: all of them)."""
        source, positions = self.parts[part]
        shards = shards_of(source, part, positions if idx is None else idx, chunks_per_shard)
        self.shards += len(shards)
        for r in self.executor.map(fn, job, shards, desc):
            self.skipped.update(r.skipped)
            yield r

    def ordered(self, fn: ShardFn, job: Job, part: str, desc: str, **kwargs: Any) -> list[ShardResult]:
        """Results in shard (position) order."""
        return sorted(self.run(fn, job, part, desc, **kwargs), key=lambda r: r.shard)


def _sample(passes: _Passes, job: Job, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` readable fit images (the fit positions are a seeded permutation), read by the executor's
    workers; fewer only when the fit split runs out."""
    idx = passes.parts["fit"][1]
    xs, ys, have, start = [], [], 0, 0
    while have < n and start < len(idx):
        part = idx[start : start + n - have]
        start += len(part)
        for r in passes.ordered(sample_pass, job, "fit", "benign sample", idx=part, chunks_per_shard=1):
            xs.append(r.value[0])
            ys.append(r.value[1])
            have += r.images
    return np.concatenate(xs), np.concatenate(ys)
