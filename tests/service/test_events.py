"""Payload-logger CloudEvents on POST /: built with the cloudevents SDK in both content modes and both payload
versions, answered at once, the results received as CloudEvents by a real HTTP sink on a local port."""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent
from fastapi.testclient import TestClient

from pathguard.service.app import create_app
from pathguard.service.cache import FLAGGED_STREAM
from pathguard.service.events import RESULT_TYPE
from pathguard.service.settings import Settings
from tests.service.conftest import MNIST_BUNDLE, png_bytes

KSERVE_REQUEST = "org.kubeflow.serving.inference.request"
KSERVE_RESPONSE = "org.kubeflow.serving.inference.response"
LOGGER = {"source": "http://localhost:9081/", "inferenceservicename": "mnist", "namespace": "models"}


class Sink:
    """A real HTTP server on a spare local port that records the CloudEvents POSTed to it; ``statuses`` lists the
    answers to give first (then 200)."""

    def __init__(self) -> None:
        self.events: list[BaseCloudEvent] = []
        self.modes: list[str] = []
        self.statuses: list[int] = []
        self.hits = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                sink.hits += 1
                status = sink.statuses.pop(0) if sink.statuses else 200
                if status == 200:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    sink.modes.append("binary" if "ce-id" in headers else "structured")
                    sink.events.append(from_http_event(HTTPMessage(headers, body)))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, count: int, timeout: float = 20.0) -> list[BaseCloudEvent]:
        end = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < end:
            time.sleep(0.02)
        assert len(self.events) >= count, f"the sink received {len(self.events)} events, expected {count}"
        return self.events

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


def _event(data: dict[str, Any], event_id: str = "req-1", etype: str = KSERVE_REQUEST, **ext: str) -> CloudEvent:
    attributes = {**LOGGER, "type": etype, "id": event_id, "datacontenttype": "application/json", **ext}
    return CloudEvent(attributes, data)


def _post(client, event: CloudEvent, mode: str = "binary"):
    message = to_binary_event(event) if mode == "binary" else to_structured_event(event)
    return client.post("/", content=message.body, headers=message.headers)


def _metric(client, name: str, labels: str = "") -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{labels} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name}{labels} not found")


