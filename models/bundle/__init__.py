"""The bundle: its file format (manifest, verification), the loaded detection pipeline, and verify-then-load.

The builder that writes bundles lives in :mod:`pathguard.models.builder` (it needs the training data and,
in supervised mode, the evaluation attacks); nothing here imports it.
"""

from typing import TYPE_CHECKING

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
from pathguard.models.bundle.result import DetectionResult
from pathguard.models.errors import BundleCompatibilityError, BundleError, BundleIntegrityError
from pathguard.models.lazy import lazy_attributes

if TYPE_CHECKING:
    from pathguard.models.bundle.loading import Bundle, load_bundle, load_classifier, verdict_sha256
    from pathguard.models.bundle.pipeline import DetectionPipeline
    from pathguard.models.components import DEFAULT_FUSION

# The loaded pipeline needs torch; the file format, the results and the stored guarded graph's loader do not. They
# are imported on first use, so a server with no torch installed reads bundles through this package too.
__getattr__ = lazy_attributes(
    __name__,
    {
        "Bundle": "pathguard.models.bundle.loading",
        "load_bundle": "pathguard.models.bundle.loading",
        "load_classifier": "pathguard.models.bundle.loading",
        "verdict_sha256": "pathguard.models.bundle.loading",
        "DetectionPipeline": "pathguard.models.bundle.pipeline",
        "DEFAULT_FUSION": "pathguard.models.components",
    },
)


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
    "verdict_sha256",
    "verify_bundle",
    "write_bundle",
]
