"""The committed bundles give the same verdicts as when their reference verdicts were taken.

`tests/data/verdicts_before_restructure.json` holds `load_bundle(...).pipeline.detect` on the first test images of
each dataset. The CIFAR-10 CNN's entry was computed once with the code of commit 70df9a4 (the last one before the
restructuring into the pathguard namespace), on the same bundle files (only the manifest has changed since: the
per-class ranges were added). The MNIST entry was retaken when that bundle was rebuilt on the retrained LeNet-5 with
the consistency components (noise seed 0), right after the component registry replaced the pipeline's hand-written
components, whose verdicts on the CNN bundle it reproduces; and again when its Effective Path took the relative rule
(the same predictions and flags on these images, other scores).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pathguard.models.bundle import load_bundle
from pathguard.models.data import load_dataset
from tests.conftest import ARTIFACTS

BEFORE = json.loads((Path(__file__).parent / "data" / "verdicts_before_restructure.json").read_text())
DATASETS = {"mnist-lenet5": "mnist", "cifar10-cnn": "cifar10"}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_committed_bundle_verdicts_are_unchanged(name):
    before = BEFORE[name]
    x = load_dataset(DATASETS[name], "test").x[: before["n"]]
    r = load_bundle(ARTIFACTS / name, seed=0).pipeline.detect(x)
    assert r.predicted.tolist() == before["predicted"]
    assert r.adversarial.tolist() == before["adversarial"]
    for key in ("score", "ep_score", "nic_score"):
        np.testing.assert_allclose(getattr(r, key), before[key], atol=1e-6, rtol=0, err_msg=key)


def test_the_committed_mnist_bundle_fuses_effective_path_in_its_chosen_form():
    """The MNIST bundle's verdict (validation/mnist-lenet5.md) fuses Effective Path in the form chosen on held-out
    attacks (validation/mnist-lenet5-ep-rules.md): the relative rule at the 0.1 quantile, every weighted layer."""
    bundle = load_bundle(ARTIFACTS / "mnist-lenet5")
    verdict = bundle.manifest["verdict"]
    assert verdict["components"] == ["effective_path", "nic", "nic_vi", "noise_drop", "squeeze"]
    assert verdict["rule"] == "fisher"
    ep = bundle.manifest["effective_path"]
    assert ep["selection"] == "relative" and ep["last_k"] is None and len(ep["layers"]) == 5
    built = bundle.manifest["build"]["config"]["components"]["effective_path"]
    assert built == {"selection": "relative", "quantile": 0.1}


RESIDUAL = ARTIFACTS / "cifar10-resnet20"


def test_the_committed_residual_bundle_is_an_imported_resnet_that_detects():
    """The residual CIFAR-10 bundle: built through the ONNX import path (the user's file kept as source.onnx),
    under 50 MB, classifying the test images as its classifier folder does, and answering every detection field."""
    from pathguard.models import load_classifier
    from pathguard.models.bundle import read_verified
    from pathguard.models.networks import Residual

    files = read_verified(RESIDUAL)
    assert json.loads(files.bytes("classifier.json"))["format"] == "onnx" and files.has("source.onnx")
    assert sum(f["size"] for f in files.manifest["files"].values()) <= 50 * 2**20
    bundle = load_bundle(RESIDUAL)
    assert sum(isinstance(m, Residual) for m in bundle.classifier.modules()) == 9
    test = load_dataset("cifar10", "test")
    x, y = test.x[:500], test.y[:500]
    r = bundle.pipeline.detect(x)
    trained = load_classifier(ARTIFACTS / "classifiers" / "cifar10-resnet20")
    import torch

    with torch.no_grad():
        expected = trained(torch.from_numpy(x)).argmax(1).numpy()
    assert (r.predicted == expected).mean() >= 0.998  # the same network, up to float rounding at near-ties
    assert (r.predicted == y).mean() >= 0.88
    row = r.row(0)
    assert row["effective_path"]["layers"] == bundle.manifest["effective_path"]["layers"]
    assert set(row["nic"]["value_violation"]) == set(bundle.manifest["nic"]["layers"])
    assert 0.0 <= row["verdict"]["score"] <= 1.0
    # the verdict chosen on attacks of held-out training images (validation/cifar10-resnet20-consistency.md):
    # the harmonic mean of the noise flip share and logit drop (sigma 0.05 from flip rate 0.1), the logit
    # margin and feature squeezing; Effective Path and NIC are built and reported beside it, Effective Path in the
    # form chosen on the same attacks (validation/cifar10-resnet20-ep-rules.md): the absolute rule at the 0.1
    # quantile on the last three weighted layers
    verdict = bundle.manifest["verdict"]
    assert verdict["components"] == ["noise_flip", "noise_drop", "margin", "squeeze"] and verdict["rule"] == "harmonic"
    ep = bundle.manifest["effective_path"]
    assert ep["selection"] == "absolute" and ep["last_k"] == 3 and len(ep["layers"]) == 3
    assert json.loads(files.bytes("ep_thresholds.json"))["rule"] == "absolute"
    assert {"effective_path", "nic"} <= set(bundle.manifest["components"])
    for name in ("noise_flip", "noise_drop"):
        assert json.loads(files.bytes(f"{name}.json")) == {"sigma": 0.05, "copies": 8}
    assert 0.0 <= row["noise_flip"]["flip_share"] <= 1.0 and row["margin"]["margin"] >= 0.0
    assert "mahalanobis" not in row
