"""The class-conditional Gaussian detector on data with a known answer: its means and covariance, distances
checked against a direct computation, uniform p-values on held-out benign samples, Fisher's combination by hand,
array round trip (no pickle)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from pathguard.models.errors import NotCalibratedError, NotFittedError
from pathguard.models.mahalanobis import ClassGaussian, fisher, pooled

K, D = 3, 4


def _sample(n: int, rng: np.random.Generator, shift: float = 0.0) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Two layers: a flat one (class means 0, 3, 6 along every axis, correlated noise) and a conv map whose
    per-channel spatial mean carries the same class signal."""
    y = rng.integers(0, K, n)
    mix = np.array([[1.0, 0.5, 0, 0], [0, 1.0, 0.3, 0], [0, 0, 1.0, 0], [0.2, 0, 0, 1.0]])
    flat = 3.0 * y[:, None] + rng.normal(size=(n, D)) @ mix + shift
    conv = 3.0 * y[:, None, None, None] + rng.normal(size=(n, 2, 5, 5)) + shift
    return {"fc": torch.from_numpy(flat), "conv": torch.from_numpy(conv)}, y


def _fitted(rng: np.random.Generator, pool: str = "mean") -> ClassGaussian:
    batches = [_sample(500, rng) for _ in range(8)]
    return ClassGaussian(["fc", "conv"], pool=pool, shrinkage=0.0).fit(batches, K)


def test_fit_recovers_class_means_and_the_tied_covariance():
    rng = np.random.default_rng(0)
    batches = [_sample(500, rng) for _ in range(8)]
    g = ClassGaussian(["fc"], shrinkage=0.0).fit(batches, K)
    f = np.concatenate([b[0]["fc"].numpy() for b in batches])
    y = np.concatenate([b[1] for b in batches])
    mu = np.stack([f[y == c].mean(0) for c in range(K)])
    centred = f - mu[y]
    np.testing.assert_allclose(g.means_["fc"], mu, atol=1e-10)
    np.testing.assert_allclose(np.linalg.inv(g.precisions_["fc"]), centred.T @ centred / len(f), atol=1e-8)
    assert np.allclose(mu[:, 0], [0, 3, 6], atol=0.15)  # the generating means


def test_layer_scores_are_the_distance_to_the_closest_class():
    rng = np.random.default_rng(1)
    g = _fitted(rng)
    acts, _ = _sample(50, rng)
    s = g.layer_scores(acts)
    for j, name in enumerate(["fc", "conv"]):
        f = pooled(acts[name]).numpy()
        d = f[:, None, :] - g.means_[name][None]  # (N, K, D)
        direct = np.einsum("nkd,de,nke->nk", d, g.precisions_[name], d).min(1)
        np.testing.assert_allclose(s[:, j], direct, rtol=1e-9, atol=1e-9)


def test_pooling_of_conv_maps():
    a = torch.arange(2 * 3 * 2 * 2, dtype=torch.float64).reshape(2, 3, 2, 2)
    np.testing.assert_allclose(pooled(a).numpy(), a.mean((2, 3)).numpy())
    both = pooled(a, "mean_std").numpy()
    np.testing.assert_allclose(both[:, 3:], a.flatten(2).std(2, correction=0).numpy())
    assert pooled(torch.ones(4, 7)).shape == (4, 7)


def test_benign_p_values_are_uniform_and_shifted_inputs_are_flagged():
    rng = np.random.default_rng(2)
    g = _fitted(rng)
    g.calibrate(g.layer_scores(_sample(2000, rng)[0]))
    p = g.p_values(g.layer_scores(_sample(4000, rng)[0]))
    for j in range(2):  # P(p <= a) ~ a on held-out benign samples
        for a in (0.05, 0.1, 0.5):
            assert abs((p[:, j] <= a).mean() - a) < 0.03
    benign = g.score(_sample(500, rng)[0])
    shifted = g.score(_sample(500, rng, shift=1.5)[0])  # between the class means
    assert np.median(shifted) > np.quantile(benign, 0.95)


def test_fisher_by_hand():
    p = np.array([[0.5, 0.5], [0.01, 1.0]])
    np.testing.assert_allclose(fisher(p), [-2 * 2 * np.log(0.5), -2 * np.log(0.01)])


def test_arrays_round_trip_without_pickle():
    rng = np.random.default_rng(3)
    g = _fitted(rng, "mean_std")
    g.calibrate(g.layer_scores(_sample(300, rng)[0]))
    buf = io.BytesIO()
    np.savez(buf, **g.to_arrays())
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        back = ClassGaussian.from_arrays(z)
    acts, _ = _sample(40, rng)
    np.testing.assert_array_equal(back.score(acts), g.score(acts))
    assert back.pool == "mean_std" and back.config() == g.config()


def test_contract_errors():
    with pytest.raises(ValueError, match="pool"):
        ClassGaussian(["a"], pool="max")
    g = ClassGaussian(["fc", "conv"])
    with pytest.raises(NotFittedError):
        g.layer_scores(_sample(5, np.random.default_rng(0))[0])
    rng = np.random.default_rng(4)
    g = _fitted(rng)
    with pytest.raises(NotCalibratedError):
        g.score(_sample(5, rng)[0])
    with pytest.raises(ValueError, match="have no training images"):
        acts, y = _sample(50, rng)
        ClassGaussian(["fc"]).fit([(acts, np.zeros_like(y))], K)


def test_two_sided_p_values_flag_both_tails():
    rng = np.random.default_rng(5)
    g = _fitted(rng)
    calib = g.layer_scores(_sample(1000, rng)[0])
    g.calibrate(calib)
    lo, hi = np.zeros((1, 2)), np.full((1, 2), 1e6)
    n = len(calib)
    np.testing.assert_allclose(g.two_sided_p_values(lo), 2.0 / (n + 1))  # below every clean score
    np.testing.assert_allclose(g.two_sided_p_values(hi), 2.0 / (n + 1))  # above every clean score
    median = np.median(calib, axis=0, keepdims=True)
    assert np.all(g.two_sided_p_values(median) > 0.9)
    p = g.two_sided_p_values(g.layer_scores(_sample(3000, rng)[0]))  # still uniform on benign samples
    assert abs((p[:, 0] <= 0.1).mean() - 0.1) < 0.03
    acts, _ = _sample(20, rng)
    np.testing.assert_allclose(g.score(acts, two_sided=True), fisher(g.two_sided_p_values(g.layer_scores(acts))))
