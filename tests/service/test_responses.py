"""The v1 bodies are built through the response models: the JSON users see is the documented shape, every other
verdict component appears in the schema, and a body the models cannot hold is never answered."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from pathguard.models.bundle import load_bundle
from pathguard.service.responses import (
    ComponentPart,
    DetectResponse,
    ModelRef,
    cacheable,
    cached_response,
    detect_response,
    encode,
    prediction,
)

REF = ModelRef(name="mnist-lenet5", version="1", bundle_sha256="ab" * 32)
TIMINGS = {"decode": 0.1, "queue": 0.0, "classify": 0.5, "total": 1.2}


@pytest.fixture(scope="module")
def detection(bundle_dir, mnist_test):
    """A real detection of four test digits by the committed MNIST bundle, and their images."""
    bundle = load_bundle(bundle_dir, seed=0)
    x = mnist_test.x[:4].copy()
    return bundle, bundle.pipeline.detect(x)


def _by_hand(rid: str, bundle, res, i: int, extra: dict | None = None) -> dict:
    """The body as the handlers assembled it before the response models built it."""
    probs = res.probabilities[i]
    k = int(probs.argmax())
    pred = {
        "class_index": k,
        "label": bundle.classes[k],
        "confidence": float(probs[k]),
        "probabilities": [float(p) for p in probs],
    }
    return {
        "id": rid,
        "model": REF.model_dump(),
        "prediction": pred,
        **res.row(i),
        **(extra or {}),
        "mode": "enforce",
        "cached": False,
        "timings_ms": TIMINGS,
    }


def test_a_detection_body_is_the_json_the_handlers_assembled(detection):
    bundle, res = detection
    for i in range(len(res)):
        body = detect_response(
            "r1", REF, prediction(bundle.classes, res.probabilities[i]), res.row(i), "enforce", TIMINGS
        )
        assert orjson.loads(encode(body)) == _by_hand("r1", bundle, res, i)
        assert "supervised" not in orjson.loads(encode(body))  # absent, not null, without a supervised detector


def test_every_other_component_keeps_its_key_score_and_statistic(detection):
    bundle, res = detection
    extra = {"margin": {"margin": 2.5, "score": 0.25}, "mahalanobis": {"layers": ["conv1", "fc1"], "score": 0.5}}
    row = {**res.row(0), **extra}
    body = detect_response("r1", REF, prediction(bundle.classes, res.probabilities[0]), row, "enforce", TIMINGS)
    assert set(body.components()) == {"margin", "mahalanobis", "noise_drop", "squeeze"}  # the bundle's own two too
    assert isinstance(body.components()["margin"], ComponentPart)
    assert orjson.loads(encode(body)) == _by_hand("r1", bundle, res, 0, extra)
    with pytest.raises(ValidationError):  # a component's part always carries its score
        detect_response("r1", REF, body.prediction, {**row, "margin": {"margin": 2.5}}, "enforce", TIMINGS)


def test_a_shadow_body_has_the_prediction_only(detection):
    bundle, res = detection
    body = detect_response("r2", REF, prediction(bundle.classes, res.probabilities[1]), None, "shadow", TIMINGS)
    got = orjson.loads(encode(body))
    assert set(got) == {"id", "model", "prediction", "effective_path", "nic", "verdict", "mode", "cached", "timings_ms"}
    assert got["effective_path"] is None and got["nic"] is None and got["verdict"] is None
    assert got["mode"] == "shadow" and got["cached"] is False


def test_a_cached_body_round_trips_and_a_malformed_entry_is_a_miss(detection):
    bundle, res = detection
    extra = {"margin": {"margin": 2.5, "score": 0.25}}
    fresh = detect_response(
        "r3", REF, prediction(bundle.classes, res.probabilities[2]), {**res.row(2), **extra}, "enforce", TIMINGS
    )
    stored = orjson.loads(orjson.dumps(cacheable(fresh)))  # as the cache writes and reads it
    hit = cached_response("r4", REF, stored, {"decode": 0.1, "cache": 0.2})
    assert hit is not None and hit.cached and hit.id == "r4"
    assert orjson.loads(encode(hit)) == {
        **orjson.loads(encode(fresh)),
        "id": "r4",
        "cached": True,
        "timings_ms": {"decode": 0.1, "cache": 0.2},
    }
    assert cached_response("r5", REF, {k: v for k, v in stored.items() if k != "prediction"}, {}) is None
    assert cached_response("r5", REF, {**stored, "margin": {"margin": 1.0}}, {}) is None


def test_the_schema_documents_every_component_and_the_split_error(make_client):
    client = make_client()
    schema = client.get("/openapi.json").json()
    info = client.get("/v1/model").json()
    defs = schema["components"]["schemas"]
    detect = defs["DetectResponse"]
    assert detect["additionalProperties"] == {"$ref": "#/components/schemas/ComponentPart"}
    part = defs["ComponentPart"]
    assert part["required"] == ["score"] and part["additionalProperties"]  # the statistic beside the score
    assert {"effective_path", "nic", "verdict", "supervised"} <= set(detect["properties"])
    assert "onnx_split_error" in defs["ModelInfo"]["properties"] and "onnx_split_error" in info


def test_served_bodies_validate_against_their_models(make_client, digits):
    png = digits[0][0]
    client = make_client()
    r = client.post("/v1/detect", content=png, headers={"content-type": "image/png"})
    batch = client.post("/v1/detect/batch", files=[("images", ("a.png", png, "image/png"))] * 2)
    assert r.status_code == 200 and batch.status_code == 200
    body = r.json()
    assert orjson.loads(encode(DetectResponse.model_validate(body))) == body
    assert [b["id"] for b in batch.json()["results"]] == [f"{batch.headers['x-request-id']}-{i}" for i in range(2)]
