"""Calibration of anomaly scores on held-out clean data: empirical p-values, violation probabilities and
thresholds at a target false-positive rate.

Convention: a *score* is higher for more anomalous inputs. ``calib_scores`` are the scores of a held-out
clean calibration split that was not used to fit the detector.

- Empirical p-value of a score ``s`` (conformal form, never 0)::

      p(s) = (1 + #{i : calib_i >= s}) / (n + 1)

  For a new clean input exchangeable with the calibration split, ``P(p <= a) <= a``.
- Violation probability: ``1 - p(s)``, in ``[0, n / (n + 1)]``; higher means more anomalous.
- Threshold at a target FPR ``f``: with ``k = floor(f * n)`` and ``c_(1) >= c_(2) >= ... >= c_(n)``
  the calibration scores sorted in decreasing order, the threshold is ``c_(k+1)`` and an input is flagged
  when ``score > threshold``; at most ``k`` calibration scores are flagged, i.e. an FPR of at most ``f``
  on the calibration split. A target below ``1 / n`` cannot be resolved by ``n`` points and is refused.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "columnwise_p_values",
    "empirical_p_values",
    "threshold_at_fpr",
    "two_sided_fisher",
    "violation_probability",
]


def _as_1d(a: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    return arr


def empirical_p_values(calib_scores: ArrayLike, scores: ArrayLike, assume_sorted: bool = False) -> np.ndarray:
    """Empirical p-values of ``scores`` against clean calibration scores.

    Parameters
    ----------
    calib_scores : array-like, shape (n,)
        Scores of the clean calibration split (higher = more anomalous).
    scores : array-like, shape (...)
        Scores to evaluate; any shape.
    assume_sorted : bool
        ``calib_scores`` is already sorted ascending (skips the sort on hot paths).

    Returns
    -------
    np.ndarray
        Same shape as ``scores``: ``(1 + #{calib >= s}) / (n + 1)`` in ``[1/(n+1), 1]``.
    """
    calib = (
        np.asarray(calib_scores, dtype=np.float64) if assume_sorted else np.sort(_as_1d(calib_scores, "calib_scores"))
    )
    s = np.asarray(scores, dtype=np.float64)
    n = calib.size
    n_ge = n - np.searchsorted(calib, s, side="left")  # #{calib >= s}
    return (1.0 + n_ge) / (n + 1.0)


def columnwise_p_values(sorted_calib: np.ndarray, scores: ArrayLike) -> np.ndarray:
    """Empirical p-values of every column of ``scores`` against the same column of the calibration scores.

    Parameters
    ----------
    sorted_calib : np.ndarray
        (n, C) clean calibration scores, each column sorted ascending.
    scores : array-like
        (N, C) scores; column j is compared with ``sorted_calib[:, j]``.

    Returns
    -------
    np.ndarray
        (N, C) ``(1 + #{calib_j >= s}) / (n + 1)``, equal to :func:`empirical_p_values` column by column.

    One ``searchsorted`` for all columns: the keys are complex numbers ``j + 1j * value``, which numpy orders
    lexicographically (column index, then value), so the flattened calibration matrix is one sorted array in
    which every score finds its position among its own column's values, exactly.
    """
    calib = np.asarray(sorted_calib, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    n, c = calib.shape
    if s.ndim != 2 or s.shape[1] != c:
        raise ValueError(f"expected scores (N, {c}), got {s.shape}")
    col = np.arange(c)
    keys = _column_keys(col[:, None], calib.T).ravel()  # (C*n,) column by column, ascending within a column
    pos = np.searchsorted(keys, _column_keys(col[None, :], s), side="left")  # (N, C)
    n_ge = n - (pos - col * n)  # #{calib_j >= s}
    return (1.0 + n_ge) / (n + 1.0)


def _column_keys(col: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Complex keys ``col + 1j * values`` (broadcast), built by assignment so that infinities stay exact."""
    out = np.empty(np.broadcast_shapes(col.shape, values.shape), dtype=np.complex128)
    out.real, out.imag = col, values
    return out


def violation_probability(calib_scores: ArrayLike, scores: ArrayLike, assume_sorted: bool = False) -> np.ndarray:
    """``1 - empirical_p_values(calib_scores, scores)``: in ``[0, n/(n+1)]``, higher = more anomalous.

    Parameters
    ----------
    calib_scores : array-like, shape (n,)
    scores : array-like, shape (...)
    assume_sorted : bool
        ``calib_scores`` is already sorted ascending.

    Returns
    -------
    np.ndarray
        Same shape as ``scores``.
    """
    return 1.0 - empirical_p_values(calib_scores, scores, assume_sorted)


def threshold_at_fpr(calib_scores: ArrayLike, target_fpr: float) -> float:
    """Threshold on the score such that flagging ``score > threshold`` has FPR <= ``target_fpr`` on the
    calibration split (exactly ``floor(target_fpr * n) / n`` when the scores have no ties).

    Parameters
    ----------
    calib_scores : array-like, shape (n,)
        Clean calibration scores (higher = more anomalous).
    target_fpr : float
        In ``(0, 1)`` and at least ``1 / n``.

    Returns
    -------
    float
        The ``(k+1)``-th largest calibration score, ``k = floor(target_fpr * n)``.

    Raises
    ------
    ValueError
        If ``target_fpr`` is outside ``(0, 1)`` or below ``1 / n``.
    """
    calib = _as_1d(calib_scores, "calib_scores")
    n = calib.size
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    if target_fpr < 1.0 / n:
        raise ValueError(
            f"target_fpr {target_fpr} is below 1/n = {1.0 / n:.3g}: {n} calibration scores cannot resolve it; "
            "use a larger calibration split"
        )
    k = int(np.floor(target_fpr * n + 1e-9))  # tolerance: 0.05 * 100 must give 5, not 4
    desc = np.sort(calib)[::-1]
    return float(desc[min(k, n - 1)])


def two_sided_fisher(violation: ArrayLike, n_calib: int) -> np.ndarray:
    """``-sum_l log p_l`` over two-sided per-column p-values; higher = more anomalous.

    ``violation`` (N, L) holds violation probabilities ``1 - u_l`` where ``u_l`` is the upper-tail empirical
    p-value among ``n_calib`` clean calibration scores (so ``u_l >= 1/(n_calib+1)``). The two-sided p-value is
    ``min(1, 2 min(u_l, 1 - u_l + 1/(n_calib+1)))``: a score far *below* the clean ones is as suspicious as one
    far above. NIC's deep-layer value invariants need this: their one-class SVMs find confident adversarial and
    noise activations *more* typical than clean test images.
    """
    floor = 1.0 / (n_calib + 1)
    upper = np.clip(1.0 - np.asarray(violation, dtype=np.float64), floor, 1.0)
    if upper.ndim != 2:
        raise ValueError(f"expected violations (N, L), got shape {upper.shape}")
    p = np.clip(np.minimum(1.0, 2.0 * np.minimum(upper, 1.0 - upper + floor)), floor, 1.0)
    return np.asarray(-np.log(p).sum(axis=1))
