"""``POST /``: payload-logger CloudEvents (KServe, Seldon), answered at once; the results follow as CloudEvents."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from pathguard.service.events import parse_event
from pathguard.service.responses import EventAccepted, ModelResponse
from pathguard.service.schemas import ErrorBody
from pathguard.service.served import ServedModel
from pathguard.service.state import ServiceState, get_state, requested_model, require_api_key

router = APIRouter(tags=["events"], dependencies=[Depends(require_api_key)])
State = Annotated[ServiceState, Depends(get_state)]
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
async def receive_event(request: Request, state: State) -> ModelResponse:
    """A payload-logger CloudEvent: a request event's images are queued for detection and the answer is sent at
    once (202); each image's result goes out as a ``pathguard.detection.result`` CloudEvent to
    ``PATHGUARD_EVENTS_SINK``, to the flagged stream and to the metrics. A response event is only counted."""
    body = await request.body()
    headers = dict(request.headers)
    named = requested_model(request)

    def pick(carried: dict[str, str]) -> ServedModel:
        # ?model= / X-Pathguard-Model, else the logged inference service when it is a model served here, else
        # the only model served
        service = carried.get("inferenceservicename")
        served = state.models.models if state.models is not None else {}
        return state.model(named or (service if service in served else None))

    event = await run_in_threadpool(parse_event, headers, body, pick, state.settings.max_request_images)
    status = "ignored"
    if event.kind == "request":
        state.events.accept(event)
        status = "accepted"
    state.metrics.events_received.labels(type=event.kind).inc()
    ack = EventAccepted(id=event.id, request_id=event.request_id, type=event.type, status=status, images=event.images)
    return ModelResponse(ack, status_code=202)
