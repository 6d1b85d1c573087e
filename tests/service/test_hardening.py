"""Availability and safety limits: decoding off the event loop, JSON that cannot crash the parser, the bounded
flagged spool, concurrency and batch caps, gRPC accounting, safe `build --out`, exposure checks, 16-bit images."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pathguard.service import inputs
from pathguard.service.cache import DetectionStore, Spool
from pathguard.service.errors import PayloadTooLarge
from pathguard.service.inputs import InputSpec, decode_image
from pathguard.service.metrics import Metrics
from pathguard.service.middleware import ConcurrencyLimitMiddleware
from pathguard.service.settings import Settings
from tests.service.conftest import png_bytes

PNG = {"content-type": "image/png"}
MODEL = "mnist-lenet5"
GRAY = InputSpec(1, 28, 28, max_pixels=4_000_000)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _metric(client: Any, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not found")


# ------------------------------------------------------------------------------------------ 1. decoding


def test_small_but_decode_heavy_pngs_are_decoded_off_the_event_loop(make_client, monkeypatch):
    """A 2000x2000 PNG of one colour is about 12 KB: small on the wire, 4 megapixels to decode."""
    png = _png(Image.new("L", (2000, 2000), 0))
    assert len(png) < 64 * 1024
    on_loop: list[bool] = []
    real_open = inputs._open

    def spying_open(data: bytes, spec: InputSpec) -> Image.Image:
        on_loop.append(asyncio._get_running_loop() is not None)  # set only in the thread running the event loop
        return real_open(data, spec)

    monkeypatch.setattr(inputs, "_open", spying_open)
    client = make_client(cache=False)
    assert client.post("/v1/detect", content=png, headers=PNG).status_code == 200
    files = [("images", (f"{i}.png", png, "image/png")) for i in range(3)]
    assert client.post("/v1/detect/batch", files=files).status_code == 200
    assert len(on_loop) == 4 and not any(on_loop)


# ------------------------------------------------------------------------------------------ 2. JSON


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 200_000 + b"]" * 200_000,  # nesting far beyond any parser's recursion
        b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        json.dumps(
            {
                "inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 784}],
                "parameters": {"p": json.loads("[" * 900 + "]" * 900)},  # echoed back: would not re-encode
            }
        ).encode(),
        b'{"inputs": [1, 2',
        b"\xff\xfe not utf-8",
        b'{"inputs": NaN}',
    ],
    ids=["deep-list", "deep-inputs", "deep-parameters", "truncated", "not-utf8", "nan"],
)
def test_every_malformed_json_body_is_400(make_client, body):
    client = make_client()
    resp = client.post(f"/v2/models/{MODEL}/infer", content=body)
    assert resp.status_code == 400, resp.text
    assert "error" in resp.json()


def test_json_nesting_is_capped_but_tensor_data_may_nest_by_its_shape(make_client, mnist_test):
    client = make_client()
    x = mnist_test.x[:2].astype(np.float32)  # (2, 1, 28, 28): data nested 4 deep
    ok = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}]}
    assert client.post(f"/v2/models/{MODEL}/infer", json=ok).status_code == 200
    deep = {**ok, "parameters": {"a": json.loads("[" * 20 + "]" * 20)}}
    resp = client.post(f"/v2/models/{MODEL}/infer", json=deep)
    assert resp.status_code == 400 and "nested deeper" in resp.json()["error"]


# ------------------------------------------------------------------------------------------ 3. spool


def _entry(i: int, image: bytes = b"\x89PNG" + b"x" * 1000) -> dict[str, str | bytes]:
    return {"id": f"r{i}", "label": "7", "image": image}


def _dead_redis_store(tmp_path: Path, **overrides: Any) -> tuple[DetectionStore, Metrics]:
    settings = Settings(
        redis_url="redis://127.0.0.1:9/0",  # the discard port: nothing answers
        redis_timeout_s=0.05,
        redis_retry_s=60.0,
        spool_path=tmp_path / "spool.jsonl",
        **overrides,
    )
    metrics = Metrics()
    return DetectionStore(settings, metrics), metrics


def _dropped(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("pathguard_flagged_dropped_total", {"reason": reason}) or 0.0


def test_spool_is_bounded_in_entries_and_bytes_and_drops_are_counted(tmp_path, caplog):
    async def run() -> tuple[DetectionStore, Metrics]:
        store, metrics = _dead_redis_store(tmp_path, spool_max_entries=50, spool_max_bytes=1_000_000)
        await store.start()
        for i in range(400):
            await store.flag(_entry(i))
            if i % 50 == 0:
                await asyncio.sleep(0)
        await store.close()
        return store, metrics

    with caplog.at_level(logging.WARNING, logger="pathguard.service"):
        store, metrics = asyncio.run(run())
    lines = (tmp_path / "spool.jsonl").read_text().splitlines()
    assert len(lines) == 50 and [json.loads(line)["id"] for line in lines] == [f"r{i}" for i in range(50)]
    assert _dropped(metrics, "spool_full") + _dropped(metrics, "backlog_full") == 350
    assert metrics.registry.get_sample_value("pathguard_spool_entries") == 50
    dropped_warnings = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert 1 <= len(dropped_warnings) <= 2  # rate-limited, not one per input

    async def by_bytes() -> Metrics:
        store, metrics = _dead_redis_store(tmp_path / "b", spool_max_bytes=20_000)
        await store.start()
        for i in range(100):
            await store.flag(_entry(i))
        await store.close()
        return metrics

    metrics = asyncio.run(by_bytes())
    size = (tmp_path / "b" / "spool.jsonl").stat().st_size
    assert 15_000 < size <= 20_000
    assert _dropped(metrics, "spool_full") > 80


def test_flag_never_writes_on_the_event_loop(tmp_path, monkeypatch):
    writes_on_loop: list[bool] = []
    real_append = Spool.append

    def spying_append(self: Spool, entries: list) -> list:
        writes_on_loop.append(asyncio._get_running_loop() is not None)
        return real_append(self, entries)

    monkeypatch.setattr(Spool, "append", spying_append)

    async def run() -> None:
        store, _ = _dead_redis_store(tmp_path)
        await store.start()
        for i in range(20):
            await store.flag(_entry(i))
        await store.close()

    asyncio.run(run())
    assert writes_on_loop and not any(writes_on_loop)
    assert len((tmp_path / "spool.jsonl").read_text().splitlines()) == 20  # below the bounds nothing is lost


def test_without_redis_flagged_inputs_are_counted_with_one_warning(tmp_path, caplog):
    async def run() -> Metrics:
        metrics = Metrics()
        store = DetectionStore(Settings(spool_path=tmp_path / "s.jsonl"), metrics)
        await store.start()
        for i in range(500):
            await store.flag(_entry(i))
        await store.close()
        return metrics

    with caplog.at_level(logging.WARNING, logger="pathguard.service"):
        metrics = asyncio.run(run())
    assert _dropped(metrics, "no_redis") == 500
    assert len([r for r in caplog.records if "flagged" in r.getMessage()]) == 1


def test_background_tasks_are_capped(make_client, mnist_test):
    client = make_client(max_background_tasks=1, cache=False)
    state = client.app.state.pathguard

    async def hold() -> None:
        await asyncio.sleep(30)

    client.portal.call(lambda: state.spawn(hold()))
    rng = np.random.default_rng(0)
    for _ in range(3):
        png = png_bytes(rng.random((1, 28, 28)))
        assert client.post("/v1/detect", content=png, headers=PNG).status_code == 200
    assert _metric(client, "pathguard_background_dropped_total") == 3
    for task in list(state._background):
        client.portal.call(task.cancel)


# ------------------------------------------------------------------------------------------ 4. concurrency


def test_requests_with_a_body_beyond_the_concurrency_limit_are_503_before_reading():
    async def run() -> tuple[list[dict], list[dict], bool]:
        release = asyncio.Event()
        read_second = False

        async def app(scope: Any, receive: Any, send: Any) -> None:
            nonlocal read_second
            if scope["path"] == "/slow":
                await release.wait()
            elif scope["path"] == "/fast":
                read_second = True
                await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        rejected: list[int] = []
        mw = ConcurrencyLimitMiddleware(app, limit=1, retry_after_s=3, on_reject=lambda: rejected.append(1))

        async def receive() -> dict:
            return {"type": "http.request", "body": b"x", "more_body": False}

        def call(method: str, path: str) -> tuple[list[dict], Any]:
            sent: list[dict] = []

            async def send(msg: dict) -> None:
                sent.append(msg)

            scope = {"type": "http", "method": method, "path": path, "headers": []}
            return sent, mw(scope, receive, send)

        slow_sent, slow = call("POST", "/slow")
        slow_task = asyncio.create_task(slow)
        await asyncio.sleep(0.01)
        second_sent, second = call("POST", "/fast")
        await second
        health_sent, health = call("GET", "/v2/health/live")
        await health
        release.set()
        await slow_task
        assert rejected == [1]
        return second_sent, health_sent, read_second

    second, health, read_second = asyncio.run(run())
    assert second[0]["status"] == 503 and (b"retry-after", b"3") in second[0]["headers"]
    assert not read_second  # the refused request's body was never read
    assert health[0]["status"] == 200


def test_no_batch_runs_more_than_max_batch_size(make_client, digits):
    with pytest.raises(ValueError, match="must not exceed max_batch_size"):
        Settings(max_batch_size=8, max_request_images=16)
    client = make_client(max_batch_size=4, max_request_images=4, cache=False)
    batcher = client.app.state.pathguard.model(None).detect_batcher
    with pytest.raises(PayloadTooLarge):
        client.portal.call(batcher.submit, np.zeros((5, 1, 28, 28), np.float32))
    sizes: list[int] = []
    work = batcher.work
    batcher.work = lambda x: sizes.append(len(x)) or work(x)
    files = [("images", (f"{i}.png", digits[i][0], "image/png")) for i in range(4)]
    assert client.post("/v1/detect/batch", files=files).status_code == 200
    assert sizes and max(sizes) <= 4


# ------------------------------------------------------------------------------------------ 5. gRPC, ONNX split


def _grpc(make_client: Any) -> tuple[Any, Any, dict[str, Any]]:
    """A started app with gRPC on a free port and API key 'k', and ``call(rpc, request, metadata)``."""
    import grpc

    from pathguard.service.grpc_server import SERVICE, messages
    from tests.service.conftest import _free_port

    port = _free_port()
    client = make_client(grpc_port=port, api_key="k")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    msgs = messages()

    def call(rpc: str, request: Any, metadata: tuple = ()) -> Any:
        fn = channel.unary_unary(
            f"/{SERVICE}/{rpc}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=msgs[f"{rpc}Response"].FromString,
        )
        return fn(request, metadata=metadata, timeout=10)

    return client, call, msgs


def test_grpc_health_needs_no_key_and_a_defect_counts_as_500(make_client, monkeypatch):
    import grpc

    from pathguard.service.grpc_server import GrpcServer

    async def broken(self: Any, request: Any, context: Any) -> Any:
        raise RuntimeError("a defect")

    monkeypatch.setattr(GrpcServer, "_ModelMetadata", broken)
    client, call, msgs = _grpc(make_client)
    assert call("ServerLive", msgs["ServerLiveRequest"]()).live is True
    assert call("ServerReady", msgs["ServerReadyRequest"]()).ready is True
    with pytest.raises(grpc.RpcError) as exc:
        call("ServerMetadata", msgs["ServerMetadataRequest"]())
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as exc:
        call("ModelMetadata", msgs["ModelMetadataRequest"](name=MODEL), metadata=(("x-api-key", "k"),))
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    text = client.get("/metrics", headers={"x-api-key": "k"}).text
    route = "/inference.GRPCInferenceService/ModelMetadata"
    assert f'pathguard_requests_total{{route="{route}",status="500"}} 1.0' in text
    assert f'route="{route}",status="200"' not in text


def test_onnx_split_failure_is_counted_and_shown_in_the_model(make_client, monkeypatch):
    import onnx.utils

    class Unsplittable:
        def __init__(self, model: Any) -> None:
            raise ValueError("not a chain")

    monkeypatch.setattr(onnx.utils, "Extractor", Unsplittable)
    client = make_client(detect_graph="off")  # the tap-by-tap split serves the Python pipeline
    info = client.get("/v1/model").json()
    assert "not a chain" in info["onnx_split_error"]
    assert _metric(client, "pathguard_onnx_split_failed") == 1
    monkeypatch.undo()
    healthy = make_client(detect_graph="off")
    assert healthy.get("/v1/model").json()["onnx_split_error"] is None
    assert _metric(healthy, "pathguard_onnx_split_failed") == 0


# ------------------------------------------------------------------------------------------ 6. build --out


def test_build_out_refuses_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    from pathguard.models.bundle import write_bundle
    from pathguard.models.errors import BundleError
    from pathguard.service.cli import main

    train = tmp_path / "train"
    (train / "0").mkdir(parents=True)
    (train / "0" / "a.png").write_bytes(b"user data")
    assert main(["build", "--dataset", "mnist", "--out", str(train)]) == 2
    assert "not a bundle" in capsys.readouterr().err
    with pytest.raises(BundleError, match="not a bundle"):
        write_bundle(train, {"x.bin": b"1"}, {"name": "x", "version": "1"})
    assert (train / "0" / "a.png").read_bytes() == b"user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]  # nothing left beside it


def test_build_out_replaces_a_bundle_only_with_force(tmp_path, capsys):
    from pathguard.models.bundle import verify_bundle, write_bundle
    from pathguard.service.cli import _out_refusal, main

    out = tmp_path / "bundle"
    write_bundle(out, {"a.bin": b"old"}, {"name": "b", "version": "1"})
    assert main(["build", "--dataset", "mnist", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert _out_refusal(out, force=True) is None and _out_refusal(tmp_path / "new", force=False) is None
    write_bundle(out, {"a.bin": b"new"}, {"name": "b", "version": "2"})
    assert (out / "a.bin").read_bytes() == b"new" and verify_bundle(out)["version"] == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # the old copy is gone


# ------------------------------------------------------------------------------------------ 7. exposure, docs


def test_binding_beyond_loopback_needs_a_key_or_insecure():
    from pathguard.service.app import check_exposure

    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_exposure(Settings(host=host))
    with pytest.raises(ValueError, match="PATHGUARD_INSECURE"):
        check_exposure(Settings(host="0.0.0.0"))
    check_exposure(Settings(host="0.0.0.0", api_key="k"))
    check_exposure(Settings(host="0.0.0.0", insecure=True))


def test_serve_refuses_an_open_public_bind(tmp_path, capsys, monkeypatch):
    from pathguard.service.cli import main

    monkeypatch.delenv("PATHGUARD_API_KEY", raising=False)
    monkeypatch.delenv("PATHGUARD_INSECURE", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "PATHGUARD_API_KEY" in capsys.readouterr().err


def test_docs_need_no_cdn(make_client):
    client = make_client(api_key="k")
    key = {"x-api-key": "k"}
    html = client.get("/docs", headers=key).text
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
    assert urls and not [u for u in urls if "//" in u]  # every asset from this server
    for url in urls:
        resp = client.get(url, headers=key)
        assert resp.status_code == 200 and len(resp.content) > 0, url
    assert "SwaggerUIBundle" in client.get("/docs/assets/swagger-ui-bundle.js", headers=key).text
    assert client.get("/docs/assets/swagger-ui.css").status_code == 401  # behind the key like /docs
    assert client.get("/docs/assets/..%2Fconsts.py", headers=key).status_code == 404


# ------------------------------------------------------------------------------------------ 8. 16-bit, threads


def test_16bit_grayscale_is_scaled_by_bit_depth_at_every_size():
    def i16(side: int, value: int) -> bytes:
        img = Image.fromarray(np.full((side, side), value, np.uint16))
        assert img.mode.startswith("I;16")
        return _png(img)

    small, large = decode_image(i16(28, 200), GRAY), decode_image(i16(56, 200), GRAY)
    np.testing.assert_allclose(small, 200 / 65535, rtol=1e-5)
    np.testing.assert_allclose(large, 200 / 65535, rtol=1e-5)
    np.testing.assert_allclose(decode_image(i16(56, 65535), GRAY), 1.0, rtol=1e-6)


def test_torch_threads_default_shares_the_cores_with_the_workers(make_client, monkeypatch):
    import os

    import torch

    def threads_where_torch_runs(client: Any) -> int:  # the detect batcher's thread, where the forward pass runs
        executor = client.app.state.pathguard.model(None).detect_batcher._executor
        return int(executor.submit(torch.get_num_threads).result())

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    try:
        assert threads_where_torch_runs(make_client(worker_threads=2)) == 4  # 12 cores / (2 workers + the batcher)
        assert threads_where_torch_runs(make_client(worker_threads=2, torch_threads=1)) == 1
    finally:
        torch.set_num_threads(before)
