"""Request handling around detection: input checks before the cache, batch item ids, route labels of answers
sent before routing, the access log and the settings documentation."""

from __future__ import annotations

import logging
import re
import time

from pathguard.service.settings import Settings
from tests.conftest import ROOT
from tests.service.test_api import _samples, _value

PNG = {"content-type": "image/png"}
JPEG = {"content-type": "image/jpeg"}


def _wait_cached(client, png: bytes, timeout_s: float = 5.0) -> None:
    """Resend ``png`` until the answer comes from the cache (cache writes happen after the response)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        r = client.post("/v1/detect", content=png, headers=PNG)
        assert r.status_code == 200, r.text
        if r.json()["cached"]:
            return
        time.sleep(0.05)
    raise AssertionError("the verdict never reached the cache")


def test_png_declared_as_jpeg_is_400_before_and_after_it_is_cached(make_client, digits):
    client = make_client()  # in-memory verdict cache (no Redis URL)
    png = digits[2][0]
    first = client.post("/v1/detect", content=png, headers=JPEG)
    assert first.status_code == 400 and "JPEG" in first.json()["error"]
    _wait_cached(client, png)
    again = client.post("/v1/detect", content=png, headers=JPEG)
    assert again.status_code == 400, again.text
    assert again.json() == first.json()
    files = [("images", ("a.png", png, "image/png")), ("images", ("b.png", png, "image/jpeg"))]
    batch = client.post("/v1/detect/batch", files=files)
    assert batch.status_code == 400 and batch.json()["error"].startswith("image 1:")


def test_batch_items_have_their_own_ids(make_client, digits):
    client = make_client()
    single = client.post("/v1/detect", content=digits[0][0], headers={**PNG, "x-request-id": "one-7"})
    assert single.json()["id"] == "one-7" and single.headers["x-request-id"] == "one-7"
    _wait_cached(client, digits[0][0])
    files = [("images", (f"{i}.png", digits[i][0], "image/png")) for i in range(3)]
    r = client.post("/v1/detect/batch", files=files, headers={"x-request-id": "batch-abc"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "batch-abc"
    results = r.json()["results"]
    assert [res["id"] for res in results] == ["batch-abc-0", "batch-abc-1", "batch-abc-2"]
    assert [res["cached"] for res in results] == [True, False, False]  # a cache hit gets its item id too
    anonymous = client.post("/v1/detect/batch", files=files[1:])
    rid = anonymous.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert [res["id"] for res in anonymous.json()["results"]] == [f"{rid}-0", f"{rid}-1"]


def test_body_limit_413_is_counted_under_its_route(make_client, digits):
    client = make_client(max_body_bytes=2048)
    big = b"\x00" * 5000
    for route in ("/v1/detect", "/v1/detect/batch"):
        r = client.post(route, content=big, headers=PNG)
        assert r.status_code == 413 and "limit of 2048" in r.json()["error"]
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])  # early answers carry an id too
    assert client.post("/no/such/route", content=big, headers=PNG).status_code == 413
    assert client.post("/v1/detect", content=digits[0][0], headers=PNG).status_code == 200
    s = _samples(client)
    assert _value(s, "pathguard_requests_total", route="/v1/detect", status="413") == 1
    assert _value(s, "pathguard_requests_total", route="/v1/detect/batch", status="413") == 1
    assert _value(s, "pathguard_requests_total", route="unmatched", status="413") == 1  # no route has that path
    assert _value(s, "pathguard_request_duration_seconds_count", route="/v1/detect") == 2


def _access_lines(caplog) -> list[str]:
    return [rec.getMessage() for rec in caplog.records if rec.name == "pathguard.access"]


def test_access_log_line_per_request(make_client, digits, caplog):
    caplog.set_level(logging.INFO, logger="pathguard.access")
    client = make_client()
    client.post("/v1/detect", content=digits[0][0], headers={**PNG, "x-request-id": "log-me-1"})
    client.post("/v1/detect", content=b"junk", headers={**PNG, "x-request-id": "log-me-2"})
    client.get("/v2/models/mnist-lenet5", headers={"x-request-id": "log-me-3"})
    client.get("/nothing/here?secret=1")
    lines = _access_lines(caplog)
    assert len(lines) == 4, lines
    assert re.fullmatch(r"POST /v1/detect 200 \d+\.\d ms id=log-me-1", lines[0]), lines[0]
    assert re.fullmatch(r"POST /v1/detect 400 \d+\.\d ms id=log-me-2", lines[1]), lines[1]
    assert re.fullmatch(r"GET /v2/models/\{name\} 200 \d+\.\d ms id=log-me-3", lines[2]), lines[2]
    assert re.fullmatch(r"GET unmatched 404 \d+\.\d ms id=[0-9a-f]{32}", lines[3]), lines[3]
    assert all(len(line) < 120 for line in lines)  # no image data, no raw path or query

    caplog.clear()
    quiet = make_client(access_log=False)
    assert quiet.post("/v1/detect", content=digits[0][0], headers=PNG).status_code == 200
    assert _access_lines(caplog) == []


def test_every_setting_is_documented():
    doc = (ROOT / "docs" / "service.md").read_text()
    table = doc.split("## Settings", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `(PATHGUARD_[A-Z0-9_]+)` \|", table, flags=re.M)
    assert sorted(documented) == sorted(f"PATHGUARD_{name.upper()}" for name in Settings.model_fields)
