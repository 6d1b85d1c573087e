"""Detection served from the guarded graph (PATHGUARD_DETECT_GRAPH, PATHGUARD_REPORTED_COMPONENTS) against the Python
pipeline, on the committed residual CIFAR-10 bundle (its verdict is all in the graph) and the MNIST bundle (its
verdict fuses the exact Effective Path walk, which runs beside the graph)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from pathguard.models.bundle import load_bundle
from pathguard.models.data import interleaved_order, load_dataset
from pathguard.service.repository import RepositoryError
from pathguard.service.runtime import DetectionRuntime, GuardedEngine, OnnxEngine
from pathguard.service.settings import Settings
from tests.conftest import ARTIFACTS
from tests.service.conftest import png_bytes

RESIDUAL = ARTIFACTS / "cifar10-resnet20"
PNG = {"content-type": "image/png"}


@pytest.fixture(scope="module")
def residual():
    return load_bundle(RESIDUAL, seed=3)


@pytest.fixture(scope="module")
def images():
    test = load_dataset("cifar10", "test")
    keep = interleaved_order(test.y)[:40]  # every class
    return test.x[keep].astype(np.float32), test.y[keep]


def test_the_graph_runtime_answers_like_the_pipeline(residual, images):
    """Seeded, the graph draws the pipeline's noise: every raw score agrees to float32 rounding (NIC VI's sum of
    per-layer p-values may move by a calibration step of one layer), the verdicts are the same, and every reported
    part (the exact Effective Path walk, run beside the graph on the plain classifier's taps, included) is there."""
    x, _ = images
    pipe = residual.pipeline
    graph = DetectionRuntime(OnnxEngine(residual.onnx_bytes, []), pipe, 1, False, graph=GuardedEngine(residual))
    plain = DetectionRuntime(OnnxEngine(residual.onnx_bytes, pipe.checked_taps), pipe, 1, True)
    a, b = graph.detect(x).result, plain.detect(x).result
    assert set(a.raw) == set(b.raw) == set(pipe.components)
    for name in pipe.components:
        tol = 0.05 if name == "nic_vi" else 1e-4
        close = np.isclose(a.raw[name], b.raw[name], atol=tol)
        assert close.mean() >= (0.9 if name == "nic_vi" else 1.0), name
    np.testing.assert_array_equal(a.predicted, b.predicted)
    near = np.abs(b.score - pipe.threshold) < 1e-3
    assert np.array_equal(a.adversarial[~near], b.adversarial[~near])
    np.testing.assert_allclose(a.score, b.score, atol=1e-3)
    np.testing.assert_allclose(a.rank1_similarity, b.rank1_similarity, atol=1e-6)  # the same walk, the same taps
    for i in range(len(x)):
        ra, rb = a.row(i), b.row(i)
        assert set(ra) == set(rb)
        assert ra["noise_drop"]["logit_drop"] == pytest.approx(rb["noise_drop"]["logit_drop"], abs=1e-4)
        assert ra["nic"]["value_violation"] == pytest.approx(rb["nic"]["value_violation"], abs=2e-3)


def test_skipped_components_are_not_computed(residual, images):
    """Left out (PATHGUARD_REPORTED_COMPONENTS): no raw score, no part of the row, the same verdict."""
    x, _ = images
    pipe = residual.pipeline
    graph = GuardedEngine(residual, beside=["effective_path"])  # as served: the compiled walk beside the graph
    full = DetectionRuntime(OnnxEngine(residual.onnx_bytes, []), pipe, 1, False, graph=graph)
    lean = DetectionRuntime(
        OnnxEngine(residual.onnx_bytes, []),
        pipe,
        1,
        False,
        graph=GuardedEngine(residual, components="verdict"),
        skip=["effective_path", "nic", "nic_vi"],
    )
    a, b = full.detect(x[:8]).result, lean.detect(x[:8]).result
    assert np.isnan(b.raw["effective_path"]).all() and np.isnan(b.raw["nic"]).all()
    assert "effective_path" not in b.row(0) and "nic" not in b.row(0)
    np.testing.assert_array_equal(a.score, b.score)  # the verdict's components drew the same noise
    assert lean.beside == [] and full.beside == ["effective_path"]  # the walk beside the graph, unless left out
    xt = torch.from_numpy(x[:2])
    obs = pipe.graph_observation(xt, torch.zeros(2, 10), {}, pipe.generators(xt))
    with pytest.raises(ValueError, match="not scored by the graph"):
        pipe.finish_graph(obs, {})


def test_the_server_detects_on_the_graph_where_the_verdict_is_in_it(make_client, tmp_path, images):
    x, _ = images
    residual = make_client(bundle=RESIDUAL, cache=False)
    info = residual.get("/v1/model").json()
    assert info["detection"] == "graph" and info["detection_note"] is None
    assert set(info["graph_components"]) >= {"noise_flip", "noise_drop", "margin", "squeeze", "nic"}
    pipeline = make_client(bundle=RESIDUAL, cache=False, detect_graph="off")
    assert pipeline.get("/v1/model").json()["detection"] == "pipeline"
    for i in range(6):
        png = png_bytes(x[i], "RGB")
        a = residual.post("/v1/detect", content=png, headers=PNG).json()
        b = pipeline.post("/v1/detect", content=png, headers=PNG).json()
        assert set(a) == set(b)  # the same parts, the exact Effective Path walk's included
        assert a["prediction"]["class_index"] == b["prediction"]["class_index"]
        assert a["verdict"]["score"] == pytest.approx(b["verdict"]["score"], abs=1e-3)
        assert a["effective_path"]["rank1_similarity"] == pytest.approx(b["effective_path"]["rank1_similarity"])


def test_the_mnist_verdict_is_fused_beside_the_graph(make_client, mnist_test):
    """The MNIST bundle's verdict fuses the exact Effective Path walk: it runs beside the graph (its compiled walk is
    the faster form), the runtime fuses the verdict, and the answers are the pipeline's (up to NIC VI's float32
    rounding, see tests/test_ep_ingraph.py)."""
    mnist = make_client(cache=False)
    info = mnist.get("/v1/model").json()
    assert info["detection"] == "graph" and info["detection_note"] is None
    assert "effective_path" not in info["graph_components"]
    assert {"nic", "nic_vi", "noise_drop", "squeeze"} <= set(info["graph_components"])
    pipeline = make_client(cache=False, detect_graph="off")
    same = 0
    for i in range(6):
        png = png_bytes(mnist_test.x[i])
        a = mnist.post("/v1/detect", content=png, headers=PNG).json()
        b = pipeline.post("/v1/detect", content=png, headers=PNG).json()
        assert set(a) == set(b)
        assert a["prediction"]["class_index"] == b["prediction"]["class_index"]
        assert a["effective_path"] == b["effective_path"]  # the same walk, on the same taps
        assert a["noise_drop"] == pytest.approx(b["noise_drop"], abs=1e-3)
        vi = a["nic"]["value_violation"]  # NIC VI's per-layer p-values: one may move a step
        if vi == pytest.approx(b["nic"]["value_violation"], abs=1e-6):
            assert a["verdict"]["score"] == pytest.approx(b["verdict"]["score"], abs=1e-3)
            same += 1
    assert same >= 4


def test_left_out_parts_are_null_everywhere(make_client, images):
    """PATHGUARD_REPORTED_COMPONENTS=verdict: effective_path and nic are null, their OIP outputs are not offered, the
    verdict is the one the full answer gives, and the metrics and flagged entries still record it."""
    x, _ = images
    lean = make_client(bundle=RESIDUAL, cache=False, reported_components="verdict")
    full = make_client(bundle=RESIDUAL, cache=False)
    info = lean.get("/v1/model").json()
    assert set(info["skipped_components"]) == {"effective_path", "nic", "nic_vi"}
    png = png_bytes(x[0], "RGB")
    a = lean.post("/v1/detect", content=png, headers=PNG).json()
    b = full.post("/v1/detect", content=png, headers=PNG).json()
    assert a["effective_path"] is None and a["nic"] is None
    assert {"noise_flip", "noise_drop", "margin", "squeeze"} <= set(a)
    assert a["verdict"]["score"] == pytest.approx(b["verdict"]["score"], abs=1e-9)
    outputs = {o["name"] for o in lean.get("/v2/models/cifar10-resnet20").json()["outputs"]}
    assert "path_similarity" not in outputs and "value_violation" not in outputs and "is_adversarial" in outputs
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": x[0].ravel().tolist()}]}
    r = lean.post("/v2/models/cifar10-resnet20/infer", json=body)
    assert r.status_code == 200
    assert {o["name"] for o in r.json()["outputs"]} == outputs
    body["outputs"] = [{"name": "path_similarity"}]
    r = lean.post("/v2/models/cifar10-resnet20/infer", json=body)
    assert r.status_code == 400 and "path_similarity" in r.text
    samples = [s for f in text_string_to_metric_families(lean.get("/metrics").text) for s in f.samples]
    verdicts = [s.value for s in samples if s.name == "pathguard_verdicts_total"]
    assert sum(verdicts) == 2  # the detect and the first infer; the refused request recorded nothing
    assert not [s for s in samples if s.name.startswith("pathguard_layer_path_similarity") and s.value]


def test_the_settings_name_their_choices():
    with pytest.raises(ValueError):
        Settings(detect_graph="sometimes")
    with pytest.raises(ValueError):
        Settings(reported_components="some")
    assert Settings().detect_graph == "auto" and Settings().reported_components == "all"


def test_shadow_mode_records_the_graphs_verdict(make_client, images):
    """Shadow mode: the prediction at once from the plain classifier, the graph's verdict recorded afterwards."""
    x, _ = images
    client = make_client(bundle=RESIDUAL, cache=False, mode="shadow")
    body = client.post("/v1/detect", content=png_bytes(x[1], "RGB"), headers=PNG).json()
    assert body["verdict"] is None and body["mode"] == "shadow"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        samples = [s for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples]
        if sum(s.value for s in samples if s.name == "pathguard_verdicts_total") == 1:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the shadow verdict was never recorded")


def test_a_graph_that_cannot_be_built_falls_back_under_auto(make_client, monkeypatch):
    """Whatever stops the guarded graph from being built (here onnxruntime refusing it) leaves 'auto' on the
    pipeline, saying why, and refuses the model under 'on'."""
    import pathguard.service.runtime.engines as engines

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("onnxruntime: this graph has an operator it cannot run")

    monkeypatch.setattr(engines, "GuardedEngine", refuse)
    info = make_client(bundle=RESIDUAL, cache=False).get("/v1/model").json()
    assert info["detection"] == "pipeline" and "operator it cannot run" in info["detection_note"]
    with pytest.raises(RepositoryError, match="operator it cannot run"):
        make_client(bundle=RESIDUAL, cache=False, detect_graph="on")
