"""Integration: a real Prometheus (Debian `prometheus` package) scrapes a running `pathguard serve`.

The counts of verdicts the clients received must come back through Prometheus's HTTP API; the alert and recording
rules load and evaluate without errors, and every dashboard query is valid PromQL on the live data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.conftest import BUNDLE, reliability_module
from tests.deploy.manifests import DASHBOARD, DEPLOY, RULES

rel = reliability_module()


@pytest.fixture(scope="module")
def pathguard(tmp_path_factory) -> Iterator[Any]:
    workdir = tmp_path_factory.mktemp("pathguard")
    server = rel.Server(BUNDLE, workdir, {"PATHGUARD_WARMUP_ROUNDS": "1"}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prometheus(pathguard, tmp_path_factory) -> Iterator[str]:
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus not found: run scripts/ensure-tools (apt-get install prometheus)")
    workdir: Path = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "pathguard", "static_configs": [{"targets": [f"127.0.0.1:{pathguard.port}"]}]},
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = rel.free_port()
    args = [exe, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}"]
    args += [f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with open(workdir / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: httpx.get(url + "/-/ready", timeout=1).status_code == 200, 30, "Prometheus ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    body = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=5).json()
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _verdicts_in_prometheus(prom: str) -> dict[str, int]:
    rows = _query(prom, 'sum by (verdict) (pathguard_verdicts_total{job="pathguard"})')
    return {r["metric"]["verdict"]: int(float(r["value"][1])) for r in rows}


def _verdicts_exposed(server: Any) -> dict[str, int]:
    counts = {}
    for line in httpx.get(server.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("pathguard_verdicts_total{"):
            verdict = line.split('verdict="', 1)[1].split('"', 1)[0]
            counts[verdict] = int(float(line.rsplit(" ", 1)[1]))
    return counts


@pytest.fixture(scope="module")
def traffic(pathguard, prometheus) -> dict[str, int]:
    """Distinct MNIST digits plus noise images sent to /v1/detect; the verdict counts the clients saw."""
    before = _verdicts_exposed(pathguard)
    _wait(lambda: _verdicts_in_prometheus(prometheus) == before, 30, "first scrape")
    seen = {"adversarial": 0, "benign": 0}
    with httpx.Client(base_url=pathguard.url, timeout=30) as client:
        for body in rel.mnist_images(24, noise_every=3):
            r = client.post("/v1/detect", content=body, headers={"Content-Type": "image/png"})
            assert r.status_code == 200, r.text
            seen["adversarial" if r.json()["verdict"]["adversarial"] else "benign"] += 1
    return {k: before.get(k, 0) + v for k, v in seen.items()} | {
        "sent": 24,
        **{f"seen_{k}": v for k, v in seen.items()},
    }


def test_verdict_counts_come_back_through_prometheus(pathguard, prometheus, traffic):
    expected = {k: traffic[k] for k in ("adversarial", "benign")}
    assert traffic["seen_adversarial"] > 0 and traffic["seen_benign"] > 0, "both verdicts occur (noise is flagged)"
    assert _verdicts_exposed(pathguard) == expected
    _wait(lambda: _verdicts_in_prometheus(prometheus) == expected, 30, f"Prometheus to show {expected}")
    targets = httpx.get(prometheus + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    assert [(t["labels"]["job"], t["health"]) for t in targets] == [("pathguard", "up")]
    bundle = _query(prometheus, "pathguard_bundle_info")
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    assert [r["metric"]["name"] for r in bundle] == [manifest["name"]]


def test_rules_load_and_evaluate_on_live_data(prometheus, traffic):
    def evaluated() -> bool:
        groups = httpx.get(prometheus + "/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return len(rules) == 11 and all(not r["lastEvaluation"].startswith("0001") for r in rules)

    _wait(evaluated, 30, "rule evaluation")
    groups = httpx.get(prometheus + "/api/v1/rules", timeout=5).json()["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert all(r["health"] == "ok" for r in rules.values()), {n: r.get("lastError") for n, r in rules.items()}

    def ratio() -> float:
        rows = _query(prometheus, "pathguard:adversarial_ratio:rate5m")
        # absent until the rule has evaluated over two scrapes that differ, NaN while the rates are zero
        return float(rows[0]["value"][1]) if rows else float("nan")

    _wait(lambda: 0.0 <= ratio() <= 1.0, 60, "the recorded adversarial ratio")
    expected = traffic["seen_adversarial"] / traffic["sent"]
    assert ratio() == pytest.approx(expected, abs=0.2), "the recording rule sees the traffic's adversarial share"
    assert rules["PathguardNotReady"]["state"] == "inactive"
    assert rules["PathguardAbsent"]["state"] == "inactive"


def _dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"]] + [c for p in dash["panels"] for c in p.get("panels", [])]
    out = []
    for p in panels:
        for t in p.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", "1m")
            for var in ("job", "instance", "model", "route", "layer", "violation_layer"):
                expr = expr.replace(f"${var}", ".*")
            out.append((p["title"], expr))
    return out


def test_every_dashboard_query_runs_on_live_data(prometheus, traffic):
    # Per-layer series are born with the first detection, so they need two scrapes of their own before rate() exists.
    for metric in ("pathguard_verdicts_total", "pathguard_layer_path_similarity_count"):
        expr = f'rate({metric}{{job="pathguard"}}[1m])'
        _wait(lambda e=expr: _query(prometheus, e) != [], 30, f"two scrapes of {metric}")
    empty = []
    for title, expr in _dashboard_queries():
        if not _query(prometheus, expr):
            empty.append(title)
    # Only panels about things this traffic never produced may be empty (no Redis, no cache hits, no 5xx).
    assert set(empty) <= {"Errors: 5xx answers and Redis errors", "Cache hit rate", "Verdict cache hit rate"}, empty
    for title in ("Request latency quantiles", "Verdict rate", "Rank-1 path similarity per layer (median and p10)"):
        assert title not in empty


def test_container_healthcheck_script_against_the_live_server(pathguard):
    script = DEPLOY / "docker" / "healthcheck.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATHGUARD_")}
    ok = subprocess.run(
        [sys.executable, str(script)], env={**env, "PATHGUARD_HOST": "0.0.0.0", "PATHGUARD_PORT": str(pathguard.port)}
    )
    assert ok.returncode == 0
    closed = subprocess.run(
        [sys.executable, str(script)],
        env={**env, "PATHGUARD_PORT": str(rel.free_port())},
        capture_output=True,
        text=True,
    )
    assert closed.returncode == 1 and "not ready" in closed.stderr
