"""NIC (Ma et al., NDSS 2019): value invariants over layer activations, provenance invariants over consecutive
layers' derived softmax heads, a final one-class model over both, and one-class SVMs exported to plain arrays."""

from pathguard.models.nic.detector import NICDetector, NICScores
from pathguard.models.nic.layers import INPUT, SOFTMAX, default_layers, layer_activation
from pathguard.models.nic.sizing import MIN_IMAGES, NICSizes, NICSizeWarning, size_to_data
from pathguard.models.nic.svm import BatchedOCSVM, ExportedOCSVM, fit_ocsvm

__all__ = [
    "INPUT",
    "MIN_IMAGES",
    "SOFTMAX",
    "BatchedOCSVM",
    "ExportedOCSVM",
    "NICDetector",
    "NICScores",
    "NICSizeWarning",
    "NICSizes",
    "default_layers",
    "fit_ocsvm",
    "layer_activation",
    "size_to_data",
]
