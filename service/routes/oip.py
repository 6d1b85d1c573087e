"""Open Inference Protocol (KServe v2) routes: server and model metadata, model readiness, inference."""

from __future__ import annotations

from importlib import metadata
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from pathguard.service.detection import detect_tensor
from pathguard.service.errors import BadInput, NotFound, PayloadTooLarge
from pathguard.service.inputs import tensor_from_oip
from pathguard.service.schemas import ErrorBody, InferRequest, InferResponse
from pathguard.service.state import ServiceState, ready_state, request_id, require_api_key

router = APIRouter(prefix="/v2", tags=["open inference protocol"], dependencies=[Depends(require_api_key)])
Ready = Annotated[ServiceState, Depends(ready_state)]
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 422, 503)}

# name -> (datatype, whether it needs the verdict)
OUTPUTS = {
    "predicted_class": ("INT64", False),
    "probabilities": ("FP32", False),
    "is_adversarial": ("BOOL", True),
    "instance_score": ("FP32", True),
    "p_value": ("FP32", True),
    "path_similarity": ("FP32", True),
    "value_violation": ("FP32", True),
    "provenance_violation": ("FP32", True),
}
# only for bundles built with supervised attacks (reported beside the verdict, see pathguard.models.verdict.supervised)
SUPERVISED_OUTPUTS = {"supervised_is_adversarial": ("BOOL", True), "supervised_score": ("FP32", True)}
_SCALAR = ("predicted_class", "is_adversarial", "instance_score", "p_value", *SUPERVISED_OUTPUTS)


def _outputs(state: ServiceState) -> dict[str, tuple[str, bool]]:
    """Outputs this server can return: the supervised ones only when the bundle has a supervised detector."""
    return OUTPUTS | SUPERVISED_OUTPUTS if state.runtime.pipeline.supervised is not None else dict(OUTPUTS)


def _model(state: ServiceState, name: str) -> Any:
    if name != state.bundle.name:
        raise NotFound(f"unknown model {name!r}; this server serves {state.bundle.name!r}")
    return state.bundle


@router.get("")
async def server_metadata(request: Request) -> dict[str, Any]:
    """Server metadata."""
    return {"name": "pathguard", "version": metadata.version("pathguard"), "extensions": []}


@router.get("/models/{name}", responses=_ERRORS)
async def model_metadata(name: str, state: Ready) -> dict[str, Any]:
    """Model metadata: the input tensor and the outputs ``infer`` returns."""
    b, p = _model(state, name), state.runtime.pipeline
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
    available = _outputs(state)
    shapes |= {n: [-1] for n in SUPERVISED_OUTPUTS if n in available}
    return {
        "name": b.name,
        "versions": [str(b.version)],
        "platform": f"pathguard-{state.settings.engine}",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *b.input_shape]}],
        "outputs": [{"name": n, "datatype": available[n][0], "shape": s} for n, s in shapes.items()],
        "parameters": {
            "path_similarity_layers": layers,
            "value_violation_layers": list(p.nic_value_layers),
            "provenance_violation_pairs": list(p.nic_provenance_pairs),
            "classes": list(b.classes),
        },
    }


@router.get("/models/{name}/ready", responses=_ERRORS)
async def model_ready(name: str, request: Request) -> dict[str, Any]:
    """200 once the model is loaded and warmed up; 503 before."""
    _model(ready_state(request), name)
    return {"name": name, "ready": True}


@router.post("/models/{name}/infer", response_model=InferResponse, responses=_ERRORS)
async def infer(name: str, body: InferRequest, request: Request, state: Ready) -> JSONResponse:
    """Inference on an FP32 tensor (N, C, H, W) in [0, 1]."""
    return await _infer(name, None, body, request, state)


@router.post("/models/{name}/versions/{version}/infer", response_model=InferResponse, responses=_ERRORS)
async def infer_version(name: str, version: str, body: InferRequest, request: Request, state: Ready) -> JSONResponse:
    """Inference on a named version (only the served one exists)."""
    return await _infer(name, version, body, request, state)


async def _infer(name: str, version: str | None, body: InferRequest, request: Request, state: Ready) -> JSONResponse:
    b = _model(state, name)
    if version is not None and version != str(b.version):
        raise NotFound(f"model {name!r} has no version {version!r}; served: {b.version}")
    if len(body.inputs) != 1:
        raise BadInput(f"expected exactly one input tensor, got {len(body.inputs)}")
    available = _outputs(state)
    wanted = _requested(body, available)
    tensor = body.inputs[0]
    assert state.spec is not None
    if tensor.shape and tensor.shape[0] > state.settings.max_request_images:
        raise PayloadTooLarge(f"at most {state.settings.max_request_images} images per request")
    x = tensor_from_oip(tensor.shape, tensor.datatype, tensor.data, state.spec)
    rid = request_id(request, body.id)
    rows = await detect_tensor(state, rid, x)
    with_verdict = rows[0].get("verdict") is not None
    outputs = [_output(n, rows, available[n][0]) for n in wanted if with_verdict or not available[n][1]]
    params = {"mode": state.settings.mode, "bundle_sha256": b.sha256}
    if with_verdict:
        v = rows[0]["verdict"]
        params.update(threshold=v["threshold"], target_fpr=v["target_fpr"])
    resp = {"model_name": b.name, "model_version": str(b.version), "id": rid, "outputs": outputs, "parameters": params}
    return JSONResponse(resp, headers={"X-Request-ID": rid})


def _requested(body: InferRequest, available: dict[str, tuple[str, bool]]) -> list[str]:
    if not body.outputs:
        return list(available)
    names = [o.name for o in body.outputs]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise BadInput(f"unknown output {unknown[0]!r}; available: {', '.join(available)}")
    return names


def _column(name: str, row: dict[str, Any]) -> list[Any]:
    if name == "predicted_class":
        return [row["prediction"]["class_index"]]
    if name == "probabilities":
        return list(row["prediction"]["probabilities"])
    if name == "is_adversarial":
        return [bool(row["verdict"]["adversarial"])]
    if name == "instance_score":
        return [row["verdict"]["score"]]
    if name == "p_value":
        return [row["verdict"]["p_value"]]
    if name == "supervised_is_adversarial":
        return [bool(row["supervised"]["adversarial"])]
    if name == "supervised_score":
        return [row["supervised"]["score"]]
    if name == "path_similarity":
        return list(row["effective_path"]["rank1_similarity"])
    if name == "value_violation":
        return list(row["nic"]["value_violation"].values())
    return list(row["nic"]["provenance_violation"].values())


def _output(name: str, rows: list[dict[str, Any]], datatype: str) -> dict[str, Any]:
    cols = [_column(name, r) for r in rows]
    width = len(cols[0])
    shape = [len(rows)] if name in _SCALAR else [len(rows), width]
    data = [float(v) if datatype == "FP32" else v for c in cols for v in c]
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}
