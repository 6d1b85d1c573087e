"""CloudEvents in and out: payload-logger events (KServe, Seldon) become images to check, detection bodies become
``pathguard.detection.result`` events.

In: ``POST /`` (where a Knative trigger delivers, as for alibi-detect-server) takes a CloudEvent in binary content
mode (``ce-*`` headers, the logged request as the body) or in structured mode (one ``application/cloudevents+json``
body), parsed by the ``cloudevents`` SDK. Request events (``org.kubeflow.serving.inference.request``,
``io.seldon.serving.inference.request``) carry the model's request: V1 ``{"instances": [...]}``, V2 (Open Inference
Protocol) ``{"inputs": [...]}`` or Seldon's ``{"data": {...}}``, with the images as tensors or base64 PNG/JPEG.
Response events (``...inference.response``) carry no input: they are acknowledged and counted only.

Every size is bounded as on the other routes: the body by ``PATHGUARD_MAX_BODY_BYTES``, the images per event by
``PATHGUARD_MAX_REQUEST_IMAGES``, each tensor's element count by the bundle's input shape, each image's pixels by
``PATHGUARD_MAX_IMAGE_PIXELS``. Parsing and decoding run on a worker thread (:func:`parse_event`).

Out: :class:`EventRelay` runs an accepted event's detection in the background through the detection batcher and
turns each image's verdict body into a result CloudEvent (the request id and the logger's ``inferenceservicename``,
``namespace``, ... extensions carried over) for the sink (:mod:`pathguard.service.sink`); the verdicts reach the
metrics and the flagged stream like any other.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import orjson
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.http import HTTPMessage, from_binary, from_structured
from cloudevents.core.exceptions import BaseCloudEventException, CloudEventValidationError
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from pathguard.service.cache import Entry
from pathguard.service.detection import Upload, detect_queued
from pathguard.service.errors import BadInput, Overloaded, PayloadTooLarge, ServiceError
from pathguard.service.inputs import InputSpec, decode_image
from pathguard.service.protocol import decode_input
from pathguard.service.responses import DetectResponse
from pathguard.service.served import ServedModel
from pathguard.service.sink import EventSink
from pathguard.service.state import ServiceState

__all__ = [
    "CARRIED_EXTENSIONS",
    "REQUEST_TYPES",
    "RESPONSE_TYPES",
    "RESULT_TYPE",
    "EventRelay",
    "LoggerEvent",
    "parse_event",
    "result_event",
]

log = logging.getLogger("pathguard.service")

REQUEST_TYPES = ("org.kubeflow.serving.inference.request", "io.seldon.serving.inference.request")
RESPONSE_TYPES = ("org.kubeflow.serving.inference.response", "io.seldon.serving.inference.response")
RESULT_TYPE = "pathguard.detection.result"
# Logger extensions copied onto every result event (KServe: inferenceservicename, namespace, component, endpoint;
# Seldon also modelid, predictor; W3C trace context).
CARRIED_EXTENSIONS = (
    "inferenceservicename",
    "namespace",
    "component",
    "endpoint",
    "modelid",
    "predictor",
    "traceparent",
    "tracestate",
)
STRUCTURED = "application/cloudevents+json"
_MAX_ATTRIBUTE_CHARS = 256
_FORMAT = JSONFormat()


@dataclass
class LoggerEvent:
    """One payload-logger event: its attributes and, for a request event, the decoded images."""

    id: str
    type: str
    kind: Literal["request", "response"]
    request_id: str  # Seldon's ``requestid`` extension, else the event id (KServe's logger uses the request id)
    carried: dict[str, str] = field(default_factory=dict)  # extensions of CARRIED_EXTENSIONS present on the event
    x: np.ndarray | None = None  # (N, C, H, W) float32 in [0, 1]; None for a response event
    uploads: list[Upload] = field(default_factory=list)  # what the flagged stream keeps of each image
    decode_s: float = 0.0  # parsing and decoding, per image
    model: Any = None  # the ServedModel that checks a request event's images

    @property
    def images(self) -> int:
        return 0 if self.x is None else len(self.x)


# --------------------------------------------------------------------------------------------------- in


def parse_event(
    headers: Mapping[str, str], body: bytes, pick: Callable[[dict[str, str]], ServedModel], max_images: int
) -> LoggerEvent:
    """A payload-logger CloudEvent from an HTTP request, its images decoded (runs on a worker thread) for the model
    ``pick(carried)`` chooses from the event's carried extensions (``inferenceservicename`` among them).

    Raises
    ------
    BadInput
        Not a CloudEvent, not a logger event type, or data without images in a known form.
    PayloadTooLarge
        More than ``max_images`` images, or an image over the pixel limit.
    UnprocessableInput, UnsupportedMediaType
        An image that does not fit the bundle's input, or is neither PNG nor JPEG.
    """
    t0 = time.perf_counter()
    event = _cloudevent({k.lower(): v for k, v in headers.items()}, body)
    attrs = event.get_attributes()
    etype = event.get_type()
    if etype not in REQUEST_TYPES + RESPONSE_TYPES:
        accepted = ", ".join(REQUEST_TYPES + RESPONSE_TYPES)
        raise BadInput(f"event type {etype!r} is not a payload-logger type; accepted: {accepted}")
    carried = {k: attrs[k] for k in CARRIED_EXTENSIONS if isinstance(attrs.get(k), str) and attrs[k]}
    requestid = attrs.get("requestid")
    rid = requestid if isinstance(requestid, str) and requestid else event.get_id()
    for name, value in [("id", event.get_id()), ("requestid", rid), *carried.items()]:
        if len(value) > _MAX_ATTRIBUTE_CHARS:
            raise BadInput(f"event attribute {name!r} is longer than {_MAX_ATTRIBUTE_CHARS} characters")
    out = LoggerEvent(event.get_id(), etype, "request", rid, carried)
    if etype in RESPONSE_TYPES:
        out.kind = "response"
        return out
    out.model = pick(carried)
    out.x, out.uploads = _images(_payload(event.get_data()), out.model.spec, max_images)
    out.decode_s = (time.perf_counter() - t0) / len(out.x)
    return out


def _cloudevent(headers: dict[str, str], body: bytes) -> BaseCloudEvent:
    """The CloudEvent of a request in binary mode (``ce-*`` headers) or structured mode, read by the SDK."""
    message = HTTPMessage(headers, body)
    binary = any(k.startswith("ce-") for k in headers)
    ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if not binary and ctype != STRUCTURED:
        raise BadInput(
            f"not a CloudEvent: send ce-* headers (binary content mode) or Content-Type {STRUCTURED} "
            f"(structured content mode); got Content-Type {ctype or '(none)'!r} and no ce-* header"
        )
    if not binary and not body.lstrip()[:1] == b"{":
        raise BadInput("structured CloudEvent body must be a JSON object")
    try:
        if binary:
            return from_binary(message, _FORMAT)
        return from_structured(message, _FORMAT)
    except CloudEventValidationError as exc:
        problems = "; ".join(f"{name}: {errors[0]}" for name, errors in exc.errors.items())
        raise BadInput(f"not a valid CloudEvent: {problems}") from None
    # the SDK's other errors: JSON, time or base64 syntax; wrong JSON types; absurd nesting
    except (BaseCloudEventException, ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise BadInput(f"not a valid CloudEvent: {exc}") from None


def _payload(data: object) -> dict[str, Any]:
    """The logged inference request as a JSON object (the SDK leaves non-JSON content types as text or bytes)."""
    if isinstance(data, str | bytes) and data:
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise BadInput(f"event data is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadInput("event data must be a JSON inference request object (V1 instances, V2 inputs or Seldon data)")
    return data


def _images(payload: dict[str, Any], spec: InputSpec, max_images: int) -> tuple[np.ndarray, list[Upload]]:
    """Images (N, C, H, W) of a V2, V1 or Seldon request body, with what the flagged stream keeps of each."""
    if "inputs" in payload:
        return _v2(payload["inputs"], spec, max_images)
    if "instances" in payload:
        return _instances(payload["instances"], spec, max_images, "instances")
    seldon = payload.get("data")
    if isinstance(seldon, dict):
        return _seldon(seldon, spec, max_images)
    raise BadInput("event data holds no images: expected V1 'instances', V2 'inputs' or Seldon 'data'")


def _v2(inputs: object, spec: InputSpec, max_images: int) -> tuple[np.ndarray, list[Upload]]:
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        count = len(inputs) if isinstance(inputs, list) else 0
        raise BadInput(f"expected exactly one input tensor, got {count}")
    tensor = inputs[0]
    datatype = tensor.get("datatype")
    if isinstance(datatype, str) and datatype.upper() == "BYTES":
        data = tensor.get("data")
        if not isinstance(data, list) or not data:
            raise BadInput("a BYTES input needs 'data': a list of base64-encoded PNG/JPEG images")
        _count(len(data), max_images)
        return _stack([_image(item, i, spec) for i, item in enumerate(data)])
    dtype = datatype if isinstance(datatype, str) else ""
    x = decode_input(tensor.get("shape", []), dtype, spec, max_images, tensor.get("data"))
    return x, _tensor_uploads(x)


def _seldon(data: dict[str, Any], spec: InputSpec, max_images: int) -> tuple[np.ndarray, list[Upload]]:
    if "ndarray" in data:
        return _instances(data["ndarray"], spec, max_images, "data.ndarray")
    if isinstance(data.get("tensor"), dict):
        tensor = data["tensor"]
        x = decode_input(tensor.get("shape", []), "FP32", spec, max_images, tensor.get("values"))
        return x, _tensor_uploads(x)
    if "binData" in data:
        return _stack([_image(data["binData"], 0, spec)])
    raise BadInput("Seldon data needs 'ndarray', 'tensor' or 'binData'")


def _instances(items: object, spec: InputSpec, max_images: int, where: str) -> tuple[np.ndarray, list[Upload]]:
    """V1 instances: each a tensor (C, H, W), (H, W, C) or, for one channel, (H, W) of numbers in [0, 1], or a
    base64 PNG/JPEG (a string, ``{"b64": ...}``, ``{"<name>": {"b64": ...}}`` or TorchServe's ``{"data": ...}``)."""
    if not isinstance(items, list) or not items:
        raise BadInput(f"'{where}' must be a non-empty list")
    _count(len(items), max_images)
    arrays: list[np.ndarray] = []
    uploads: list[Upload] = []
    for i, item in enumerate(items):
        if isinstance(item, list):
            arrays.append(_instance_tensor(item, i, spec))
            uploads.extend(_tensor_uploads(arrays[-1][None]))
        else:
            x, (upload,) = _stack([_image(item, i, spec)])
            arrays.append(x[0])
            uploads.append(upload)
    return np.stack(arrays), uploads  # (N, C, H, W)


def _instance_tensor(item: list[Any], i: int, spec: InputSpec) -> np.ndarray:
    c, h, w = spec.shape
    dims: list[int] = []
    node: object = item
    while isinstance(node, list) and len(dims) <= 4:
        dims.append(len(node))
        node = node[0] if node else None
    layouts: dict[tuple[int, ...], str] = {(c, h, w): "chw", (h, w, c): "hwc"} | ({(h, w): "chw"} if c == 1 else {})
    layout = layouts.get(tuple(dims))
    if layout is None:
        want = f"({c}, {h}, {w}), ({h}, {w}, {c})" + (f" or ({h}, {w})" if c == 1 else "")
        raise BadInput(f"instance {i} has shape {tuple(dims)}; expected {want}")
    try:
        x = decode_input([1, c, h, w], "FP32", spec, 1, item)  # checks the element count, types and range
    except BadInput as exc:
        hint = "; send 0-255 pixels as a V2 UINT8 tensor or a base64 image" if "[0, 1]" in exc.message else ""
        raise BadInput(f"instance {i}: {exc.message}{hint}") from None
    if layout == "hwc":
        x = np.ascontiguousarray(x.reshape(h, w, c).transpose(2, 0, 1))  # (H, W, C) -> (C, H, W)
    return x.reshape(c, h, w)


def _image(item: object, i: int, spec: InputSpec) -> tuple[np.ndarray, Upload]:
    """One base64 PNG/JPEG, decoded to (C, H, W)."""
    text = _b64_text(item)
    if text is None:
        raise BadInput(f"instance {i} is neither a tensor nor a base64 image")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"instance {i}: image is not valid base64") from None
    try:
        x = decode_image(data, spec)
    except ServiceError as exc:
        exc.message = f"instance {i}: {exc.message}"
        raise
    ctype = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"  # decode_image takes nothing else
    return x, Upload(data, None, ctype)


