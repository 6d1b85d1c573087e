"""The v1 response bodies (docs/PRODUCT.md shapes): the pydantic models /docs and /openapi.json show, and the one
place that builds /v1/predict, /v1/detect, /v1/detect/batch and /v1/model answers through them.

A detection body holds every verdict component's fields under the component's name (``effective_path``, ``nic``
and every other component the bundle holds, e.g. ``mahalanobis``, ``margin``, ``noise_flip``, ``squeeze``: a
:class:`ComponentPart` each), the ``verdict`` and, for bundles built with supervised attacks, ``supervised``. In
shadow mode the client gets the prediction only: ``effective_path``, ``nic`` and ``verdict`` are null and no other
component is reported.

Bodies are validated once when built (so an answer always matches its schema) and encoded straight from the model
by pydantic-core (:class:`ModelResponse`), without a second pass through plain dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "BatchResponse",
    "ComponentPart",
    "DetectResponse",
    "EventAccepted",
    "ModelInfo",
    "ModelRef",
    "ModelResponse",
    "PredictResponse",
    "batch_response",
    "cacheable",
    "cached_response",
    "detect_response",
    "encode",
    "predict_response",
    "prediction",
]

Statistic = bool | int | float | list[float] | list[str] | dict[str, float]
"""What a component may report beside its ``score``: a number or flag, one value per layer, names, or a number
per named layer (pair)."""


class ModelRef(BaseModel):
    name: str
    version: str
    bundle_sha256: str


class Prediction(BaseModel):
    class_index: int
    label: str
    confidence: float = Field(description="Probability of the predicted class.")
    probabilities: list[float] = Field(description="Softmax over all classes, in class order.")


class EffectivePath(BaseModel):
    layers: list[str] = Field(description="Weighted layers covered by Effective Path, forward order.")
    rank1_similarity: list[float] = Field(description="Per layer: share of the rank-1 path inside its class path.")
    rank2_similarity: list[float] = Field(description="Per layer: the same for the rank-2 path.")
    score: float = Field(description="Effective Path detector score in [0, 1] (higher = more adversarial).")


class Nic(BaseModel):
    value_violation: dict[str, float] = Field(description="Per layer: value-invariant violation probability.")
    provenance_violation: dict[str, float] = Field(description="Per layer pair 'a->b': provenance violation.")
    score: float = Field(description="NIC detector score in [0, 1].")


class ComponentPart(BaseModel):
    """Any other verdict component's part of a detection body, under the component's name: its ``score`` and the
    statistic it is computed from (e.g. ``mahalanobis``: ``layers``; ``margin``: ``margin``; ``noise_flip``:
    ``flip_share``; ``noise_l1`` and ``squeeze``: ``softmax_l1``; ``noise_drop``: ``logit_drop``)."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Statistic] = Field(init=False)

    score: float = Field(
        description="Violation probability in [0, 1]: 1 - p of the component's raw score against clean calibration "
        "inputs (higher = more adversarial)."
    )


class Verdict(BaseModel):
    adversarial: bool
    score: float = Field(description="Fused score in [0, 1]; the verdict is adversarial when it passes threshold.")
    threshold: float
    p_value: float = Field(description="Share of clean calibration inputs scoring at least this high.")
    target_fpr: float


class Supervised(BaseModel):
    detector: str = Field(description="Supervised Effective Path model: linear, random_forest, adaboost, ...")
    adversarial: bool = Field(description="Score above its own threshold for the same target FPR.")
    score: float = Field(description="Violation probability in [0, 1] against clean calibration inputs.")
    p_value: float = Field(description="Share of clean calibration inputs scoring at least this high.")


class PredictResponse(BaseModel):
    id: str
    model: ModelRef
    prediction: Prediction
    timings_ms: dict[str, float] = Field(description="decode, queue, classify, total.")


