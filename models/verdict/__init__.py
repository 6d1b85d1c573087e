"""From scores to a verdict: empirical p-values and thresholds on benign calibration data, the fused benign-only
verdict, and the scorer of the optional supervised detector (fitting it lives with the builder) with its tree
ensembles as plain arrays (`trees.py`)."""

from typing import TYPE_CHECKING

from pathguard.models.lazy import lazy_attributes
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

# the supervised detector's feature extraction needs torch: imported on first use
__getattr__ = lazy_attributes(
    __name__, dict.fromkeys(("SupervisedAssessment", "SupervisedDetector"), "pathguard.models.verdict.supervised")
)


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