def _v2(x: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode()


@pytest.fixture
def events_client(make_client, sink) -> Callable[..., Any]:
    def make(**overrides: Any) -> Any:
        return make_client(
            events_sink=sink.url, events_sink_backoff_s=0.01, events_sink_backoff_max_s=0.05, **overrides
        )

    return make


def test_binary_and_structured_v1_and_v2_events_give_one_result_event_per_image(events_client, sink, mnist_test):
    client = events_client()
    x = mnist_test.x[:3]  # (3, 1, 28, 28)
    reference = [
        client.post("/v1/detect", content=png_bytes(img), headers={"content-type": "image/png"}).json() for img in x
    ]
    sent = [
        ("binary", _event({"instances": [x[0].tolist()]}, "v1-bin")),
        ("structured", _event({"instances": [x[0][0].tolist()]}, "v1-struct")),  # (H, W): one channel
        (
            "binary",
            _event(_v2(x[1:3]), "v2-bin", traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ),
        ("structured", _event(_v2(x[2:3]), "v2-struct")),
    ]
    for mode, event in sent:
        r = _post(client, event, mode)
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "accepted" and r.json()["request_id"] == event.get_id()
    results = {e.get_id(): e for e in sink.wait(5)}
    assert sorted(results) == ["v1-bin", "v1-struct", "v2-bin-0", "v2-bin-1", "v2-struct"]
    assert set(sink.modes) == {"binary"}  # PATHGUARD_EVENTS_SINK_MODE's default
    for rid, image in [("v1-bin", 0), ("v1-struct", 0), ("v2-bin-0", 1), ("v2-bin-1", 2), ("v2-struct", 2)]:
        e = results[rid]
        attrs, data = e.get_attributes(), e.get_data()
        assert e.get_type() == RESULT_TYPE and e.get_source() == "/pathguard/mnist-lenet5"
        assert attrs["inferenceservicename"] == "mnist" and attrs["namespace"] == "models"
        assert attrs["requestid"] == rid.removesuffix("-0").removesuffix("-1")
        assert isinstance(data, dict) and data["id"] == rid
        assert attrs["adversarial"] == ("true" if data["verdict"]["adversarial"] else "false")
        # the same image through /v1/detect (PNG-encoded, so the pixels differ by rounding only)
        assert data["prediction"]["class_index"] == reference[image]["prediction"]["class_index"]
        assert data["verdict"]["threshold"] == reference[image]["verdict"]["threshold"]
        assert abs(data["verdict"]["score"] - reference[image]["verdict"]["score"]) < 0.05
    assert "traceparent" in results["v2-bin-0"].get_attributes()
    assert "traceparent" not in results["v1-bin"].get_attributes()
    assert _metric(client, "pathguard_events_received_total", '{type="request"}') == 4
    assert _metric(client, "pathguard_event_results_total") == 5
    assert (
        _metric(client, "pathguard_verdicts_total", '{model="mnist-lenet5",verdict="benign"}')
        + _metric(client, "pathguard_verdicts_total", '{model="mnist-lenet5",verdict="adversarial"}')
        == 8
    )  # 3 /v1/detect + 5 events
    assert _metric(client, "pathguard_requests_total", '{route="/",status="202"}') == 4


def test_base64_images_seldon_ids_and_structured_results(events_client, sink, mnist_test):
    client = events_client(events_sink_mode="structured")
    pngs = [png_bytes(mnist_test.x[i]) for i in range(3)]
    v1 = {"instances": [{"image_bytes": {"b64": _b64(pngs[0])}}, _b64(pngs[1]), {"data": _b64(pngs[2])}]}
    v2 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [_b64(pngs[0])]}]}
    seldon = {"data": {"ndarray": [mnist_test.x[1].tolist()]}}
    assert _post(client, _event(v1, "b64-v1"), "binary").status_code == 202
    assert _post(client, _event(v2, "b64-v2"), "structured").status_code == 202
    seldon_event = _event(seldon, "ce-1", "io.seldon.serving.inference.request", requestid="seldon-req", modelid="m")
    assert _post(client, seldon_event).json()["request_id"] == "seldon-req"
    as_bytes = _event({}, "bytes-data")  # data as bytes: structured mode carries it as data_base64
    as_bytes = CloudEvent(as_bytes.get_attributes(), json.dumps(seldon).encode())
    assert b"data_base64" in to_structured_event(as_bytes).body
    assert _post(client, as_bytes, "structured").status_code == 202
    results = {e.get_id(): e for e in sink.wait(6)}
    assert sorted(results) == ["b64-v1-0", "b64-v1-1", "b64-v1-2", "b64-v2", "bytes-data", "seldon-req"]
    assert set(sink.modes) == {"structured"}
    for rid, i in [("b64-v1-0", 0), ("b64-v1-1", 1), ("b64-v1-2", 2), ("b64-v2", 0)]:
        assert results[rid].get_data()["prediction"]["class_index"] == int(mnist_test.y[i])
    assert results["seldon-req"].get_attributes()["modelid"] == "m"


def test_response_events_are_acknowledged_and_counted_only(events_client, sink):
    client = events_client()
    r = _post(client, _event({"predictions": [7]}, "req-9", KSERVE_RESPONSE))
    assert r.status_code == 202 and r.json() == {
        "id": "req-9",
        "request_id": "req-9",
        "type": KSERVE_RESPONSE,
        "status": "ignored",
        "images": 0,
    }
    assert _metric(client, "pathguard_events_received_total", '{type="response"}') == 1
    assert _metric(client, "pathguard_event_results_total") == 0
    assert sink.hits == 0


CE = {
    "ce-specversion": "1.0",
    "ce-id": "x",
    "ce-source": "s",
    "ce-type": KSERVE_REQUEST,
    "content-type": "application/json",
}


