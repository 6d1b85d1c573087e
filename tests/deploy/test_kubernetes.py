"""Kubernetes and KServe manifests: kinds, labels and selectors, ports, probes, resources, env names and values."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pathguard.service.settings import Settings
from tests.conftest import ARTIFACTS
from tests.deploy.manifests import (
    DEPLOY,
    PROMETHEUS_DIR,
    SETTING_ENV_NAMES,
    WILDCARD_HOSTS,
    configmap_data,
    k8s_documents,
    parse_dockerfile,
    settings_from_env,
)

K8S = DEPLOY / "kubernetes"
EXPECTED_KINDS = {
    "kubernetes/configmap.yaml": ["ConfigMap"],
    "kubernetes/standalone.yaml": ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"],
    "kubernetes/sidecar.yaml": ["Deployment", "Service", "NetworkPolicy"],
    "kubernetes/podmonitor.yaml": ["PodMonitor"],
    "kserve/inferenceservice.yaml": ["InferenceService"],
    "kserve/payload-logger.yaml": ["Broker", "InferenceService", "Service", "Trigger", "Trigger"],
}
API_VERSIONS = {
    "ConfigMap": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "PodMonitor": "monitoring.coreos.com/v1",
    "InferenceService": "serving.kserve.io/v1beta1",
    "Broker": "eventing.knative.dev/v1",
    "Trigger": "eventing.knative.dev/v1",
}
KNATIVE_SERVICE = "serving.knative.dev/v1"  # kind Service, but Knative's
KNATIVE_FILES = {"kserve/payload-logger.yaml"}
_FINAL_STAGE = parse_dockerfile()[1][-1]
IMAGE_UID = int(_FINAL_STAGE.all("USER")[-1].args.split(":")[0])


@pytest.fixture(scope="module")
def docs() -> dict[str, list[dict[str, Any]]]:
    return {str(path.relative_to(DEPLOY)): d for path, d in k8s_documents().items()}


def _one(docs, file: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs[file] if d["kind"] == kind]
    return doc


def _pod_specs(docs) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """(where, pod spec, pod labels) of every workload that runs pathguard."""
    out = []
    for file, ds in docs.items():
        for d in ds:
            if d["kind"] == "Deployment" or (d["kind"] == "Service" and d["apiVersion"] == KNATIVE_SERVICE):
                tpl = d["spec"]["template"]
                out.append((f"{file}:{d['metadata']['name']}", tpl["spec"], tpl["metadata"]["labels"]))
            elif d["kind"] == "InferenceService" and _pathguard_containers(d["spec"]["predictor"]):
                pred = d["spec"]["predictor"]
                out.append((f"{file}:{d['metadata']['name']}", pred, pred["labels"]))
    return out


def _pathguard_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        c
        for c in spec.get("initContainers", []) + spec.get("containers", [])
        if "/pathguard:" in c["image"] or c["image"].startswith("pathguard:")
    ]


def _effective_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's PATHGUARD_* environment: the image's ENV, then envFrom, then env (Kubernetes' order)."""
    env = {k: v for k, v in _FINAL_STAGE.env().items() if k.startswith("PATHGUARD_")}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == "pathguard-config"
        env.update(configmap_data())
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
    return env


def _resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(match)


def _quantity(value: str | int) -> float:
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_every_manifest_parses_with_the_expected_kinds(docs):
    assert set(docs) == set(EXPECTED_KINDS), "a manifest was added or removed without updating the checks"
    for file, kinds in EXPECTED_KINDS.items():
        assert [d["kind"] for d in docs[file]] == kinds, file
        for d in docs[file]:
            knative = file in KNATIVE_FILES and d["kind"] == "Service"
            assert d["apiVersion"] == (KNATIVE_SERVICE if knative else API_VERSIONS[d["kind"]]), (file, d["kind"])
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), d["metadata"]["name"]


def test_configmap_keys_are_settings_and_values_validate(monkeypatch):
    data = configmap_data()
    assert set(data) <= SETTING_ENV_NAMES, set(data) - SETTING_ENV_NAMES
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    settings = settings_from_env(data, monkeypatch)
    assert settings.host in WILDCARD_HOSTS, "kubelet probes and Prometheus reach the Pod IP"
    assert str(settings.bundle) == _FINAL_STAGE.env()["PATHGUARD_BUNDLE"]


