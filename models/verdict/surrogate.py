"""Differentiable stand-ins of the verdict's step functions, for adaptive attacks (gradients only; the served
verdict never uses them).

An empirical p-value ``p(s) = (1 + #{c_i >= s}) / (n + 1)`` is a step function of the score: its gradient is zero
almost everywhere. Its smoothed form replaces every step by a logistic one of width ``tau`` (``bandwidth`` times
the calibration scores' 5-95% range) and the conformal ``1`` (the test point itself) by an exponential tail beyond
the largest calibration score::

    p~(s) = (sigmoid((c_max - s) / r + 4) + sum_i sigmoid((c_i - s) / tau)) / (n + 1)        r = the 5-95% range

Inside the calibration range it is within the smoothing of ``p``; above ``c_max``, where ``p`` stays at its floor
``1 / (n + 1)``, ``log p~`` keeps falling with slope ``1 / r``, so an attacker far out in the tail still has a
gradient that leads back. The lower tail (``(1 + #{c_i < s}) / (n + 1)``, for two-sided statistics) mirrors it.
``bandwidth`` 0 gives the hard steps; ``straight_through`` forwards the hard value with the smooth gradient.

The fusion rules (:mod:`.fusion`) are differentiable in the p-values and are written here in torch, in log form
(:func:`fused_log_p`): the served verdict flags ``1 - p > threshold``, i.e. ``-log p > -log(1 - threshold)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from pathguard.models.verdict.fusion import FusedVerdict, parse_rule

__all__ = ["combine_log_p", "fused_log_p", "soft_p_values"]

_TAIL_OFFSET = 4.0  # the tail term is sigmoid(4) = 0.982 of its hard value at c_max, ~1 below


def soft_p_values(
    sorted_calib: np.ndarray | torch.Tensor,
    scores: torch.Tensor,
    bandwidth: float,
    straight_through: bool = True,
    lower: bool = False,
) -> torch.Tensor:
    """Upper-tail (or ``lower``-tail) empirical p-values of ``scores``, smoothed (see the module docstring).

    Parameters
    ----------
    sorted_calib : array
        (n,) or (n, C) clean calibration scores, each column sorted ascending.
    scores : torch.Tensor
        (N,) or (N, C) scores (a column compared with the same column of the calibration).
    bandwidth : float
        Step width as a share of each column's 5-95% range; 0: hard steps.
    straight_through : bool
        Forward the hard p-value, take the smooth one's gradient.
    lower : bool
        ``(1 + #{c < s}) / (n + 1)`` instead of ``(1 + #{c >= s}) / (n + 1)``.

    Returns
    -------
    torch.Tensor
        The shape of ``scores``, float64.
    """
    calib = torch.as_tensor(np.asarray(sorted_calib, dtype=np.float64))
    s = scores.double()
    flat = s.ndim == 1
    if flat:
        calib, s = calib[:, None], s[:, None]
    n = calib.shape[0]
    c = calib.T.unsqueeze(0)  # (1, C, n)
    sign = -1.0 if lower else 1.0
    hard_count = (c < s.unsqueeze(-1)) if lower else (c >= s.unsqueeze(-1))
    hard = (1.0 + hard_count.sum(-1).double()) / (n + 1)  # (N, C)
    if bandwidth <= 0:
        out = hard
    else:
        spread = (torch.quantile(calib, 0.95, dim=0) - torch.quantile(calib, 0.05, dim=0)).clamp_min(1e-12)  # (C,)
        tau = bandwidth * spread
        edge = calib[0] if lower else calib[-1]  # (C,)
        tail = torch.sigmoid(sign * (edge - s) / spread + _TAIL_OFFSET)
        body = torch.sigmoid(sign * (c - s.unsqueeze(-1)) / tau[None, :, None]).sum(-1)
        soft = (tail + body) / (n + 1)
        out = hard + (soft - soft.detach()) if straight_through else soft
    return out[:, 0] if flat else out


def combine_log_p(log_p: torch.Tensor, rule: str) -> torch.Tensor:
    """(N,) log of the combined p-value of (N, K) log p-values by ``fisher``, ``tippett`` or ``harmonic`` (the
    torch form of :func:`~pathguard.models.verdict.fusion.combine_p_values`)."""
    k = log_p.shape[1]
    if rule == "fisher":  # chi-square tail with 2k degrees of freedom: exp(-h) sum_{i<k} h^i / i!, h = -sum log p
        h = (-log_p.sum(1)).clamp_min(1e-300)
        i = torch.arange(k, dtype=log_p.dtype)
        terms = i * torch.log(h)[:, None] - torch.lgamma(i + 1.0)[None, :]
        return (-h + torch.logsumexp(terms, 1)).clamp_max(0.0)
    if rule == "tippett":  # 1 - (1 - min p)^k
        m = log_p.min(1).values.clamp_max(math.log1p(-1e-16))
        return torch.log(-torch.expm1(k * torch.log1p(-torch.exp(m))))
    if rule == "harmonic":  # k / sum(1 / p)
        return math.log(k) - torch.logsumexp(-log_p, 1)
    raise ValueError(f"unknown combination rule {rule!r}")


def fused_log_p(
    verdict: FusedVerdict, log_p: Mapping[str, torch.Tensor], components: list[str] | None = None
) -> torch.Tensor:
    """(N,) log of the verdict's combined p-value from every fused component's log p-value (N,), by the verdict's
    rule (``outer(inner)``: within each family first). The served fused score is ``1 - exp`` of it.

    ``components`` restricts the combination to some of the fused components (the rule over those alone)."""
    names = [k for k in verdict.components if components is None or k in components]
    outer, inner = parse_rule(verdict.rule)
    if inner is None:
        return combine_log_p(torch.stack([log_p[k] for k in names], 1), outer)
    fams: dict[str, list[str]] = {}
    for name in names:
        fams.setdefault(verdict.families.get(name, name), []).append(name)
    per_family = [combine_log_p(torch.stack([log_p[k] for k in ks], 1), inner) for ks in fams.values()]
    return combine_log_p(torch.stack(per_family, 1), outer)
