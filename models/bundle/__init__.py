"""The bundle: its file format (manifest, verification), the loaded detection pipeline, and verify-then-load.

The builder that writes bundles lives in :mod:`pathguard.models.builder` (it needs the training data and,
in supervised mode, the evaluation attacks); nothing here imports it.
"""

from pathguard.models.bundle.format import (
    BENIGN_RANGES,
    MAHALANOBIS_FILE,
    MANIFEST,
    SCHEMA_VERSION,
    VerifiedFiles,
    bundle_sha256,
    library_versions,
    npz_bytes,
    read_verified,
    verify_bundle,
    write_bundle,
)
from pathguard.models.bundle.loading import Bundle, load_bundle, load_classifier
from pathguard.models.bundle.pipeline import DetectionPipeline, DetectionResult
from pathguard.models.components import DEFAULT_FUSION
from pathguard.models.errors import BundleCompatibilityError, BundleError, BundleIntegrityError

__all__ = [
    "BENIGN_RANGES",
    "DEFAULT_FUSION",
    "MAHALANOBIS_FILE",
    "MANIFEST",
    "SCHEMA_VERSION",
    "Bundle",
    "BundleCompatibilityError",
    "BundleError",
    "BundleIntegrityError",
    "DetectionPipeline",
    "DetectionResult",
    "VerifiedFiles",
    "bundle_sha256",
    "library_versions",
    "load_bundle",
    "load_classifier",
    "npz_bytes",
    "read_verified",
    "verify_bundle",
    "write_bundle",
]
