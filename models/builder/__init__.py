"""The offline builder: a classifier and its benign training data become a verified bundle."""

from pathguard.models.builder.builder import build_bundle, build_bundle_from_onnx
from pathguard.models.builder.config import BuildConfig

__all__ = ["BuildConfig", "build_bundle", "build_bundle_from_onnx"]
