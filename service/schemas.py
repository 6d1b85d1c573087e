"""HTTP request and response bodies (docs/PRODUCT.md shapes), used for validation and the OpenAPI schema.

Handlers build plain dicts in these shapes and answer with them directly (no second validation on the way out);
the models document the contract in /docs and /openapi.json.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = [
    "BatchResponse",
    "DetectResponse",
    "ErrorBody",
    "InferRequest",
    "InferResponse",
    "InferTensor",
    "ModelInfo",
    "PredictResponse",
]


class ErrorBody(BaseModel):
    error: str = Field(description="What went wrong.")


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


class DetectResponse(PredictResponse):
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


class BatchResponse(BaseModel):
    results: list[DetectResponse]


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


class InferTensor(BaseModel):
    """An Open Inference Protocol tensor: row-major ``data`` (flat or nested) of the given shape, or (binary tensor
    data extension) no ``data`` and ``parameters.binary_data_size`` bytes after the JSON header."""

    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str
    outputs: list[InferTensor]
    parameters: dict[str, Any] | None = None
