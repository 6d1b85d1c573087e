"""End-to-end build of a tiny real bundle (MNIST subset, committed LeNet-5), verification and loading."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pathguard.models import load_classifier
from pathguard.models.builder import BuildConfig, build_bundle
from pathguard.models.bundle import BundleError, BundleIntegrityError, load_bundle, read_verified, verify_bundle
from pathguard.models.verdict import threshold_at_fpr

from .conftest import MNIST_CLASSIFIER, TINY_NIC


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "tiny-mnist"
    cfg = BuildConfig(name="tiny-mnist", n_train=4000, n_calib=1500, target_fpr=0.1, nic=TINY_NIC)
    report = build_bundle("mnist", MNIST_CLASSIFIER, out, cfg)
    return out, report


def test_bundle_verifies_and_lists_every_file(tiny_bundle):
    out, report = tiny_bundle
    manifest = verify_bundle(out)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for key in (
        "schema_version",
        "name",
        "version",
        "created_at",
        "dataset",
        "architecture",
        "classes",
        "input",
        "tapped_layers",
        "effective_path",
        "ep_layer_count",
        "verdict",
        "libraries",
        "files",
    ):
        assert key in manifest, key
    assert manifest["ep_layer_count"] == 5 and manifest["effective_path"]["theta"] == 0.5
    assert manifest["calibration"] == {"ep_fit": 300, "calib_a": 600, "calib_b": 600, "fit": 2500}
    assert report["sha256"] == read_verified(out).sha256
    cli = subprocess.run(
        [sys.executable, "-m", "pathguard.service.cli", "verify", str(out)], capture_output=True, text=True
    )
    assert cli.returncode == 0, cli.stderr


def test_no_pickle_in_bundle(tiny_bundle):
    out, _ = tiny_bundle
    for name in verify_bundle(out)["files"]:
        assert name.rsplit(".", 1)[-1] in {"json", "npz", "safetensors", "onnx"}, name
        if name.endswith(".npz"):
            with np.load(out / name, allow_pickle=False) as z:  # would raise on object arrays
                assert all(z[k].dtype != object for k in z.files)


def test_flipping_any_byte_fails_verify_and_load(tiny_bundle, tmp_path):
    src, _ = tiny_bundle
    for name in verify_bundle(src)["files"]:
        dst = tmp_path / name.replace("/", "_")
        shutil.copytree(src, dst)
        blob = bytearray((dst / name).read_bytes())
        blob[len(blob) // 3] ^= 0x40
        (dst / name).write_bytes(bytes(blob))
        with pytest.raises(BundleIntegrityError, match=name):
            verify_bundle(dst)
        with pytest.raises(BundleError, match=name):
            load_bundle(dst)
        with pytest.raises(BundleError, match=name):
            load_classifier(dst)
        cli = subprocess.run(
            [sys.executable, "-m", "pathguard.service.cli", "verify", str(dst)], capture_output=True, text=True
        )
        assert cli.returncode != 0 and name in cli.stderr


def test_threshold_gives_target_fpr_on_images_the_bundle_never_saw(tiny_bundle, mnist_test):
    """Built at 10% FPR on 600 held-out training images; on 1,000 test images (never used by the build) the
    share of clean images flagged is within 5 points of 10% (binomial sd: about 1.2 points from the calibration
    images, 1 from the test images). A stricter operating point flags fewer."""
    out, _ = tiny_bundle
    bundle = load_bundle(out)
    assert bundle.pipeline.threshold == threshold_at_fpr(bundle.pipeline.verdict.fused_calib, 0.1)
    flagged = bundle.pipeline.detect(mnist_test.x[:1000]).adversarial
    assert abs(flagged.mean() - 0.1) <= 0.05, flagged.mean()
    stricter = load_bundle(out, target_fpr=0.02).pipeline.detect(mnist_test.x[:1000]).adversarial
    assert stricter.mean() <= 0.06 and stricter.sum() < flagged.sum(), (stricter.mean(), flagged.mean())
    with pytest.raises(ValueError, match="below 1/n"):
        load_bundle(out, target_fpr=1e-4)


def test_load_twice_identical_scores_and_noise_scores_higher(tiny_bundle, mnist_test):
    out, _ = tiny_bundle
    x = mnist_test.x[:40]
    a = load_bundle(out).pipeline.detect(x)
    b = load_bundle(out).pipeline.detect(x)
    np.testing.assert_array_equal(a.score, b.score)
    np.testing.assert_array_equal(a.rank1_similarity, b.rank1_similarity)
    assert (a.predicted == mnist_test.y[:40]).mean() > 0.9
    assert a.rank1_similarity.shape == (40, 5) and a.p_value.min() > 0
    assert set(a.row(0)) == {"effective_path", "nic", "verdict"}
    noise = np.random.default_rng(0).random(x.shape, dtype=np.float32)
    n = load_bundle(out).pipeline.detect(noise)
    assert np.median(n.score) > np.median(a.score)
    assert n.adversarial.mean() > 0.9


def test_fusion_components_recorded_loaded_and_validated(tiny_bundle, tmp_path):
    out, _ = tiny_bundle
    bundle = load_bundle(out)
    assert bundle.manifest["verdict"]["components"] == ["effective_path", "nic", "nic_vi"]
    assert bundle.pipeline.verdict.components == ["effective_path", "nic", "nic_vi"]
    # a two-component build fuses exactly what it names, from the same fitted detectors
    cfg = BuildConfig(
        name="tiny-2", n_train=4000, n_calib=1500, target_fpr=0.1, nic=TINY_NIC, fusion=["effective_path", "nic"]
    )
    build_bundle("mnist", MNIST_CLASSIFIER, tmp_path / "tiny-2", cfg)
    two = load_bundle(tmp_path / "tiny-2")
    assert two.manifest["verdict"]["fusion"] == "fisher(effective_path, nic)"
    assert two.pipeline.verdict.components == ["effective_path", "nic"]
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    res3, raw3 = bundle.pipeline.detect_with_components(x)
    res2, raw2 = two.pipeline.detect_with_components(x)
    np.testing.assert_allclose(raw2["nic"], raw3["nic"])  # same seed, same fit
    assert not np.allclose(res2.score, res3.score)  # different fusion, different score
    for bad in (["nic", "bogus"], [], ["nic", "nic"]):
        with pytest.raises(ValueError, match="fusion must list distinct components"):
            BuildConfig(name="x", fusion=bad)


def test_an_onnx_file_builds_on_a_bundled_dataset(tmp_path, mnist_test, capsys):
    """``--dataset mnist --model classifier.onnx``: the file goes through the ONNX import path (kept in the bundle
    as the user's file), on the same seeded splits as a classifier folder, and classifies as the original does."""
    from pathguard.models.errors import DatasetError
    from pathguard.models.networks import onnx_of_module
    from pathguard.service.cli import main

    lenet = load_classifier(MNIST_CLASSIFIER)
    onnx_file = tmp_path / "lenet5.onnx"
    onnx_file.write_bytes(onnx_of_module(lenet, (1, 28, 28)))
    out = tmp_path / "onnx-mnist"
    cfg = BuildConfig(name="onnx-mnist", n_train=2500, n_calib=1000, target_fpr=0.1, nic=TINY_NIC, ep_last_k=2)
    report = build_bundle("mnist", onnx_file, out, cfg)
    files = read_verified(out)
    meta = json.loads(files.bytes("classifier.json"))
    assert meta["format"] == "onnx" and files.bytes(meta["source"]) == onnx_file.read_bytes()
    assert files.manifest["calibration"] == {"ep_fit": 200, "calib_a": 400, "calib_b": 400, "fit": 1500}
    assert report["sha256"] == files.sha256
    assert files.manifest["source"] == {"model": "lenet5.onnx", "data": "mnist", "skipped_files": 0}
    bundle = load_bundle(out)
    x = mnist_test.x[:64]
    ours = bundle.pipeline.detect(x)
    with torch.no_grad():
        expected = lenet(torch.from_numpy(x)).softmax(1).numpy()
    np.testing.assert_allclose(ours.probabilities, expected, atol=1e-5)
    assert ours.ep_layers == bundle.manifest["effective_path"]["layers"] and len(ours.ep_layers) == 2
    with pytest.raises(DatasetError, match=r"takes \(1, 28, 28\) inputs with 10 outputs; cifar10 has \(3, 32, 32\)"):
        build_bundle("cifar10", onnx_file, tmp_path / "wrong", cfg)
    both = ["build", "--dataset", "mnist", "--model", str(onnx_file), "--classifier", str(MNIST_CLASSIFIER)]
    assert main([*both, "--out", str(tmp_path / "x")]) == 2
    assert "not both" in capsys.readouterr().err


def test_class_gaussian_component_is_built_exported_and_fused(tmp_path, mnist_test):
    """``fusion`` with ``mahalanobis``: the class Gaussians are fitted on NIC's sample, calibrated on split A,
    stored as plain arrays, reloaded with the same scores, fused into the verdict and reported per image."""
    from pathguard.models.components.mahalanobis import gaussian_activation
    from pathguard.models.mahalanobis import ClassGaussian

    layers = ["pool1", "fc1", "logits"]
    cfg = BuildConfig(
        name="tiny-gauss", n_train=4000, n_calib=1500, target_fpr=0.1, nic=TINY_NIC,
        fusion=["effective_path", "nic", "mahalanobis"], mahalanobis={"layers": layers},
    )  # fmt: skip
    build_bundle("mnist", MNIST_CLASSIFIER, tmp_path / "g", cfg)
    files = read_verified(tmp_path / "g")
    assert files.manifest["mahalanobis"] == {"layers": layers, "pool": "mean", "shrinkage": 0.01, "n_fit": 2000}
    assert files.manifest["verdict"]["components"] == ["effective_path", "nic", "mahalanobis"]
    with np.load(tmp_path / "g" / "mahalanobis.npz", allow_pickle=False) as z:  # plain arrays only
        g = ClassGaussian.from_arrays({k: z[k] for k in z.files})
    assert g.calib_.shape == (files.manifest["calibration"]["calib_a"], 3)
    bundle = load_bundle(tmp_path / "g")
    x = mnist_test.x[:200]
    res, raw = bundle.pipeline.detect_with_components(x)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        logits, taps = bundle.classifier.forward_with_taps(xt)
    acts = {n: gaussian_activation(n, xt, logits, taps) for n in layers}
    np.testing.assert_allclose(raw["mahalanobis"], g.score(acts), rtol=1e-12)  # the exported scorer is the fitted one
    # clean test images: per-layer p-values roughly uniform, so the Fisher statistic is chi2(6)-like (mean 6)
    assert 4.0 < float(np.mean(raw["mahalanobis"])) < 8.0
    row = res.row(0)
    assert row["mahalanobis"]["layers"] == layers and 0 <= row["mahalanobis"]["score"] <= 1
    noise = np.random.default_rng(0).random((50, 1, 28, 28), dtype=np.float32)
    assert bundle.pipeline.detect_with_components(noise)[1]["mahalanobis"].min() > np.median(raw["mahalanobis"])
    with pytest.raises(ValueError, match=r"mahalanobis layers \['nope'\] are not layers"):
        build_bundle("mnist", MNIST_CLASSIFIER, tmp_path / "bad", BuildConfig(
            name="x", n_train=4000, n_calib=1500, nic=TINY_NIC, fusion=["nic", "mahalanobis"],
            mahalanobis={"layers": ["nope"]},
        ))  # fmt: skip
    with pytest.raises(ValueError, match="'mahalanobis' is not among the fusion components"):
        BuildConfig(name="x", mahalanobis={"pool": "mean"})