def test_pathguard_containers_ports_probes_env(docs, monkeypatch):
    pods = _pod_specs(docs)
    assert len(pods) == 4  # standalone, sidecar, KServe predictor, KServe payload-logger detector
    for where, spec, _ in pods:
        (c,) = _pathguard_containers(spec)
        env = _effective_env(c)
        names = {i["name"] for i in c.get("env", [])} | set(env)
        assert names <= SETTING_ENV_NAMES, (where, names - SETTING_ENV_NAMES)
        settings = settings_from_env(env, monkeypatch)
        assert settings.host in WILDCARD_HOSTS, where
        port, *others = c["ports"]
        assert port["containerPort"] == settings.port and port["protocol"] == "TCP", where
        if where.startswith("kserve"):  # Knative: one port per container, so OIP over HTTP only
            assert others == [], where
        else:  # the gRPC port; readiness (HTTP) flips only once it listens
            (grpc,) = others
            assert grpc["name"] == "grpc" and grpc["containerPort"] == settings.grpc_port == 8081, where
        assert c.get("args", ["serve"]) == ["serve"]
        ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
        assert ready["path"] == "/v2/health/ready" and live["path"] == "/v2/health/live", where
        assert _resolve_port(c, ready["port"]) == _resolve_port(c, live["port"]) == settings.port, where
        if "startupProbe" in c:
            assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
            budget = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
            assert budget >= 60, f"{where}: loading and warm-up get at least a minute"
        else:
            assert c["livenessProbe"]["initialDelaySeconds"] >= 60, f"{where}: liveness waits for the warm-up"
        for item in c.get("env", []):
            if "valueFrom" in item:  # secrets are optional so the example applies as is
                assert item["valueFrom"]["secretKeyRef"]["optional"] is True


