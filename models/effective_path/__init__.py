"""Effective Path (Qiu et al., CVPR 2019): per-image extraction of the critical synapses, per-class path bitmaps,
and the detectors built on image-vs-class path similarity.

Modules, in the order data flows through them: :mod:`.selection` (the selection rule), :mod:`.steps` and
:mod:`.plan` (a network compiled into steps that walk the selection backwards), :mod:`.extractor` (the batched
extractor), :mod:`.paths` (its results), :mod:`.class_paths` (per-class bitmaps and similarity),
:mod:`.detectors` (benign and supervised scores on the similarities; a fitted ensemble is stored as plain arrays
by :class:`pathguard.models.verdict.trees.TreeEnsemble`).
"""

from pathguard.models.effective_path.benign import ClassSimilarityRanges
from pathguard.models.effective_path.class_paths import ClassPaths, PathCounts
from pathguard.models.effective_path.detectors import (
    DETECTORS,
    BenignEPScore,
    LinearJointSimilarity,
    SklearnDetector,
    ep_features,
    make_detector,
)
from pathguard.models.effective_path.extractor import EffectivePathExtractor, extract_effective_paths
from pathguard.models.effective_path.paths import DEFAULT_THETA, LayerInfo, PathBatch
from pathguard.models.effective_path.selection import select_synapses

__all__ = [
    "DEFAULT_THETA",
    "DETECTORS",
    "BenignEPScore",
    "ClassPaths",
    "ClassSimilarityRanges",
    "EffectivePathExtractor",
    "LayerInfo",
    "LinearJointSimilarity",
    "PathBatch",
    "PathCounts",
    "SklearnDetector",
    "ep_features",
    "extract_effective_paths",
    "make_detector",
    "select_synapses",
]
