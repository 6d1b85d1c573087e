"""The model repository: control modes, the load/unload API, hot swaps, readiness and statistics, on copies of the
committed MNIST bundle (two copies of one bundle serve as two models)."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pathguard.service import repository as repository_module
from pathguard.service.metrics import Metrics
from pathguard.service.repository import ModelManager, scan_repository
from pathguard.service.settings import Settings
from tests.service.conftest import MNIST_BUNDLE

PNG = {"content-type": "image/png"}


def _copy(dst: Path) -> Path:
    shutil.copytree(MNIST_BUNDLE, dst)
    return dst


def _corrupt(bundle: Path) -> str:
    """Flip one byte of a bundle file the manifest lists (verification must refuse it); returns the file name."""
    victim = sorted(p for p in bundle.iterdir() if p.suffix == ".npz")[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    return victim.name


def _oip(x: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def _samples(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _index(client) -> dict[str, dict[str, Any]]:
    resp = client.post("/v2/repository/index")
    assert resp.status_code == 200, resp.text
    return {row["name"]: row for row in resp.json()}


@pytest.fixture
def repo(tmp_path) -> Path:
    """``a/`` (an unversioned bundle: its manifest's version, 1) and ``b/1``, ``b/3`` (version 3 is served)."""
    root = tmp_path / "repo"
    root.mkdir()
    _copy(root / "a")
    _copy(root / "b" / "1")
    _copy(root / "b" / "3")
    (root / ".staging").mkdir()  # hidden: skipped
    (root / "notes").mkdir()  # no bundle: skipped
    return root


def test_scan_finds_plain_and_versioned_bundles(repo):
    found = scan_repository(repo)
    assert sorted(found) == ["a", "b"]
    assert found["a"].version is None and found["a"].path == repo / "a"
    assert found["b"].version == "3" and found["b"].path == repo / "b" / "3"


def test_none_mode_serves_every_model_by_name(make_client, repo, mnist_test, digits):
    client = make_client(model_repository=repo)
    assert client.get("/v2/health/ready").status_code == 200
    index = _index(client)
    assert {n: (r["state"], r["version"]) for n, r in index.items()} == {"a": ("READY", "1"), "b": ("READY", "3")}
    x = mnist_test.x[:2]
    for name, version in (("a", "1"), ("b", "3")):
        assert client.get(f"/v2/models/{name}/ready").json() == {"name": name, "ready": True}
        assert client.get(f"/v2/models/{name}").json()["versions"] == [version]
        body = client.post(f"/v2/models/{name}/infer", json=_oip(x)).json()
        assert body["model_name"] == name and body["model_version"] == version
    assert client.get("/v2/models/b/versions/1/ready").status_code == 404  # only the served version exists
    assert client.get("/v2/models/zzz/ready").status_code == 404
    png, label = digits[0]
    several = client.post("/v1/detect", content=png, headers=PNG)
    assert several.status_code == 400 and "?model=" in several.json()["error"]
    by_query = client.post("/v1/detect?model=a", content=png, headers=PNG).json()
    by_header = client.post("/v1/detect", content=png, headers={**PNG, "X-Pathguard-Model": "b"}).json()
    assert by_query["model"]["name"] == "a" and by_header["model"]["name"] == "b"
    assert by_query["prediction"]["class_index"] == by_header["prediction"]["class_index"] == label
    assert client.get("/v1/model?model=b").json()["version"] == "3"
    refused = client.post("/v2/repository/models/a/load")
    assert refused.status_code == 400 and "explicit" in refused.json()["error"]
    s = _samples(client)  # every model's work under its own label
    assert (
        s[("pathguard_verdicts_total", (("model", "a"), ("verdict", "benign")))]
        + s[("pathguard_verdicts_total", (("model", "a"), ("verdict", "adversarial")))]
        == 3
    )  # two OIP images + one /v1/detect
    assert s[("pathguard_model_ready", (("model", "b"),))] == 1
    assert s[("pathguard_model_loads_total", (("model", "a"), ("outcome", "success")))] == 1


def test_none_mode_fails_the_start_on_a_broken_model(tmp_path, repo):
    from fastapi.testclient import TestClient

    from pathguard.service.app import create_app

    victim = _corrupt(repo / "a")
    settings = Settings(model_repository=repo, warmup_rounds=1, spool_path=tmp_path / "s.jsonl")
    with pytest.raises(Exception, match=victim), TestClient(create_app(settings)):
        pass


def test_explicit_mode_load_unload_and_statistics(make_client, repo, mnist_test):
    client = make_client(model_repository=repo, model_control_mode="explicit", load_models=["a"])
    assert client.get("/v2/health/ready").status_code == 200
    assert {n: r["state"] for n, r in _index(client).items()} == {"a": "READY", "b": "UNAVAILABLE"}
    assert client.get("/v2/models/b/ready").status_code == 404
    ready_only = client.post("/v2/repository/index", json={"ready": True}).json()
    assert [r["name"] for r in ready_only] == ["a"]

    loaded = client.post("/v2/repository/models/b/load")
    assert loaded.status_code == 200 and loaded.json()["version"] == "3"
    stats = client.get("/v2/models/b/stats").json()["model_stats"][0]
    assert (stats["name"], stats["version"], stats["inference_count"]) == ("b", "3", 0)
    assert stats["inference_stats"]["success"] == {"count": 0, "ns": 0}
    x = mnist_test.x[:3]
    assert client.post("/v2/models/b/infer", json=_oip(x)).status_code == 200
    bad = client.post("/v2/models/b/infer", json={"inputs": [{"name": "input", "shape": [1, 1, 2, 2],
                                                               "datatype": "FP32", "data": [0.0] * 4}]})  # fmt: skip
    assert bad.status_code == 400  # shape mismatch
    stats = client.get("/v2/models/b/stats").json()["model_stats"][0]
    inference = stats["inference_stats"]
    assert stats["inference_count"] == 3 and stats["execution_count"] >= 1
    assert inference["success"]["count"] == 1 and inference["fail"]["count"] == 1
    assert inference["compute_infer"]["count"] == 3 and inference["compute_infer"]["ns"] > 0
    assert inference["queue"]["count"] == 3
    assert {"effective_path", "nic"} <= set(stats["detection_stats"])
    assert stats["detection_stats"]["nic"]["count"] == 3
    assert {m["name"] for m in client.get("/v2/models/stats").json()["model_stats"]} == {"a", "b"}

    assert client.post("/v2/repository/models/a/unload").status_code == 200
    assert client.get("/v2/models/a/ready").status_code == 404
    assert _index(client)["a"] == {"name": "a", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
    assert client.post("/v2/repository/models/a/unload").status_code == 400  # not loaded
    assert client.post("/v2/repository/models/zzz/load").status_code == 400  # not in the repository
    s = _samples(client)
    assert s[("pathguard_model_ready", (("model", "a"),))] == 0
    assert not any(name == "pathguard_bundle_info" and ("model", "a") in labels for name, labels in s)


def test_a_corrupt_new_version_is_refused_and_the_old_one_keeps_serving(make_client, repo, mnist_test):
    client = make_client(model_repository=repo, model_control_mode="explicit", load_models=["b"])
    x = mnist_test.x[:1]
    victim = _corrupt(_copy(repo / "b" / "4"))
    refused = client.post("/v2/repository/models/b/load")
    assert refused.status_code == 400 and victim in refused.json()["error"]
    served = client.post("/v2/models/b/infer", json=_oip(x)).json()
    assert served["model_version"] == "3"
    row = _index(client)["b"]
    assert row["state"] == "READY" and row["version"] == "3" and victim in row["reason"]
    s = _samples(client)
    assert s[("pathguard_model_loads_total", (("model", "b"), ("outcome", "failed")))] == 1
    shutil.rmtree(repo / "b" / "4")
    _copy(repo / "b" / "4")  # fixed: loads and swaps in
    assert client.post("/v2/repository/models/b/load").json()["version"] == "4"
    assert client.post("/v2/models/b/infer", json=_oip(x)).json()["model_version"] == "4"
    assert _index(client)["b"]["reason"] == ""


def test_requests_in_flight_during_swaps_all_succeed(make_client, repo, digits):
    """Two threads send /v1/detect while the model is reloaded three times: no request fails, and every answer
    comes from a fully loaded version."""
    client = make_client(model_repository=repo, model_control_mode="explicit", load_models=["a"])
    stop, results, errors = threading.Event(), [], []

    def send() -> None:
        i = 0
        while not stop.is_set() and i < 400:
            png, label = digits[i % len(digits)]
            resp = client.post("/v1/detect?model=a", content=png, headers=PNG)
            (results if resp.status_code == 200 else errors).append((resp.status_code, resp.json()))
            i += 1

    workers = [threading.Thread(target=send) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        for _ in range(3):
            assert client.post("/v2/repository/models/a/load").status_code == 200
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    assert not errors, errors[:3]
    assert results and all(body["verdict"] is not None and body["model"]["name"] == "a" for _, body in results)
    s = _samples(client)
    assert s[("pathguard_model_loads_total", (("model", "a"), ("outcome", "success")))] == 4


def test_poll_mode_follows_the_folder(make_client, repo, mnist_test):
    shutil.rmtree(repo / "b")
    client = make_client(model_repository=repo, model_control_mode="poll", repository_poll_s=0.2)
    assert set(_index(client)) == {"a"}

    def wait_for(predicate, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"not reached: {_index(client)}")

    _copy(repo / "c")  # a new model
    wait_for(lambda: _index(client).get("c", {}).get("state") == "READY")
    victim = _corrupt(_copy(repo / "a2"))
    wait_for(lambda: victim in _index(client).get("a2", {}).get("reason", ""))
    assert _index(client)["a2"]["state"] == "UNAVAILABLE"
    assert client.get("/v2/health/ready").status_code == 503  # strict: a model of the folder does not load
    shutil.rmtree(repo / "a2")
    wait_for(lambda: client.get("/v2/health/ready").status_code == 200)
    shutil.rmtree(repo / "a")  # removed: unloaded
    wait_for(lambda: "a" not in {n for n, r in _index(client).items() if r["state"] == "READY"})
    assert client.get("/v2/models/a/ready").status_code == 404
    assert client.post("/v2/models/c/infer", json=_oip(mnist_test.x[:1])).status_code == 200


def test_readiness_is_false_while_a_model_loads(tmp_path, repo, monkeypatch):
    """The server is not ready, and the index says LOADING, until the start's models are loaded and warmed."""
    release = threading.Event()
    real_open = repository_module.open_model

    def slow_open(*args: Any, **kwargs: Any) -> Any:
        assert release.wait(60)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(repository_module, "open_model", slow_open)

    async def run() -> None:
        settings = Settings(model_repository=repo, warmup_rounds=1, spool_path=tmp_path / "s.jsonl")
        from pathguard.service.cache import DetectionStore

        metrics = Metrics()
        tasks: set[asyncio.Task[Any]] = set()
        manager = ModelManager(settings, metrics, DetectionStore(settings, metrics), lambda c: tasks.add(c))
        start = asyncio.create_task(manager.start())
        await asyncio.sleep(0.3)
        assert not manager.ready
        assert (await manager.index())[0]["state"] == "LOADING"
        release.set()
        await start
        assert manager.ready and {r["state"] for r in await manager.index()} == {"READY"}
        await manager.close()

    asyncio.run(run())


def test_a_real_server_swaps_under_load_driven_by_the_repo_cli(tmp_path, repo, digits):
    """`pathguard serve --repository` as a process, requests from two threads (bounded), and `pathguard repo`
    loading a new version, refusing a corrupt one and unloading: no request fails, every answer names a version
    whose load succeeded."""
    import http.client
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.service.conftest import _free_port

    shutil.rmtree(repo / "b")
    (repo / "a").rename(tmp_path / "a1")
    (repo / "a").mkdir()
    (tmp_path / "a1").rename(repo / "a" / "1")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATHGUARD_") or k.endswith("_DIR")}
    env |= {
        "PATHGUARD_WARMUP_ROUNDS": "1",
        "PATHGUARD_SPOOL_PATH": str(tmp_path / "s.jsonl"),
        "PATHGUARD_GRPC_PORT": "0",
    }
    cli = [sys.executable, "-m", "pathguard.service.cli"]
    serve = [*cli, "serve", "--repository", str(repo), "--control-mode", "explicit", "--load-model", "a"]
    proc = subprocess.Popen([*serve, "--port", str(port), "--log-level", "warning"], cwd=ROOT, env=env)

    def repo_cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [*cli, "repo", *args, "--url", f"http://127.0.0.1:{port}"]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    try:
        end = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < end, "server not ready"
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/v2/health/ready")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        stop, answers = threading.Event(), []

        def send() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            for i in range(5000):  # bounded; stopped once the swaps are done and answered
                if stop.is_set():
                    return
                conn.request("POST", "/v1/detect?model=a", body=digits[i % 8][0], headers=PNG)
                resp = conn.getresponse()
                answers.append((resp.status, json.loads(resp.read())))

        workers = [threading.Thread(target=send) for _ in range(2)]
        for w in workers:
            w.start()
        try:
            time.sleep(0.5)
            _copy(repo / "a" / "2")
            loaded = repo_cli("load", "a")
            assert loaded.returncode == 0 and "version 2" in loaded.stdout, loaded.stderr
            victim = _corrupt(_copy(repo / "a" / "3"))
            refused = repo_cli("load", "a")
            assert refused.returncode == 1 and victim in refused.stderr and "HTTP 400" in refused.stderr
            end = time.monotonic() + 30  # until the new version has answered (a fast machine may be between requests)
            while time.monotonic() < end and not any(body["model"]["version"] == "2" for _, body in answers[-4:]):
                time.sleep(0.1)
        finally:
            stop.set()
            for w in workers:
                w.join(60)
        listed = repo_cli("list")
        assert listed.returncode == 0
        assert listed.stdout.split("\n")[1].split()[:3] == ["a", "2", "READY"], listed.stdout
        assert answers and all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
        assert {body["model"]["version"] for _, body in answers} <= {"1", "2"}
        assert "2" in {body["model"]["version"] for _, body in answers}  # the swap happened under load
        assert repo_cli("unload", "a").returncode == 0
        assert "UNAVAILABLE" in repo_cli("list").stdout
        assert repo_cli("load").returncode == 2  # no name
    finally:
        proc.terminate()
        proc.wait(timeout=30)
