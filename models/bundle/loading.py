"""Verify-then-load: a bundle folder becomes a :class:`Bundle` (classifier + detection pipeline), parsed only from
bytes whose sha256 matched the manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathguard.models.bundle.format import BENIGN_RANGES, MAHALANOBIS_FILE, MANIFEST, read_verified
from pathguard.models.bundle.pipeline import FUSION_COMPONENTS, LEGACY_COMPONENTS, MAHALANOBIS, DetectionPipeline
from pathguard.models.effective_path import BenignEPScore, ClassPaths, ClassSimilarityRanges, EffectivePathExtractor
from pathguard.models.errors import BundleIntegrityError, ClassifierLoadError
from pathguard.models.mahalanobis import ClassGaussian
from pathguard.models.networks import TappedSequential, classifier_from_files
from pathguard.models.nic import NICDetector
from pathguard.models.verdict import FusedVerdict, SupervisedDetector
from pathguard.models.verdict.supervised import SUPERVISED_JOBLIB, pickled_ensemble_error

__all__ = ["Bundle", "load_bundle", "load_classifier"]


@dataclass
class Bundle:
    """A verified, loaded bundle (see PRODUCT.md 'Bundle')."""

    path: Path
    manifest: dict[str, Any]
    sha256: str
    classifier: TappedSequential
    onnx_bytes: bytes
    pipeline: DetectionPipeline
    benign_ranges: ClassSimilarityRanges | None = None  # bundles built since per-class ranges exist

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def dataset(self) -> str:
        return str(self.manifest["dataset"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.manifest["input"]["shape"]
        return (int(c), int(h), int(w))

    @property
    def tap_names(self) -> list[str]:
        return list(self.manifest["tapped_layers"])

    @property
    def onnx_path(self) -> Path:
        return self.path / "classifier.onnx"


def load_bundle(path: str | Path, target_fpr: float | None = None) -> Bundle:
    """Verify every file of the bundle at ``path``, then load it from the verified bytes.

    ``target_fpr`` overrides the manifest's operating point (refused below 1/n of the calibration split).
    A bundle with a pickled supervised ensemble (``supervised.joblib``, older versions) is refused with a
    :class:`~pathguard.models.errors.BundleCompatibilityError` that says how to rebuild it.
    """
    files = read_verified(path)
    m = files.manifest
    pickled = pickled_ensemble_error(path, m, files.has(SUPERVISED_JOBLIB))
    if pickled is not None:  # never unpickled: refused before anything is parsed
        raise pickled
    classifier = classifier_from_files(files.bytes("classifier.json"), files.bytes)
    ep_cfg = m["effective_path"]
    extractor = EffectivePathExtractor(classifier, theta=ep_cfg["theta"], last_k=ep_cfg.get("last_k"))
    class_paths = ClassPaths.from_arrays(files.npz("class_paths.npz"))
    ep_score = BenignEPScore.from_arrays(files.npz("ep_score.npz"))
    nic = NICDetector.from_arrays(files.npz("nic.npz"), files.json("nic.json"))
    fpr = float(target_fpr if target_fpr is not None else m["verdict"]["target_fpr"])
    components = list(m["verdict"].get("components", LEGACY_COMPONENTS))
    unknown = sorted(set(components) - set(FUSION_COMPONENTS))
    if unknown:
        known = list(FUSION_COMPONENTS)
        raise ValueError(f"bundle {path}: unknown fusion component(s) {unknown}; this pathguard knows {known}")
    verdict = FusedVerdict.from_arrays(files.npz("calibration.npz"), components, fpr)
    sup = None
    if "supervised" in m:  # optional: bundles built with --supervised-attacks
        sup = SupervisedDetector.from_verified(m["supervised"], files.npz)
    gaussian = None
    if MAHALANOBIS in components:
        if not files.has(MAHALANOBIS_FILE):
            raise BundleIntegrityError(
                MAHALANOBIS_FILE, f"bundle {path}: its verdict fuses {MAHALANOBIS}, but {MAHALANOBIS_FILE} is missing"
            )
        gaussian = ClassGaussian.from_arrays(files.npz(MAHALANOBIS_FILE))
    pipeline = DetectionPipeline(classifier, extractor, class_paths, ep_score, nic, verdict, fpr, sup, gaussian)
    if sup is not None:
        names = pipeline.feature_names(sup.features)
        if m["supervised"].get("feature_names", names) != names:
            raise ValueError(f"bundle {path}: the supervised detector's features do not match this pipeline's")
    ranges = ClassSimilarityRanges.from_arrays(files.npz(BENIGN_RANGES)) if files.has(BENIGN_RANGES) else None
    return Bundle(Path(path), m, files.sha256, classifier, files.bytes("classifier.onnx"), pipeline, ranges)


def load_classifier(path: str | Path) -> TappedSequential:
    """Load a classifier (eval mode) from a classifier folder or a bundle folder.

    Input float32 (N, C, H, W) in [0, 1]; output logits (N, num_classes). A bundle folder (one with
    ``manifest.json``) is verified first and the classifier is read from the verified bytes.
    """
    root = Path(path)
    if (root / MANIFEST).is_file():
        files = read_verified(root)
        return classifier_from_files(files.bytes("classifier.json"), files.bytes)
    meta_path = root / "classifier.json"
    if not meta_path.is_file():
        raise ClassifierLoadError(f"missing classifier file {meta_path}")

    def read(name: str) -> bytes:
        if not (root / name).is_file():
            raise ClassifierLoadError(f"missing classifier file {root / name}")
        return (root / name).read_bytes()

    return classifier_from_files(meta_path.read_bytes(), read)
