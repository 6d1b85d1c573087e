"""docker-compose.yml: parsed and checked against the Dockerfile, the settings and the mounted config files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from tests.conftest import ROOT
from tests.deploy.manifests import (
    COMPOSE,
    SETTING_ENV_NAMES,
    WILDCARD_HOSTS,
    Instruction,
    Stage,
    parse_dockerfile,
    settings_from_env,
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def services(compose) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def image() -> Stage:
    return parse_dockerfile()[1][-1]


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path for the ``./host:/container[:ro]`` volumes of ``service``."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith("."):
            out[target] = (ROOT / source).resolve()
    return out


def _host_path(service: dict[str, Any], container_path: str) -> Path:
    """Where a path inside ``service``'s container comes from on the host (through a bind mount)."""
    for target, source in sorted(_bind_mounts(service).items(), key=lambda kv: -len(kv[0])):
        if container_path == target or container_path.startswith(target + "/"):
            return source / container_path[len(target) :].lstrip("/")
    raise AssertionError(f"{container_path} is not bind-mounted")


def _published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    out = []
    for spec in service.get("ports", []):
        host_ip, host_port, container_port = str(spec).split(":")
        out.append((host_ip, int(host_port), int(container_port)))
    return out


def test_stack_services_healthchecks_and_named_volumes(compose, services):
    assert set(services) == {"pathguard", "redis", "prometheus", "grafana"}
    for name, svc in services.items():
        test = svc["healthcheck"]["test"]
        assert isinstance(test, list) and test[0] == "CMD", f"{name}: exec-form healthcheck"
        assert svc["restart"] == "unless-stopped"
    declared = set(compose["volumes"])
    used = {
        spec.split(":")[0] for svc in services.values() for spec in svc.get("volumes", []) if not spec.startswith(".")
    }
    assert used == declared, "every named volume is declared and used"
    for name, svc in services.items():
        for host_ip, _, _ in _published(svc):
            assert host_ip == "127.0.0.1", f"{name} publishes on localhost only"


def test_pathguard_service_matches_the_dockerfile_and_settings(services, image, monkeypatch):
    svc = services["pathguard"]
    assert svc["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    assert (ROOT / svc["build"]["dockerfile"]).is_file()
    env = {k: str(v) for k, v in svc["environment"].items()}
    assert set(env) <= SETTING_ENV_NAMES, set(env) - SETTING_ENV_NAMES
    settings = settings_from_env(
        {**{k: v for k, v in image.env().items() if k.startswith("PATHGUARD_")}, **env}, monkeypatch
    )
    assert settings.host in WILDCARD_HOSTS
    exposed = [int(p) for i in image.all("EXPOSE") for p in i.args.split()]
    assert [c for _, _, c in _published(svc)] == [settings.port, settings.grpc_port] == exposed
    assert str(settings.bundle) == image.env()["PATHGUARD_BUNDLE"], "serves the bundle baked into the image"
    # the spool lives on the named volume mounted where the image declares its VOLUME
    (volume,) = svc["volumes"]
    name, target = volume.split(":")
    assert image.all("VOLUME")[0].exec_form() == [target]
    assert str(settings.spool_path.parent) == target
    # same health check as the image's HEALTHCHECK
    (hc,) = image.all("HEALTHCHECK")
    assert svc["healthcheck"]["test"][1:] == Instruction("CMD", hc.args.split("CMD", 1)[1]).exec_form()
    assert svc["init"] is True, "PID 1 forwards SIGTERM and reaps"
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"


def test_redis_url_points_at_the_redis_service(services, monkeypatch):
    url = urlparse(str(services["pathguard"]["environment"]["PATHGUARD_REDIS_URL"]))
    assert url.scheme == "redis"
    assert url.hostname in services
    command = services[url.hostname].get("command", [])
    port = int(command[command.index("--port") + 1]) if "--port" in command else 6379
    assert url.port == port
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in services[url.hostname]["volumes"]), "Redis data on a named volume"


def test_prometheus_scrapes_the_pathguard_service(services):
    svc = services["prometheus"]
    flags = dict(arg.lstrip("-").split("=", 1) for arg in svc["command"])
    config_path = _host_path(svc, flags["config.file"])
    assert config_path == (ROOT / "deploy/prometheus/prometheus.yml").resolve()
    config = yaml.safe_load(config_path.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "pathguard"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    port = services["pathguard"]["environment"]["PATHGUARD_PORT"]
    assert targets == [f"pathguard:{port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    for pattern in config["rule_files"]:
        matched = list(config_path.parent.glob(pattern))
        assert matched, f"rule_files {pattern} matches nothing next to the config"
    assert any(v.endswith(":/prometheus") for v in svc["volumes"]), "TSDB on a named volume"


def test_grafana_provisioning_matches_the_mounts(services):
    svc = services["grafana"]
    provisioning = _host_path(svc, "/etc/grafana/provisioning")
    (ds_file,) = (provisioning / "datasources").glob("*.yml")
    (ds,) = yaml.safe_load(ds_file.read_text())["datasources"]
    url = urlparse(ds["url"])
    assert url.hostname == "prometheus" and url.hostname in services
    assert [c for _, _, c in _published(services["prometheus"])] == [url.port]
    (prov_file,) = (provisioning / "dashboards").glob("*.yml")
    (provider,) = yaml.safe_load(prov_file.read_text())["providers"]
    dashboards = _host_path(svc, provider["options"]["path"])
    (dash_file,) = dashboards.glob("*.json")
    dashboard = json.loads(dash_file.read_text())
    ds_var = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert ds_var["current"]["value"] == ds["uid"], "the dashboard defaults to the provisioned datasource"
    home = svc["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _host_path(svc, home) == dash_file
    assert svc["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_top_level_keys_both_compose_implementations_accept(compose):
    """Only keys that Compose v2 and Debian's docker-compose 1.29 both accept: 1.29 rejects the top-level ``name``
    ("'name' does not match any of the regexes: '^x-'") and v2 ignores ``version``."""
    allowed = {"services", "volumes", "networks", "configs", "secrets"}
    extra = {k for k in compose if k not in allowed and not k.startswith("x-")}
    assert not extra, f"top-level keys docker-compose 1.29 or Compose v2 rejects: {sorted(extra)}"
    assert compose["services"]["pathguard"]["image"] == "pathguard:0.1.0", "the image `docker build -t` names"
