"""Serving a bundle's stored guarded graph: on a server without torch (a Python where torch, scikit-learn, scipy,
numba and onnx cannot be imported, ``tests/without_torch.py``) and with PATHGUARD_DETECT_GRAPH=stored."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pathguard.models.data import load_dataset
from pathguard.models.effective_path import ingraph
from pathguard.models.guarded import store_in_bundle
from pathguard.service.repository import RepositoryError
from tests.conftest import ARTIFACTS, ROOT, nested_keys
from tests.service.conftest import MNIST_BUNDLE, png_bytes

RESIDUAL = ARTIFACTS / "cifar10-resnet20"

PNG = {"content-type": "image/png"}

# A server's life without torch, as a client sees it: the model's description, a detection, a prediction, an Open
# Inference Protocol call over HTTP and over gRPC; then what was imported.
_CLIENT = """
import base64, json, sys
from fastapi.testclient import TestClient
from pathguard.service.app import create_app
from pathguard.service.settings import Settings

import socket
import numpy as np
import tritonclient.grpc as grpcclient

sock = socket.socket()
sock.bind(("127.0.0.1", 0))
grpc_port = sock.getsockname()[1]
sock.close()
settings = Settings(bundle=sys.argv[1], spool_path=sys.argv[2], warmup_rounds=1, redis_url=None, noise_seed=0,
                    grpc_port=grpc_port)
png = base64.b64decode(sys.argv[3])
out = {}
with TestClient(create_app(settings)) as c:
    out["model"] = c.get("/v1/model").json()
    out["detect"] = c.post("/v1/detect", content=png, headers={"content-type": "image/png"}).json()
    out["predict"] = c.post("/v1/predict", content=png, headers={"content-type": "image/png"}).json()
    body = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
    r = c.post("/v2/models/mnist-lenet5/infer", json=body)
    out["infer"] = {"status": r.status_code, "outputs": sorted(o["name"] for o in r.json()["outputs"])}
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    tensor = grpcclient.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 28, 28), dtype=np.float32))
    answer = client.infer("mnist-lenet5", [tensor]).get_response()
    out["grpc"] = sorted(o.name for o in answer.outputs)
out["modules"] = sorted({m.split(".")[0] for m in sys.modules})
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def stored_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("stored") / "mnist-lenet5"
    store_in_bundle(MNIST_BUNDLE, out)
    return out


def _without_torch(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tests" / "without_torch.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _client_without_torch(bundle, tmp_path, png: bytes) -> subprocess.CompletedProcess:
    import base64

    spool = str(tmp_path / "spool.jsonl")
    return _without_torch("-c", _CLIENT, str(bundle), spool, base64.b64encode(png).decode())


def test_a_server_without_torch_answers_from_the_stored_graph(stored_bundle, tmp_path, mnist_test, make_client):
    """No builder dependency is imported; the answers have the shape of a server with torch, and the Effective Path
    walk's similarities are the same numbers."""
    png = png_bytes(mnist_test.x[0])
    run = _client_without_torch(stored_bundle, tmp_path, png)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.split("RESULT ", 1)[1])
    assert not {"torch", "sklearn", "scipy", "numba", "onnx", "safetensors"} & set(out["modules"])
    model, detect = out["model"], out["detect"]
    assert model["detection"] == "stored" and model["skipped_components"] == []
    assert model["graph_components"] == ["effective_path", "nic", "nic_vi", "noise_drop", "squeeze"]
    assert model["benign_similarity"]["rank1"]["median"]  # the bundle's benign statistics, as with torch
    assert detect["prediction"]["label"] == "7" and detect["verdict"]["adversarial"] is False
    assert out["predict"]["prediction"]["label"] == "7"
    assert out["infer"]["status"] == 200 and "is_adversarial" in out["infer"]["outputs"]
    assert out["grpc"] == out["infer"]["outputs"]  # the same answer over gRPC

    with_torch = make_client(bundle=stored_bundle, detect_graph="on")  # the graph built at load, the walk beside
    ref = with_torch.post("/v1/detect", content=png, headers=PNG).json()
    assert nested_keys(detect) - {"timings_ms.checks_wait"} <= nested_keys(ref)
    drop = {"id", "timings_ms", "cached"}
    assert nested_keys({k: v for k, v in detect.items() if k not in drop}) == nested_keys(
        {k: v for k, v in ref.items() if k not in drop}
    )
    assert detect["effective_path"]["rank1_similarity"] == ref["effective_path"]["rank1_similarity"]
    assert detect["effective_path"]["rank2_similarity"] == ref["effective_path"]["rank2_similarity"]
    described = with_torch.get("/v1/model").json()
    where = {"detection", "detection_note", "graph_components", "skipped_components"}
    assert {k: v for k, v in described.items() if k not in where} == {k: v for k, v in model.items() if k not in where}


