"""From scores to a verdict: empirical p-values and thresholds on benign calibration data, the fused benign-only
verdict, and the scorer of the optional supervised detector (fitting it lives with the builder) with its tree
ensembles as plain arrays (`trees.py`)."""

import importlib
from typing import TYPE_CHECKING, Any

from pathguard.models.verdict.calibration import (
    columnwise_p_values,
    empirical_p_values,
    threshold_at_fpr,
    two_sided_fisher,
    violation_probability,
)
from pathguard.models.verdict.fusion import FusedVerdict, fisher_score

if TYPE_CHECKING:
    from pathguard.models.verdict.supervised import SupervisedAssessment, SupervisedDetector

_SUPERVISED = ("SupervisedAssessment", "SupervisedDetector")  # its feature extraction needs torch: on first use


def __getattr__(name: str) -> Any:
    if name in _SUPERVISED:
        return getattr(importlib.import_module("pathguard.models.verdict.supervised"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FusedVerdict",
    "SupervisedAssessment",
    "SupervisedDetector",
    "columnwise_p_values",
    "empirical_p_values",
    "fisher_score",
    "threshold_at_fpr",
    "two_sided_fisher",
    "violation_probability",
]
