from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pathguard.models.bundle import load_classifier
from pathguard.models.networks import CONFIGS, build_classifier, fold_batchnorm, save_classifier

from .conftest import CIFAR_CLASSIFIER, MNIST_CLASSIFIER

LENET_TAPS = {
    "conv1": (6, 28, 28),
    "pool1": (6, 14, 14),
    "conv2": (16, 10, 10),
    "pool2": (16, 5, 5),
    "flatten": (400,),
    "fc1": (120,),
    "fc2": (84,),
    "fc3": (10,),
}


def test_lenet_taps_in_forward_order_and_post_relu():
    model = build_classifier(CONFIGS["mnist"]).eval()
    x = torch.rand(3, 1, 28, 28)
    logits, taps = model.forward_with_taps(x)
    assert list(taps) == list(LENET_TAPS) == model.tap_names
    for name, shape in LENET_TAPS.items():
        assert tuple(taps[name].shape) == (3, *shape), name
    for name in ("conv1", "conv2", "fc1", "fc2"):
        assert taps[name].min() >= 0, f"{name} tap must be post-ReLU"
    assert taps["conv1"].max() > 0
    assert torch.equal(taps["fc3"], logits)
    assert model.weighted_layer_names == ["conv1", "conv2", "fc1", "fc2", "fc3"]


def test_cifar_taps():
    model = build_classifier(CONFIGS["cifar10"]).eval()
    _, taps = model.forward_with_taps(torch.rand(2, 3, 32, 32))
    assert list(taps) == ["conv1", "conv2", "pool1", "conv3", "conv4", "pool2", "flatten", "fc1", "fc2", "fc3"]
    assert tuple(taps["pool2"].shape) == (2, 128, 8, 8)
    assert taps["conv1"].min() >= 0  # tapped after BN + ReLU


def test_fold_batchnorm_is_equivalent():
    torch.manual_seed(0)
    model = build_classifier(CONFIGS["cifar10"])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(4, 3, 32, 32)
    ref_logits, ref_taps = model.forward_with_taps(x)
    logits, taps = folded.forward_with_taps(x)
    assert list(taps) == list(ref_taps)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(taps["conv3"], ref_taps["conv3"], atol=1e-4, rtol=1e-4)


def test_save_load_roundtrip(tmp_path):
    model = build_classifier(CONFIGS["mnist"]).eval()
    save_classifier(model, tmp_path)
    loaded = load_classifier(tmp_path)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert not loaded.training


def _accuracy(model, split, n):
    with torch.no_grad():
        pred = model(torch.from_numpy(split.x[:n])).argmax(1).numpy()
    return float((pred == split.y[:n]).mean())


def test_committed_lenet_accuracy(lenet, mnist_test):
    # Full MNIST test set: the committed weights must meet the >= 99.0% target.
    assert _accuracy(lenet, mnist_test, 10000) >= 0.990


def test_committed_cifar_accuracy(cifar_cnn, cifar_test):
    idx = np.arange(0, 10000, 5)  # every 5th image: 2,000 images, all classes
    assert _accuracy(cifar_cnn, cifar_test.subset(idx), 2000) >= 0.78


@pytest.mark.parametrize(("folder", "fixture"), [(MNIST_CLASSIFIER, "mnist_test"), (CIFAR_CLASSIFIER, "cifar_test")])
def test_onnx_parity_on_real_images(folder, fixture, request):
    split = request.getfixturevalue(fixture)
    model = load_classifier(folder)
    x = split.x[:64]
    sess = ort.InferenceSession(str(folder / "classifier.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert names == ["logits", *model.tap_names]
    outs = dict(zip(names, sess.run(None, {"input": x}), strict=True))
    with torch.no_grad():
        logits, taps = model.forward_with_taps(torch.from_numpy(x))
    assert np.abs(outs["logits"] - logits.numpy()).max() < 1e-4
    for name, t in taps.items():
        assert np.abs(outs[name] - t.numpy()).max() < 1e-4, name
    # dynamic batch axis
    assert sess.run(["logits"], {"input": x[:3]})[0].shape == (3, 10)


def test_cli_help():
    out = subprocess.run(
        [sys.executable, "-m", "pathguard.service.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "train" in out.stdout and "pathguard" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "pathguard.service.cli", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2
