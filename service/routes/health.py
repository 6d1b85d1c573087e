"""Liveness and readiness (never behind the API key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from pathguard.service.errors import NotReady
from pathguard.service.state import get_state

router = APIRouter(tags=["health"])


@router.get("/v2/health/live")
async def live() -> dict[str, Any]:
    """The process is up."""
    return {"live": True}


@router.get("/v2/health/ready", responses={503: {"description": "bundle not loaded or warming up"}})
async def ready(request: Request) -> dict[str, Any]:
    """The bundle is verified, loaded and warmed up."""
    state = get_state(request)
    if not state.ready:
        raise NotReady("bundle is not loaded yet", state.settings.retry_after_s)
    return {"ready": True}
