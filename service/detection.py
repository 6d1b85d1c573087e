"""Request handling shared by the REST and OIP routes: reading images, cache, batching, recording; the bodies are
built by :mod:`pathguard.service.responses`."""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import numpy as np
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from pathguard.service.cache import Entry
from pathguard.service.errors import BadInput, PayloadTooLarge
from pathguard.service.inputs import check_media_type, decode_images
from pathguard.service.responses import (
    DetectResponse,
    ModelRef,
    PredictResponse,
    cacheable,
    cached_response,
    detect_response,
    predict_response,
    prediction,
)
from pathguard.service.runtime import BatchSlice, Detected, ShadowStarted
from pathguard.service.served import ServedModel

__all__ = [
    "Upload",
    "detect_queued",
    "detect_tensor",
    "detect_uploads",
    "model_ref",
    "predict_uploads",
    "read_uploads",
]


@dataclass
class Upload:
    """One image as sent: bytes, the declared format (or None) and its sha256 (hashed once, on first use)."""

    data: bytes
    declared: str | None
    content_type: str

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


# --------------------------------------------------------------------------------------------------- reading


async def read_uploads(request: Request, served: ServedModel, field: str, many: bool) -> list[Upload]:
    """Images from a raw PNG/JPEG body or from multipart field ``field`` (all its files when ``many``)."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() == "multipart/form-data":
        uploads = await _read_multipart(request, served, field)
        if not many and len(uploads) > 1:
            raise BadInput(f"send one image in field {field!r}; use /v1/detect/batch for several")
        return uploads
    declared = check_media_type(ctype)
    data = await request.body()
    if not data:
        raise BadInput("empty request body")
    return [Upload(data, declared, ctype)]


async def _read_multipart(request: Request, served: ServedModel, field: str) -> list[Upload]:
    limit = served.settings.max_request_images
    try:
        form = await request.form(max_files=limit + 1, max_fields=limit + 16)
    except StarletteHTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise PayloadTooLarge(f"at most {limit} images per request") from None
        raise BadInput(f"malformed multipart body: {exc.detail}") from None
    parts = form.getlist(field)
    if not parts:
        raise BadInput(f"multipart field {field!r} is missing")
    if len(parts) > limit:
        raise PayloadTooLarge(f"at most {limit} images per request, got {len(parts)}")
    uploads = []
    for part in parts:
        if not isinstance(part, UploadFile):
            raise BadInput(f"multipart field {field!r} must be a file")
        declared = check_media_type(part.content_type, allow_octet_stream=True)
        uploads.append(Upload(await part.read(), declared, part.content_type or "application/octet-stream"))
    await form.close()
    return uploads


async def _decode_all(served: ServedModel, uploads: list[Upload]) -> np.ndarray:
    """Decode every upload into one float32 (n, C, H, W) array on a worker thread, never on the event loop: the
    compressed size says nothing about the decode cost (a 12 KB PNG can hold 4 megapixels of one colour)."""
    assert served.spec is not None
    return await run_in_threadpool(decode_images, [(up.data, up.declared) for up in uploads], served.spec)


# --------------------------------------------------------------------------------------------------- bodies


def model_ref(served: ServedModel) -> ModelRef:
    """The model as responses name it: the repository's name and served version (with PATHGUARD_BUNDLE, the
    bundle's own), and the bundle id."""
    return ModelRef(name=served.name, version=served.version, bundle_sha256=served.sha256)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _timings(decode_s: float, sl: BatchSlice[Any], classify_s: float, det: Detected | None, t0: float) -> dict:
    """A response's ``timings_ms``: its own decode and queue time, its batch's forward pass (``classify``) and,
    for a detection, the batch's ``checks`` (forward pass end to verdict) with the parts measured inside it:
    ``checks_wait`` (waiting for per-layer checks still running beside it) and the components' own stages
    (``nic``, ``effective_path``, and where the bundle has them ``mahalanobis`` and ``consistency``, the
    consistency copies' forward pass)."""
    out = {"decode": _ms(decode_s), "queue": _ms(sl.queue_s), "classify": _ms(classify_s)}
    if det is not None:
        out["checks"] = _ms(det.checks_s)
        out["checks_wait"] = _ms(det.wait_s)
        stages = dict(det.result.timings_s)
        out.update({key: _ms(seconds) for key, seconds in stages.items()})
    out["total"] = _ms(time.perf_counter() - t0)
    return out


def _record(served: ServedModel, body: DetectResponse) -> None:
    """Verdict and per-layer metrics of one image's detection."""
    ep, nic, verdict = body.effective_path, body.nic, body.verdict
    assert verdict is not None
    served.metrics.observe_detection(  # a part left out of the answer (PATHGUARD_REPORTED_COMPONENTS) records nothing
        verdict.adversarial,
        verdict.score,
        ep.layers if ep is not None else [],
        ep.rank1_similarity if ep is not None else [],
        nic.value_violation if nic is not None else {},
        nic.provenance_violation if nic is not None else {},
    )


