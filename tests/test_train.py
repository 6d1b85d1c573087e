"""Classifier training: a run interrupted after an epoch and resumed ends with the same weights as an
uninterrupted one; ResNet-20 trains, folds its batch norms (also inside residual blocks) and reloads."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pathguard.models.bundle import load_classifier
from pathguard.models.bundle.splits import training_splits
from pathguard.models.data import load_dataset
from pathguard.models.evaluation import train as train_module
from pathguard.models.evaluation.train import ARCH_DEFAULTS, DEFAULTS, _training_images, train_classifier
from pathguard.models.networks import ARCHITECTURES, Residual, build_classifier, fold_batchnorm


class Interrupted(Exception):
    pass


def test_resume_after_an_interruption_gives_the_same_weights(tmp_path, monkeypatch):
    cfg = replace(DEFAULTS["mnist"], epochs=2, n_train=512, batch_size=128, n_test=1000)
    straight = train_classifier("mnist", tmp_path / "straight", cfg)
    save = train_module._save_checkpoint

    def save_then_stop(folder, epoch, *args):
        save(folder, epoch, *args)
        if epoch == 1:
            raise Interrupted

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        train_classifier("mnist", tmp_path / "resumed", cfg)
    monkeypatch.setattr(train_module, "_save_checkpoint", save)
    resumed = train_classifier("mnist", tmp_path / "resumed", cfg, resume=True)
    a = (tmp_path / "straight" / "classifier.safetensors").read_bytes()
    b = (tmp_path / "resumed" / "classifier.safetensors").read_bytes()
    assert a == b
    assert resumed["test_accuracy"] == straight["test_accuracy"]


def test_holdout_is_exactly_the_builders_calibration_split():
    train = load_dataset("mnist", "train")
    cfg = replace(DEFAULTS["mnist"], holdout=5000)
    used = _training_images(train, cfg)
    calib = training_splits(train, 5000, cfg.seed)
    held = np.concatenate([calib["ep_fit"].x, calib["calib_a"].x, calib["calib_b"].x]).reshape(5000, -1)
    used_rows = {r.tobytes() for r in used.x.reshape(len(used), -1)}
    assert len(used) == len(train) - 5000
    assert not any(r.tobytes() in used_rows for r in held[:500])  # none of the calibration images is trained on


def test_resnet20_trains_folds_and_reloads(tmp_path):
    cfg = replace(ARCH_DEFAULTS["resnet20"], epochs=1, n_train=512, batch_size=32, n_test=200)
    report = train_classifier("cifar10", tmp_path / "r20", cfg, arch="resnet20")
    assert report["architecture"] == "resnet20" and report["held_out"]["images"] == 5000
    model = load_classifier(tmp_path / "r20")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, Residual) for m in model.modules()) == 9
    assert model.tap_names[:3] == ["conv1", "block1_0", "block1_1"]


def test_fold_batchnorm_inside_residual_blocks_is_equivalent():
    model = build_classifier(ARCHITECTURES["resnet20"]).eval()
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    x = torch.rand(4, 3, 32, 32, generator=gen)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
