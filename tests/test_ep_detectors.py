"""Detectors over Effective Path features: sign constraints, supervised fits, the benign-only score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pathguard.models.effective_path import (
    DETECTORS,
    BenignEPScore,
    ClassPaths,
    EffectivePathExtractor,
    LinearJointSimilarity,
    ep_features,
    make_detector,
)
from pathguard.models.errors import NotFittedError

L = 4


def synthetic(n=400, seed=0, confound=True):
    """Benign: high rank-1, low rank-2 similarity; adversarial the opposite. Optionally a confounding
    rank-1 feature that is *higher* for adversarial rows, which a sign-constrained model must not use."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.5
    r1 = np.clip(0.95 - 0.15 * y[:, None] + 0.05 * rng.standard_normal((n, L)), 0, 1)
    r2 = np.clip(0.6 + 0.2 * y[:, None] + 0.08 * rng.standard_normal((n, L)), 0, 1)
    if confound:
        r1[:, 3] = np.clip(0.5 + 0.3 * y + 0.05 * rng.standard_normal(n), 0, 1)
    return np.concatenate([r1, r2], 1), y


def test_ep_features_order():
    f = ep_features({2: np.full((3, 2), 2.0), 1: np.ones((3, 2))})
    assert f.shape == (3, 4) and f[0].tolist() == [1, 1, 2, 2]


def test_linear_sign_constraints_hold_and_confounder_is_dropped():
    f, y = synthetic()
    det = LinearJointSimilarity().fit(f, y)
    assert det.coef_.shape == (2 * L,)
    assert np.all(det.coef_[:L] >= 0) and np.all(det.coef_[L:] <= 0)
    assert det.coef_[3] == 0.0  # the rank-1 confounder would need a negative weight
    assert det.coef_[:3].min() > 0 and det.coef_[L:].max() < 0
    ft, yt = synthetic(seed=1)
    assert roc_auc_score(yt, det.score(ft)) > 0.95
    np.testing.assert_allclose(det.score(ft), -det.joint_similarity(ft))


def test_linear_round_trip():
    f, y = synthetic()
    det = LinearJointSimilarity(epochs=300).fit(f, y)
    back = LinearJointSimilarity.from_arrays(det.to_arrays())
    np.testing.assert_array_equal(back.score(f), det.score(f))


@pytest.mark.parametrize("name", DETECTORS)
def test_supervised_detectors_separate_synthetic(name):
    f, y = synthetic(confound=False)
    det = make_detector(name).fit(f, y)
    ft, yt = synthetic(seed=2, confound=False)
    s = det.score(ft)
    assert s.shape == (len(ft),)
    assert roc_auc_score(yt, s) > 0.95


def test_unfitted_and_bad_input():
    with pytest.raises(NotFittedError):
        BenignEPScore().score(np.zeros((2, 4)))
    with pytest.raises(NotFittedError):
        make_detector("random_forest").score(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="even"):
        BenignEPScore().fit(np.zeros((20, 3)))
    with pytest.raises(ValueError):
        make_detector("svm")
    with pytest.raises(ValueError, match="both"):
        LinearJointSimilarity().fit(np.zeros((5, 4)), np.zeros(5))


def test_benign_score_orientation_on_synthetic():
    f, y = synthetic(confound=False)
    b = BenignEPScore().fit(f[~y])
    z = b.feature_scores(f)
    assert np.all(z >= 0)
    low_r1 = f.copy()
    low_r1[:, 0] -= 0.3  # lower rank-1 similarity: more suspicious
    high_r2 = f.copy()
    high_r2[:, L] += 0.3  # higher rank-2 similarity: more suspicious
    assert np.all(b.score(low_r1) >= b.score(f)) and np.all(b.score(high_r2) >= b.score(f))
    assert b.score(low_r1).mean() > b.score(f).mean()
    better = f.copy()
    better[:, :L], better[:, L:] = 1.0, 0.0
    np.testing.assert_array_equal(b.score(better), 0.0)


@pytest.fixture(scope="module")
def lenet_features(lenet):
    from pathguard.models.data import load_dataset

    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    ext = EffectivePathExtractor(lenet)
    cp = ClassPaths(10).fit(ext, train.x[:2000], train.y[:2000])  # AUC grows with the class-path size

    def feats(x):
        return ep_features(cp.similarity(ext.extract(x)))

    gen = torch.Generator().manual_seed(0)
    clean = test.x[:200]
    noisy = torch.clamp(torch.from_numpy(clean) + 0.6 * torch.randn(clean.shape, generator=gen), 0, 1).numpy()
    return feats(train.x[2000:2400]), feats(clean), feats(noisy)


def test_benign_score_separates_clean_from_heavily_noised_mnist(lenet_features):
    fit_feats, clean, noisy = lenet_features
    b = BenignEPScore().fit(fit_feats)
    s_clean, s_noisy = b.score(clean), b.score(noisy)
    labels = np.r_[np.zeros(len(clean)), np.ones(len(noisy))]
    assert roc_auc_score(labels, np.r_[s_clean, s_noisy]) > 0.9
    assert np.median(s_noisy) > 3 * max(np.median(s_clean), 1e-3)
    back = BenignEPScore.from_arrays(b.to_arrays())
    np.testing.assert_array_equal(back.score(noisy), s_noisy)


def test_linear_on_real_features_keeps_signs(lenet_features):
    _, clean, noisy = lenet_features
    f = np.r_[clean, noisy]
    y = np.r_[np.zeros(len(clean)), np.ones(len(noisy))].astype(bool)
    det = LinearJointSimilarity().fit(f, y)
    half = f.shape[1] // 2
    assert np.all(det.coef_[:half] >= 0) and np.all(det.coef_[half:] <= 0)
    assert roc_auc_score(y, det.score(f)) > 0.9