def test_resources_requests_and_limits(docs):
    for where, spec, _ in _pod_specs(docs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            res = c["resources"]
            for key in ("cpu", "memory"):
                assert _quantity(res["requests"][key]) <= _quantity(res["limits"][key]), (where, c["name"], key)
        (c,) = _pathguard_containers(spec)
        assert _quantity(c["resources"]["limits"]["memory"]) >= 2**30, f"{where}: torch + bundle need 1 GiB"


def test_pod_security_and_no_service_links(docs):
    for where, spec, _ in _pod_specs(docs):
        assert spec["enableServiceLinks"] is False, (
            f"{where}: a Service named pathguard would set PATHGUARD_PORT=tcp://... in the pod"
        )
        assert spec["securityContext"]["runAsNonRoot"] is True
        (c,) = _pathguard_containers(spec)
        uid = c.get("securityContext", {}).get("runAsUser", spec["securityContext"].get("runAsUser"))
        assert uid == IMAGE_UID, f"{where}: runs as the image's user"
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        if sc.get("readOnlyRootFilesystem"):
            spool_dir = str(Settings(**{"spool_path": _effective_env(c)["PATHGUARD_SPOOL_PATH"]}).spool_path.parent)
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert {spool_dir, "/tmp"} <= mounts, f"{where}: writable spool and /tmp on a read-only root"
            volumes = {v["name"] for v in spec["volumes"]}
            assert {m["name"] for m in c["volumeMounts"]} <= volumes


def test_standalone_selectors_service_hpa_pdb(docs):
    file = "kubernetes/standalone.yaml"
    dep = _one(docs, file, "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    svc = _one(docs, file, "Service")
    assert svc["spec"]["selector"].items() <= labels.items()
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    sport, grpc = svc["spec"]["ports"]
    assert _resolve_port(c, sport["targetPort"]) == c["ports"][0]["containerPort"]
    assert grpc["name"] == "grpc" and _resolve_port(c, grpc["targetPort"]) == c["ports"][1]["containerPort"] == 8081
    hpa = _one(docs, file, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu", "CPU utilisation needs the CPU request set"
    assert "cpu" in c["resources"]["requests"]
    pdb = _one(docs, file, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain can always evict one pod"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop[0] == "sleep" and int(pre_stop[1]) < grace


def test_sidecar_app_calls_pathguard_on_localhost(docs):
    file = "kubernetes/sidecar.yaml"
    dep = _one(docs, file, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    (pg,) = spec["initContainers"]
    assert pg["restartPolicy"] == "Always", "native sidecar: started before and stopped after the app"
    assert "startupProbe" in pg, "the app starts only after pathguard is up"
    (app,) = spec["containers"]
    port = pg["ports"][0]["containerPort"]
    app_env = {e["name"]: e["value"] for e in app["env"]}
    assert app_env["PATHGUARD_URL"] == f"http://127.0.0.1:{port}"
    svc = _one(docs, file, "Service")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (sport,) = svc["spec"]["ports"]
    assert _resolve_port(app, sport["targetPort"]) != port, "the Service exposes the app, not pathguard"
    netpol = _one(docs, file, "NetworkPolicy")
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    port_names = {p["port"] for rule in netpol["spec"]["ingress"] for p in rule["ports"]}
    assert port_names == {app["ports"][0]["name"], pg["ports"][0]["name"]}
    (monitoring_rule,) = [r for r in netpol["spec"]["ingress"] if "from" in r]
    assert [p["port"] for p in monitoring_rule["ports"]] == [pg["ports"][0]["name"]]


def test_kserve_inference_service_custom_container():
    (isvc,) = yaml.safe_load_all((DEPLOY / "kserve/inferenceservice.yaml").read_text())
    pred = isvc["spec"]["predictor"]
    (c,) = pred["containers"]
    assert c["name"] == "kserve-container"
    (port,) = c["ports"]
    assert port["name"] in {"http1", "h2c"} and port["containerPort"] == 8080, "Knative's port rules"
    manifest = json.loads((ARTIFACTS / "mnist-lenet5" / "manifest.json").read_text())
    assert isvc["metadata"]["name"] == manifest["name"], "KServe model name == the bundle's OIP model name"
    assert pred["minReplicas"] >= 1, "no scale-to-zero: the warm-up takes seconds"


def test_kserve_payload_logger_feeds_pathguard_and_routes_its_results(docs, monkeypatch):
    from pathguard.service.events import REQUEST_TYPES, RESULT_TYPE

    file = "kserve/payload-logger.yaml"
    broker = _one(docs, file, "Broker")["metadata"]["name"]
    isvc = _one(docs, file, "InferenceService")
    detector = _one(docs, file, "Service")
    requests, flagged = [d for d in docs[file] if d["kind"] == "Trigger"]
    broker_url = f"http://broker-ingress.knative-eventing.svc.cluster.local/default/{broker}"
    assert isvc["spec"]["predictor"]["logger"]["url"] == broker_url
    assert isvc["spec"]["predictor"]["logger"]["mode"] in {"request", "all"}, "the request events carry the images"
    assert requests["spec"]["broker"] == flagged["spec"]["broker"] == broker
    assert requests["spec"]["filter"]["attributes"] == {
        "type": REQUEST_TYPES[0],
        "inferenceservicename": isvc["metadata"]["name"],
    }
    ref = requests["spec"]["subscriber"]["ref"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (KNATIVE_SERVICE, "Service", detector["metadata"]["name"])
    assert flagged["spec"]["filter"]["attributes"] == {"type": RESULT_TYPE, "adversarial": "true"}
    (c,) = detector["spec"]["template"]["spec"]["containers"]
    settings = settings_from_env(_effective_env(c), monkeypatch)
    assert settings.events_sink == broker_url, "results go back to the broker"
    assert settings.grpc_port == 0, "Knative: one port per container"


def test_podmonitor_and_scrape_config_select_exactly_the_pathguard_ports(docs):
    mon = _one(docs, "kubernetes/podmonitor.yaml", "PodMonitor")
    selector = mon["spec"]["selector"]["matchLabels"]
    endpoint_ports = {e["port"] for e in mon["spec"]["podMetricsEndpoints"]}
    for e in mon["spec"]["podMetricsEndpoints"]:
        assert e["path"] == "/metrics"
        assert {"targetLabel": "job", "replacement": "pathguard"} in e["relabelings"], "the rules expect job=pathguard"
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus-kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "pathguard"
    keep = job["relabel_configs"][0]
    assert keep["action"] == "keep"
    regex = re.compile(keep["regex"])
    for where, spec, labels in _pod_specs(docs):
        assert selector.items() <= labels.items(), f"{where} is selected by the PodMonitor"
        for c in spec.get("initContainers", []) + spec["containers"]:
            is_pathguard = c in _pathguard_containers(spec)
            for p in c["ports"]:
                joined = keep["separator"].join([labels.get("app.kubernetes.io/part-of", ""), p["name"]])
                scraped = is_pathguard and p["name"] != "grpc"  # metrics are on the HTTP port only
                assert bool(regex.fullmatch(joined)) == scraped, (where, c["name"], p["name"])
                if scraped:
                    assert p["name"] in endpoint_ports
    assert not regex.fullmatch(";http1"), "a random pod's http1 port is not scraped"


def test_no_manifest_mentions_an_unknown_pathguard_variable():
    for path in [*(K8S.glob("*.yaml")), *(DEPLOY / "kserve").glob("*.yaml")]:
        names = set(re.findall(r"\bPATHGUARD_[A-Z_]+\b", Path(path).read_text())) - {"PATHGUARD_URL"}
        assert names <= SETTING_ENV_NAMES, (path.name, names - SETTING_ENV_NAMES)
