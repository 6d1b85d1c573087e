"""From scores to a verdict: empirical p-values and thresholds on benign calibration data, the fused benign-only
verdict, and the scorer of the optional supervised detector (fitting it lives with the builder) with its tree
ensembles as plain arrays (`trees.py`)."""

from pathguard.models.verdict.calibration import (
    columnwise_p_values,
    empirical_p_values,
    threshold_at_fpr,
    two_sided_fisher,
    violation_probability,
)
from pathguard.models.verdict.fusion import FusedVerdict, fisher_score
from pathguard.models.verdict.supervised import SupervisedAssessment, SupervisedDetector

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
