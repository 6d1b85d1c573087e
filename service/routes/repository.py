"""The Open Inference Protocol's model repository extension (as Triton serves it): index, load, unload."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request

from pathguard.service.errors import BadInput, NotReady
from pathguard.service.schemas import ErrorBody
from pathguard.service.state import ServiceState, get_state, require_api_key

router = APIRouter(prefix="/v2/repository", tags=["model repository"], dependencies=[Depends(require_api_key)])
State = Annotated[ServiceState, Depends(get_state)]
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (400, 401, 503)}
_MAX_BODY = 64 * 1024


async def _json_body(request: Request) -> dict[str, Any]:
    """The optional JSON object body of a repository request ({} when empty)."""
    raw = await request.body()
    if not raw.strip():
        return {}
    if len(raw) > _MAX_BODY:
        raise BadInput(f"repository request bodies are at most {_MAX_BODY} bytes")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadInput("request body must be a JSON object")
    return body


def _manager(state: ServiceState) -> Any:
    if state.models is None:
        raise NotReady("the server is starting", state.settings.retry_after_s)
    return state.models


@router.post("/index", responses=_ERRORS)
async def index(request: Request, state: State) -> list[dict[str, Any]]:
    """Every model of the repository and every loaded model: ``name``, ``version`` (when known), ``state``
    (READY, LOADING, UNLOADING, UNAVAILABLE) and ``reason`` (why a load failed, or "unloaded"). Body
    ``{"ready": true}``: only the READY ones."""
    body = await _json_body(request)
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        raise BadInput("'ready' must be true or false")
    rows: list[dict[str, Any]] = await _manager(state).index(ready_only=ready)
    return rows


@router.post("/models/{name}/load", responses=_ERRORS)
async def load(name: str, request: Request, state: State) -> dict[str, Any]:
    """Load (or reload) ``name`` from the repository (explicit control mode). The new bundle is verified, loaded
    and warmed up beside the version serving now, then swapped in; if it fails, 400 with the reason and the old
    version keeps serving."""
    await _json_body(request)  # parameters are accepted and ignored, as the protocol allows
    manager = _manager(state)
    manager.check_explicit("load")
    served = await manager.load(name)
    return {"name": name, "version": served.version, "bundle_sha256": served.sha256, "state": "READY"}


@router.post("/models/{name}/unload", responses=_ERRORS)
async def unload(name: str, request: Request, state: State) -> dict[str, Any]:
    """Stop serving ``name`` (explicit control mode); the requests already on it finish first."""
    await _json_body(request)
    manager = _manager(state)
    manager.check_explicit("unload")
    await manager.unload(name)
    return {"name": name, "state": "UNAVAILABLE"}
