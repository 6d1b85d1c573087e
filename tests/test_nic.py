from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest
import torch

from pathguard.models.errors import NotCalibratedError, NotFittedError
from pathguard.models.nic import NICDetector, default_layers

from .conftest import MNIST_CLASSIFIER, ROOT

SMALL: dict[str, Any] = dict(
    pca_dim=24, n_fit=400, n_final=250, n_pca=300, n_head=2500, head_epochs=4, holdout=0, batch_size=500
)
TINY: dict[str, Any] = dict(
    pca_dim=8, n_fit=120, n_final=80, n_pca=100, n_head=300, head_epochs=1, holdout=0, batch_size=300
)


def _auc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Probability that a positive outscores a negative (ties count half)."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


@pytest.fixture(scope="module")
def mnist_train():
    from pathguard.models.data import load_dataset

    return load_dataset("mnist", "train")


@pytest.fixture(scope="module")
def fitted(lenet, mnist_train, mnist_test):
    """A small detector: fit on 3000 training images, calibrated on 500 others."""
    det = NICDetector(seed=0, **SMALL).fit(
        lenet, mnist_train.x[:3000], mnist_train.y[:3000], x_val=mnist_test.x[:1000], y_val=mnist_test.y[:1000]
    )
    return det.calibrate(lenet, mnist_train.x[3000:3500])


@pytest.fixture(scope="module")
def clean_and_noisy(mnist_test):
    clean = mnist_test.x[1000:1300]
    rng = np.random.default_rng(0)
    noisy = np.clip(clean + rng.normal(0.0, 0.5, clean.shape), 0.0, 1.0).astype(np.float32)
    return clean, noisy


def test_default_layers_of_lenet(lenet):
    # flatten is the pool2 numbers reshaped and fc3 is the logits (checked as the softmax)
    assert default_layers(lenet) == ["input", "conv1", "pool1", "conv2", "pool2", "fc1", "fc2", "softmax"]


def test_default_layers_of_an_imported_resnet_skip_the_flatten_after_its_pool():
    """Imported taps are named after ONNX nodes (``pool_GlobalAveragePool``, ``flatten_Flatten``): a Flatten right
    after a pooling layer repeats its numbers and is not checked twice; the logits are checked as the softmax."""
    from pathguard.models.networks import import_onnx

    from .test_onnx_import import NETS, _export

    make, shape = NETS["resnet"]
    model = import_onnx(_export(make(), shape))
    layers = default_layers(model)
    flatten = [t for t in model.tap_names if t.startswith("head_head_1")]
    pooled = [t for t in model.tap_names if "GlobalAveragePool" in t]
    assert flatten and pooled and flatten[0] not in layers and pooled[0] in layers
    assert layers[0] == "input" and layers[-1] == "softmax" and model.tap_names[-1] not in layers
    assert len(layers) == len(model.tap_names) + 2 - 2  # input and softmax in; the flatten and the logits out


def test_heads_are_trained_and_improve_with_depth(fitted, lenet, mnist_test):
    acc = fitted.head_accuracy_
    assert list(acc) == fitted.layers_
    assert min(acc.values()) > 0.6  # chance is 0.1: untrained (random) heads would sit near it
    assert acc["fc2"] > acc["conv1"] > 0.0 and acc["fc2"] > acc["input"]
    with torch.no_grad():
        model_acc = (lenet(torch.from_numpy(mnist_test.x[:1000])).argmax(1).numpy() == mnist_test.y[:1000]).mean()
    assert acc["softmax"] == pytest.approx(model_acc)  # the last derived model is the network itself
    assert acc["fc2"] > model_acc - 0.02