def _flag_entry(
    served: ServedModel, image_sha: str, payload: bytes, ctype: str, body: DetectResponse, extra: Entry | None = None
) -> Entry:
    verdict, pred, ep, nic = body.verdict, body.prediction, body.effective_path, body.nic
    assert verdict is not None
    entry: Entry = {
        "id": body.id,
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "bundle": served.bundle.sha256,
        "bundle_name": served.bundle.name,
        "image_sha256": image_sha,
        "class_index": str(pred.class_index),
        "label": str(pred.label),
        "confidence": repr(pred.confidence),
        "score": repr(verdict.score),
        "threshold": repr(verdict.threshold),
        "p_value": repr(verdict.p_value),
        **({"effective_path_score": repr(ep.score)} if ep is not None else {}),  # absent when not reported
        **({"nic_score": repr(nic.score)} if nic is not None else {}),
        "mode": served.settings.mode,
        "content_type": ctype,
        "image_size": str(len(payload)),
        **(extra or {}),
    }
    if len(payload) <= served.settings.stream_image_max_bytes:
        entry["image"] = payload
    else:
        entry["image_omitted"] = "1"
    return entry


async def _after_detection(
    served: ServedModel, items: list[tuple[Upload, DetectResponse]], cache: bool, extra: Entry | None = None
) -> None:
    """Cache writes and flagged-stream entries (with the fields of ``extra``), off the response path."""
    assert served.store is not None
    for up, body in items:
        if cache:
            await served.store.put_verdict(up.sha256, cacheable(body))
        if body.verdict is not None and body.verdict.adversarial:
            await served.store.flag(_flag_entry(served, up.sha256, up.data, up.content_type, body, extra))


def _same_threshold(cached: dict[str, Any], threshold: float) -> bool:
    """A cached verdict is reused only at the current operating point (responses round to 6 decimals)."""
    value = (cached.get("verdict") or {}).get("threshold")
    return isinstance(value, float | int) and abs(float(value) - threshold) <= 1e-6


# --------------------------------------------------------------------------------------------------- flows


async def predict_uploads(served: ServedModel, rid: str, uploads: list[Upload]) -> PredictResponse:
    """Classification only: the baseline for the detection overhead."""
    t0 = time.perf_counter()
    x = await _decode_all(served, uploads)
    decode_s = time.perf_counter() - t0
    sl = await served.predict_batcher.submit(x)
    probs = sl.batch.probabilities[sl.start]
    served.metrics.observe_stages({"decode": decode_s, "classify": sl.batch.classify_s})
    timings = _timings(decode_s, sl, sl.batch.classify_s, None, t0)
    served.metrics.observe_stages({"total": timings["total"] / 1000.0})
    served.observe(timings)
    return predict_response(rid, model_ref(served), prediction(served.bundle.classes, probs), timings)


async def detect_uploads(
    served: ServedModel, rid: str, uploads: list[Upload], item_ids: bool = False
) -> list[DetectResponse]:
    """Detection for each upload, in order: cache hits answered from the cache, the rest batched together.

    Every upload is decoded (and so validated) before the cache is consulted: a cached verdict is only returned
    for input that passes the same checks as a fresh one. With ``item_ids`` (the batch route) the i-th result's
    id is ``<rid>-<i>``; otherwise every result carries ``rid``.
    """
    t0 = time.perf_counter()
    x = await _decode_all(served, uploads)  # (n, C, H, W)
    decode_s = (time.perf_counter() - t0) / len(uploads)
    served.metrics.observe_stages({"decode": decode_s})
    ids = [f"{rid}-{i}" for i in range(len(uploads))] if item_ids else [rid] * len(uploads)
    use_cache = served.settings.cache and served.settings.mode == "enforce"
    bodies: list[DetectResponse | None] = [None] * len(uploads)
    if use_cache:
        for i, up in enumerate(uploads):
            bodies[i] = await _cached(served, ids[i], up, decode_s)
    todo = [i for i, b in enumerate(bodies) if b is None]
    if todo:
        fresh = await _detect(
            served, [ids[i] for i in todo], [uploads[i] for i in todo], x[todo], decode_s, t0, use_cache
        )
        for i, body in zip(todo, fresh, strict=True):
            bodies[i] = body
    total = time.perf_counter() - t0
    served.metrics.observe_stages({"total": total})
    return [b for b in bodies if b is not None]


async def _cached(served: ServedModel, rid: str, up: Upload, decode_s: float) -> DetectResponse | None:
    t0 = time.perf_counter()
    hit = await served.store.get_verdict(up.sha256)
    lookup_s = time.perf_counter() - t0
    body = None
    if hit is not None and _same_threshold(hit, served.runtime.pipeline.threshold):
        # None for an entry of another response shape: a miss, overwritten by the fresh detection
        body = cached_response(rid, model_ref(served), hit, {"decode": _ms(decode_s), "cache": _ms(lookup_s)})
    served.stats.add("cache_miss" if body is None else "cache_hit", lookup_s)
    if body is None:
        return None
    served.observe({"decode": body.timings_ms["decode"]})
    _record(served, body)
    if body.verdict is not None and body.verdict.adversarial:
        served.spawn(served.store.flag(_flag_entry(served, up.sha256, up.data, up.content_type, body)))
    return body


