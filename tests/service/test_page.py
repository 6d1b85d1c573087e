"""The page (GET /): static files, the benign ranges it shows, and a real headless Chromium driving it against a real
`pathguard serve` (Debian `chromium` + `chromium-driver`, installed by scripts/ensure-tools)."""

from __future__ import annotations

import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.deploy.conftest import BUNDLE, reliability_module

STATIC = ROOT / "service" / "static"
SAMPLES = json.loads((STATIC / "samples" / "index.json").read_text())
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
API_KEY = "page-test-key"
BODY_LIMIT = 64 * 1024


# --------------------------------------------------------------------------------------------- without a browser


def test_page_and_its_files_are_served_without_the_key(make_client):
    client = make_client(api_key="s3cret")
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert ref.startswith("/static/"), ref  # nothing from another origin (no CDN, no font service)
        assert client.get(ref).status_code == 200, ref
    for name in ("index.html", "page.js", "page.css"):
        assert not re.search(r"https?://", (STATIC / name).read_text()), name
    assert client.get("/static/samples/index.json").json() == SAMPLES
    assert client.get("/v1/model").status_code == 401  # the API itself still needs the key
    assert client.get("/v1/model", headers={"x-api-key": "s3cret"}).status_code == 200


def test_samples_are_what_the_index_says(make_client):
    client = make_client(cache=False)
    model = client.get("/v1/model").json()
    assert SAMPLES["bundle"]["bundle_sha256"] == model["bundle_sha256"], "samples are for the committed bundle"
    kinds = [s["kind"] for s in SAMPLES["samples"]]
    assert kinds.count("clean") >= 2 and kinds.count("adversarial") >= 2
    for s in SAMPLES["samples"]:
        png = (STATIC / "samples" / s["file"]).read_bytes()
        assert len(png) < 4096
        body = client.post("/v1/detect", content=png, headers={"content-type": "image/png"}).json()
        assert body["verdict"]["adversarial"] == (s["kind"] == "adversarial"), s
        assert (body["prediction"]["label"] == s["true_label"]) == (s["kind"] == "clean"), s
        assert body["verdict"]["score"] == pytest.approx(s["score"], abs=1e-3)


def test_model_reports_the_benign_similarity_the_bundle_holds(make_client):
    model = make_client().get("/v1/model").json()
    benign = model["benign_similarity"]
    assert benign["scope"] == "all classes" and benign["images"] == 1000 and benign["tail"] == 0.05
    arrays = np.load(BUNDLE / "ep_score.npz")
    n = len(model["layers"])
    z = 1.6448536269514722  # standard-normal quantile at 0.95
    for rank, sl, sign in ((1, slice(0, n), -1.0), (2, slice(n, 2 * n), 1.0)):
        median, scale = arrays["median"][sl], arrays["scale"][sl]
        assert benign[f"rank{rank}"]["median"] == pytest.approx(median.tolist(), abs=1e-6)
        expected = np.clip(median + sign * scale * z, 0, 1)
        assert benign[f"rank{rank}"]["bound"] == pytest.approx(expected.tolist(), abs=1e-6)
    per_class = benign["per_class"]
    ranges = np.load(BUNDLE / "benign_similarity.npz")
    assert per_class["images"] == ranges["count"].tolist() and sum(per_class["images"]) == 1000
    for k in range(10):
        assert per_class["rank1"]["median"][k] == pytest.approx(ranges["median"][k, :n].tolist(), abs=1e-6)
        assert per_class["rank2"]["bound"][k] == pytest.approx(ranges["bound"][k, n:].tolist(), abs=1e-6)


# --------------------------------------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Any]:
    rel = reliability_module()
    env = {"PATHGUARD_WARMUP_ROUNDS": "1", "PATHGUARD_MAX_BODY_BYTES": str(BODY_LIMIT), "PATHGUARD_API_KEY": API_KEY}
    srv = rel.Server(BUNDLE, tmp_path_factory.mktemp("page-server"), env).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail(
            "chromium / chromedriver not found: run scripts/ensure-tools (apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1100",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver: Any, condition: Any, what: str, timeout_s: float = 30) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s).until(condition, message=f"timed out waiting for {what}")


def _text(driver: Any, element_id: str) -> str:
    return str(driver.find_element("id", element_id).text)


def _answered(driver: Any, before: str) -> Any:
    """Condition: a new /v1/detect answer is rendered (another request id) or an error is shown."""
    return lambda d: (_text(d, "v-id") not in ("", before)) or d.find_element("id", "error").is_displayed()


def _sample_button(driver: Any, kind: str) -> tuple[Any, dict[str, Any]]:
    sample = next(s for s in SAMPLES["samples"] if s["kind"] == kind)
    return driver.find_element("css selector", f'button.sample[data-file="{sample["file"]}"]'), sample


