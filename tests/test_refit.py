"""``pathguard refit``: components the verdict does not read are fitted again with new parameters, as a build
fits them, and the verdict is kept byte for byte (its id, and the reports that name it, hold)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pathguard.models.builder import BuildConfig, build_bundle, refit_bundle
from pathguard.models.bundle import load_bundle, read_verified, verdict_sha256
from pathguard.models.bundle.stored import has_stored_graph
from pathguard.models.guarded import store_in_bundle
from pathguard.service.cli import main
from tests.conftest import ARTIFACTS, MNIST_CLASSIFIER, TINY_NIC

EP_FILES = {"class_paths.npz", "ep_score.npz", "ep_thresholds.json", "benign_similarity.npz"}
NEW_FORM = {"last_k": 2, "selection": "relative", "quantile": 0.1}


def _cfg(**ep) -> BuildConfig:
    components = {"effective_path": {k: v for k, v in ep.items() if k != "last_k"}} if ep else {}
    return BuildConfig(
        name="tiny", n_train=2500, n_calib=1000, target_fpr=0.1, nic=TINY_NIC, fusion=["nic", "squeeze"],
        ep_last_k=ep.get("last_k"), components=components,
    )  # fmt: skip


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """A tiny MNIST bundle whose verdict does not fuse Effective Path (the paper's walk on every layer), a bundle
    built from scratch with the new form, and the first one refitted to it."""
    root = tmp_path_factory.mktemp("refit")
    build_bundle("mnist", MNIST_CLASSIFIER, root / "old", _cfg())
    build_bundle("mnist", MNIST_CLASSIFIER, root / "built", _cfg(**NEW_FORM))
    report = refit_bundle(root / "old", {"effective_path": NEW_FORM}, root / "refit")
    return root / "old", root / "built", root / "refit", report


def test_the_verdict_and_every_other_file_are_kept(bundles):
    old, _, refit, report = bundles
    a, b = read_verified(old), read_verified(refit)
    assert verdict_sha256(refit) == verdict_sha256(old) and b.sha256 != a.sha256 == report["refit"]["from"]
    kept = set(a.blobs) - EP_FILES - {"calibration.npz"}
    assert {n: b.blobs[n] for n in kept} == {n: a.blobs[n] for n in kept}
    ca, cb = a.npz("calibration.npz"), b.npz("calibration.npz")
    assert set(ca) == set(cb)
    for key in set(ca) - {"calib_a/effective_path"}:
        np.testing.assert_array_equal(cb[key], ca[key], err_msg=key)
    assert b.manifest["verdict"] == a.manifest["verdict"] and b.manifest["build"]["refit"]["components"] == [
        "effective_path"
    ]


def test_the_refitted_component_is_the_one_a_build_fits(bundles):
    """Effective Path refitted equals Effective Path built from scratch with the same parameters (same splits,
    same sample, same thresholds, same class paths) and is calibrated on the same split A."""
    _, built, refit, _ = bundles
    a, b = read_verified(built), read_verified(refit)
    for name in EP_FILES:
        assert b.blobs[name] == a.blobs[name], name
    np.testing.assert_allclose(
        b.npz("calibration.npz")["calib_a/effective_path"], a.npz("calibration.npz")["calib_a/effective_path"],
        rtol=1e-6,
    )  # fmt: skip
    for key in ("effective_path", "ep_layer_count"):
        assert b.manifest[key] == a.manifest[key]
    assert b.manifest["components"]["effective_path"] == a.manifest["components"]["effective_path"]
    assert b.manifest["build"]["config"] == a.manifest["build"]["config"]
    assert b.manifest["effective_path"]["selection"] == "relative" and len(b.manifest["effective_path"]["layers"]) == 2


def test_the_refitted_bundle_scores_as_before_and_reports_the_new_form(bundles, mnist_test):
    old, _, refit, _ = bundles
    x = mnist_test.x[:64]
    before, after = load_bundle(old, seed=0).pipeline.detect(x), load_bundle(refit, seed=0).pipeline.detect(x)
    np.testing.assert_array_equal(after.score, before.score)
    np.testing.assert_array_equal(after.adversarial, before.adversarial)
    assert len(after.row(0)["effective_path"]["layers"]) == 2 < len(before.row(0)["effective_path"]["layers"])


def test_what_would_change_the_verdict_is_refused(bundles, tmp_path, capsys):
    old = bundles[0]
    with pytest.raises(ValueError, match="verdict .* reads 'nic'"):
        refit_bundle(old, {"nic": {"pca_dim": 8}}, tmp_path / "x")
    with pytest.raises(ValueError, match="holds no component 'mahalanobis'"):
        refit_bundle(old, {"mahalanobis": {}}, tmp_path / "x")
    with pytest.raises(ValueError, match="unknown effective_path parameter"):
        refit_bundle(old, {"effective_path": {"colour": 1}}, tmp_path / "x")
    # the committed MNIST bundle fuses Effective Path: refused, nothing written
    assert main(["refit", str(ARTIFACTS / "mnist-lenet5"), "--out", str(tmp_path / "m"), "--components",
                 json.dumps({"effective_path": {"last_k": 2}})]) == 2  # fmt: skip
    assert "reads 'effective_path'" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert main(["refit", str(old), "--components", "{not json"]) == 2
    assert main(["refit", str(old), "--components", "[]"]) == 2


def test_the_cli_stores_the_graph_again_with_the_new_form(bundles, tmp_path, capsys):
    old = tmp_path / "stored"
    store_in_bundle(bundles[0], old)
    out = tmp_path / "refit"
    assert main(["refit", str(old), "--out", str(out), "--components", json.dumps({"effective_path": NEW_FORM})]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stored_graph"]["stored"] and has_stored_graph(out)
    assert report["sha256"] == read_verified(out).sha256 and verdict_sha256(out) == verdict_sha256(old)
    spec = json.loads((out / "guarded.json").read_text())
    assert "effective_path" in spec["components"]
    assert spec["serving"]["ep_layers"] == load_bundle(out).manifest["effective_path"]["layers"]
