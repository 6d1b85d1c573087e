"""The v1 REST API: model summary, classification, detection (single and batch)."""

from __future__ import annotations

from statistics import NormalDist
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request

from pathguard.service.detection import detect_uploads, model_ref, predict_uploads, read_uploads
from pathguard.service.responses import (
    BatchResponse,
    DetectResponse,
    ModelInfo,
    ModelResponse,
    PredictResponse,
    batch_response,
)
from pathguard.service.runtime import StoredRuntime
from pathguard.service.schemas import ErrorBody
from pathguard.service.served import ServedModel
from pathguard.service.state import get_state, request_id, requested_model, require_api_key

router = APIRouter(prefix="/v1", tags=["v1"], dependencies=[Depends(require_api_key)])

_BINARY = {"schema": {"type": "string", "format": "binary"}}


def _image_body(field: str, many: bool) -> dict[str, Any]:
    item = {"type": "string", "format": "binary"}
    prop = {"type": "array", "items": item} if many else item
    content: dict[str, Any] = {} if many else {"image/png": _BINARY, "image/jpeg": _BINARY}
    content["multipart/form-data"] = {"schema": {"type": "object", "properties": {field: prop}, "required": [field]}}
    return {"requestBody": {"required": True, "content": content}}


_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (400, 401, 413, 415, 422, 503)}


def _supervised_info(sup: Any) -> dict[str, Any] | None:
    return None if sup is None else {"detector": sup.detector, "features": sup.features, "attacks": list(sup.attacks)}


def _benign_similarity(served: ServedModel) -> dict[str, Any]:
    """The benign path-similarity statistics the bundle holds: those of its benign Effective Path score, fitted
    on held-out training images of all classes together (a bundle keeps no per-class similarity statistics).

    Per layer: the benign median and the bound on the suspicious side (rank-1 below, rank-2 above) at the score's
    tail quantile, ``median -/+ scale * z(1 - tail)``. Where the fitted scale sits at its floor, the bound is the
    floor's, i.e. at least as far from the median as the real quantile.
    """
    ep = served.runtime.pipeline.ep_score
    n = len(served.runtime.pipeline.ep_layers)
    z = NormalDist().inv_cdf(1.0 - ep.tail)
    bound = np.clip(ep.median_ + ep.orientation_ * ep.scale_ * z, 0.0, 1.0)  # (2L,): rank-1 | rank-2

    def part(sl: slice) -> dict[str, list[float]]:
        return {
            "median": [round(float(v), 6) for v in ep.median_[sl]],
            "bound": [round(float(v), 6) for v in bound[sl]],
        }

    images = (served.bundle.manifest.get("calibration") or {}).get("ep_fit")
    return {
        "scope": "all classes",
        "images": images,
        "tail": float(ep.tail),
        "rank1": part(slice(0, n)),
        "rank2": part(slice(n, 2 * n)),
        "per_class": _per_class(served.bundle.benign_ranges, n),
    }


def _per_class(ranges: Any, n: int) -> dict[str, Any] | None:
    """Per predicted class (bundles that carry ``benign_similarity.npz``): the same median and bound, from the
    held-out images the classifier predicts as that class; ``null`` rows for classes with too few of them."""
    if ranges is None:
        return None

    def rows(a: np.ndarray, sl: slice) -> list[list[float] | None]:
        return [None if np.isnan(r).any() else [round(float(v), 6) for v in r[sl]] for r in a]

    return {
        "tail": float(ranges.tail),
        "images": [int(c) for c in ranges.count_],
        "rank1": {"median": rows(ranges.median_, slice(0, n)), "bound": rows(ranges.bound_, slice(0, n))},
        "rank2": {"median": rows(ranges.median_, slice(n, 2 * n)), "bound": rows(ranges.bound_, slice(n, 2 * n))},
    }


_MODEL_PARAM = {
    "parameters": [
        {
            "name": "model",
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": "The model to use (also as header X-Pathguard-Model); needed only when the server serves "
            "several.",
        }
    ]
}


def _detection(runtime: Any) -> str:
    """``/v1/model``'s ``detection``: where detection runs."""
    if isinstance(runtime, StoredRuntime):
        return "stored"
    return "graph" if runtime.graph is not None else "pipeline"


def _served(request: Request) -> ServedModel:
    return get_state(request).model(requested_model(request))


@router.get("/model", response_model=ModelInfo, openapi_extra=_MODEL_PARAM)
async def model(request: Request) -> ModelResponse:
    """Summary of the served bundle's manifest. ``onnx_split_error``: why the onnx engine could not split the graph
    at the checked taps (so the per-layer checks start only after the whole forward pass), else null."""
    served = _served(request)
    b, p, s = served.bundle, served.runtime.pipeline, served.settings
    body = {
        **model_ref(served).model_dump(),
        "dataset": b.dataset,
        "classes": list(b.classes),
        "input_shape": list(b.input_shape),
        "layers": list(p.ep_layers),
        "value_layers": list(p.nic_value_layers),
        "provenance_pairs": list(p.nic_provenance_pairs),
        "target_fpr": float(p.target_fpr),
        "threshold": float(p.threshold),
        "mode": s.mode,
        "engine": s.engine,
        "parallel_checks": s.parallel_checks,
        "supervised": _supervised_info(p.supervised),
        "benign_similarity": _benign_similarity(served),
        "onnx_split_error": served.runtime.engine.split_error,
        "detection": _detection(served.runtime),
        "detection_note": served.runtime.graph_note,
        "graph_components": list(served.runtime.graph.components) if served.runtime.graph is not None else [],
        "skipped_components": list(served.runtime.skip),
    }
    return ModelResponse(ModelInfo.model_validate(body))


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=_ERRORS,
    openapi_extra=_image_body("image", many=False) | _MODEL_PARAM,
)
async def predict(request: Request) -> ModelResponse:
    """Classify one image (no layer checks): the baseline the detection overhead is measured against."""
    rid = request_id(request)
    async with _served(request).use() as served:
        uploads = await read_uploads(request, served, "image", many=False)
        body = await predict_uploads(served, rid, uploads)
        return ModelResponse(body, headers={"X-Request-ID": rid})


@router.post(
    "/detect",
    response_model=DetectResponse,
    responses=_ERRORS,
    openapi_extra=_image_body("image", many=False) | _MODEL_PARAM,
)
async def detect(request: Request) -> ModelResponse:
    """Classify one image and check it: per-layer path similarity, invariant violations, verdict."""
    rid = request_id(request)
    async with _served(request).use() as served:
        uploads = await read_uploads(request, served, "image", many=False)
        (body,) = await detect_uploads(served, rid, uploads)
        return ModelResponse(body, headers={"X-Request-ID": rid})


@router.post(
    "/detect/batch",
    response_model=BatchResponse,
    responses=_ERRORS,
    openapi_extra=_image_body("images", many=True) | _MODEL_PARAM,
)
async def detect_batch(request: Request) -> ModelResponse:
    """Several images (multipart field ``images``, repeated); results in the order sent, the i-th with id
    ``<request id>-<i>``."""
    rid = request_id(request)
    async with _served(request).use() as served:
        uploads = await read_uploads(request, served, "images", many=True)
        results = await detect_uploads(served, rid, uploads, item_ids=True)
        return ModelResponse(batch_response(results), headers={"X-Request-ID": rid})
