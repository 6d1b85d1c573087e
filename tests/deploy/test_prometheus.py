"""Prometheus config and rules: promtool (Debian `prometheus` package) plus checks against the service's metrics.

promtool is a hard requirement: `make test` installs it (scripts/ensure-tools); a missing promtool fails here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pathguard.service.metrics import Metrics
from tests.deploy.manifests import PROMETHEUS_DIR, RULES

ROUTES = ("/v1/detect", "/v1/detect/batch", "/v1/predict", "/v2/models/{name}/infer")
TARGET_LABELS = {"job", "instance"}


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: run scripts/ensure-tools (apt-get install prometheus)")
    return exe


def run_promtool(*args: str | Path, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60)


def exported_metrics() -> dict[str, set[str]]:
    """Series name -> label names of the series the service exports (service/metrics.py), each metric used once."""
    m = Metrics()
    m.requests.labels(route="/v1/detect", status="200").inc()
    m.request_duration.labels(route="/v1/detect").observe(0.01)
    model = m.for_model("mnist")
    model.observe_stages({"decode": 0.001})
    model.observe_detection(True, 0.9, ["conv1"], [0.5], {"conv1": 0.1}, {"conv1->conv2": 0.2})
    model.cache_hits.inc()
    model.cache_misses.inc()
    m.redis_errors.inc()
    m.inflight.inc()
    m.set_bundle("mnist", "mnist-lenet5", "1", "0" * 64)
    m.model_loads.labels(model="mnist", outcome="success").inc()
    out: dict[str, set[str]] = {}
    for family in m.registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def rule_expressions() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(r.get("record") or r["alert"], r["expr"]) for g in groups for r in g["rules"]]


def check_metric_references(expr: str, where: str, metrics: dict[str, set[str]]) -> set[str]:
    """Every ``pathguard_*`` series in ``expr`` exists, and its label matchers use its labels; returns the names."""
    names = set(re.findall(r"\bpathguard_[a-z_]+\b", expr))
    for name in names:
        assert name in metrics, f"{where}: {name} is not exported by service/metrics.py"
    for name, matchers in re.findall(r"\b(pathguard_[a-z_]+)\{([^}]*)\}", expr):
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers):
            assert label in metrics[name] | TARGET_LABELS, f"{where}: {name} has no label {label}"
            if label == "verdict":
                assert value in {"adversarial", "benign"}, where
            if label == "route" and "$" not in value:
                assert any(re.fullmatch(value, r) for r in ROUTES), f"{where}: route {value} matches no route"
    return names


def test_promtool_check_config_compose():
    out = run_promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 1 rule files found" in out.stdout


def test_promtool_check_config_kubernetes(tmp_path):
    """Debian's promtool is built without Kubernetes discovery, so the pod discovery block is swapped for a static
    target and everything else (relabelling regexes, rule files, intervals) goes through promtool."""
    config: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "prometheus-kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    job["static_configs"] = [{"targets": ["127.0.0.1:8080"]}]
    shutil.copytree(PROMETHEUS_DIR / "rules", tmp_path / "rules")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    out = run_promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    relabelled = {r["source_labels"][0] for r in job["relabel_configs"]}
    assert "__meta_kubernetes_pod_container_port_name" in str(job["relabel_configs"][0]["source_labels"])
    assert {"__meta_kubernetes_namespace", "__meta_kubernetes_pod_name"} <= relabelled


def test_promtool_check_rules():
    out = run_promtool("check", "rules", RULES)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_of_the_alerts():
    """Each alert fires on a synthetic incident and stays silent on normal traffic (tests/pathguard.rules.test.yml)."""
    out = run_promtool("test", "rules", "tests/pathguard.rules.test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS_DIR / "tests/pathguard.rules.test.yml").read_text()))
    alerts = {name for name, _ in rule_expressions() if not name.startswith("pathguard:")}
    assert alerts == tested, f"alerts without a unit test: {alerts - tested}"


def test_promtool_rejects_a_broken_rule(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: rate(pathguard_x[5m]\n")
    assert run_promtool("check", "rules", broken).returncode != 0


def test_rules_cover_the_required_alerts_on_real_metric_names():
    metrics = exported_metrics()
    used: set[str] = set()
    for name, expr in rule_expressions():
        used |= check_metric_references(expr, name, metrics)
    assert {
        "pathguard_verdicts_total",
        "pathguard_request_duration_seconds_bucket",
        "pathguard_redis_errors_total",
    } <= used
    alerts = dict(rule_expressions())
    assert "pathguard_verdicts_total" in alerts["pathguard:adversarial_ratio:rate5m"]
    assert "pathguard:adversarial_ratio:rate5m" in alerts["PathguardAdversarialRateSpike"]
    assert "pathguard:detect_slow_ratio:rate5m" in alerts["PathguardDetectLatencyObjective"]
    assert "pathguard_redis_errors_total" in alerts["PathguardRedisErrors"]
    assert 'up{job="pathguard"}' in alerts["PathguardNotReady"]


def test_exported_metrics_match_the_product_contract():
    metrics = exported_metrics()
    contract = {
        "pathguard_requests_total": {"route", "status"},
        "pathguard_request_duration_seconds_bucket": {"route", "le"},
        "pathguard_stage_duration_seconds_bucket": {"model", "stage", "le"},
        "pathguard_verdicts_total": {"model", "verdict"},
        "pathguard_detection_score_bucket": {"model", "le"},
        "pathguard_layer_path_similarity_bucket": {"model", "layer", "le"},
        "pathguard_layer_violation_probability_bucket": {"model", "layer", "invariant", "le"},
        "pathguard_cache_hits_total": {"model"},
        "pathguard_cache_misses_total": {"model"},
        "pathguard_redis_errors_total": set(),
        "pathguard_inflight_requests": set(),
        "pathguard_bundle_info": {"model", "name", "version", "sha256"},
        "pathguard_model_ready": {"model"},
        "pathguard_model_loads_total": {"model", "outcome"},
    }
    for name, labels in contract.items():
        assert metrics.get(name) == labels, name
