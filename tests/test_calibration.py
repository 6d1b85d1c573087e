from __future__ import annotations

import numpy as np
import pytest

from pathguard.models.verdict import empirical_p_values, threshold_at_fpr, two_sided_fisher, violation_probability


def test_p_values_hand_computed():
    calib = np.array([3.0, 1.0, 4.0, 2.0])
    # #{calib >= s}: s=0 -> 4, s=2 -> 3 (2,3,4), s=2.5 -> 2, s=4 -> 1, s=5 -> 0
    p = empirical_p_values(calib, np.array([0.0, 2.0, 2.5, 4.0, 5.0]))
    np.testing.assert_allclose(p, np.array([5, 4, 3, 2, 1]) / 5.0)
    np.testing.assert_allclose(violation_probability(calib, [0.0, 5.0]), [0.0, 0.8])


def test_p_values_keep_shape_and_are_monotone():
    rng = np.random.default_rng(0)
    calib = rng.normal(size=200)
    s = rng.normal(size=(7, 3))
    p = empirical_p_values(calib, s)
    assert p.shape == (7, 3)
    assert p.min() >= 1 / 201 and p.max() <= 1.0
    grid = np.linspace(-4, 4, 50)
    assert np.all(np.diff(empirical_p_values(calib, grid)) <= 0)  # higher score, smaller p-value


def test_threshold_gives_target_fpr_on_calibration():
    calib = np.arange(100, dtype=float)
    t = threshold_at_fpr(calib, 0.05)
    assert t == 94.0
    assert np.mean(calib > t) == pytest.approx(0.05)
    assert np.mean(calib > threshold_at_fpr(calib, 0.01)) == pytest.approx(0.01)


def test_threshold_fpr_holds_on_fresh_clean_scores():
    rng = np.random.default_rng(1)
    calib, fresh = rng.gamma(2.0, size=5000), rng.gamma(2.0, size=50000)
    for fpr in (0.01, 0.05, 0.2):
        t = threshold_at_fpr(calib, fpr)
        assert np.mean(calib > t) <= fpr
        assert abs(np.mean(fresh > t) - fpr) < 0.25 * fpr + 0.003


def test_threshold_with_ties_never_exceeds_target():
    calib = np.array([1.0] * 50 + [2.0] * 50)
    t = threshold_at_fpr(calib, 0.1)
    assert np.mean(calib > t) <= 0.1


def test_threshold_refuses_unresolvable_targets():
    calib = np.arange(10, dtype=float)
    with pytest.raises(ValueError, match="below 1/n"):
        threshold_at_fpr(calib, 0.05)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            threshold_at_fpr(calib, bad)
    assert threshold_at_fpr(calib, 0.1) == 8.0  # 1/n itself is allowed: only 9 is flagged


def test_rejects_empty_or_nonfinite_calibration():
    with pytest.raises(ValueError):
        empirical_p_values(np.array([]), [1.0])
    with pytest.raises(ValueError):
        threshold_at_fpr(np.array([1.0, np.nan]), 0.5)


def test_presorted_calibration_gives_the_same_p_values():
    rng = np.random.default_rng(2)
    calib, s = rng.normal(size=300), rng.normal(size=50)
    np.testing.assert_array_equal(
        empirical_p_values(np.sort(calib), s, assume_sorted=True), empirical_p_values(calib, s)
    )


def test_two_sided_fisher_flags_both_tails():
    calib = np.arange(1.0, 100.0)  # 99 clean scores: p-values in steps of 1/100
    scores = np.array([[-5.0], [50.0], [500.0]])  # far below, typical, far above the clean scores
    stat = two_sided_fisher(violation_probability(calib, scores), len(calib))
    # upper-tail p: 1, 0.5, 0.01 -> two-sided: min(1, 2 min(u, 1 - u + 0.01)) = 0.02, 1, 0.02
    np.testing.assert_allclose(stat, -np.log([0.02, 1.0, 0.02]))
    # one-sided, the low score would look perfectly clean; two-sided it is as suspicious as the high one
    assert stat[0] == pytest.approx(stat[2]) and min(stat[0], stat[2]) > stat[1] == 0.0


def test_two_sided_fisher_sums_over_columns_and_checks_shape():
    v = np.array([[0.99, 0.5], [0.5, 0.5]])
    stat = two_sided_fisher(v, 99)
    np.testing.assert_allclose(stat, [-np.log(0.02) - np.log(1.0), 0.0])
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        two_sided_fisher(np.array([0.5, 0.5]), 99)
