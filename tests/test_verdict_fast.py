"""Closed-form Fisher combination and the one-lookup column-wise p-values equal what they replace."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chi2

from pathguard.models.verdict import FusedVerdict, columnwise_p_values, empirical_p_values, fisher_score


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_fisher_closed_form_equals_scipy_on_a_grid(k):
    grid = np.concatenate([np.logspace(-300, 0, 200), np.linspace(0.001, 1.0, 200)])
    rng = np.random.default_rng(k)
    p = np.stack([rng.permutation(grid) for _ in range(k)], axis=1)  # (400, k), extremes included
    p[:5] = 1.0
    p[5:10] = 1e-300
    stat = -2.0 * np.log(np.clip(p, 1e-300, 1.0)).sum(axis=1)
    np.testing.assert_allclose(fisher_score(p), chi2.cdf(stat, df=2 * k), rtol=0, atol=1e-12)


def test_fisher_score_bounds_and_monotone():
    p = np.array([[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.01, 0.5, 0.5], [1e-12, 1e-12, 1e-12]])
    s = fisher_score(p)
    assert s[0] == pytest.approx(0.0, abs=1e-15)
    assert np.all(np.diff(s) > 0) and s[-1] <= 1.0


def _per_column(calib_sorted, values):
    cols = [empirical_p_values(calib_sorted[:, j], values[:, j], assume_sorted=True) for j in range(values.shape[1])]
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_columnwise_lookup_equals_per_column_loop(seed):
    rng = np.random.default_rng(seed)
    calib = np.round(rng.normal(size=(301, 6)) * [1, 10, 100, 0.01, 1e6, 3], 2)  # ties within columns
    calib[:, 3] = calib[:, 0]  # overlapping ranges across columns
    calib = np.sort(calib, axis=0)
    values = np.concatenate([rng.choice(calib.ravel(), size=(40, 6)), rng.normal(size=(40, 6)) * 1e3])
    values[0] = calib[0]
    values[1] = calib[-1]
    values[2] = -np.inf
    values[3] = np.inf
    got = columnwise_p_values(calib, values)
    np.testing.assert_array_equal(got, _per_column(calib, values))
    with pytest.raises(ValueError):
        columnwise_p_values(calib, values[:, :5])


def test_fused_verdict_one_lookup_equals_per_component():
    rng = np.random.default_rng(4)
    a = {k: rng.normal(size=500) for k in ("ep", "nic", "vi")}
    b = {k: rng.normal(size=400) for k in ("ep", "nic", "vi")}
    verdict = FusedVerdict.fit(a, b, target_fpr=0.05)
    raw = {k: rng.normal(size=64) * 2 for k in ("ep", "nic", "vi")}
    p = verdict.component_p_values(raw)
    expected = chi2.cdf(-2.0 * np.log(np.stack([p[k] for k in verdict.components], axis=1)).sum(1), df=6)
    np.testing.assert_allclose(verdict.fuse(raw), expected, rtol=0, atol=1e-12)
    unsorted = FusedVerdict({"ep": rng.permutation(a["ep"]), "nic": a["nic"][:450]}, verdict.fused_calib, 0.05)
    mixed = {"ep": raw["ep"], "nic": raw["nic"]}
    q = {"ep": empirical_p_values(a["ep"], raw["ep"]), "nic": empirical_p_values(a["nic"][:450], raw["nic"])}
    want = chi2.cdf(-2.0 * np.log(np.stack([q["ep"], q["nic"]], axis=1)).sum(1), df=4)
    np.testing.assert_allclose(unsorted.fuse(mixed), want, rtol=0, atol=1e-12)  # unequal lengths: per component
