"""Supervised build mode: a supervised EP detector trained on generated attacks, reported beside the verdict."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pathguard.models.bundle import (
    BundleCompatibilityError,
    BundleIntegrityError,
    DetectionPipeline,
    load_bundle,
    npz_bytes,
    read_verified,
    verify_bundle,
    write_bundle,
)
from pathguard.models.components.supervised import fit_supervised, supervised_files
from pathguard.models.effective_path import LinearJointSimilarity
from pathguard.models.evaluation.attacks import run_attack
from pathguard.models.verdict import threshold_at_fpr
from pathguard.models.verdict.supervised import SUPERVISED_JOBLIB, SUPERVISED_NPZ, SupervisedDetector
from pathguard.models.verdict.trees import TREE_KINDS, TreeEnsemble

from .conftest import ARTIFACTS


def test_manifest_records_training_and_files(supervised_bundle):
    m = verify_bundle(supervised_bundle)
    sup = m["supervised"]
    assert sup["detector"] == "logistic" and sup["features"] == "all" and sup["attacks"] == ["fgsm", "bim"]
    n_nic = len(m["nic"]["layers"])
    assert len(sup["feature_names"]) == 2 * m["ep_layer_count"] + n_nic + (n_nic - 1) + 3
    assert sup["feature_names"][0] == "rank1_similarity/conv1" and sup["feature_names"][-1] == "raw/nic_vi"
    assert sup["files"] == [SUPERVISED_NPZ] and SUPERVISED_NPZ in m["files"] and SUPERVISED_JOBLIB not in m["files"]
    # a registry component of the family that is reported beside the verdict, never fused
    assert m["components"]["supervised"]["family"] == "reported" and "supervised" not in m["verdict"]["components"]
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


def test_threshold_gives_target_fpr_on_images_the_bundle_never_saw(supervised_bundle, mnist_test):
    """The supervised threshold is set at 10% FPR on the clean calibration split; on 1,000 test images (never used
    by the build) the supervised detector flags within 5 points of 10%, and fewer at a 5% operating point."""
    pipe = load_bundle(supervised_bundle).pipeline
    assert pipe.supervised_threshold == threshold_at_fpr(pipe.supervised.calib, 0.1)
    flagged = pipe.detect(mnist_test.x[:1000]).supervised.adversarial
    assert abs(flagged.mean() - 0.1) <= 0.05, flagged.mean()
    stricter = load_bundle(supervised_bundle, target_fpr=0.05).pipeline
    assert stricter.supervised_threshold >= pipe.supervised_threshold
    assert stricter.detect(mnist_test.x[:1000]).supervised.adversarial.sum() < flagged.sum()


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
    assert p.components["supervised"].family == "reported" and "supervised" not in p.verdict.components
    without = {k: c for k, c in p.components.items() if k != "supervised"}
    plain = DetectionPipeline(p.classifier, without, p.verdict, p.target_fpr, p.calibration)
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


@pytest.fixture(scope="module")
def real_features(mnist_test):
    """Supervised features of the committed MNIST bundle on real data: 600 clean test images and their successful
    FGSM examples, split in half (fit / held out), for both feature sets."""
    bundle = load_bundle(ARTIFACTS / "mnist-lenet5")
    x, y = mnist_test.x[:600], mnist_test.y[:600]
    adv = run_attack(bundle.classifier, "fgsm", "mnist", x, y)
    out = {}
    for fs in ("effective_path", "all"):
        f = np.concatenate(
            [
                bundle.pipeline.supervised_features(x, fs),
                bundle.pipeline.supervised_features(adv.x_adv[adv.success], fs),
            ]
        )
        is_adv = np.r_[np.zeros(len(x)), np.ones(int(adv.success.sum()))]
        idx = np.random.default_rng(0).permutation(len(f))
        fit, held = idx[: len(f) // 2], idx[len(f) // 2 :]
        out[fs] = (f[fit], is_adv[fit], f[held])
    return out


@pytest.mark.parametrize("features", ["effective_path", "all"])
@pytest.mark.parametrize("kind", TREE_KINDS)
def test_tree_export_reproduces_sklearn_predict_proba(real_features, kind, features):
    from pathguard.models.effective_path import make_detector

    fit_x, fit_y, held = real_features[features]
    sk = make_detector(kind, random_state=0).fit(fit_x, fit_y)
    trees = TreeEnsemble.from_sklearn(kind, sk.estimator_)
    n_trees = {"random_forest": 100, "adaboost": len(sk.estimator_.estimators_), "gradient_boosting": 100}[kind]
    assert len(trees.roots_) == n_trees and trees.n_features_ == fit_x.shape[1]
    for x in (fit_x, held):
        expected = sk.estimator_.predict_proba(x)[:, 1]
        got = trees.score(x)
        assert np.max(np.abs(got - expected)) <= 1e-9
        assert got.shape == (len(x),) and np.all((got >= 0) & (got <= 1))
    expected = sk.estimator_.predict_proba(held)[:, 1]
    assert len(np.unique(np.round(expected, 12))) > 1  # not a constant: the parity is over real decisions
    # the arrays alone (as stored, after an npz round trip without pickle) give the same scores
    with np.load(io.BytesIO(npz_bytes(trees.to_arrays())), allow_pickle=False) as z:
        again = TreeEnsemble.from_arrays(kind, {k: z[k] for k in z.files})
    np.testing.assert_array_equal(again.score(held), trees.score(held))


def test_tree_export_is_not_fooled_by_float32_rounding(real_features):
    """Inputs a hair above a threshold in float64 but not in float32 take the branch scikit-learn takes."""
    from pathguard.models.effective_path import make_detector

    fit_x, fit_y, _ = real_features["effective_path"]
    sk = make_detector("gradient_boosting", random_state=0).fit(fit_x, fit_y)
    trees = TreeEnsemble.from_sklearn("gradient_boosting", sk.estimator_)
    inner = np.flatnonzero(trees.feature_ >= 0)[:50]
    x = np.repeat(fit_x[:1], len(inner), axis=0)
    x[np.arange(len(inner)), trees.feature_[inner]] = trees.threshold_[inner] + 1e-12  # float32: == threshold
    np.testing.assert_allclose(trees.score(x), sk.estimator_.predict_proba(x)[:, 1], rtol=0, atol=1e-9)


def test_tree_arrays_are_checked(real_features):
    from pathguard.models.effective_path import make_detector

    fit_x, fit_y, held = real_features["effective_path"]
    trees = TreeEnsemble.from_sklearn("random_forest", make_detector("random_forest").fit(fit_x, fit_y).estimator_)
    arrays = trees.to_arrays()
    loop = dict(arrays, left=np.where(trees.feature_ >= 0, 0, -1))  # children pointing back: a walk would not end
    with pytest.raises(ValueError, match="children must follow"):
        TreeEnsemble.from_arrays("random_forest", loop)
    with pytest.raises(ValueError, match="missing"):
        TreeEnsemble.from_arrays("random_forest", {k: v for k, v in arrays.items() if k != "leaf"})
    with pytest.raises(ValueError, match=r"features must be \(N, 10\)"):
        trees.score(held[:, :4])


def test_ensemble_round_trips_as_arrays_and_tampering_is_named(real_features, tmp_path):
    fit_x, fit_y, held = real_features["effective_path"]
    from pathguard.models.effective_path import make_detector

    sk = make_detector("adaboost", random_state=0).fit(fit_x, fit_y)
    model = TreeEnsemble.from_sklearn("adaboost", sk.estimator_)
    det = SupervisedDetector("adaboost", "effective_path", ["fgsm"], model, np.sort(model.score(held[::2])))
    files = supervised_files(det)
    assert set(files) == {SUPERVISED_NPZ} and det.manifest()["files"] == [SUPERVISED_NPZ]
    with np.load(io.BytesIO(files[SUPERVISED_NPZ]), allow_pickle=False) as z:
        names = set(z.files)
        assert all(z[k].dtype != object for k in z.files)
    assert names == {"calib"} | {f"adaboost/{k}" for k in model.to_arrays()}
    write_bundle(tmp_path / "b", files, {"supervised": det.manifest()})
    vf = read_verified(tmp_path / "b")
    loaded = SupervisedDetector.from_verified(vf.manifest["supervised"], vf.npz)
    assert isinstance(loaded.model, TreeEnsemble)
    np.testing.assert_array_equal(loaded.raw_score(held), det.raw_score(held))
    np.testing.assert_allclose(loaded.raw_score(held), sk.estimator_.predict_proba(held)[:, 1], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(loaded.calib, det.calib)

    blob = bytearray((tmp_path / "b" / SUPERVISED_NPZ).read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (tmp_path / "b" / SUPERVISED_NPZ).write_bytes(bytes(blob))
    with pytest.raises(BundleIntegrityError, match=SUPERVISED_NPZ):
        read_verified(tmp_path / "b")


@pytest.mark.parametrize("where", ["file", "manifest_only"])
def test_bundle_with_a_pickled_ensemble_is_refused_with_the_rebuild_command(tmp_path, where):
    vf = read_verified(ARTIFACTS / "mnist-lenet5")
    manifest = {k: v for k, v in vf.manifest.items() if k not in ("files", "schema_version", "created_at")}
    manifest["supervised"] = {
        "detector": "random_forest",
        "features": "effective_path",
        "attacks": ["fgsm", "bim"],
        "files": [SUPERVISED_NPZ, SUPERVISED_JOBLIB],
    }
    blobs = dict(vf.blobs, **{SUPERVISED_NPZ: npz_bytes({"calib": np.zeros(3)})})
    if where == "file":
        blobs[SUPERVISED_JOBLIB] = b"\x80\x04 would be a pickle"  # listed with its digest: read_verified accepts it
    write_bundle(tmp_path / "b", blobs, manifest)
    read_verified(tmp_path / "b")
    with pytest.raises(BundleCompatibilityError) as exc:
        load_bundle(tmp_path / "b")
    msg = str(exc.value)
    assert SUPERVISED_JOBLIB in msg and "no longer loads" in msg
    assert "pathguard build ... --supervised-attacks fgsm,bim --supervised-detector random_forest" in msg


def test_no_pickle_or_joblib_import_in_the_package():
    import ast

    from .conftest import ROOT

    offenders = []
    for path in [*(ROOT / "models").rglob("*.py"), *(ROOT / "service").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("joblib", "pickle")]
    assert offenders == []


def test_fit_supervised_linear_on_real_attacks_keeps_the_paper_sign_constraints(lenet, mnist_test):
    from pathguard.models.effective_path import ClassPaths, EffectivePathExtractor, ep_features

    extractor = EffectivePathExtractor(lenet, theta=0.5)
    paths = ClassPaths(10).fit(extractor, mnist_test.x[1000:2000], mnist_test.y[1000:2000])
    seen: list[int] = []

    def features(x: np.ndarray) -> np.ndarray:
        seen.append(len(x))
        return ep_features(paths.similarity(extractor.extract(x, ranks=(1, 2))))

    x, y = mnist_test.x, mnist_test.y
    det = fit_supervised(
        run_attack, lenet, "mnist", features, x[:80], y[:80], x[80:120], ["fgsm"], "linear", "effective_path"
    )
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


def test_fit_supervised_ensemble_is_calibrated_with_the_exported_scorer(lenet, mnist_test):
    from pathguard.models.effective_path import ClassPaths, EffectivePathExtractor, ep_features

    extractor = EffectivePathExtractor(lenet, theta=0.5)
    paths = ClassPaths(10).fit(extractor, mnist_test.x[1000:2000], mnist_test.y[1000:2000])

    def features(x: np.ndarray) -> np.ndarray:
        return ep_features(paths.similarity(extractor.extract(x, ranks=(1, 2))))

    x, y = mnist_test.x, mnist_test.y
    det = fit_supervised(
        run_attack, lenet, "mnist", features, x[:80], y[:80], x[80:120], ["fgsm"], "gradient_boosting", "effective_path"
    )
    assert isinstance(det.model, TreeEnsemble) and det.model.kind == "gradient_boosting"
    np.testing.assert_array_equal(det.calib, np.sort(det.model.score(features(x[80:120]))))
    assert set(supervised_files(det)) == {SUPERVISED_NPZ}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"supervised_attacks": ["fgsm", "nope"]}, "unknown supervised attack"),
        ({"supervised_attacks": ["fgsm", "fgsm"]}, "distinct"),
        ({"supervised_attacks": ["fgsm"], "supervised_detector": "svm"}, "unknown supervised detector"),
        ({"supervised_attacks": ["fgsm"], "supervised_features": "pixels"}, "unknown supervised feature set"),
        ({"supervised_attacks": ["fgsm"], "supervised_detector": "linear"}, "needs features='effective_path'"),
        ({"supervised_attacks": ["fgsm"], "supervised_n": 0}, "supervised_n must be positive"),
        ({"fusion": ["effective_path", "nic", "supervised"]}, "reported beside the verdict, never fused"),
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
