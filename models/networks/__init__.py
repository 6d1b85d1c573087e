"""What a classifier is to the detectors: its configuration, the bundled architectures, the named taps both
detectors read, batch-norm folding, and persistence (safetensors + JSON, ONNX with tap outputs)."""

from pathguard.models.networks.architectures import ARCHITECTURES, CONFIGS, build_classifier
from pathguard.models.networks.blocks import Normalize, Residual
from pathguard.models.networks.config import ClassifierConfig
from pathguard.models.networks.folding import fold_batchnorm, folded_parameters
from pathguard.models.networks.onnx_import import SUPPORTED_OPS, import_onnx, import_onnx_tensors, served_onnx
from pathguard.models.networks.persistence import (
    CLASSIFIER_FILES,
    ONNX_SOURCE,
    classifier_from_bytes,
    classifier_from_files,
    export_onnx,
    imported_classifier_meta,
    onnx_of_module,
    save_classifier,
)
from pathguard.models.networks.taps import OnnxTapWrapper, TappedSequential, tap_points

__all__ = [
    "ARCHITECTURES",
    "CLASSIFIER_FILES",
    "CONFIGS",
    "ONNX_SOURCE",
    "SUPPORTED_OPS",
    "ClassifierConfig",
    "Normalize",
    "OnnxTapWrapper",
    "Residual",
    "TappedSequential",
    "build_classifier",
    "classifier_from_bytes",
    "classifier_from_files",
    "export_onnx",
    "fold_batchnorm",
    "folded_parameters",
    "import_onnx",
    "import_onnx_tensors",
    "imported_classifier_meta",
    "onnx_of_module",
    "save_classifier",
    "served_onnx",
    "tap_points",
]
