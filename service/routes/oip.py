"""Open Inference Protocol (KServe v2) routes: server and model metadata, model readiness, inference."""

from __future__ import annotations

from importlib import metadata
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from pathguard.service.detection import detect_tensor
from pathguard.service.errors import NotFound
from pathguard.service.protocol import (
    SUPERVISED_OUTPUTS,
    available_outputs,
    encode_http,
    output_tensors,
    parse_http,
    requested_outputs,
)
from pathguard.service.schemas import ErrorBody, InferRequest, InferResponse
from pathguard.service.served import ServedModel
from pathguard.service.state import ServiceState, get_state, request_id, require_api_key

router = APIRouter(prefix="/v2", tags=["open inference protocol"], dependencies=[Depends(require_api_key)])
State = Annotated[ServiceState, Depends(get_state)]
# the protocol extensions served: Triton's model repository (index, load, unload) and statistics
EXTENSIONS = ("model_repository", "statistics")
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 422, 503)}


def _outputs(served: ServedModel) -> dict[str, tuple[str, bool]]:
    return available_outputs(served.runtime.pipeline.supervised is not None, served.runtime.skip)


def _model(state: ServiceState, name: str, version: str | None = None) -> ServedModel:
    """The served model ``name`` (404 unknown, 503 while it loads); with ``version``, only if that is served."""
    served = state.model(name)
    if version is not None and version != served.version:
        raise NotFound(f"model {name!r} has no version {version!r}; served: {served.version}")
    return served


@router.get("")
async def server_metadata(request: Request) -> dict[str, Any]:
    """Server metadata."""
    return {"name": "pathguard", "version": metadata.version("pathguard"), "extensions": list(EXTENSIONS)}


@router.get("/models/stats", responses=_ERRORS)
async def all_model_stats(state: State) -> dict[str, Any]:
    """Statistics of every served model (Triton's statistics extension; declared before
    ``/models/{name}``, which would take ``stats`` for a model name)."""
    served = list(state.models.models.values()) if state.models is not None else []
    return {"model_stats": [m.stats.snapshot(m.name, m.version) for m in served]}


@router.get("/models/{name}", responses=_ERRORS)
async def model_metadata(name: str, state: State) -> dict[str, Any]:
    """Model metadata: the input tensor and the outputs ``infer`` returns."""
    return _metadata(_model(state, name))


def _metadata(served: ServedModel) -> dict[str, Any]:
    b, p = served.bundle, served.runtime.pipeline
    k, layers = len(b.classes), list(p.ep_layers)
    shapes = {
        "predicted_class": [-1],
        "probabilities": [-1, k],
        "is_adversarial": [-1],
        "instance_score": [-1],
        "p_value": [-1],
        "path_similarity": [-1, len(layers)],
        "value_violation": [-1, len(p.nic_value_layers)],
        "provenance_violation": [-1, len(p.nic_provenance_pairs)],
    }
    available = _outputs(served)
    shapes |= {n: [-1] for n in SUPERVISED_OUTPUTS}
    shapes = {n: shape for n, shape in shapes.items() if n in available}
    return {
        "name": served.name,
        "versions": [served.version],
        "platform": f"pathguard-{served.settings.engine}",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *b.input_shape]}],
        "outputs": [{"name": n, "datatype": available[n][0], "shape": s} for n, s in shapes.items()],
        "parameters": {
            "path_similarity_layers": layers,
            "value_violation_layers": list(p.nic_value_layers),
            "provenance_violation_pairs": list(p.nic_provenance_pairs),
            "classes": list(b.classes),
        },
    }


@router.get("/models/{name}/versions/{version}", responses=_ERRORS)
async def model_version_metadata(name: str, version: str, state: State) -> dict[str, Any]:
    """Model metadata of a named version (only the served one exists)."""
    return _metadata(_model(state, name, version))


@router.get("/models/{name}/ready", responses=_ERRORS)
async def model_ready(name: str, state: State) -> dict[str, Any]:
    """200 once the model is loaded and warmed up; 503 while it loads; 404 when it is not served."""
    _model(state, name)
    return {"name": name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready", responses=_ERRORS)
async def model_version_ready(name: str, version: str, state: State) -> dict[str, Any]:
    """Readiness of a named version."""
    _model(state, name, version)
    return {"name": name, "version": version, "ready": True}


@router.get("/models/{name}/stats", responses=_ERRORS)
async def model_stats(name: str, state: State) -> dict[str, Any]:
    """Statistics of one model in Triton's shape: request success and failure counts and cumulative durations
    (ns), per stage (queue, compute_input = decoding, compute_infer = forward pass, compute_output = the checks,
    cache_hit, cache_miss) and per detection stage (``detection_stats``)."""
    m = _model(state, name)
    return {"model_stats": [m.stats.snapshot(m.name, m.version)]}


@router.get("/models/{name}/versions/{version}/stats", responses=_ERRORS)
async def model_version_stats(name: str, version: str, state: State) -> dict[str, Any]:
    """Statistics of a named version (only the served one exists)."""
    m = _model(state, name, version)
    return {"model_stats": [m.stats.snapshot(m.name, m.version)]}


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` inlined (OpenAPI resolves refs from the document root)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    inlined: dict[str, Any] = walk(schema)
    return inlined


# The body is read raw (JSON with or without Content-Type, or the binary tensor data extension) and parsed on a
# worker thread; the schema below documents the JSON form.
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _inline_refs(InferRequest.model_json_schema())}},
    }
}


@router.post("/models/{name}/infer", response_model=InferResponse, responses=_ERRORS, openapi_extra=_INFER_BODY)
async def infer(name: str, request: Request, state: State) -> Response:
    """Inference on a tensor (N, C, H, W): FP32 in [0, 1] or UINT8 in [0, 255], JSON or binary."""
    return await _infer(name, None, request, state)


@router.post(
    "/models/{name}/versions/{version}/infer",
    response_model=InferResponse,
    responses=_ERRORS,
    openapi_extra=_INFER_BODY,
)
async def infer_version(name: str, version: str, request: Request, state: State) -> Response:
    """Inference on a named version (only the served one exists)."""
    return await _infer(name, version, request, state)


async def _infer(name: str, version: str | None, request: Request, state: State) -> Response:
    async with _model(state, name, version).use() as served:
        return await _infer_on(served, request)


async def _infer_on(served: ServedModel, request: Request) -> Response:
    body = await request.body()
    header_length = request.headers.get("inference-header-content-length")
    max_images = served.settings.max_request_images
    call = await run_in_threadpool(parse_http, body, header_length, served.spec, max_images)
    available = _outputs(served)
    wanted = requested_outputs(call.outputs, available)
    rid = request_id(request, call.request_id)
    rows = await detect_tensor(served, rid, call.x)
    params = {**call.parameters, "mode": served.settings.mode, "bundle_sha256": served.sha256}
    v = rows[0].verdict
    if v is not None:
        params.update(threshold=v.threshold, target_fpr=v.target_fpr)
    resp = {"model_name": served.name, "model_version": served.version, "id": rid, "parameters": params}
    content, json_length = encode_http(resp, output_tensors(rows, wanted, available), call.binary_outputs)
    headers = {"X-Request-ID": rid}
    if json_length is None:
        return Response(content, media_type="application/json", headers=headers)
    headers["Inference-Header-Content-Length"] = str(json_length)
    return Response(content, media_type="application/octet-stream", headers=headers)