def _b64_text(item: object) -> str | None:
    if isinstance(item, str):
        return item
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("b64"), str):
        return str(item["b64"])
    if isinstance(item.get("data"), str):  # TorchServe's KServe payload
        return str(item["data"])
    if len(item) == 1:  # TF Serving / KServe: {"image_bytes": {"b64": "..."}}
        (inner,) = item.values()
        if isinstance(inner, dict) and isinstance(inner.get("b64"), str):
            return str(inner["b64"])
    return None


def _stack(decoded: list[tuple[np.ndarray, Upload]]) -> tuple[np.ndarray, list[Upload]]:
    return np.stack([x for x, _ in decoded]), [u for _, u in decoded]  # (N, C, H, W)


def _count(n: int, max_images: int) -> None:
    if n > max_images:
        raise PayloadTooLarge(f"at most {max_images} images per event, got {n}")


def _tensor_uploads(x: np.ndarray) -> list[Upload]:
    """What the flagged stream keeps of tensor inputs: each image's float32 bytes (as for OIP requests)."""
    ctype = "application/x-pathguard-fp32; shape=" + ",".join(map(str, x.shape[1:]))
    return [Upload(np.ascontiguousarray(img, dtype=np.float32).tobytes(), None, ctype) for img in x]


# --------------------------------------------------------------------------------------------------- out


