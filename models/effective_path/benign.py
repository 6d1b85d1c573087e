"""Per-class benign ranges of the image-vs-class path similarity, for people reading a verdict.

Fitted at build time on the held-out ``ep_fit`` images (benign, never in the class paths), grouped by the class
the classifier predicts for them, so the range of class ``k`` is what benign inputs predicted as ``k`` look like.
Per class and per layer: the median, and the bound on the suspicious side at quantile ``tail`` (rank-1: the
``tail`` quantile, low similarity is suspicious; rank-2: the ``1 - tail`` quantile, high is suspicious). Reporting
only: the verdict does not use these numbers.
"""

from __future__ import annotations

import numpy as np

from pathguard.models.errors import NotFittedError

__all__ = ["ClassSimilarityRanges"]


class ClassSimilarityRanges:
    """Per-class benign median and suspicious-side bound of the rank-1 / rank-2 similarities.

    Parameters
    ----------
    tail : float
        Quantile of the bound on the suspicious side.
    min_images : int
        Classes with fewer benign images get no range (``count_`` tells how many they had).
    """

    def __init__(self, tail: float = 0.05, min_images: int = 10) -> None:
        self.tail = tail
        self.min_images = min_images

    def fit(self, features: np.ndarray, predicted: np.ndarray, num_classes: int) -> ClassSimilarityRanges:
        """``features`` (N, 2L): rank-1 then rank-2 similarities; ``predicted`` (N,) the predicted classes."""
        f = np.asarray(features, dtype=np.float64)
        n_layers = f.shape[1] // 2
        self.median_ = np.full((num_classes, 2 * n_layers), np.nan)
        self.bound_ = np.full((num_classes, 2 * n_layers), np.nan)
        self.count_ = np.bincount(np.asarray(predicted, dtype=np.int64), minlength=num_classes)[:num_classes]
        for k in np.flatnonzero(self.count_ >= self.min_images):
            rows = f[predicted == k]  # (n_k, 2L)
            self.median_[k] = np.median(rows, axis=0)
            self.bound_[k, :n_layers] = np.quantile(rows[:, :n_layers], self.tail, axis=0)
            self.bound_[k, n_layers:] = np.quantile(rows[:, n_layers:], 1.0 - self.tail, axis=0)
        return self

    def _check(self) -> None:
        if not hasattr(self, "median_"):
            raise NotFittedError("ClassSimilarityRanges is not fitted")

    def to_arrays(self) -> dict[str, np.ndarray]:
        self._check()
        return {"median": self.median_, "bound": self.bound_, "count": self.count_, "tail": np.array(self.tail)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ClassSimilarityRanges:
        self = cls(tail=float(arrays["tail"]))
        self.median_ = np.asarray(arrays["median"], dtype=np.float64)
        self.bound_ = np.asarray(arrays["bound"], dtype=np.float64)
        self.count_ = np.asarray(arrays["count"], dtype=np.int64)
        if self.median_.shape != self.bound_.shape or self.median_.shape[0] != len(self.count_):
            raise ValueError("ClassSimilarityRanges arrays have inconsistent shapes")
        return self
