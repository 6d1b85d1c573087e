"""The guarded graph stored in a bundle (``pathguard export --in-bundle``) and scored without torch
(:mod:`pathguard.models.bundle.stored`), against the Python pipeline on the committed bundles."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pathguard.models.bundle import BundleError, BundleIntegrityError, bundle_sha256, load_bundle, read_verified
from pathguard.models.bundle.stored import (
    GUARDED_JSON,
    GUARDED_ONNX,
    StoredDetector,
    has_stored_graph,
    input_seeds,
    load_stored,
)
from pathguard.models.data import interleaved_order, load_dataset
from pathguard.models.effective_path import ingraph
from pathguard.models.guarded import store_in_bundle
from tests.conftest import ARTIFACTS, nested_keys

MNIST = ARTIFACTS / "mnist-lenet5"
RESIDUAL = ARTIFACTS / "cifar10-resnet20"


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A copy of the committed MNIST bundle with its guarded graph stored, and the sha256 the store returned."""
    out = tmp_path_factory.mktemp("stored") / "mnist-lenet5"
    return out, store_in_bundle(MNIST, out)


def test_storing_adds_the_graph_and_keeps_every_file(stored):
    out, sha = stored
    before, after = read_verified(MNIST), read_verified(out)
    assert set(after.blobs) == set(before.blobs) | {GUARDED_ONNX, GUARDED_JSON}
    assert all(after.blobs[name] == data for name, data in before.blobs.items())
    assert sha == after.sha256 == bundle_sha256(out) != before.sha256
    kept = ("name", "version", "classes", "input", "verdict", "components", "calibration", "effective_path")
    assert {k: after.manifest[k] for k in kept} == {k: before.manifest[k] for k in kept}
    assert has_stored_graph(out) and not has_stored_graph(MNIST)
    spec = json.loads(after.blobs[GUARDED_JSON])
    assert spec["components"] == spec["all_components"] == list(load_bundle(MNIST).pipeline.components)
    assert load_bundle(out).sha256 == sha  # the Python pipeline loads it as before


def test_the_stored_graph_answers_like_the_pipeline(stored, mnist_test):
    """Same prediction; the deterministic components' raw scores to onnxruntime's rounding (Effective Path's walk
    exactly; NIC's value-invariant statistic may move by a calibration step of one layer); the noise response from
    other draws of the same noise, so close but not equal; the same response fields, row by row."""
    out, _ = stored
    x = mnist_test.x[:48].astype(np.float32)
    pipe = load_bundle(out, seed=0).pipeline
    ref = pipe.detect(x)
    got = StoredDetector(load_stored(out), seed=0).detect(x)
    np.testing.assert_array_equal(got.predicted, ref.predicted)
    np.testing.assert_allclose(got.probabilities, ref.probabilities, atol=1e-5)
    np.testing.assert_allclose(got.raw["effective_path"], ref.raw["effective_path"], atol=1e-9)
    np.testing.assert_allclose(got.raw["squeeze"], ref.raw["squeeze"], atol=1e-5)
    np.testing.assert_allclose(got.raw["nic"], ref.raw["nic"], atol=1e-3)
    # onnxruntime's softmax moves a confident input's softmax-layer p-value by a calibration step now and then
    assert np.isclose(got.raw["nic_vi"], ref.raw["nic_vi"], atol=0.05).mean() >= 0.85
    drop = got.raw["noise_drop"], ref.raw["noise_drop"]
    assert not np.array_equal(*drop) and np.corrcoef(*drop)[0, 1] > 0.7  # 8 copies: the image explains most of it
    assert abs(drop[0].mean() - drop[1].mean()) < 0.05 * drop[1].mean()
    assert (got.adversarial == ref.adversarial).mean() >= 0.9
    assert got.threshold == ref.threshold and got.target_fpr == ref.target_fpr
    for i in range(len(x)):
        a, b = got.row(i), ref.row(i)
        assert nested_keys(a) == nested_keys(b)
        assert a["effective_path"] == b["effective_path"] | {"score": a["effective_path"]["score"]}
        assert a["effective_path"]["score"] == pytest.approx(b["effective_path"]["score"], abs=1e-6)
        assert a["nic"]["provenance_violation"] == pytest.approx(b["nic"]["provenance_violation"], abs=2e-3)
        assert a["squeeze"]["softmax_l1"] == pytest.approx(b["squeeze"]["softmax_l1"], abs=1e-5)


def test_the_noise_is_drawn_per_input(stored, mnist_test):
    """Seeded, an input gets the same noise alone or in any batch, from the pipeline's per-input seeds; unseeded,
    fresh noise per run."""
    out, _ = stored
    x = mnist_test.x[:6].astype(np.float32)
    seeded = StoredDetector(load_stored(out), seed=5)
    whole, part = seeded.detect(x).raw["noise_drop"], seeded.detect(x[3:]).raw["noise_drop"]
    np.testing.assert_array_equal(whole[3:], part)
    assert input_seeds(x[3:], 5) == input_seeds(x, 5)[3:] != input_seeds(x, 6)[3:]
    fresh = StoredDetector(load_stored(out))
    assert not np.array_equal(fresh.detect(x).raw["noise_drop"], fresh.detect(x).raw["noise_drop"])


def test_the_operating_point_follows_the_target_fpr(stored):
    out, _ = stored
    for fpr in (0.01, 0.05, 0.1):
        assert load_stored(out, target_fpr=fpr).info.threshold == load_bundle(out, target_fpr=fpr).pipeline.threshold
    with pytest.raises(BundleError, match="target"):
        load_stored(out, target_fpr=1e-6)


def test_a_bundle_without_a_stored_graph_is_refused_with_the_command():
    with pytest.raises(BundleError, match=r"pathguard export .*mnist-lenet5 --in-bundle"):
        load_stored(MNIST)


def test_a_tampered_stored_graph_is_refused(stored, tmp_path):
    out, _ = stored
    copy = tmp_path / "tampered"
    shutil.copytree(out, copy)
    data = bytearray((copy / GUARDED_ONNX).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / GUARDED_ONNX).write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=GUARDED_ONNX):
        load_stored(copy)


def test_a_component_with_no_in_graph_form_is_left_out_and_not_reported(tmp_path, monkeypatch):
    """An Effective Path walk over the graph's synapse budget (the residual bundle's 4.7 million synapses against a
    budget lowered to 1 million): the stored graph holds every other component and the verdict (which does not fuse
    the walk); the walk is not reported."""
    monkeypatch.setattr(ingraph, "SYNAPSE_BUDGET", 1_000_000)
    out = tmp_path / "residual"
    store_in_bundle(RESIDUAL, out)
    test = load_dataset("cifar10", "test")
    x = test.x[interleaved_order(test.y)[:10]].astype(np.float32)
    bundle = load_stored(out)
    assert "effective_path" not in bundle.graph_components and "effective_path" in bundle.info.components
    got = StoredDetector(bundle, seed=1).detect(x)
    ref = load_bundle(out, seed=1).pipeline.detect(x)
    assert np.isnan(got.raw["effective_path"]).all() and "effective_path" not in got.row(0)
    assert set(got.row(0)) == set(ref.row(0)) - {"effective_path"}
    np.testing.assert_allclose(got.raw["margin"], ref.raw["margin"], atol=1e-4)
    np.testing.assert_array_equal(got.predicted, ref.predicted)
