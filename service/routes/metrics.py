"""Prometheus text exposition of the app's dedicated registry."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pathguard.service.state import get_state, require_api_key

router = APIRouter(tags=["metrics"], dependencies=[Depends(require_api_key)])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """All ``pathguard_*`` metrics in the Prometheus text format."""
    registry = get_state(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
