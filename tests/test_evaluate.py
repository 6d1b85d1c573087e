"""Smoke run of ``pathguard evaluate`` on the committed MNIST bundle with two cheap attacks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pathguard.models.bundle import load_bundle
from pathguard.models.evaluation.evaluate import DETECTORS, SUPERVISED
from pathguard.service.cli import main
from tests.conftest import ARTIFACTS

BUNDLE = ARTIFACTS / "mnist-lenet5"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    cache = tmp_path_factory.mktemp("cache")
    args = ["evaluate", "--bundle", str(BUNDLE), "--attacks", "fgsm,noise", "--n", "40", "--n-clean", "60"]
    assert main([*args, "--out", str(out), "--cache", str(cache), "--threads", "1"]) == 0
    return out, cache


def _unit(v: float) -> bool:
    return 0.0 <= v <= 1.0


def test_report_has_the_issue_schema(report_dir):
    out, _ = report_dir
    r = json.loads((out / "report.json").read_text())
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    assert r["bundle"]["name"] == manifest["name"] and len(r["bundle"]["sha256"]) == 64
    assert r["clean"]["n"] == 60 and r["clean"]["accuracy"] >= 0.95
    others = {"noise_drop", "squeeze", "family_layer", "family_consistency"}  # the bundle's consistency family
    assert set(r["clean"]["fpr"]) == set(DETECTORS) | others and all(_unit(v) for v in r["clean"]["fpr"].values())
    assert set(r["attacks"]) == {"fgsm", "noise"}
    for a in r["attacks"].values():
        assert {"n_attempted", "n_successful", "params"} <= set(a)
        assert 0 < a["n_successful"] <= a["n_attempted"] <= 40
    assert r["attacks"]["fgsm"]["params"]["eps"] == 0.3
    # the bundle's other components (its consistency family) and each family's part of the verdict beside them
    assert set(r["detectors"]) == set(DETECTORS) | others
    for d in r["detectors"].values():
        assert math.isfinite(d["threshold"])
        for m in d["per_attack"].values():
            assert {"auc", "dr", "dr_at_fpr_0.01", "dr_at_fpr_0.02", "dr_at_fpr_0.05"} <= set(m)
            assert _unit(m["auc"]) and _unit(m["dr"]) and _unit(m["dr_at_fpr_0.05"])
    assert set(r["leave_one_attack_out"]) == set(SUPERVISED)
    for per in r["leave_one_attack_out"].values():
        assert set(per) == {"fgsm", "noise"}
        assert all({"auc", "dr_at_fpr_0.05"} <= set(v) for v in per.values())


def test_detection_is_real(report_dir):
    out, _ = report_dir
    r = json.loads((out / "report.json").read_text())
    # Uniform noise images are far off the data manifold: every benign-only detector must separate them.
    for d in ("ep_benign", "nic", "fused"):
        assert r["detectors"][d]["per_attack"]["noise"]["auc"] > 0.95, d
    # FGSM (eps 0.3) on MNIST: the committed report has the fused AUC at 0.997 and DR 100% at 5% FPR on 231
    # examples; with the smoke run's few examples it must still be detected far above chance (AUC 0.5).
    assert r["attacks"]["fgsm"]["n_successful"] >= 20
    fgsm = {d: r["detectors"][d]["per_attack"]["fgsm"] for d in ("ep_benign", "nic", "fused")}
    assert fgsm["fused"]["auc"] > 0.9 and fgsm["fused"]["dr_at_fpr_0.05"] > 0.6, fgsm["fused"]
    assert fgsm["nic"]["auc"] > 0.9 and fgsm["ep_benign"]["auc"] > 0.75, fgsm
    # The fused threshold is the bundle's.
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    assert r["detectors"]["fused"]["threshold"] == pytest.approx(manifest["verdict"]["threshold"])


def test_clean_fpr_on_images_the_bundle_never_saw_is_near_its_target(mnist_test):
    """The verdict's threshold was set on held-out training images; on 2,000 test images (never used by the
    build) the share of clean images flagged is within 2.5 points of the target (binomial sd here: about 0.5
    point from the test sample, 0.5 from the 2,000 calibration images that set the threshold)."""
    bundle = load_bundle(BUNDLE)
    target = bundle.pipeline.target_fpr
    assert target == json.loads((BUNDLE / "manifest.json").read_text())["verdict"]["target_fpr"]
    flagged = np.concatenate(
        [bundle.pipeline.detect(mnist_test.x[s : s + 500]).adversarial for s in range(0, 2000, 500)]
    )
    assert abs(flagged.mean() - target) <= 0.025, (flagged.mean(), target)


def test_figures_markdown_and_attack_cache(report_dir):
    out, cache = report_dir
    for d in DETECTORS:
        assert (out / f"roc_{d}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "ep_similarity.png").exists() and (out / "score_distributions.png").exists()
    md = (out / "report.md").read_text()
    assert "| `fgsm` |" in md and "NIC paper DR" in md and "Leave-one-attack-out" in md
    cached = sorted(cache.glob("*.npz"))
    assert [p.name.split("-")[0] for p in cached] == ["fgsm", "noise"]
    with np.load(cached[0]) as z:
        x_adv = z["x_adv"]
    assert x_adv.dtype == np.float32 and x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_cifar_reports_put_the_review_anchors_beside_the_fused_detector(report_dir):
    """A CIFAR-10 report lists the NIC reimplementation's published rates (at 10.1% FPR) beside the fused
    detector's DR at 5% and 10% FPR for the attacks the two share; 10% FPR is one of the reported points."""
    from pathguard.models.evaluation.evaluate import NIC_REVIEW_DR, render_markdown

    out, _ = report_dir
    r = json.loads((out / "report.json").read_text())
    assert "dr_at_fpr_0.1" in r["detectors"]["fused"]["per_attack"]["fgsm"]
    r["bundle"]["dataset"] = "cifar10"  # the same numbers, rendered as if they were a CIFAR-10 bundle's
    r["attacks"]["fgsm_8"] = r["attacks"].pop("fgsm")
    for d in r["detectors"].values():
        d["per_attack"]["fgsm_8"] = d["per_attack"].pop("fgsm")
    fused = r["detectors"]["fused"]["per_attack"]["fgsm_8"]
    md = render_markdown(r)
    row = next(line for line in md.splitlines() if line.startswith("| `fgsm_8` | 43.6% |"))
    assert f"{100 * fused['dr_at_fpr_0.05']:.1f}%" in row and f"{fused['auc']:.3f}" in row
    assert "## Detection rate at 10% FPR on the clean test images" in md and NIC_REVIEW_DR["fgsm_8"] == 0.436
    assert "| `noise` | " not in md.split("review of detectors")[1].split("## Leave")[0]  # no anchor, no row