def test_scores_separate_clean_from_heavy_noise(fitted, lenet, clean_and_noisy):
    clean, noisy = clean_and_noisy
    sc, sn = fitted.score(lenet, clean), fitted.score(lenet, noisy)
    assert sc.value.shape == (300, 8) and sc.provenance.shape == (300, 7) and sc.final.shape == (300,)
    for j in range(3):  # input, conv1, pool1 value invariants
        assert _auc(sc.value[:, j], sn.value[:, j]) > 0.9, fitted.layers_[j]
    assert _auc(sc.provenance[:, 0], sn.provenance[:, 0]) > 0.9  # input -> conv1
    assert _auc(sc.final, sn.final) > 0.9
    assert _auc(sc.score, sn.score) > 0.9
    for s in (sc, sn):
        for arr in (s.score, s.value_violation, s.provenance_violation):
            assert arr.min() >= 0.0 and arr.max() <= 1.0
    thr = fitted.threshold(0.1)
    assert np.mean(sc.score > thr) < 0.2  # clean test FPR near the 10% target
    assert np.mean(sn.score > thr) > 0.8


def test_per_layer_api_reproduces_batched_scores(fitted, lenet, mnist_test):
    x = torch.from_numpy(mnist_test.x[:5])
    logits, acts = fitted.activations(lenet, x)
    checks = [fitted.check_layer(name, acts[name]) for name in fitted.layers_]
    value = torch.stack([v for v, _ in checks], 1)
    prov = torch.stack(
        [fitted.provenance_score(p, checks[i][1], checks[i + 1][1]) for i, p in enumerate(fitted.pairs_)], 1
    )
    final = fitted.final_score(value, prov)
    for batched in (True, False):
        v, p, f = fitted.raw_scores(acts, batched=batched)
        torch.testing.assert_close(v, value, atol=1e-9, rtol=0)
        torch.testing.assert_close(p, prov, atol=1e-9, rtol=0)
        torch.testing.assert_close(f, final, atol=1e-9, rtol=0)
    np.testing.assert_allclose(fitted.final_violation(final), fitted.score(lenet, x).score)
    # the softmax layer's derived model is the network's own softmax
    torch.testing.assert_close(checks[-1][1], torch.softmax(logits, 1))


