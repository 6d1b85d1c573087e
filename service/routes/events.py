"""``POST /``: payload-logger CloudEvents (KServe, Seldon), answered at once; the results follow as CloudEvents."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from pathguard.service.events import parse_event
from pathguard.service.responses import EventAccepted, ModelResponse
from pathguard.service.schemas import ErrorBody
from pathguard.service.state import ServiceState, ready_state, require_api_key

router = APIRouter(tags=["events"], dependencies=[Depends(require_api_key)])
Ready = Annotated[ServiceState, Depends(ready_state)]
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (400, 401, 413, 415, 422, 503)}
_EVENT_BODY = {
    "requestBody": {
        "required": True,
        "description": "Binary content mode: ce-* headers and the logged inference request (V1 instances, V2 "
        "inputs, Seldon data) as the JSON body. Structured content mode: the whole event as "
        "application/cloudevents+json.",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/cloudevents+json": {"schema": {"type": "object"}},
        },
    }
}


@router.post("/", status_code=202, response_model=EventAccepted, responses=_ERRORS, openapi_extra=_EVENT_BODY)
async def receive_event(request: Request, state: Ready) -> ModelResponse:
    """A payload-logger CloudEvent: a request event's images are queued for detection and the answer is sent at
    once (202); each image's result goes out as a ``pathguard.detection.result`` CloudEvent to
    ``PATHGUARD_EVENTS_SINK``, to the flagged stream and to the metrics. A response event is only counted."""
    assert state.spec is not None
    body = await request.body()
    headers = dict(request.headers)
    event = await run_in_threadpool(parse_event, headers, body, state.spec, state.settings.max_request_images)
    status = "ignored"
    if event.kind == "request":
        state.events.accept(event)
        status = "accepted"
    state.metrics.events_received.labels(type=event.kind).inc()
    ack = EventAccepted(id=event.id, request_id=event.request_id, type=event.type, status=status, images=event.images)
    return ModelResponse(ack, status_code=202)
