"""Supervised build mode: a supervised EP detector trained on generated attacks, reported beside the verdict."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pathguard.models.builder.supervised import fit_supervised, supervised_files
from pathguard.models.bundle import (
    BundleIntegrityError,
    DetectionPipeline,
    load_bundle,
    read_verified,
    verify_bundle,
    write_bundle,
)
from pathguard.models.effective_path import LinearJointSimilarity
from pathguard.models.evaluation.attacks import run_attack
from pathguard.models.verdict import threshold_at_fpr
from pathguard.models.verdict.supervised import SUPERVISED_JOBLIB, SUPERVISED_NPZ, SupervisedDetector

from .conftest import ARTIFACTS


def test_manifest_records_training_and_files(supervised_bundle):
    m = verify_bundle(supervised_bundle)
    sup = m["supervised"]
    assert sup["detector"] == "logistic" and sup["features"] == "all" and sup["attacks"] == ["fgsm", "bim"]
    n_nic = len(m["nic"]["layers"])
    assert len(sup["feature_names"]) == 2 * m["ep_layer_count"] + n_nic + (n_nic - 1) + 3
    assert sup["feature_names"][0] == "rank1_similarity/conv1" and sup["feature_names"][-1] == "raw/nic_vi"
    assert sup["files"] == [SUPERVISED_NPZ] and SUPERVISED_NPZ in m["files"] and SUPERVISED_JOBLIB not in m["files"]
    tr = sup["training"]
    # trained on the held-out ep_fit split (20% of n_calib), calibrated on split B: never the test set
    assert tr["clean"] == m["calibration"]["ep_fit"] == 300 and sup["n_calibration"] == m["calibration"]["calib_b"]
    for a in ("fgsm", "bim"):
        assert 0 < tr["attacks"][a]["successful"] <= tr["attacks"][a]["attempted"] <= 300
    assert tr["adversarial"] == sum(tr["attacks"][a]["successful"] for a in ("fgsm", "bim"))
    assert m["build"]["config"]["supervised_attacks"] == ["fgsm", "bim"]
    with np.load(supervised_bundle / SUPERVISED_NPZ, allow_pickle=False) as z:
        assert set(z.files) == {"calib", "logistic/mean", "logistic/scale", "logistic/coef", "logistic/intercept"}
        assert z["logistic/coef"].shape == (len(sup["feature_names"]),)


def test_features_that_do_not_match_the_pipeline_are_refused(supervised_bundle, tmp_path):
    vf = read_verified(supervised_bundle)
    manifest = {k: v for k, v in vf.manifest.items() if k not in ("files", "schema_version", "created_at")}
    manifest["supervised"] = manifest["supervised"] | {"feature_names": manifest["supervised"]["feature_names"][1:]}
    write_bundle(tmp_path / "b", vf.blobs, manifest)
    with pytest.raises(ValueError, match="features do not match"):
        load_bundle(tmp_path / "b")


def test_threshold_gives_target_fpr_on_its_calibration_scores(supervised_bundle):
    pipe = load_bundle(supervised_bundle).pipeline
    calib = pipe.supervised.calib
    assert pipe.supervised_threshold == threshold_at_fpr(calib, 0.1)
    assert 0.1 - 1 / len(calib) <= float((calib > pipe.supervised_threshold).mean()) <= 0.1
    assert load_bundle(supervised_bundle, target_fpr=0.05).pipeline.supervised_threshold >= pipe.supervised_threshold


def test_detects_trained_attack_on_test_images_and_leaves_verdict_unchanged(supervised_bundle, mnist_test):
    bundle = load_bundle(supervised_bundle)
    x, y = mnist_test.x[:300], mnist_test.y[:300]
    clean = bundle.pipeline.detect(x)
    adv = run_attack(bundle.classifier, "fgsm", "mnist", x, y)
    x_adv = adv.x_adv[adv.success]
    attacked = bundle.pipeline.detect(x_adv)
    assert len(x_adv) > 100
    assert clean.supervised.adversarial.mean() < 0.2  # target 10% on calibration; 300 test images
    assert attacked.supervised.adversarial.mean() > 0.7
    assert np.median(attacked.supervised.score) > np.median(clean.supervised.score)
    row = attacked.row(0)
    assert set(row) == {"effective_path", "nic", "verdict", "supervised"}
    assert set(row["supervised"]) == {"detector", "adversarial", "score", "p_value"}
    assert 0 < row["supervised"]["p_value"] <= 1 and 0 <= row["supervised"]["score"] < 1
    # the same pipeline without the supervised detector gives the very same verdict
    p = bundle.pipeline
    plain = DetectionPipeline(p.classifier, p.extractor, p.class_paths, p.ep_score, p.nic, p.verdict, p.target_fpr)
    for xs, res in ((x, clean), (x_adv, attacked)):
        other = plain.detect(xs)
        np.testing.assert_array_equal(other.score, res.score)
        np.testing.assert_array_equal(other.adversarial, res.adversarial)
        assert other.supervised is None and "supervised" not in other.row(0)


def test_benign_bundle_has_no_supervised_part():
    bundle = load_bundle(ARTIFACTS / "mnist-lenet5")
    assert bundle.pipeline.supervised is None and "supervised" not in bundle.manifest
    res = bundle.pipeline.detect(np.zeros((1, 1, 28, 28), np.float32))
    assert res.supervised is None and "supervised" not in res.row(0)


def test_tampered_supervised_file_is_named(supervised_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(supervised_bundle, dst)
    blob = bytearray((dst / SUPERVISED_NPZ).read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (dst / SUPERVISED_NPZ).write_bytes(bytes(blob))
    with pytest.raises(BundleIntegrityError, match=SUPERVISED_NPZ):
        load_bundle(dst)


def _toy_features(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Separable (N, 4) similarity features: adversarial rows have lower rank-1 and higher rank-2 similarity."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    rank1 = np.clip(0.9 - 0.3 * y[:, None] + 0.05 * rng.standard_normal((n, 2)), 0, 1)
    rank2 = np.clip(0.5 + 0.3 * y[:, None] + 0.05 * rng.standard_normal((n, 2)), 0, 1)
    return np.concatenate([rank1, rank2], axis=1), y


def test_ensemble_is_unpickled_only_after_its_digest_matched(tmp_path, monkeypatch):
    feats, y = _toy_features(200, 0)
    calib_feats, _ = _toy_features(100, 1)
    from pathguard.models.effective_path import make_detector

    model = make_detector("random_forest", random_state=0).fit(feats, y)
    det = SupervisedDetector("random_forest", "effective_path", ["fgsm"], model, np.sort(model.score(calib_feats[::2])))
    files = supervised_files(det)
    assert set(files) == {SUPERVISED_NPZ, SUPERVISED_JOBLIB}
    write_bundle(tmp_path / "b", files, {"supervised": det.manifest()})
    vf = read_verified(tmp_path / "b")
    loaded = SupervisedDetector.from_verified(vf.manifest["supervised"], vf.npz, vf.bytes)
    test, _ = _toy_features(50, 2)
    np.testing.assert_array_equal(loaded.raw_score(test), det.raw_score(test))
    np.testing.assert_array_equal(loaded.calib, det.calib)

    # a tampered pickle is refused by the digest check; joblib.load is never reached
    blob = bytearray((tmp_path / "b" / SUPERVISED_JOBLIB).read_bytes())
    blob[-10] ^= 0xFF
    (tmp_path / "b" / SUPERVISED_JOBLIB).write_bytes(bytes(blob))
    import joblib

    def refuse(*_a, **_k):
        raise AssertionError("joblib.load called on an unverified file")

    monkeypatch.setattr(joblib, "load", refuse)
    with pytest.raises(BundleIntegrityError, match=SUPERVISED_JOBLIB):
        read_verified(tmp_path / "b")


def test_fit_supervised_linear_on_real_attacks_keeps_the_paper_sign_constraints(lenet, mnist_test):
    from pathguard.models.builder.builder import _ep_features
    from pathguard.models.effective_path import ClassPaths, EffectivePathExtractor

    extractor = EffectivePathExtractor(lenet, theta=0.5)
    paths = ClassPaths(10).fit(extractor, mnist_test.x[1000:2000], mnist_test.y[1000:2000])
    seen: list[int] = []

    def features(x: np.ndarray) -> np.ndarray:
        seen.append(len(x))
        return _ep_features(extractor, paths, x)

    x, y = mnist_test.x, mnist_test.y
    det = fit_supervised(lenet, "mnist", features, x[:80], y[:80], x[80:120], ["fgsm"], "linear", "effective_path")
    assert det.detector == "linear" and det.training["clean"] == 80 and len(det.calib) == 40
    assert seen[0] == 80 and seen[-1] == 40  # clean training features first, calibration last
    assert seen[1] == det.training["attacks"]["fgsm"]["successful"] == det.training["adversarial"]
    assert np.all(np.diff(det.calib) >= 0)
    assert isinstance(det.model, LinearJointSimilarity)
    half = len(det.model.coef_) // 2  # >= 0 on rank-1, <= 0 on rank-2 similarities, not all zero
    assert np.all(det.model.coef_[:half] >= 0) and np.all(det.model.coef_[half:] <= 0)
    assert np.any(det.model.coef_ != 0)
    assert det.manifest()["files"] == [SUPERVISED_NPZ]
    with np.load(io.BytesIO(supervised_files(det)[SUPERVISED_NPZ]), allow_pickle=False) as z:
        assert set(z.files) == {"calib", "linear/coef", "linear/intercept"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"supervised_attacks": ["fgsm", "nope"]}, "unknown supervised attack"),
        ({"supervised_attacks": ["fgsm", "fgsm"]}, "distinct"),
        ({"supervised_attacks": ["fgsm"], "supervised_detector": "svm"}, "unknown supervised detector"),
        ({"supervised_attacks": ["fgsm"], "supervised_features": "pixels"}, "unknown supervised feature set"),
        ({"supervised_attacks": ["fgsm"], "supervised_detector": "linear"}, "needs features='effective_path'"),
        ({"supervised_attacks": ["fgsm"], "supervised_n": 0}, "supervised_n must be positive"),
    ],
)
def test_config_validation(kwargs, match):
    from pathguard.models.builder import BuildConfig

    with pytest.raises(ValueError, match=match):
        BuildConfig(name="x", **kwargs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--supervised-n", "10"], "need --supervised-attacks"),
        (["--supervised-attacks", "fgsm,bogus"], "unknown supervised attack"),
        (["--nic", "{not json"], "error:"),
    ],
)
def test_build_cli_rejects_bad_options_before_work(tmp_path, args, message):
    cmd = [
        sys.executable,
        "-m",
        "pathguard.service.cli",
        "build",
        "--dataset",
        "mnist",
        "--out",
        str(tmp_path / "b"),
        *args,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr
    assert not (tmp_path / "b").exists()


def test_score_cli_reports_supervised_clean_flagged_rate(supervised_bundle):
    import json

    cmd = [sys.executable, "-m", "pathguard.service.cli", "score", str(supervised_bundle), "--n", "300"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n"] == 300 and 0.0 <= out["supervised_flagged_rate"] < 0.2 and 0.0 <= out["flagged_rate"] < 0.2


def test_evaluate_scores_the_bundle_supervised_detector(supervised_bundle, tmp_path):
    import json

    from pathguard.models.evaluation.evaluate import BUNDLE_SUPERVISED, DETECTORS
    from pathguard.service.cli import main

    args = ["evaluate", "--bundle", str(supervised_bundle), "--attacks", "fgsm,noise", "--n", "40", "--n-clean", "60"]
    assert main([*args, "--out", str(tmp_path), "--threads", "1"]) == 0
    r = json.loads((tmp_path / "report.json").read_text())
    assert set(r["detectors"]) == {*DETECTORS, BUNDLE_SUPERVISED}
    d = r["detectors"][BUNDLE_SUPERVISED]
    pipe = load_bundle(supervised_bundle).pipeline
    assert d["threshold"] == pytest.approx(pipe.supervised_threshold)  # split B rebuilt from the manifest's seed
    assert d["calibration_fpr"] <= 0.1 and d["n_clean_scored"] == 60  # every clean test image: no training split
    assert d["per_attack"]["fgsm"]["auc"] > 0.9  # an attack it was trained on (on other images)
    assert r["settings"]["bundle_supervised"]["attacks"] == ["fgsm", "bim"]
    md = (tmp_path / "report.md").read_text()
    assert f"`{BUNDLE_SUPERVISED}`: the bundle's own supervised detector (`logistic`" in md
    assert (tmp_path / f"roc_{BUNDLE_SUPERVISED}.png").exists()