def test_export_round_trip_gives_identical_scores(fitted, lenet, clean_and_noisy, tmp_path):
    np.savez(tmp_path / "nic.npz", **fitted.to_arrays())
    (tmp_path / "nic.json").write_text(json.dumps(fitted.config()))
    with np.load(tmp_path / "nic.npz", allow_pickle=False) as z:
        restored = NICDetector.from_arrays(dict(z), json.loads((tmp_path / "nic.json").read_text()))
    x = clean_and_noisy[1][:50]
    a, b = fitted.score(lenet, x), restored.score(lenet, x)
    for field in ("value", "provenance", "final", "value_violation", "provenance_violation", "score"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert restored.head_accuracy_ == fitted.head_accuracy_
    assert restored.threshold(0.05) == fitted.threshold(0.05)


def test_scoring_from_arrays_does_not_import_sklearn(fitted, tmp_path):
    np.savez(tmp_path / "nic.npz", **fitted.to_arrays())
    (tmp_path / "nic.json").write_text(json.dumps(fitted.config()))
    code = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np, torch
        from pathguard.models import load_classifier
        from pathguard.models.nic import NICDetector
        with np.load({str(tmp_path / "nic.npz")!r}, allow_pickle=False) as z:
            det = NICDetector.from_arrays(dict(z), json.load(open({str(tmp_path / "nic.json")!r})))
        s = det.score(load_classifier({str(MNIST_CLASSIFIER)!r}), torch.rand(2, 1, 28, 28))
        assert s.score.shape == (2,)
        print(sorted(m for m in sys.modules if m.split(".")[0] == "sklearn"))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_fit_is_deterministic_given_seed(lenet, mnist_train):
    x, y = mnist_train.x[:700], mnist_train.y[:700]
    a = NICDetector(seed=3, **TINY).fit(lenet, x, y).to_arrays()
    b = NICDetector(seed=3, **TINY).fit(lenet, x, y).to_arrays()
    c = NICDetector(seed=4, **TINY).fit(lenet, x, y).to_arrays()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert not np.array_equal(a["m0.fc1.vi.support_vectors"], c["m0.fc1.vi.support_vectors"])


def test_randomized_members_are_reproducible_and_vote(lenet, mnist_train, mnist_test):
    det = NICDetector(seed=0, n_random=3, **TINY).fit(lenet, mnist_train.x[:700], mnist_train.y[:700])
    det.calibrate(lenet, mnist_train.x[700:900])
    arrays = det.to_arrays()
    for k in (1, 2, 3):
        assert (arrays[f"m{k}.transform_scale"] > 0).all()  # every layer of a randomized member is transformed
    assert (arrays["m0.transform_scale"] == 0).all()
    assert det.select_members("one", 11) == det.select_members("one", 11)
    picks = {tuple(det.select_members("majority3", s)) for s in range(20)}
    assert all(len(set(p)) == 3 and 0 not in p for p in picks) and len(picks) > 1
    x = mnist_test.x[:40]
    per_member = [det.final_violation(det.raw_scores(det.activations(lenet, x)[1], k)[2], k) for k in (1, 2, 3)]
    assert not np.array_equal(per_member[0], per_member[1])  # members really differ
    s = det.score(lenet, x, randomize="majority3", rng=5)
    assert sorted(s.members) == [1, 2, 3]
    np.testing.assert_array_equal(s.score, np.median(np.stack(per_member), axis=0))
    with pytest.raises(ValueError, match="n_random"):
        NICDetector(**TINY).fit(lenet, mnist_train.x[:700], mnist_train.y[:700]).select_members("one", 0)


def test_unfitted_and_uncalibrated_use_raise_clear_errors(lenet, mnist_train):
    with pytest.raises(NotFittedError, match="not fitted"):
        NICDetector().score(lenet, mnist_train.x[:2])
    det = NICDetector(seed=0, **TINY).fit(lenet, mnist_train.x[:700], mnist_train.y[:700])
    with pytest.raises(NotCalibratedError, match="calibrate"):
        det.score(lenet, mnist_train.x[:2])
    with pytest.raises(ValueError, match="layers"):
        NICDetector(layers=["input", "nope"], **TINY).fit(lenet, mnist_train.x[:700], mnist_train.y[:700])


def test_channel_mean_reduction_is_the_standardized_per_channel_mean(lenet, mnist_train, mnist_test):
    """``reduction="channel_mean"``: a conv map's features are its per-channel spatial means, standardized on the
    fitting images (hand-checked below), flat layers are reduced as before; the detector round-trips through its
    arrays and still separates heavy noise from clean digits."""
    x, y = mnist_train.x[:1200], mnist_train.y[:1200]
    det = NICDetector(seed=0, reduction="channel_mean", **TINY).fit(lenet, x, y)
    det.calibrate(lenet, mnist_train.x[1200:1400])
    _, taps = det.activations(lenet, x[:300])
    conv1 = taps["conv1"]  # (N, 6, 24, 24)
    feats = det.reduce("conv1", conv1)
    assert feats.shape == (300, 6)
    with torch.no_grad():
        _, fit_taps = det.activations(lenet, x[det._split(len(x), 0)["fit"][: det.sizes_.n_pca]])
    means = fit_taps["conv1"].double().mean((2, 3))  # the fitting images' per-channel means
    expected = (conv1.double().mean((2, 3)) - means.mean(0)) / means.std(0, correction=0)
    np.testing.assert_allclose(feats.double().numpy(), expected.numpy(), atol=1e-4)
    assert det.reduce("fc1", taps["fc1"]).shape == (300, TINY["pca_dim"])  # 120 inputs > pca_dim: PCA as before
    restored = NICDetector.from_arrays(det.to_arrays(), json.loads(json.dumps(det.config())))
    assert restored.reduction == "channel_mean"
    clean = mnist_test.x[:200]
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 0.5, clean.shape), 0, 1).astype(np.float32)
    a, b = det.score(lenet, clean), restored.score(lenet, clean)
    np.testing.assert_array_equal(a.final, b.final)
    assert _auc(det.score(lenet, clean).final, det.score(lenet, noisy).final) > 0.9
    with pytest.raises(ValueError, match="reduction must be one of"):
        NICDetector(reduction="pool")