def test_the_attack_cache_is_keyed_by_the_classifier_also_for_imported_bundles():
    """Bundles built from a user's ONNX file carry ``source.onnx`` instead of ``classifier.safetensors``; their
    cached attacks are keyed by that file, so a rebuilt detector reuses them and another classifier does not."""
    import copy
    from types import SimpleNamespace

    from pathguard.models.evaluation.evaluate import _attack_key

    manifest = json.loads((ARTIFACTS / "cifar10-resnet20" / "manifest.json").read_text())
    assert "classifier.safetensors" not in manifest["files"] and "source.onnx" in manifest["files"]
    imported = SimpleNamespace(dataset="cifar10", manifest=manifest)
    rebuilt = copy.deepcopy(manifest)
    rebuilt["files"]["nic.npz"]["sha256"] = "0" * 64  # other detectors, same classifier
    other = copy.deepcopy(manifest)
    other["files"]["source.onnx"]["sha256"] = "0" * 64
    key = _attack_key(imported, "fgsm_8", 10, "interleaved")  # type: ignore[arg-type]
    same = SimpleNamespace(dataset="cifar10", manifest=rebuilt)
    assert key == _attack_key(same, "fgsm_8", 10, "interleaved")  # type: ignore[arg-type]
    assert key != _attack_key(SimpleNamespace(dataset="cifar10", manifest=other), "fgsm_8", 10, "interleaved")  # type: ignore[arg-type]
    assert key != _attack_key(imported, "fgsm_8", 11, "interleaved")  # type: ignore[arg-type]
    assert key != _attack_key(imported, "fgsm_8", 10, "stored")  # type: ignore[arg-type]  # other images


def test_the_first_n_test_images_cover_every_class(report_dir):
    """ "The first n" test images are taken class by class in turn (the CIFAR-10 copy stores its test split ordered
    by class, where the stored order's first images would all be airplanes); the report says so, per class."""
    out, _ = report_dir
    r = json.loads((out / "report.json").read_text())
    assert r["settings"]["order"] == "interleaved"
    assert r["clean"]["per_class"] == [6] * 10  # 60 clean images, 10 classes
    assert r["settings"]["pool_per_class"] == [6] * 10
    assert "taken classes in turn, per class [6, 6, 6, 6, 6, 6, 6, 6, 6, 6]" in (out / "report.md").read_text()
