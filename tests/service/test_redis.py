"""Verdict cache and flagged stream against real redis-servers, including Redis going away mid-run."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest
import redis

from pathguard.service.cache import CACHE_SCHEMA, FLAGGED_STREAM, verdict_key
from tests.service.conftest import png_bytes

PNG = {"content-type": "image/png"}


def _candidates(mnist_test) -> list[bytes]:
    """Inputs far from benign digits: noise, a checkerboard, inverted and blank digits."""
    rng = np.random.default_rng(0)
    out = [png_bytes(rng.random((1, 28, 28))), png_bytes(np.ones((1, 28, 28)))]
    board = (np.indices((28, 28)).sum(0) % 2).astype(np.float32)[None]
    out.append(png_bytes(board))
    out += [png_bytes(1 - mnist_test.x[i]) for i in range(5)]
    return out


@pytest.fixture(scope="module")
def flagged_png(bundle_dir, mnist_test, tmp_path_factory) -> bytes:
    """An input the served detector flags (found by asking the service itself)."""
    from fastapi.testclient import TestClient

    from pathguard.service.app import create_app
    from pathguard.service.settings import Settings

    settings = Settings(bundle=bundle_dir, spool_path=tmp_path_factory.mktemp("s") / "s.jsonl", cache=False)
    with TestClient(create_app(settings)) as client:
        for png in _candidates(mnist_test):
            if client.post("/v1/detect", content=png, headers=PNG).json()["verdict"]["adversarial"]:
                return png
    raise AssertionError("none of the out-of-distribution candidates is flagged")


def _metric(client, name: str) -> float:
    """The sum of the metric's series (the cache counters have one per model; these tests serve one)."""
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _stream(r: redis.Redis) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in r.xrange(FLAGGED_STREAM)]