@pytest.mark.parametrize(
    ("headers", "body", "status", "message"),
    [
        ({"content-type": "application/json"}, b'{"instances": []}', 400, "not a CloudEvent"),
        ({"content-type": "application/cloudevents+json"}, b"[1, 2]", 400, "must be a JSON object"),
        ({"content-type": "application/cloudevents+json"}, b'{"specversion": "1.0", "id": "1"}', 400, "source"),
        ({"content-type": "application/cloudevents+json"}, b'{"id": 1, "source": "s", "type": "t"}', 400, "id"),
        (
            {"content-type": "application/cloudevents+json"},
            b'{"id": "1", "source": "s", "type": "t", "time": "x"}',
            400,
            "not a valid CloudEvent",
        ),
        ({"content-type": "application/cloudevents+json"}, b'{"id": ' + b"[" * 100_000, 400, "not a valid CloudEvent"),
        ({**CE, "ce-type": "com.example.other"}, b"{}", 400, "not a payload-logger type"),
        ({**CE, "ce-bad-name": "1"}, b"{}", 400, "not a valid CloudEvent"),
        ({**CE, "ce-id": "i" * 300}, b'{"instances": [[0]]}', 400, "longer than 256"),
        (CE, b"not json", 400, "not JSON"),
        (CE, b"[1]", 400, "JSON inference request object"),
        ({**CE, "content-type": "application/octet-stream"}, b"\xff\xfe", 400, "not JSON"),
        (CE, b'{"foo": 1}', 400, "holds no images"),
        (CE, b'{"instances": [[[0.5]]]}', 400, "instance 0 has shape (1, 1);"),
        (CE, json.dumps({"instances": [np.full((28, 28), 255).tolist()]}).encode(), 400, "V2 UINT8 tensor"),
        (CE, json.dumps({"instances": [np.full((28, 28), "a").tolist()]}).encode(), 400, "numbers"),
        (CE, b'{"instances": ["not base64!"]}', 400, "not valid base64"),
        (CE, b'{"instances": [{"b64": "aGVsbG8="}]}', 415, "neither PNG nor JPEG"),
        (CE, b'{"instances": [7]}', 400, "neither a tensor nor a base64 image"),
        (CE, json.dumps({"instances": [[[0.0] * 28] * 28] * 65}).encode(), 413, "at most 64"),
        (CE, b'{"inputs": [{"name": "i", "shape": [1, 1, 28, 27], "datatype": "FP32", "data": []}]}', 400, "shape"),
        (CE, b'{"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": "x"}]}', 400, "BYTES"),
        (CE, b'{"inputs": []}', 400, "exactly one input"),
        (CE, b'{"data": {"names": []}}', 400, "Seldon data needs"),
    ],
)
def test_malformed_events_are_4xx_with_a_clear_message(plain_client, headers, body, status, message):
    client = plain_client
    before = _metric(client, "pathguard_events_received_total", '{type="request"}')
    r = client.post("/", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert _metric(client, "pathguard_events_received_total", '{type="request"}') == before == 0


def test_full_backlog_is_503_with_retry_after_and_counted(events_client, sink, mnist_test):
    client = events_client(events_backlog=1, retry_after_s=3)
    batcher = client.app.state.pathguard.model(None).detect_batcher
    release = threading.Event()
    real = batcher.work

    def held(x: np.ndarray) -> Any:
        release.wait(10)
        return real(x)

    batcher.work = held
    event = _event({"instances": [mnist_test.x[0].tolist()]}, "first")
    assert _post(client, event).status_code == 202  # answered while its detection is held
    r = _post(client, _event({"instances": [mnist_test.x[1].tolist()]}, "second"))
    assert r.status_code == 503 and r.headers["retry-after"] == "3"
    assert _metric(client, "pathguard_events_rejected_total") == 1
    assert _metric(client, "pathguard_events_pending") == 1
    release.set()
    assert [e.get_id() for e in sink.wait(1)] == ["first"]
    assert _post(client, _event({"instances": [mnist_test.x[1].tolist()]}, "third")).status_code == 202
    assert [e.get_id() for e in sink.wait(2)][1] == "third"


def test_a_failing_sink_is_retried_and_every_result_is_accounted_for(events_client, sink, mnist_test):
    client = events_client(events_sink_attempts=3)
    sink.statuses = [503, 502]  # the first result needs a third attempt
    assert _post(client, _event({"instances": [mnist_test.x[0].tolist()]}, "retried")).status_code == 202
    assert [e.get_id() for e in sink.wait(1)] == ["retried"]
    assert _metric(client, "pathguard_events_sink_failures_total") == 2
    sink.statuses = [500, 500, 500]  # out of attempts: dropped
    assert _post(client, _event({"instances": [mnist_test.x[1].tolist()]}, "lost")).status_code == 202
    _wait_for(lambda: _metric(client, "pathguard_events_dropped_total", '{reason="retries_exhausted"}') == 1)
    sink.statuses = [400]  # refused: not retried
    assert _post(client, _event({"instances": [mnist_test.x[2].tolist()]}, "refused")).status_code == 202
    _wait_for(lambda: _metric(client, "pathguard_events_dropped_total", '{reason="sink_rejected"}') == 1)
    assert _post(client, _event({"instances": [mnist_test.x[3].tolist()]}, "after")).status_code == 202
    assert [e.get_id() for e in sink.wait(2)] == ["retried", "after"]
    assert sink.hits == 3 + 3 + 1 + 1
    results = _metric(client, "pathguard_event_results_total")
    delivered = _metric(client, "pathguard_events_delivered_total")
    dropped = sum(
        _metric(client, "pathguard_events_dropped_total", f'{{reason="{r}"}}')
        for r in ("retries_exhausted", "sink_rejected")
    )
    assert (results, delivered, dropped) == (4, 2, 2)
    assert _metric(client, "pathguard_events_sink_backlog") == 0


def test_a_failed_detection_is_counted_and_sends_nothing(events_client, sink, mnist_test):
    client = events_client()
    batcher = client.app.state.pathguard.model(None).detect_batcher

    def broken(x: np.ndarray) -> Any:
        raise RuntimeError("engine failure")

    real, batcher.work = batcher.work, broken
    assert _post(client, _event(_v2(mnist_test.x[:2]), "broken")).status_code == 202
    _wait_for(lambda: _metric(client, "pathguard_events_dropped_total", '{reason="detection_failed"}') == 2)
    batcher.work = real
    assert _post(client, _event(_v2(mnist_test.x[:1]), "fine")).status_code == 202
    assert [e.get_id() for e in sink.wait(1)] == ["fine"]
    assert _metric(client, "pathguard_event_results_total") == 1 and _metric(client, "pathguard_events_pending") == 0


def test_events_need_the_api_key_when_one_is_set(make_client, mnist_test):
    client = make_client(api_key="s3cret")
    event = _event({"instances": [mnist_test.x[0].tolist()]})
    assert _post(client, event).status_code == 401
    message = to_binary_event(event)
    r = client.post("/", content=message.body, headers={**message.headers, "x-api-key": "s3cret"})
    assert r.status_code == 202
    assert client.get("/").status_code == 200  # the page stays open


def test_a_sink_that_is_down_drops_after_the_bounded_retry(make_client, mnist_test):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/"
    client = make_client(events_sink=url, events_sink_attempts=2, events_sink_backoff_s=0.01)
    assert _post(client, _event({"instances": [mnist_test.x[0].tolist()]})).status_code == 202
    _wait_for(lambda: _metric(client, "pathguard_events_dropped_total", '{reason="retries_exhausted"}') == 1)
    assert _metric(client, "pathguard_events_sink_failures_total") == 2
    assert _metric(client, "pathguard_events_delivered_total") == 0


def test_shadow_mode_results_carry_the_verdict(events_client, sink, mnist_test):
    client = events_client(mode="shadow")
    assert _post(client, _event(_v2(mnist_test.x[:1]), "shadowed")).status_code == 202
    (event,) = sink.wait(1)
    data = event.get_data()
    assert data["mode"] == "shadow" and data["verdict"] is not None and data["nic"] is not None


def test_flagged_results_reach_the_redis_stream_with_the_logger_fields(events_client, sink, redis_db, mnist_test):
    url, r = redis_db
    client = events_client(redis_url=url)
    rng = np.random.default_rng(0)
    board = (np.indices((28, 28)).sum(0) % 2).astype(np.float32)[None]
    x = np.stack([rng.random((1, 28, 28)), np.ones((1, 28, 28)), board, 1 - mnist_test.x[0], mnist_test.x[1]])
    assert _post(client, _event({"instances": x.tolist()}, "mixed")).status_code == 202
    events = sink.wait(5)
    flagged = sorted(e.get_id() for e in events if e.get_attributes()["adversarial"] == "true")
    assert flagged, "none of the out-of-distribution inputs was flagged"
    _wait_for(lambda: r.xlen(FLAGGED_STREAM) == len(flagged))
    entries = [fields for _, fields in r.xrange(FLAGGED_STREAM)]
    assert sorted(e[b"id"].decode() for e in entries) == flagged
    for e in entries:
        assert e[b"source"] == b"event" and e[b"event_type"] == KSERVE_REQUEST.encode()
        assert e[b"inferenceservicename"] == b"mnist" and e[b"namespace"] == b"models"


def test_pending_events_finish_and_results_are_delivered_at_shutdown(bundle_dir, tmp_path, sink, mnist_test):
    settings = _settings(bundle_dir, tmp_path, events_sink=sink.url)
    with TestClient(create_app(settings)) as client:
        for i in range(5):
            assert _post(client, _event({"instances": [mnist_test.x[i].tolist()]}, f"late-{i}")).status_code == 202
    # the lifespan's shutdown has run: pending detections finished and their results went out
    assert sorted(e.get_id() for e in sink.events) == [f"late-{i}" for i in range(5)]


def _settings(bundle_dir: Path, tmp_path: Path, **overrides: Any) -> Settings:
    base = {"bundle": bundle_dir, "spool_path": tmp_path / "spool.jsonl", "warmup_rounds": 1, "redis_url": None}
    return Settings(**{**base, **overrides})


@pytest.fixture(scope="module")
def plain_client(bundle_dir, tmp_path_factory) -> Iterator[TestClient]:
    """One app without a sink for the many malformed-event cases."""
    with TestClient(create_app(_settings(bundle_dir, tmp_path_factory.mktemp("events")))) as client:
        yield client


def _wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_events_go_to_the_model_they_name_in_a_repository(events_client, sink, mnist_test, tmp_path):
    """Several models: an event is checked by the model named like its inference service (KServe's
    ``inferenceservicename``), or the one ``?model=`` names; an event that names none of them is refused."""
    repo = tmp_path / "repo"
    for name in ("mnist", "other"):
        shutil.copytree(MNIST_BUNDLE, repo / name)
    client = events_client(model_repository=repo)
    x = mnist_test.x[:1]
    assert _post(client, _event(_v2(x), "by-service")).status_code == 202  # inferenceservicename: mnist
    message = to_binary_event(_event(_v2(x), "by-query"))
    assert client.post("/?model=other", content=message.body, headers=message.headers).status_code == 202
    unknown = _post(client, _event(_v2(x), "unknown", inferenceservicename="elsewhere"))
    assert unknown.status_code == 400 and "?model=" in unknown.json()["error"]
    results = {e.get_id(): e for e in sink.wait(2)}
    assert sorted(results) == ["by-query", "by-service"]
    for rid, model in (("by-service", "mnist"), ("by-query", "other")):
        assert results[rid].get_source() == f"/pathguard/{model}"
        assert results[rid].get_data()["model"]["name"] == model
