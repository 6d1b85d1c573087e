"""The HTTP API on a bundle built in supervised mode: the supervised block beside the verdict."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from pathguard.service.app import create_app
from pathguard.service.settings import Settings

from .conftest import png_bytes
from .test_api import PNG, _oip


@pytest.fixture
def client(supervised_bundle, tmp_path):
    settings = Settings(bundle=supervised_bundle, spool_path=tmp_path / "spool.jsonl", warmup_rounds=1, redis_url=None)
    with TestClient(create_app(settings)) as c:
        yield c


def test_detect_reports_supervised_block(client, mnist_test):
    info = client.get("/v1/model").json()
    assert info["supervised"] == {"detector": "logistic", "features": "all", "attacks": ["fgsm", "bim"]}
    r = client.post("/v1/detect", content=png_bytes(mnist_test.x[0]), headers=PNG)
    assert r.status_code == 200, r.text
    body = r.json()
    sup = body["supervised"]
    assert sup["detector"] == "logistic" and isinstance(sup["adversarial"], bool)
    assert 0 < sup["p_value"] <= 1 and sup["score"] == pytest.approx(1 - sup["p_value"], abs=1e-5)
    assert body["verdict"] is not None  # the benign-only verdict is still there, unchanged in shape
    batch = client.post(
        "/v1/detect/batch", files=[("images", (f"{i}.png", png_bytes(mnist_test.x[i]), "image/png")) for i in range(3)]
    ).json()
    assert all("supervised" in res for res in batch["results"])


def test_oip_offers_supervised_outputs(client, mnist_test):
    meta = client.get("/v2/models/tiny-supervised").json()
    names = [o["name"] for o in meta["outputs"]]
    assert {"supervised_score", "supervised_is_adversarial"} <= set(names)
    x = mnist_test.x[:2]
    wanted = [{"name": "supervised_score"}, {"name": "supervised_is_adversarial"}, {"name": "instance_score"}]
    r = client.post("/v2/models/tiny-supervised/infer", json=_oip(x, outputs=wanted))
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["supervised_score"]["shape"] == [2] and out["supervised_score"]["datatype"] == "FP32"
    assert out["supervised_is_adversarial"]["datatype"] == "BOOL"
    single = client.post("/v1/detect", content=png_bytes(x[1]), headers=PNG).json()
    assert out["supervised_score"]["data"][1] == pytest.approx(single["supervised"]["score"], abs=1e-5)


def test_benign_bundle_refuses_supervised_outputs(make_client):
    client = make_client(cache=False)
    assert client.get("/v1/model").json()["supervised"] is None
    x = np.zeros((1, 1, 28, 28), np.float32)
    r = client.post("/v2/models/mnist-lenet5/infer", json=_oip(x, outputs=[{"name": "supervised_score"}]))
    assert r.status_code == 400 and "supervised_score" in r.json()["error"]
    names = [o["name"] for o in client.get("/v2/models/mnist-lenet5").json()["outputs"]]
    assert "supervised_score" not in names
