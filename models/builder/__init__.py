"""The offline builder: a classifier and its benign training data become a verified bundle.

The passes over images run on an executor: :class:`LocalExecutor` (this process, the default) or
:class:`~pathguard.models.builder.cluster.RayExecutor` (Ray tasks; the ``cluster`` extra), with the same bytes.
"""

from pathguard.models.builder.builder import (
    build_bundle,
    build_bundle_from_onnx,
    build_bundle_from_torch,
    refit_bundle,
)
from pathguard.models.builder.cluster import RayExecutor
from pathguard.models.builder.config import BuildConfig
from pathguard.models.builder.shards import LocalExecutor

__all__ = [
    "BuildConfig",
    "LocalExecutor",
    "RayExecutor",
    "build_bundle",
    "build_bundle_from_onnx",
    "build_bundle_from_torch",
    "refit_bundle",
]
