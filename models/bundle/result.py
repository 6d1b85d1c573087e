"""What a detection returns for a batch: :class:`DetectionResult` (numpy arrays) and :func:`row_of`, one input's part
of the ``/v1/detect`` response. Only numpy: a server that scores the stored guarded graph
(:mod:`pathguard.models.bundle.stored`) builds the same results without torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pathguard.models.verdict.supervised import SupervisedAssessment

__all__ = ["EP", "MAHALANOBIS", "NIC", "NIC_VI", "SUPERVISED", "DetectionResult", "row_of", "softmax"]

EP, NIC, NIC_VI, MAHALANOBIS, SUPERVISED = "effective_path", "nic", "nic_vi", "mahalanobis", "supervised"


@dataclass
class DetectionResult:
    """Detection results for a batch of N inputs (numpy arrays; see PRODUCT.md for the JSON shape)."""

    probabilities: np.ndarray  # (N, K)
    predicted: np.ndarray  # (N,)
    confidence: np.ndarray  # (N,)
    fields: dict[str, dict[str, Any]]  # component -> its response fields (arrays with the batch first)
    raw: dict[str, np.ndarray]  # component -> (N,) raw score
    score: np.ndarray  # (N,) fused, in [0, 1]
    p_value: np.ndarray  # (N,)
    adversarial: np.ndarray  # (N,) bool
    threshold: float
    target_fpr: float
    timings_s: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.predicted)

    @classmethod
    def of(
        cls,
        probabilities: np.ndarray,
        fields: dict[str, dict[str, Any]],
        raw: dict[str, np.ndarray],
        score: np.ndarray,
        p_value: np.ndarray,
        threshold: float,
        target_fpr: float,
        timings_s: dict[str, float] | None = None,
    ) -> DetectionResult:
        """A batch's result from its softmax and fused scores: the prediction and its confidence from the softmax,
        the verdict ``score > threshold``."""
        return cls(
            probabilities=probabilities,
            predicted=probabilities.argmax(1),
            confidence=probabilities.max(1),
            fields=fields,
            raw=raw,
            score=score,
            p_value=p_value,
            adversarial=score > threshold,
            threshold=threshold,
            target_fpr=target_fpr,
            timings_s=dict(timings_s or {}),
        )

    # the parts older callers read by name
    @property
    def ep_layers(self) -> list[str]:
        return list(self.fields[EP]["layers"])

    @property
    def rank1_similarity(self) -> np.ndarray:
        return np.asarray(self.fields[EP]["rank1_similarity"])

    @property
    def rank2_similarity(self) -> np.ndarray:
        return np.asarray(self.fields[EP]["rank2_similarity"])

    @property
    def ep_score(self) -> np.ndarray:
        return np.asarray(self.fields[EP]["score"])

    @property
    def value_violation(self) -> dict[str, np.ndarray]:
        return dict(self.fields[NIC]["value_violation"])

    @property
    def provenance_violation(self) -> dict[str, np.ndarray]:
        return dict(self.fields[NIC]["provenance_violation"])

    @property
    def nic_score(self) -> np.ndarray:
        return np.asarray(self.fields[NIC]["score"])

    @property
    def supervised(self) -> SupervisedAssessment | None:
        """The supervised detector's results (bundles built with supervised attacks only)."""
        f = self.fields.get(SUPERVISED)
        if not f:
            return None
        from pathguard.models.verdict.supervised import SupervisedAssessment  # the scorer's module needs torch

        return SupervisedAssessment(f["detector"], f["score"], f["p_value"], f["adversarial"], self.raw[SUPERVISED])

    def row(self, i: int) -> dict[str, Any]:
        """Input ``i``'s part of the /v1/detect response: every component's fields (``effective_path``, ``nic``,
        ..., and for supervised bundles ``supervised``) and the ``verdict``."""

        def r(v: float) -> float:
            return round(float(v), 6)

        out = {name: row_of(f, i) for name, f in self.fields.items() if f}
        out["verdict"] = {
            "adversarial": bool(self.adversarial[i]),
            "score": r(self.score[i]),
            "threshold": r(self.threshold),
            "p_value": r(self.p_value[i]),
            "target_fpr": float(self.target_fpr),
        }
        return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits, float32."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def row_of(fields: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Input ``i``'s response fields: arrays indexed by ``i`` (a row of an (N, L) array becomes a list) and rounded
    to 6 decimals, dicts recursed into, anything else copied."""
    out: dict[str, Any] = {}
    for k, v in fields.items():
        if isinstance(v, np.ndarray):
            item = v[i]
            out[k] = [_r(e) for e in item] if np.ndim(item) else _r(item)
        elif isinstance(v, Mapping):
            out[k] = row_of(v, i)
        elif isinstance(v, list | tuple):
            out[k] = list(v)
        else:
            out[k] = v
    return out


def _r(v: Any) -> float | bool | int:
    if isinstance(v, np.bool_ | bool):
        return bool(v)
    return round(float(v), 6)
