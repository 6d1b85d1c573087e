"""Grafana provisioning and the dashboard JSON: structure, variables, and queries on real metric names."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import DASHBOARD, DEPLOY
from tests.deploy.test_prometheus import check_metric_references, exported_metrics

REQUIRED = {
    "request rate": r"rate\(pathguard_requests_total\b",
    "latency quantiles": r"histogram_quantile\(0\.99, sum by \(route, le\) \(rate\(pathguard_request_duration_sec",
    "verdict rate": r"sum by \(verdict\) \(rate\(pathguard_verdicts_total\b",
    "per-layer path similarity": r"sum by \(layer, le\) \(rate\(pathguard_layer_path_similarity_bucket",
    "per-layer violation": r"sum by \(layer, invariant, le\) \(rate\(pathguard_layer_violation_probability_bucket",
    "cache hit rate": r"pathguard_cache_hits_total.*pathguard_cache_misses_total",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]


def test_dashboard_structure(dashboard):
    assert dashboard["uid"] == "pathguard" and dashboard["title"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for p in panels(dashboard):
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["targets"], f"{p['title']} has no query"
            for t in p["targets"]:
                assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
                assert t["refId"]
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), p["title"]


def test_dashboard_covers_the_required_views(dashboard):
    text = "\n".join(expr for _, expr in expressions(dashboard))
    for view, pattern in REQUIRED.items():
        assert re.search(pattern, text), f"no panel shows the {view}"
    kinds = {p["type"] for p in panels(dashboard)}
    assert {"timeseries", "heatmap", "stat"} <= kinds
    heatmaps = [p for p in panels(dashboard) if p["type"] == "heatmap"]
    assert all(t["format"] == "heatmap" and "{{le}}" in t["legendFormat"] for p in heatmaps for t in p["targets"])
    repeated = {p.get("repeat") for p in heatmaps}
    assert {"layer", "violation_layer"} <= repeated, "one distribution panel per layer"


def test_dashboard_queries_use_exported_metrics_and_defined_variables(dashboard):
    metrics = exported_metrics()
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    builtin = {"__rate_interval", "__interval", "__range"}
    for title, expr in expressions(dashboard):
        check_metric_references(expr, title, metrics)
        used = set(re.findall(r"\$(\w+)", expr)) - builtin
        assert used <= variables, f"{title}: undefined variables {used - variables}"
        assert expr.count("(") == expr.count(")"), title
        if "rate(" in expr:
            assert "[$__rate_interval]" in expr, f"{title}: rate windows follow the scrape interval"
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            check_metric_references(v["query"]["query"], v["name"], metrics)
    for p in panels(dashboard):
        if p.get("repeat"):
            assert p["repeat"] in variables


def test_provisioning_files():
    (ds,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["uid"] == "prometheus" and ds["isDefault"] is True
    (provider,) = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/pathguard.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