class DetectResponse(BaseModel):
    """One image's detection. Besides the fields listed, every other verdict component the bundle holds adds its
    :class:`ComponentPart` under its own name (enforce mode only)."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, ComponentPart] = Field(init=False)

    id: str
    model: ModelRef
    prediction: Prediction
    effective_path: EffectivePath | None = Field(description="null in shadow mode.")
    nic: Nic | None = Field(description="null in shadow mode.")
    verdict: Verdict | None = Field(description="null in shadow mode (the verdict is only recorded).")
    supervised: Supervised | None = Field(
        default=None,
        description="Only for bundles built with --supervised-attacks: a detector also trained on those attacks, "
        "reported beside the benign-only verdict (which it never changes). Absent otherwise and in shadow mode.",
    )
    mode: str = Field(description="'enforce' or 'shadow'.")
    cached: bool = Field(description="True when the answer came from the verdict cache.")
    timings_ms: dict[str, float] = Field(
        description="decode, queue, classify, checks (checks_wait and the components' stages inside it), total; "
        "decode and cache for a cached answer."
    )

    def components(self) -> dict[str, ComponentPart]:
        """The parts of the components other than Effective Path and NIC, by name."""
        return dict(self.__pydantic_extra__ or {})


class BatchResponse(BaseModel):
    results: list[DetectResponse]


class EventAccepted(BaseModel):
    """The answer to a payload-logger CloudEvent (``POST /``): its results follow as CloudEvents."""

    id: str = Field(description="The event's id.")
    request_id: str = Field(description="The logged request's id, carried over to the result events.")
    type: str = Field(description="The event's type.")
    status: str = Field(description="'accepted': its images are being checked; 'ignored': a response event.")
    images: int = Field(description="Images queued for detection (one result event each).")


class ModelInfo(BaseModel):
    name: str
    version: str
    bundle_sha256: str
    dataset: str
    classes: list[str]
    input_shape: list[int] = Field(description="(C, H, W) of one input; pixels in [0, 1].")
    layers: list[str] = Field(description="Effective Path layers (as in effective_path.layers).")
    value_layers: list[str]
    provenance_pairs: list[str]
    target_fpr: float
    threshold: float
    mode: str
    engine: str
    parallel_checks: bool
    supervised: dict[str, Any] | None = Field(
        default=None, description="Detector, feature set and training attacks of the bundle's supervised model, if any."
    )
    benign_similarity: dict[str, Any] | None = Field(
        default=None,
        description="Benign path similarity per Effective Path layer, over all classes (the bundle keeps no per-class "
        "statistics): 'rank1'/'rank2' {'median', 'bound'}, bound = the benign 'tail' quantile on the suspicious side "
        "(below for rank-1, above for rank-2); 'images' = held-out training images it was fitted on.",
    )
    detection: str = Field(
        default="pipeline",
        description="'graph': detection runs on the guarded graph built at load (PATHGUARD_DETECT_GRAPH); 'stored': on "
        "the guarded graph stored in the bundle, with nothing beside it (PATHGUARD_DETECT_GRAPH=stored, or a server "
        "without torch); 'pipeline': the Python pipeline.",
    )
    detection_note: str | None = Field(
        default=None,
        description="With PATHGUARD_DETECT_GRAPH=auto and detection on the pipeline: why the graph cannot serve it.",
    )
    graph_components: list[str] = Field(
        default_factory=list,
        description="The components the guarded graph computes (empty when detection runs on the pipeline).",
    )
    skipped_components: list[str] = Field(
        default_factory=list,
        description="Components left out of responses (PATHGUARD_REPORTED_COMPONENTS; with the stored graph, those "
        "with no in-graph form).",
    )
    onnx_split_error: str | None = Field(
        default=None,
        description="Why the onnx engine could not split the graph at the checked taps (so the per-layer checks "
        "start only after the whole forward pass); null otherwise.",
    )


# ------------------------------------------------------------------------------------------------------- building


def prediction(classes: Sequence[str], probs: np.ndarray) -> Prediction:
    """The ``prediction`` part of one image's softmax ``probs`` (K,)."""
    k = int(np.argmax(probs))
    return Prediction(
        class_index=k, label=classes[k], confidence=float(probs[k]), probabilities=[float(p) for p in probs]
    )


def predict_response(rid: str, model: ModelRef, pred: Prediction, timings: dict[str, float]) -> PredictResponse:
    return PredictResponse(id=rid, model=model, prediction=pred, timings_ms=timings)


def detect_response(
    rid: str,
    model: ModelRef,
    pred: Prediction,
    row: Mapping[str, Any] | None,
    mode: str,
    timings: dict[str, float],
) -> DetectResponse:
    """One image's fresh detection body, enforce and shadow alike.

    Parameters
    ----------
    row : mapping or None
        ``DetectionResult.row(i)``: every component's fields under its name, ``verdict`` and, for supervised
        bundles, ``supervised``. None when the client gets no verdict (shadow mode).
    """
    none = {"effective_path": None, "nic": None, "verdict": None}  # parts a response always names
    parts: Mapping[str, Any] = none if row is None else {**none, **row}
    return DetectResponse.model_validate(
        {
            "id": rid,
            "model": model,
            "prediction": pred,
            **parts,
            "mode": mode,
            "cached": False,
            "timings_ms": timings,
        }
    )


def cacheable(body: DetectResponse) -> dict[str, Any]:
    """What the verdict cache keeps of a body: all but ``id``, ``timings_ms`` and ``cached``."""
    return body.model_dump(mode="json", exclude={"id", "timings_ms", "cached"}, exclude_unset=True)


def cached_response(
    rid: str, model: ModelRef, hit: Mapping[str, Any], timings: dict[str, float]
) -> DetectResponse | None:
    """A body from a verdict-cache entry (as :func:`cacheable` wrote it), named after ``model``: the entry is keyed
    by the bundle, which two models of one repository may share. None when the entry does not fit the response
    schema (then it is a miss)."""
    try:
        body = {"id": rid, **hit, "model": model.model_dump(), "cached": True, "timings_ms": timings}
        return DetectResponse.model_validate(body)
    except ValidationError:
        return None


# ------------------------------------------------------------------------------------------------------- encoding


def encode(body: BaseModel) -> bytes:
    """JSON bytes of a body, straight from the model (fields left unset, e.g. ``supervised`` on bundles without a
    supervised detector, are absent)."""
    return body.__pydantic_serializer__.to_json(body, exclude_unset=True)


class ModelResponse(Response):
    """A JSON response encoded from a response model."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes | memoryview:
        if isinstance(content, BaseModel):
            return encode(content)
        return super().render(content)


def batch_response(results: list[DetectResponse]) -> BatchResponse:
    return BatchResponse.model_construct(results=results)  # each result was validated when it was built