def test_a_server_without_torch_refuses_a_bundle_without_a_stored_graph(tmp_path, mnist_test):
    run = _client_without_torch(MNIST_BUNDLE, tmp_path, png_bytes(mnist_test.x[0]))
    assert run.returncode != 0
    assert "this server has no torch installed" in run.stderr
    assert "--in-bundle" in run.stderr and "pathguard[build]" in run.stderr


def test_the_builder_commands_without_torch_say_what_to_install(tmp_path):
    run = _without_torch("-m", "pathguard.service.cli", "build", "--dataset", "mnist", "--out", str(tmp_path / "b"))
    assert run.returncode == 2, run.stderr
    assert "pip install 'pathguard[build]'" in run.stderr and "Traceback" not in run.stderr


def test_detect_graph_stored_serves_the_stored_graph_with_torch_too(stored_bundle, make_client, digits):
    """PATHGUARD_DETECT_GRAPH=stored: enforce and shadow answers from the stored graph; seeded, repeatable."""
    client = make_client(bundle=stored_bundle, detect_graph="stored")
    assert client.get("/v1/model").json()["detection"] == "stored"
    png, label = digits[1]
    first = client.post("/v1/detect", content=png, headers=PNG).json()
    again = client.post("/v1/detect", content=png, headers=PNG).json()
    assert first["prediction"]["class_index"] == label
    assert first["verdict"] == again["verdict"] and first["noise_drop"] == again["noise_drop"]
    shadow = make_client(bundle=stored_bundle, detect_graph="stored", mode="shadow")
    body = shadow.post("/v1/detect", content=png, headers=PNG).json()
    assert body["prediction"]["class_index"] == label and body["mode"] == "shadow"


def test_detect_graph_stored_refuses_a_bundle_without_one(make_client):
    with pytest.raises(RepositoryError, match="--in-bundle"):
        make_client(detect_graph="stored")


def test_the_stored_runtime_answers_batches_like_single_images(stored_bundle, mnist_test):
    """A batch scores each input as alone (per-input noise seeds; no state across inputs)."""
    from pathguard.models.bundle.stored import load_stored
    from pathguard.service.runtime import StoredRuntime

    runtime = StoredRuntime(load_stored(stored_bundle), seed=3)
    try:
        x = mnist_test.x[:5].astype(np.float32)
        batch = runtime.detect(x).result
        for i in range(len(x)):
            alone = runtime.detect(x[i : i + 1]).result
            assert alone.row(0) == batch.row(i)
    finally:
        runtime.close()


def test_auto_prefers_the_stored_graph_where_it_holds_what_the_answers_report(
    stored_bundle, tmp_path, make_client, monkeypatch
):
    """With torch: a stored graph that holds every component is served by ``auto`` (MNIST; the residual bundle, its
    Effective Path walk in it). One that lacks the walk (stored under a synapse budget too small for it) makes
    ``auto`` build the graph at load (the walk beside it) unless the answers leave the walk out
    (PATHGUARD_REPORTED_COMPONENTS)."""
    assert make_client(bundle=stored_bundle).get("/v1/model").json()["detection"] == "stored"
    whole = tmp_path / "whole" / "cifar10-resnet20"
    store_in_bundle(RESIDUAL, whole)
    info = make_client(bundle=whole, cache=False).get("/v1/model").json()
    assert info["detection"] == "stored" and "effective_path" in info["graph_components"]
    residual = tmp_path / "cifar10-resnet20"
    with monkeypatch.context() as patch:
        patch.setattr(ingraph, "SYNAPSE_BUDGET", 1_000_000)
        store_in_bundle(RESIDUAL, residual)
    full = make_client(bundle=residual, cache=False).get("/v1/model").json()
    assert full["detection"] == "graph" and full["skipped_components"] == []
    lean = make_client(bundle=residual, cache=False, reported_components="graph").get("/v1/model").json()
    assert lean["detection"] == "stored" and lean["skipped_components"] == ["effective_path"]
    verdict = json.loads((residual / "guarded.json").read_text())["verdict"]["components"]
    only = make_client(bundle=residual, cache=False, reported_components="verdict")
    info = only.get("/v1/model").json()
    assert info["detection"] == "stored" and set(info["skipped_components"]).isdisjoint(verdict)
    assert set(info["skipped_components"]) | set(verdict) == set(full["graph_components"]) | {"effective_path"}
    test = load_dataset("cifar10", "test")
    body = only.post("/v1/detect", content=png_bytes(test.x[0], "RGB"), headers=PNG).json()
    assert all(body.get(c) is None for c in info["skipped_components"]) and body["verdict"]["score"] >= 0.0
