"""The HTTP API end to end (TestClient with lifespan) on the committed MNIST bundle."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from pathguard.service.app import create_app
from pathguard.service.settings import Settings
from tests.service.conftest import png_bytes

PNG = {"content-type": "image/png"}
MODEL = "mnist-lenet5"  # the served model's name: the bundle's, with PATHGUARD_BUNDLE


def _samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _assert_detect_body(body: dict, model: dict) -> None:
    assert set(body) >= {"id", "model", "prediction", "effective_path", "nic", "verdict", "timings_ms"}
    assert body["model"] == {
        "name": model["name"],
        "version": model["version"],
        "bundle_sha256": model["bundle_sha256"],
    }
    pred = body["prediction"]
    assert len(pred["probabilities"]) == len(model["classes"])
    assert abs(sum(pred["probabilities"]) - 1) < 1e-4
    assert pred["label"] == model["classes"][pred["class_index"]]
    assert pred["confidence"] == max(pred["probabilities"])
    ep = body["effective_path"]
    assert ep["layers"] == model["layers"]
    assert len(ep["rank1_similarity"]) == len(ep["rank2_similarity"]) == len(model["layers"])
    assert all(0 <= v <= 1 for v in ep["rank1_similarity"] + ep["rank2_similarity"] + [ep["score"]])
    nic = body["nic"]
    assert list(nic["value_violation"]) == model["value_layers"]
    assert list(nic["provenance_violation"]) == model["provenance_pairs"]
    assert all(0 <= v <= 1 for v in [*nic["value_violation"].values(), *nic["provenance_violation"].values()])
    v = body["verdict"]
    assert 0 <= v["score"] <= 1 and 0 < v["p_value"] <= 1
    assert v["threshold"] == pytest.approx(model["threshold"], abs=1e-6)
    assert v["target_fpr"] == pytest.approx(model["target_fpr"])
    assert v["adversarial"] == (v["score"] > v["threshold"])
    # the committed MNIST bundle's consistency components: their statistics and scores
    assert set(body["noise_drop"]) == {"logit_drop", "score"} and set(body["squeeze"]) == {"softmax_l1", "score"}
    assert 0 <= body["noise_drop"]["score"] <= 1 and 0 <= body["squeeze"]["score"] <= 1
    assert body["squeeze"]["softmax_l1"] >= 0
    t = body["timings_ms"]
    stages = {"decode", "queue", "classify", "checks", "checks_wait", "nic", "effective_path", "total"}
    if model["detection"] == "graph":  # the copies are in the graph's run; the walk runs beside it
        assert stages == set(t)
        assert t["checks_wait"] + t["nic"] <= t["checks"] <= t["total"]
        assert t["effective_path"] <= t["classify"] + t["checks_wait"] + 0.01  # started with the graph's run
        return
    assert stages | {"consistency"} == set(t)
    assert t["checks_wait"] + t["nic"] + t["effective_path"] <= t["checks"] <= t["total"]  # parts of the checks
    # the copies' forward pass starts before the classifier's and runs beside it, NIC and EP: within the request
    assert 0 < t["consistency"] <= t["total"]


def test_health_before_and_after_lifespan(bundle_dir, tmp_path, digits):
    app = create_app(Settings(bundle=bundle_dir, spool_path=tmp_path / "s.jsonl", warmup_rounds=0))
    client = TestClient(app)  # no `with`: the lifespan has not run, the bundle is not loaded
    assert client.get("/v2/health/live").json() == {"live": True}
    r = client.get("/v2/health/ready")
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and set(r.json()) == {"error"}
    assert client.post("/v1/detect", content=digits[0][0], headers=PNG).status_code == 503
    with client:
        assert client.get("/v2/health/ready").status_code == 200
        assert client.post("/v1/detect", content=digits[0][0], headers=PNG).status_code == 200
    assert client.get("/v2/health/ready").status_code == 503  # shut down


def test_real_digits_are_classified_with_complete_responses(make_client, digits):
    client = make_client(cache=False)
    model = client.get("/v1/model").json()
    assert model["input_shape"] == [1, 28, 28] and model["classes"] == [str(i) for i in range(10)]
    correct = 0
    for png, label in digits:
        r = client.post("/v1/detect", content=png, headers=PNG)
        assert r.status_code == 200, r.text
        body = r.json()
        _assert_detect_body(body, model)
        assert r.headers["x-request-id"] == body["id"]
        correct += body["prediction"]["class_index"] == label
        p = client.post("/v1/predict", content=png, headers=PNG).json()
        assert p["prediction"]["class_index"] == body["prediction"]["class_index"]
        np.testing.assert_allclose(p["prediction"]["probabilities"], body["prediction"]["probabilities"], atol=1e-5)
    assert correct >= 31  # LeNet-5 is 99.3 % accurate on MNIST test


def test_nic_in_the_graph_answers_like_the_per_layer_checks(make_client, digits):
    """PATHGUARD_NIC_IN_GRAPH (on the Python pipeline): the same answers (within float32 rounding of the NIC scores)
    from one onnxruntime run."""
    graph = make_client(cache=False, nic_in_graph=True, detect_graph="off")
    classic = make_client(cache=False, detect_graph="off")
    assert graph.app.state.pathguard.model(None).runtime.engine.computes_nic
    assert not classic.app.state.pathguard.model(None).runtime.engine.computes_nic
    model = graph.get("/v1/model").json()
    for png, _ in digits[:12]:
        a = graph.post("/v1/detect", content=png, headers=PNG).json()
        b = classic.post("/v1/detect", content=png, headers=PNG).json()
        _assert_detect_body(a, model)
        assert a["prediction"] == b["prediction"] and a["verdict"]["adversarial"] == b["verdict"]["adversarial"]
        assert a["nic"]["value_violation"] == pytest.approx(b["nic"]["value_violation"], abs=1e-3)
        assert a["nic"]["provenance_violation"] == pytest.approx(b["nic"]["provenance_violation"], abs=1e-3)
        assert a["verdict"]["score"] == pytest.approx(b["verdict"]["score"], abs=1e-3)
    s = _samples(graph)
    assert _value(s, "pathguard_stage_duration_seconds_count", model=MODEL, stage="nic") == 12


def test_multipart_jpeg_and_batch_keep_order(make_client, digits, mnist_test):
    client = make_client(cache=False)
    png, label = digits[3]
    r = client.post("/v1/detect", files={"image": ("x.png", png, "image/png")}, headers={"x-request-id": "req-42"})
    assert r.status_code == 200 and r.json()["id"] == "req-42"
    assert r.json()["prediction"]["class_index"] == label
    buf = io.BytesIO()
    Image.fromarray(np.round(mnist_test.x[3][0] * 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    r = client.post("/v1/detect", content=buf.getvalue(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["prediction"]["class_index"] == label
    files = [("images", (f"{i}.png", digits[i][0], "image/png")) for i in range(10)]
    r = client.post("/v1/detect/batch", files=files)
    assert r.status_code == 200
    results = r.json()["results"]
    assert [res["prediction"]["class_index"] for res in results] == [lbl for _, lbl in digits[:10]]
    single = client.post("/v1/detect", content=digits[5][0], headers=PNG).json()
    assert results[5]["verdict"]["score"] == pytest.approx(single["verdict"]["score"], abs=1e-5)


def _big_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (3000, 3000)).save(buf, format="PNG")
    return buf.getvalue()


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28)).save(buf, format="GIF")
    return buf.getvalue()


def _chunks(n: int):
    for _ in range(n):
        yield b"\x00" * 16384


BAD_INPUTS = [
    # (name, request kwargs, route, status)
    ("empty body", {"content": b"", "headers": PNG}, "/v1/detect", 400),
    ("truncated png", {"content": "TRUNCATED", "headers": PNG}, "/v1/detect", 400),
    ("not an image", {"content": b"hello world", "headers": PNG}, "/v1/detect", 400),
    ("png declared as jpeg", {"content": "DIGIT", "headers": {"content-type": "image/jpeg"}}, "/v1/detect", 400),
    ("text content type", {"content": "DIGIT", "headers": {"content-type": "text/plain"}}, "/v1/detect", 415),
    ("no content type", {"content": "DIGIT", "headers": {"content-type": ""}}, "/v1/predict", 415),
    ("gif upload", {"files": {"image": ("a.gif", "GIF", "application/octet-stream")}}, "/v1/detect", 415),
    ("gif part type", {"files": {"image": ("a.gif", "GIF", "image/gif")}}, "/v1/detect", 415),
    ("missing field", {"files": {"picture": ("a.png", "DIGIT", "image/png")}}, "/v1/detect", 400),
    ("text field", {"data": {"image": "abc"}, "files": {"x": ("a", b"1", "image/png")}}, "/v1/detect", 400),
    (
        "two images",
        {"files": [("image", ("a.png", "DIGIT", "image/png")), ("image", ("b.png", "DIGIT", "image/png"))]},
        "/v1/detect",
        400,
    ),
    ("too many pixels", {"content": "BIG", "headers": PNG}, "/v1/detect", 413),
    ("body too large", {"content": b"\x89PNG" + b"\x00" * 70_000, "headers": PNG}, "/v1/detect", 413),
    ("chunked body too large", {"content": "CHUNKS", "headers": PNG}, "/v1/detect", 413),
    ("wrong aspect ratio", {"content": "WIDE", "headers": PNG}, "/v1/detect", 422),
    ("too many batch images", {"files": "MANY"}, "/v1/detect/batch", 413),
    ("bad image in batch", {"files": "ONE_BAD"}, "/v1/detect/batch", 400),
]


def _materialize(kwargs: dict, digit: bytes) -> dict:
    def sub(v):
        wide = io.BytesIO()
        Image.new("L", (28, 56)).save(wide, format="PNG")
        table = {
            "DIGIT": digit,
            "TRUNCATED": digit[: len(digit) // 2],
            "BIG": _big_png(),
            "GIF": _gif(),
            "WIDE": wide.getvalue(),
            "CHUNKS": _chunks(5),
        }
        return table.get(v, v) if isinstance(v, str) else v

    out = {}
    for key, value in kwargs.items():
        if value == "MANY":
            value = [("images", (f"{i}.png", digit, "image/png")) for i in range(5)]
        elif value == "ONE_BAD":
            value = [("images", ("a.png", digit, "image/png")), ("images", ("b.png", b"junk", "image/png"))]
        elif key == "files" and isinstance(value, dict):
            value = {k: (f, sub(c), t) for k, (f, c, t) in value.items()}
        elif key == "files":
            value = [(k, (f, sub(c), t)) for k, (f, c, t) in value]
        else:
            value = sub(value)
        out[key] = value
    return out


@pytest.fixture
def strict_limits_client(make_client):
    return make_client(max_body_bytes=65_536, max_image_pixels=1_000_000, max_request_images=4)


@pytest.mark.parametrize(("name", "kwargs", "route", "status"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_get_4xx_with_one_error_shape(strict_limits_client, digits, name, kwargs, route, status):
    r = strict_limits_client.post(route, **_materialize(kwargs, digits[0][0]))
    assert r.status_code == status, (name, r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]


def test_metrics_after_requests(make_client, digits):
    client = make_client(cache=False)
    for png, _ in digits[:5]:
        assert client.post("/v1/detect", content=png, headers=PNG).status_code == 200
    client.post("/v1/predict", content=digits[0][0], headers=PNG)
    client.post("/v1/detect", content=b"junk", headers=PNG)
    model = client.get("/v1/model").json()
    s = _samples(client)
    assert _value(s, "pathguard_requests_total", route="/v1/detect", status="200") == 5
    assert _value(s, "pathguard_requests_total", route="/v1/detect", status="400") == 1
    assert _value(s, "pathguard_requests_total", route="/v1/predict", status="200") == 1
    assert _value(s, "pathguard_request_duration_seconds_count", route="/v1/detect") == 6
    verdicts = _value(s, "pathguard_verdicts_total", model=MODEL, verdict="benign") + _value(
        s, "pathguard_verdicts_total", model=MODEL, verdict="adversarial"
    )
    assert verdicts == 5
    assert _value(s, "pathguard_detection_score_count", model=MODEL) == 5
    for stage in ("decode", "classify", "effective_path", "nic", "total"):
        assert _value(s, "pathguard_stage_duration_seconds_count", model=MODEL, stage=stage) >= 5, stage
    for layer in model["layers"]:
        assert _value(s, "pathguard_layer_path_similarity_count", model=MODEL, layer=layer) == 5
    for layer in model["value_layers"]:
        assert (
            _value(s, "pathguard_layer_violation_probability_count", model=MODEL, invariant="value", layer=layer) == 5
        )
    for pair in model["provenance_pairs"]:
        assert (
            _value(s, "pathguard_layer_violation_probability_count", model=MODEL, invariant="provenance", layer=pair)
            == 5
        )
    info_labels = {"model": MODEL, "name": model["name"], "sha256": model["bundle_sha256"], "version": "1"}
    info = ("pathguard_bundle_info", tuple(sorted(info_labels.items())))
    assert s[info] == 1
    assert _value(s, "pathguard_inflight_requests") == 1  # the /metrics request itself
    assert ("pathguard_redis_errors_total", ()) in s and ("pathguard_cache_hits_total", (("model", MODEL),)) in s
    label_values = {v for (_, labels) in s for _, v in labels}
    assert not any(len(v) == 32 and v.isalnum() for v in label_values)  # no request ids


def test_api_key(make_client, digits):
    client = make_client(api_key="s3cret-key")
    png = digits[0][0]
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    for route in ("/v1/model", "/metrics", "/v2/models/mnist-lenet5"):
        r = client.get(route)
        assert r.status_code == 401 and set(r.json()) == {"error"}, route
    assert client.post("/v1/detect", content=png, headers=PNG).status_code == 401
    assert client.post("/v1/detect", content=png, headers={**PNG, "x-api-key": "wrong"}).status_code == 401
    assert (
        client.post("/v1/detect", content=png, headers={**PNG, "authorization": "Bearer s3cret-key"}).status_code == 200
    )
    assert client.post("/v1/predict", content=png, headers={**PNG, "x-api-key": "s3cret-key"}).status_code == 200
    assert client.get("/metrics", headers={"authorization": "Bearer s3cret-key"}).status_code == 200


def _oip(x: np.ndarray, **extra) -> dict:
    return {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
        **extra,
    }


def test_open_inference_protocol(make_client, mnist_test):
    client = make_client(cache=False)
    meta = client.get("/v2/models/mnist-lenet5").json()
    assert meta["name"] == "mnist-lenet5" and meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
    assert client.get("/v2/models/mnist-lenet5/ready").json() == {"name": "mnist-lenet5", "ready": True}
    assert client.get("/v2/models/other").status_code == 404
    x = mnist_test.x[:3]
    r = client.post("/v2/models/mnist-lenet5/infer", json=_oip(x, id="oip-1"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "mnist-lenet5" and body["id"] == "oip-1"
    out = {o["name"]: o for o in body["outputs"]}
    assert set(out) == {
        "predicted_class",
        "probabilities",
        "is_adversarial",
        "instance_score",
        "p_value",
        "path_similarity",
        "value_violation",
        "provenance_violation",
    }
    assert out["predicted_class"]["data"] == [int(v) for v in mnist_test.y[:3]]
    assert out["probabilities"]["shape"] == [3, 10] and len(out["probabilities"]["data"]) == 30
    layers = meta["parameters"]
    assert out["path_similarity"]["shape"] == [3, len(layers["path_similarity_layers"])]
    assert out["value_violation"]["shape"] == [3, len(layers["value_violation_layers"])]
    assert out["provenance_violation"]["shape"] == [3, len(layers["provenance_violation_pairs"])]
    assert out["is_adversarial"]["datatype"] == "BOOL"
    # the same image through /v1/detect gives the same score
    single = client.post("/v1/detect", content=png_bytes(x[1]), headers=PNG).json()
    assert out["instance_score"]["data"][1] == pytest.approx(single["verdict"]["score"], abs=1e-5)
    # selected outputs, versioned route
    r = client.post("/v2/models/mnist-lenet5/versions/1/infer", json=_oip(x[:1], outputs=[{"name": "instance_score"}]))
    assert [o["name"] for o in r.json()["outputs"]] == ["instance_score"]


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ('{"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [NaN]}]}', 400),
        ("NAN_FULL", 400),
        ("WRONG_SHAPE", 400),
        ("{not json", 400),
        ('{"inputs": []}', 400),
        ('{"inputs": [{"name": "input", "shape": "x", "datatype": "FP32", "data": []}]}', 400),
        ("[1, 2]", 400),
        ('{"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [300]}]}', 400),
        ("UNKNOWN_OUTPUT", 400),
    ],
)
def test_oip_bad_requests(make_client, payload, status):
    client = make_client()
    x = np.full((1, 1, 28, 28), 0.5, np.float32)
    if payload == "NAN_FULL":
        data = x.ravel().tolist()
        data[10] = float("nan")
        payload = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": data}]})
    elif payload == "WRONG_SHAPE":
        payload = json.dumps(_oip(np.zeros((1, 3, 28, 28), np.float32)))
    elif payload == "UNKNOWN_OUTPUT":
        payload = json.dumps(_oip(x, outputs=[{"name": "logits"}]))
    r = client.post("/v2/models/mnist-lenet5/infer", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}


def test_shadow_mode_answers_prediction_and_records_verdict(make_client, digits):
    client = make_client(mode="shadow")
    png, label = digits[0]
    r = client.post("/v1/detect", content=png, headers=PNG)
    assert r.status_code == 200
    body = r.json()
    assert body["mode"] == "shadow" and body["verdict"] is None and body["effective_path"] is None
    assert body["prediction"]["class_index"] == label
    for _ in range(100):  # the verdict is computed after the answer
        s = _samples(client)
        total = _value(s, "pathguard_verdicts_total", model=MODEL, verdict="benign") + _value(
            s, "pathguard_verdicts_total", model=MODEL, verdict="adversarial"
        )
        if total == 1:
            break
        threading.Event().wait(0.05)
    assert total == 1
    assert _value(s, "pathguard_detection_score_count", model=MODEL) == 1


def test_full_queue_answers_503_with_retry_after(make_client, digits):
    client = make_client(queue_size=1, max_batch_size=64, max_request_images=64, retry_after_s=2, cache=False)
    files = [("images", (f"{i}.png", digits[i % 32][0], "image/png")) for i in range(64)]
    statuses: list[tuple[int, str | None]] = []

    def send() -> None:
        r = client.post("/v1/detect/batch", files=files)
        statuses.append((r.status_code, r.headers.get("retry-after")))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = [c for c, _ in statuses]
    assert codes.count(200) >= 2 and codes.count(503) >= 1, codes
    assert all(ra == "2" for c, ra in statuses if c == 503)
    assert set(codes) <= {200, 503}


def test_bundle_pin(make_client, bundle_dir, tmp_path):
    from pathguard.models.bundle import BundleIntegrityError, bundle_sha256

    good = bundle_sha256(bundle_dir)
    assert make_client(bundle_sha256=good).get("/v1/model").json()["bundle_sha256"] == good
    app = create_app(Settings(bundle=bundle_dir, spool_path=tmp_path / "s.jsonl", bundle_sha256="0" * 64))
    with pytest.raises(BundleIntegrityError, match="manifest.json"), TestClient(app):
        pass


def _stream(data: bytes, piece: int = 8192):
    """A generator body: httpx sends it chunked, without Content-Length."""
    for i in range(0, len(data), piece):
        yield data[i : i + piece]


CHUNKED_ROUTES = [
    ("/v1/detect", "image/png"),
    ("/v1/predict", "image/png"),
    ("/v1/detect/batch", "multipart/form-data; boundary=pathguard"),
    ("/v2/models/mnist-lenet5/infer", "application/json"),
]


@pytest.mark.parametrize(("route", "ctype"), CHUNKED_ROUTES, ids=[r for r, _ in CHUNKED_ROUTES])
def test_chunked_body_over_the_limit_is_413_on_every_route(strict_limits_client, route, ctype):
    body = b"[" + b"0," * 40_000 + b"0]"  # 80 kB, over the 64 KiB limit; the JSON parser would wrap errors as 400
    r = strict_limits_client.post(route, content=_stream(body), headers={"content-type": ctype})
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413, r.text
    assert r.json() == {"error": "request body exceeds the limit of 65536 bytes"}
    samples = _samples(strict_limits_client)
    assert _value(samples, "pathguard_requests_total", route=route.replace("mnist-lenet5", "{name}"), status="413") == 1


def test_chunked_body_under_the_limit_is_served(strict_limits_client, digits, mnist_test):
    png = digits[0][0]
    r = strict_limits_client.post("/v1/detect", content=_stream(png, 100), headers=PNG)
    assert "content-length" not in r.request.headers and r.status_code == 200
    assert r.json()["prediction"]["class_index"] == digits[0][1]
    payload = json.dumps(_oip(mnist_test.x[:1])).encode()
    assert len(payload) < 65_536
    r = strict_limits_client.post(
        "/v2/models/mnist-lenet5/infer", content=_stream(payload), headers={"content-type": "application/json"}
    )
    assert r.status_code == 200, r.text


def test_docs_and_schema_follow_the_api_key_or_are_switched_off(make_client):
    open_client = make_client()
    schema = open_client.get("/openapi.json")
    assert schema.status_code == 200 and "/v1/detect" in schema.json()["paths"]
    assert "/openapi.json" not in schema.json()["paths"] and "/docs" not in schema.json()["paths"]
    page = open_client.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text and "/openapi.json" in page.text

    keyed = make_client(api_key="s3cret-key")
    for route in ("/docs", "/openapi.json"):
        r = keyed.get(route)
        assert r.status_code == 401 and set(r.json()) == {"error"}, route
        assert keyed.get(route, headers={"x-api-key": "wrong"}).status_code == 401
        assert keyed.get(route, headers={"authorization": "Bearer s3cret-key"}).status_code == 200
    assert keyed.get("/openapi.json", headers={"x-api-key": "s3cret-key"}).json() == schema.json()

    off = make_client(docs=False, api_key="s3cret-key")
    for route in ("/docs", "/openapi.json", "/redoc"):
        r = off.get(route, headers={"x-api-key": "s3cret-key"})
        assert r.status_code == 404 and set(r.json()) == {"error"}, route
    assert off.get("/v1/model", headers={"x-api-key": "s3cret-key"}).status_code == 200


@pytest.mark.parametrize("detect_graph", ["auto", "off"])
def test_shadow_backlog_drops_verdicts_beyond_the_bound_and_still_answers(make_client, digits, detect_graph):
    backlog, sent = 3, 8
    client = make_client(mode="shadow", shadow_backlog=backlog, detect_graph=detect_graph)
    pipeline = client.app.state.pathguard.model(None).runtime.pipeline
    gate, entered = threading.Event(), threading.Event()
    method = "finish_graph" if detect_graph == "auto" else "finish"  # the MNIST bundle is served from the graph
    finish = getattr(pipeline, method)

    def slow_finish(*args, **kwargs):  # the finisher stalls until the test lets it go
        entered.set()
        assert gate.wait(60)
        return finish(*args, **kwargs)

    setattr(pipeline, method, slow_finish)
    try:
        for i in range(sent):  # one at a time: each request is its own batch
            r = client.post("/v1/detect", content=digits[i][0], headers=PNG)
            assert r.status_code == 200 and r.json()["mode"] == "shadow" and r.json()["verdict"] is None
            assert r.json()["prediction"]["class_index"] == digits[i][1]
        assert entered.wait(10)
        s = _samples(client)
        # the first `backlog` batches hold the places (one being finished, the rest queued); the others are dropped
        assert _value(s, "pathguard_shadow_dropped_total", model=MODEL) == sent - backlog
        assert _value(s, "pathguard_requests_total", route="/v1/detect", status="200") == sent
    finally:
        gate.set()
    verdicts = 0.0
    for _ in range(200):  # the admitted verdicts are still recorded once the finisher moves again
        s = _samples(client)
        verdicts = _value(s, "pathguard_verdicts_total", model=MODEL, verdict="benign") + _value(
            s, "pathguard_verdicts_total", model=MODEL, verdict="adversarial"
        )
        if verdicts == backlog:
            break
        threading.Event().wait(0.05)
    assert verdicts == backlog
    # with the backlog drained, verdicts are admitted again
    assert client.post("/v1/detect", content=digits[9][0], headers=PNG).status_code == 200
    for _ in range(200):
        s = _samples(client)
        if _value(s, "pathguard_detection_score_count", model=MODEL) == backlog + 1:
            break
        threading.Event().wait(0.05)
    assert _value(s, "pathguard_detection_score_count", model=MODEL) == backlog + 1
    assert _value(s, "pathguard_shadow_dropped_total", model=MODEL) == sent - backlog
