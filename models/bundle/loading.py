"""Verify-then-load: a bundle folder becomes a :class:`Bundle` (classifier + detection pipeline), parsed only from
bytes whose sha256 matched the manifest."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathguard.models.bundle.format import MANIFEST, ManifestFacts, VerifiedFiles, read_verified
from pathguard.models.bundle.pipeline import DetectionPipeline
from pathguard.models.components import ALWAYS_BUILT, LEGACY_FUSION, Component, build_order, component_class
from pathguard.models.components.effective_path import EffectivePathComponent
from pathguard.models.effective_path import ClassSimilarityRanges
from pathguard.models.errors import BundleIntegrityError, ClassifierLoadError
from pathguard.models.networks import CLASSIFIER_FILES, ONNX_SOURCE, TappedSequential, classifier_from_files
from pathguard.models.verdict import FusedVerdict
from pathguard.models.verdict.supervised import SUPERVISED_JOBLIB, pickled_ensemble_error

__all__ = [
    "Bundle",
    "built_components",
    "fused_components",
    "load_bundle",
    "load_classifier",
    "load_components",
    "verdict_sha256",
]


@dataclass
class Bundle(ManifestFacts):
    """A verified, loaded bundle (see PRODUCT.md 'Bundle')."""

    path: Path
    manifest: dict[str, Any]
    sha256: str
    classifier: TappedSequential
    onnx_bytes: bytes
    pipeline: DetectionPipeline
    benign_ranges: ClassSimilarityRanges | None = None  # bundles built since per-class ranges exist

    @property
    def tap_names(self) -> list[str]:
        return list(self.manifest["tapped_layers"])

    @property
    def onnx_path(self) -> Path:
        return self.path / "classifier.onnx"


def load_bundle(path: str | Path, target_fpr: float | None = None, seed: int | None = None) -> Bundle:
    """Verify every file of the bundle at ``path``, then load it from the verified bytes.

    ``target_fpr`` overrides the manifest's operating point (refused below 1/n of the calibration split);
    ``seed`` fixes the randomized components' noise (default: drawn per request).
    A bundle with a pickled supervised ensemble (``supervised.joblib``, older versions) is refused with a
    :class:`~pathguard.models.errors.BundleCompatibilityError` that says how to rebuild it.
    """
    files = read_verified(path)
    m = files.manifest
    pickled = pickled_ensemble_error(path, m, files.has(SUPERVISED_JOBLIB))
    if pickled is not None:  # never unpickled: refused before anything is parsed
        raise pickled
    classifier = classifier_from_files(files.bytes("classifier.json"), files.bytes)
    fpr = float(target_fpr if target_fpr is not None else m["verdict"]["target_fpr"])
    components = load_components(files, classifier)
    fused = fused_components(m)
    calib = files.npz("calibration.npz")
    rule, families = m["verdict"].get("rule", "fisher"), {n: components[n].family for n in fused}
    verdict = FusedVerdict.from_arrays(calib, fused, fpr, rule, families)
    calibration = {k.removeprefix("calib_a/"): v for k, v in calib.items() if k.startswith("calib_a/")}
    pipeline = DetectionPipeline(classifier, components, verdict, fpr, calibration, seed)
    ep = components["effective_path"]
    ranges = ep.ranges if isinstance(ep, EffectivePathComponent) else None
    return Bundle(Path(path), m, files.sha256, classifier, files.bytes("classifier.onnx"), pipeline, ranges)


def fused_components(manifest: dict[str, Any]) -> list[str]:
    """The verdict's components as the manifest names them (bundles that name none fuse EP and NIC)."""
    return list(manifest["verdict"].get("components", LEGACY_FUSION))


def verdict_sha256(path: str | Path) -> str:
    """The verdict's id: sha256 of everything the verdict's decisions depend on, read from the verified bundle at
    ``path``.

    It covers the classifier's files, the input contract and classes, the manifest's ``verdict`` (rule,
    components, threshold, operating point), each fused component and every component it requires (their manifest
    entries and files), and the calibration arrays the verdict reads (``calib_a/<component>`` of the fused ones
    and ``calib_b/fused``). Two bundles with the same verdict id score and flag every input alike. A rebuilt
    reported-only component (Effective Path when the verdict does not fuse it), a stored guarded graph or a new
    build date change the bundle's sha256 but not this id. Reports of the verdict alone (the adaptive attacks)
    name it beside the bundle's sha256.
    """
    files = read_verified(path)
    m = files.manifest
    listed = m["files"]

    def digests(names: Iterable[str]) -> dict[str, str]:
        return {n: listed[n]["sha256"] for n in names if n in listed}

    fused = fused_components(m)
    entries = m.get("components", {})
    parts: dict[str, Any] = {}
    for name in build_order(fused):
        published = m.get(name)
        parts[name] = {
            "entry": entries.get(name),
            "published": published if isinstance(published, dict) else None,
            "files": digests(component_class(name).files),
        }
    calib = files.npz("calibration.npz")
    keys = [f"calib_a/{n}" for n in fused if f"calib_a/{n}" in calib] + ["calib_b/fused"]
    arrays = {k: hashlib.sha256(f"{calib[k].dtype}{calib[k].shape}".encode() + calib[k].tobytes()).hexdigest()
              for k in keys}  # fmt: skip
    identity = {
        "classifier": digests((*CLASSIFIER_FILES, ONNX_SOURCE)),
        "input": m.get("input"),
        "classes": m.get("classes"),
        "verdict": m["verdict"],
        "components": parts,
        "calibration": arrays,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def built_components(manifest: dict[str, Any]) -> list[str]:
    """Every component a bundle holds, in build order: those its manifest lists (bundles built before the
    registry: Effective Path, NIC and its value invariants) and the fused ones."""
    listed = list(manifest.get("components", {})) or [*ALWAYS_BUILT, "nic_vi"]
    reported = ["supervised"] if "supervised" in manifest else []  # bundles built with --supervised-attacks
    return build_order([*listed, *fused_components(manifest), *reported])


def load_components(files: VerifiedFiles, classifier: TappedSequential) -> dict[str, Component]:
    """Every component of a verified bundle, read from its verified bytes through the registry."""
    m = files.manifest
    entries = m.get("components", {})

    def read(name: str) -> bytes:
        if not files.has(name):
            raise KeyError(name)
        return files.bytes(name)

    out: dict[str, Component] = {}
    for name in built_components(m):
        try:
            cls = component_class(name)
        except ValueError as e:
            raise ValueError(f"bundle {files.root}: {e}") from None
        try:
            published = m.get(name)  # a component's published manifest section wins over its ``components`` entry
            entry = published if isinstance(published, dict) else entries.get(name, {})
            out[name] = cls.from_files(read, classifier, out, entry)
        except KeyError as e:
            missing = str(e.args[0]) if e.args else name
            msg = f"bundle {files.root}: component {name} needs {missing}, which is not in the bundle"
            raise BundleIntegrityError(missing, msg) from None
        except ValueError as e:
            raise ValueError(f"bundle {files.root}: component {name}: {e}") from None
    return out


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