def _noise_png(min_bytes: int) -> bytes:
    """A valid PNG (uniform noise barely compresses) of more than ``min_bytes``."""
    side = int((min_bytes * 1.2) ** 0.5) + 1
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)).save(buf, format="PNG")
    assert len(buf.getvalue()) > min_bytes
    return buf.getvalue()


def test_browser_checks_samples_and_shows_errors(server, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    assert httpx.get(server.url + "/", timeout=10).status_code == 200  # no key for the page itself
    browser.get(server.url + "/")
    # Without the key, the service's own 401 message is shown; typing the key in names the bundle.
    _wait(browser, lambda d: "401" in _text(d, "bundle"), "the 401 of /v1/model")
    assert "missing or invalid API key" in _text(browser, "bundle")
    key = browser.find_element("id", "api-key")
    key.send_keys(API_KEY, Keys.TAB)
    _wait(browser, lambda d: "Bundle mnist-lenet5 v1" in _text(d, "bundle"), "the bundle name")
    assert SAMPLES["bundle"]["bundle_sha256"][:12] in _text(browser, "bundle")

    button, clean = _sample_button(browser, "clean")
    button.click()
    _wait(browser, _answered(browser, ""), "the clean sample's verdict")
    assert not browser.find_element("id", "error").is_displayed(), _text(browser, "error")
    verdict = browser.find_element("id", "verdict")
    assert verdict.get_attribute("data-verdict") == "benign" and verdict.text.lower() == "benign"
    assert _text(browser, "pred-label") == clean["true_label"]
    assert re.fullmatch(r"0\.\d{4} ≤ 0\.\d{4}", _text(browser, "v-score")), _text(browser, "v-score")
    assert float(_text(browser, "v-fpr")) == pytest.approx(0.05)
    first_id = _text(browser, "v-id")

    button, adv = _sample_button(browser, "adversarial")
    button.send_keys(Keys.ENTER)  # the samples work from the keyboard
    _wait(browser, _answered(browser, first_id), "the adversarial sample's verdict")
    verdict = browser.find_element("id", "verdict")
    assert verdict.get_attribute("data-verdict") == "adversarial" and verdict.text.lower() == "adversarial"
    assert _text(browser, "pred-label") != adv["true_label"]
    assert " > " in _text(browser, "v-score")
    ep_rows = browser.find_elements("css selector", "#ep-table tbody tr")
    assert [r.find_element("tag name", "th").text for r in ep_rows] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert all(len(r.find_elements("css selector", ".band")) == 2 for r in ep_rows)  # rank-1 and rank-2 ranges
    note = _text(browser, "benign-note")
    assert f"Benign range of class {_text(browser, 'pred-label')}" in note and "held-out benign" in note
    assert len(browser.find_elements("css selector", "#nic-value tbody tr")) == 8
    assert len(browser.find_elements("css selector", "#nic-prov tbody tr")) == 7
    shot = tmp_path / "page-adversarial.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # An oversized upload: the service's 413 message is shown as it came back.
    big = tmp_path / "too-big.png"
    big.write_bytes(_noise_png(2 * BODY_LIMIT))
    adv_id = _text(browser, "v-id")
    browser.find_element("id", "file").send_keys(str(big))
    _wait(browser, lambda d: d.find_element("id", "error").is_displayed(), "the 413 error")
    error = _text(browser, "error")
    assert error.startswith("413: request body of") and f"exceeds the limit of {BODY_LIMIT}" in error, error
    assert _text(browser, "v-id") == adv_id  # the last good result stays

    # A shadow-mode answer (no verdict) clears the previous image's per-layer tables instead of leaving them on screen.
    browser.execute_script(
        'render({id: "shadow-1", prediction: {label: "3", confidence: 0.5}, verdict: null}, new Blob([]), "shadow")'
    )
    assert _text(browser, "v-id") == "shadow-1" and _text(browser, "v-score") == "-"
    for table in ("ep-table", "nic-value", "nic-prov"):
        assert browser.find_elements("css selector", f"#{table} tbody tr") == [], table
    assert "shadow mode" in _text(browser, "benign-note")

    # 360 px wide: nothing wider than the viewport.
    browser.set_window_size(360, 900)
    _wait(browser, lambda d: d.execute_script("return window.innerWidth") <= 360, "the narrow window")
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= browser.execute_script("return window.innerWidth"), width
    assert browser.save_screenshot(str(tmp_path / "page-360.png"))

    log = Path(server.log_path).read_text()
    assert re.search(r"POST /v1/detect 200 \d+\.\d ms id=[0-9a-f]{32}", log), log[-2000:]
    assert re.search(r"POST /v1/detect 413 \d+\.\d ms id=", log), log[-2000:]
    assert "GET / 200" in log