async def _detect(
    served: ServedModel,
    ids: list[str],
    uploads: list[Upload],
    x: np.ndarray,
    decode_s: float,
    t0: float,
    use_cache: bool,
) -> list[DetectResponse]:
    """Detection of the decoded images ``x`` (n, C, H, W), enforce and shadow mode alike; ``ids[j]`` is the id of
    the j-th body. Enforce: the bodies carry the verdict, recorded now. Shadow: they carry the prediction only; the
    verdict is recorded once the detection finishes, off the response path."""
    sl = await served.detect_batcher.submit(x)
    det = None if isinstance(sl.batch, ShadowStarted) else sl.batch
    classified = sl.batch.classified if isinstance(sl.batch, ShadowStarted) else sl.batch
    mode = "shadow" if det is None else "enforce"
    ref, classes = model_ref(served), served.bundle.classes
    bodies = [
        detect_response(
            ids[j],
            ref,
            prediction(classes, classified.probabilities[i]),
            None if det is None else det.result.row(i),
            mode,
            _timings(decode_s, sl, classified.classify_s, det, t0),
        )
        for j, i in enumerate(sl.rows)
    ]
    for body in bodies:
        served.observe(body.timings_ms)
    if det is None:
        served.spawn(_shadow_verdicts(served, uploads, sl, bodies))
    else:
        _recorded(served, det, uploads, bodies, use_cache)
    return bodies


def _recorded(
    served: ServedModel,
    det: Detected,
    uploads: list[Upload],
    bodies: list[DetectResponse],
    cache: bool,
    extra: Entry | None = None,
) -> None:
    """Metrics of a finished detection now; cache writes and flagged entries off the response path."""
    for body in bodies:
        _record(served, body)
    stages = {"classify": det.classify_s}
    stages.update(dict(det.result.timings_s))
    served.metrics.observe_stages(stages)
    served.spawn(_after_detection(served, list(zip(uploads, bodies, strict=True)), cache, extra))


async def _shadow_verdicts(
    served: ServedModel, uploads: list[Upload], sl: BatchSlice[Any], bodies: list[DetectResponse]
) -> None:
    """Shadow mode: wait for the detection, then record it (metrics, flagged stream); the client never sees it."""
    started: ShadowStarted = sl.batch
    if started.detection is None:  # dropped: the shadow backlog was full (counted in pathguard_shadow_dropped_total)
        return
    det = await asyncio.wrap_future(started.detection)
    full = [
        detect_response(b.id, b.model, b.prediction, det.result.row(i), "shadow", b.timings_ms)
        for i, b in zip(sl.rows, bodies, strict=True)
    ]
    _recorded(served, det, uploads, full, cache=False)


async def detect_tensor(served: ServedModel, rid: str, x: np.ndarray) -> list[DetectResponse]:
    """Detection of an OIP tensor (N, C, H, W): one body per image, built as for /v1/detect (shadow mode: no
    verdict; it is recorded later). A several-image tensor's j-th body has the id ``<rid>-<j>``."""
    t0 = time.perf_counter()
    per_image = x[0].nbytes
    payload = x.tobytes()
    ctype = "application/x-pathguard-fp32; shape=" + ",".join(map(str, x.shape[1:]))
    uploads = [Upload(payload[j * per_image : (j + 1) * per_image], None, ctype) for j in range(x.shape[0])]
    ids = [rid] if len(uploads) == 1 else [f"{rid}-{j}" for j in range(len(uploads))]
    return await _detect(served, ids, uploads, x, 0.0, t0, use_cache=False)


async def detect_queued(
    served: ServedModel,
    ids: list[str],
    uploads: list[Upload],
    queued: asyncio.Future[BatchSlice[Any]],
    decode_s: float,
    t0: float,
    extra: Entry | None = None,
) -> list[DetectResponse] | None:
    """The verdict bodies of a detection queued with ``detect_batcher.enqueue`` (the j-th with id ``ids[j]``),
    recorded like any other (metrics, flagged-stream entries with the fields of ``extra``; no verdict cache).

    Always with the verdict, in shadow mode too (``mode`` says which mode recorded it). None when shadow mode's
    backlog dropped the batch's verdicts (counted in ``pathguard_shadow_dropped_total``)."""
    sl = await queued
    if isinstance(sl.batch, ShadowStarted):
        if sl.batch.detection is None:
            return None
        det: Detected = await asyncio.wrap_future(sl.batch.detection)
    else:
        det = sl.batch
    ref, classes, mode = model_ref(served), served.bundle.classes, served.settings.mode
    timings = _timings(decode_s, sl, det.classify_s, det, t0)
    bodies = [
        detect_response(ids[j], ref, prediction(classes, det.probabilities[i]), det.result.row(i), mode, timings)
        for j, i in enumerate(sl.rows)
    ]
    _recorded(served, det, uploads, bodies, cache=False, extra=extra)
    served.metrics.observe_stages({"total": time.perf_counter() - t0})
    for body in bodies:
        served.observe(body.timings_ms)
    return bodies