def result_event(body: DetectResponse, event: LoggerEvent, source: str) -> CloudEvent:
    """The ``pathguard.detection.result`` CloudEvent of one image's detection body.

    ``id`` is the body's id (the request id, ``-<j>`` appended for the j-th image of a several-image event);
    extensions: ``requestid``, ``adversarial`` (``"true"``/``"false"``, for trigger filters) and the logger
    extensions of :data:`CARRIED_EXTENSIONS` the event had. The data is the detection body (``/v1/detect``'s
    shape)."""
    verdict = body.verdict
    attributes: dict[str, Any] = {
        "type": RESULT_TYPE,
        "source": source,
        "id": body.id,
        "time": datetime.now(UTC),
        "datacontenttype": "application/json",
        "requestid": event.request_id,
        "adversarial": "true" if verdict is not None and verdict.adversarial else "false",
        **event.carried,
    }
    return CloudEvent(attributes, body.model_dump(mode="json", exclude_unset=True))


class EventRelay:
    """Accepted logger events -> background detections -> result events for the sink.

    At most ``PATHGUARD_EVENTS_BACKLOG`` events may wait for their detection; :meth:`accept` raises
    :class:`Overloaded` (503 + Retry-After) beyond that, or when the detection queue is full, and counts the
    refusal. Every image of an accepted event ends as one result event (counted), or as a counted drop:
    ``detection_failed``, ``shadow_backlog`` (shadow mode's backlog was full), ``unfinished`` (still pending at
    shutdown).
    """

    def __init__(self, state: ServiceState, sink: EventSink | None, source: str | None) -> None:
        self.state = state
        self.sink = sink
        self.source = source  # None: /pathguard/<model name>
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def accept(self, event: LoggerEvent) -> None:
        """Queue a request event's images for detection now (never waits); its results follow in the background."""
        s, m = self.state.settings, self.state.metrics
        assert event.x is not None
        if self.pending >= s.events_backlog:
            m.events_rejected.inc()
            message = f"{s.events_backlog} logger events are waiting for detection; retry later"
            raise Overloaded(message, s.retry_after_s)
        served: ServedModel = event.model
        served.acquire()  # held until the detection is recorded: a swap lets it finish on this version
        try:
            queued = served.detect_batcher.enqueue(event.x)
        except Overloaded:
            served.release()
            m.events_rejected.inc()
            raise
        except BaseException:
            served.release()
            raise
        task = asyncio.get_running_loop().create_task(self._finish(event, queued, time.perf_counter()))
        self._tasks.add(task)
        m.events_pending.set(self.pending)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.state.metrics.events_pending.set(self.pending)

    async def _finish(self, event: LoggerEvent, queued: asyncio.Future[Any], t0: float) -> None:
        m = self.state.metrics
        ids = [event.request_id] if event.images == 1 else [f"{event.request_id}-{j}" for j in range(event.images)]
        extra: Entry = {"source": "event", "event_type": event.type, **event.carried}
        served: ServedModel = event.model
        try:
            bodies = await detect_queued(served, ids, event.uploads, queued, event.decode_s, t0, extra)
        except asyncio.CancelledError:
            m.events_dropped.labels(reason="unfinished").inc(event.images)
            raise
        except Exception:
            log.exception("detection of logger event %s failed", event.id)
            m.events_dropped.labels(reason="detection_failed").inc(event.images)
            return
        finally:
            served.release()
        if bodies is None:
            m.events_dropped.labels(reason="shadow_backlog").inc(event.images)
            return
        for body in bodies:
            m.event_results.inc()
            if self.sink is not None:
                self.sink.offer(result_event(body, event, self.source or f"/pathguard/{served.name}"))

    async def close(self, timeout_s: float) -> None:
        """Let pending detections finish (at most ``timeout_s``; the rest are counted as ``unfinished``), then
        deliver what waits for the sink within what is left of ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in late:
                task.cancel()
            for task in late:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.sink is not None:
            await self.sink.close(max(0.0, deadline - time.monotonic()))