def _wait(predicate, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_cache_hit_on_repeated_image(make_client, redis_db, digits):
    url, r = redis_db
    client = make_client(redis_url=url, cache_ttl_s=120)
    png = digits[0][0]
    first = client.post("/v1/detect", content=png, headers=PNG).json()
    assert first["cached"] is False
    key = verdict_key(first["model"]["bundle_sha256"], hashlib.sha256(png).hexdigest())
    assert _wait(lambda: r.exists(key) == 1)
    assert 0 < r.ttl(key) <= 120
    stored = json.loads(r.get(key))
    assert stored["schema"] == CACHE_SCHEMA and stored["bundle"] == first["model"]["bundle_sha256"]
    assert stored["body"]["verdict"] == first["verdict"] and "id" not in stored["body"]
    second = client.post("/v1/detect", content=png, headers=PNG).json()
    assert second["cached"] is True and second["id"] != first["id"]
    for part in ("prediction", "effective_path", "nic", "verdict", "model"):
        assert second[part] == first[part]
    assert _metric(client, "pathguard_cache_hits_total") == 1
    assert _metric(client, "pathguard_cache_misses_total") == 1
    assert _metric(client, "pathguard_redis_errors_total") == 0


def test_in_memory_cache_without_redis(make_client, digits):
    client = make_client(redis_url=None)
    png = digits[1][0]
    assert client.post("/v1/detect", content=png, headers=PNG).json()["cached"] is False
    assert client.post("/v1/detect", content=png, headers=PNG).json()["cached"] is True
    assert _metric(client, "pathguard_cache_hits_total") == 1


def test_flagged_input_lands_in_stream(make_client, redis_db, flagged_png, digits):
    url, r = redis_db
    client = make_client(redis_url=url)
    benign = client.post("/v1/detect", content=digits[0][0], headers=PNG).json()
    body = client.post("/v1/detect", content=flagged_png, headers=PNG).json()
    assert body["verdict"]["adversarial"] is True and benign["verdict"]["adversarial"] is False
    assert _wait(lambda: len(_stream(r)) == 1)
    entry = _stream(r)[0]
    assert entry[b"id"].decode() == body["id"]
    assert entry[b"image"] == flagged_png
    assert entry[b"image_sha256"].decode() == hashlib.sha256(flagged_png).hexdigest()
    assert entry[b"bundle"].decode() == body["model"]["bundle_sha256"]
    assert int(entry[b"class_index"]) == body["prediction"]["class_index"]
    assert float(entry[b"score"]) == pytest.approx(body["verdict"]["score"])
    assert float(entry[b"p_value"]) == pytest.approx(body["verdict"]["p_value"])


def test_redis_down_spools_and_replays(make_client, private_redis, flagged_png, digits, tmp_path):
    spool = tmp_path / "flagged.jsonl"
    client = make_client(redis_url=private_redis.url, redis_retry_s=0.2, redis_timeout_s=0.2, spool_path=spool)
    r = redis.Redis.from_url(private_redis.url)
    first = client.post("/v1/detect", content=flagged_png, headers=PNG).json()
    assert _wait(lambda: len(_stream(r)) == 1)

    private_redis.stop()
    ids = []
    for png in (flagged_png, digits[2][0], flagged_png):
        resp = client.post("/v1/detect", content=png, headers=PNG)
        assert resp.status_code == 200
        if resp.json()["verdict"]["adversarial"]:
            ids.append(resp.json()["id"])
    assert len(ids) == 2 and first["id"] not in ids
    assert _wait(lambda: spool.is_file() and len(spool.read_text().splitlines()) == 2)
    assert _metric(client, "pathguard_redis_errors_total") >= 1

    private_redis.start()  # a fresh, empty server on the same port
    r = redis.Redis.from_url(private_redis.url)
    assert _wait(lambda: [e[b"id"].decode() for e in _stream(r)] == ids, timeout=10)
    assert [e[b"image"] for e in _stream(r)] == [flagged_png, flagged_png]
    assert _wait(lambda: not spool.exists())
    # back to normal: a new flagged input goes straight to the stream
    third = client.post("/v1/detect", content=flagged_png, headers={**PNG, "x-request-id": "after"}).json()
    assert third["verdict"]["adversarial"] is True
    assert _wait(lambda: [e[b"id"] for e in _stream(r)][-1] == b"after")


def _good_entry(client, png: bytes) -> dict:
    """What the service itself caches for ``png`` (read back from its own in-memory or Redis cache later)."""
    body = client.post("/v1/detect", content=png, headers=PNG).json()
    assert body["cached"] is False
    return {k: v for k, v in body.items() if k not in ("id", "timings_ms", "cached")}


def _unusable_entries(body: dict, bundle: str) -> dict[str, bytes]:
    """Values a cache key may hold that the service must treat as a miss."""

    def entry(**changes) -> bytes:
        return json.dumps({"schema": CACHE_SCHEMA, "bundle": bundle, "body": body, **changes}).encode()

    return {
        "garbage bytes": b"\xff\xfe\x00 not json",
        "truncated json": entry()[:-7],
        "deep nesting": b"[" * 100_000 + b"]" * 100_000,
        "json list": b"[1, 2, 3]",
        "pre-schema entry (a bare response body)": json.dumps(body).encode(),
        "stale schema": entry(schema=CACHE_SCHEMA + 1),
        "no schema": entry(schema=None),
        "other bundle": entry(bundle="0" * 64),
        "other bundle in the body": entry(body={**body, "model": {**body["model"], "bundle_sha256": "1" * 64}}),
        "body not an object": entry(body="cached"),
        "verdict not an object": entry(body={**body, "verdict": []}),
        "threshold a string": entry(body={**body, "verdict": {**body["verdict"], "threshold": "0.5"}}),
        "layers and scores disagree": entry(
            body={**body, "effective_path": {**body["effective_path"], "rank1_similarity": [0.5]}}
        ),
    }


def test_unusable_redis_entries_are_counted_misses_never_errors(make_client, redis_db, digits, caplog):
    url, r = redis_db
    client = make_client(redis_url=url, cache_ttl_s=120)
    png = digits[3][0]
    body = _good_entry(client, png)
    key = verdict_key(body["model"]["bundle_sha256"], hashlib.sha256(png).hexdigest())
    assert key == f"pathguard:verdict:{body['model']['bundle_sha256']}:{hashlib.sha256(png).hexdigest()}"
    assert _wait(lambda: r.exists(key) == 1)
    hits, misses = _metric(client, "pathguard_cache_hits_total"), _metric(client, "pathguard_cache_misses_total")
    assert (hits, misses) == (0, 1)
    for name, value in _unusable_entries(body, body["model"]["bundle_sha256"]).items():
        r.set(key, value, ex=120)
        caplog.clear()
        with caplog.at_level("WARNING", logger="pathguard.service"):
            resp = client.post("/v1/detect", content=png, headers=PNG)
        assert resp.status_code == 200, (name, resp.text)
        assert resp.json()["cached"] is False and resp.json()["verdict"] == body["verdict"], name
        misses += 1
        assert _metric(client, "pathguard_cache_misses_total") == misses, name
        assert _metric(client, "pathguard_cache_hits_total") == 0, name
        assert any("unusable" in m and key in m for m in caplog.messages), name
        # the fresh detection replaces the bad entry with a good one
        assert _wait(lambda: r.get(key) != value), name
        stored = json.loads(r.get(key))
        assert stored["body"]["verdict"] == body["verdict"] and stored["bundle"] == body["model"]["bundle_sha256"]
    assert client.post("/v1/detect", content=png, headers=PNG).json()["cached"] is True
    assert _metric(client, "pathguard_cache_hits_total") == 1


def test_unusable_in_memory_entries_are_counted_misses(make_client, digits):
    import asyncio

    client = make_client(redis_url=None)
    png = digits[4][0]
    body = _good_entry(client, png)
    store = client.app.state.pathguard.store
    key = verdict_key(body["model"]["bundle_sha256"], hashlib.sha256(png).hexdigest())
    assert client.post("/v1/detect", content=png, headers=PNG).json()["cached"] is True  # the real entry works
    misses = _metric(client, "pathguard_cache_misses_total")
    for name, value in _unusable_entries(body, body["model"]["bundle_sha256"]).items():
        asyncio.run(store.cache.set(key, value))
        resp = client.post("/v1/detect", content=png, headers=PNG)
        assert resp.status_code == 200 and resp.json()["cached"] is False, name
        misses += 1
        assert _metric(client, "pathguard_cache_misses_total") == misses, name
    assert _metric(client, "pathguard_cache_hits_total") == 1


def test_flagged_batch_items_carry_their_item_ids(make_client, redis_db, flagged_png, digits):
    url, r = redis_db
    client = make_client(redis_url=url, cache=False)
    files = [("images", ("a.png", digits[0][0], "image/png")), ("images", ("b.png", flagged_png, "image/png"))]
    results = client.post("/v1/detect/batch", files=files, headers={"x-request-id": "fb-1"}).json()["results"]
    assert [res["verdict"]["adversarial"] for res in results] == [False, True]
    assert _wait(lambda: len(_stream(r)) == 1)
    entry = _stream(r)[0]
    assert entry[b"id"] == b"fb-1-1" and entry[b"id"].decode() == results[1]["id"]
    assert entry[b"image_sha256"] == hashlib.sha256(flagged_png).hexdigest().encode()


def test_flagged_images_of_an_oip_tensor_carry_their_item_ids(make_client, redis_db, flagged_png, digits):
    import io

    from PIL import Image

    url, r = redis_db
    client = make_client(redis_url=url, cache=False)
    rows = [np.asarray(Image.open(io.BytesIO(p)), dtype=np.float32)[None] / 255.0 for p in (digits[0][0], flagged_png)]
    x = np.stack(rows)  # (2, 1, 28, 28), the exact pixels of the two PNGs
    body = {"id": "oip-7", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}  # fmt: skip
    out = client.post("/v2/models/mnist-lenet5/infer", json=body).json()
    flags = next(o["data"] for o in out["outputs"] if o["name"] == "is_adversarial")
    assert flags == [False, True]
    assert _wait(lambda: len(_stream(r)) == 1)
    assert _stream(r)[0][b"id"] == b"oip-7-1"
