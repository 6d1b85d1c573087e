"""Adaptive attacks: white-box attacks that know the detector (``pathguard evaluate --adaptive``; ``eval`` extra).

An oblivious attack only fools the classifier; an adaptive one also drives the detector's score down (Carlini &
Wagner, AISec 2017; Tramer et al., NeurIPS 2020). Every component gives its differentiable form through the registry
(:meth:`~pathguard.models.components.Component.surrogate`, relaxed as a
:class:`~pathguard.models.components.Relaxation` says); the empirical p-values against the clean calibration scores
are smoothed (:func:`~pathguard.models.verdict.surrogate.soft_p_values`) and fused by the bundle's rule in log form
(:func:`~pathguard.models.verdict.surrogate.fused_log_p`). The detector term of every attack is
``D(x) = -log p~(x)``, the surrogate of the target's p-value (the fused verdict's, or one component's alone).

Attacks (all batched, deterministic with a seed):

- ``pgd``: PGD maximizing ``CE(f(x), y) - lambda * D(x)`` in an Linf or L2 ball; ``lambda`` searched per image
  (0 first: the oblivious attack; then ``lambda_start``, times ``lambda_factor`` while the image stays flagged,
  divided while it is no longer misclassified). Randomized components are averaged over ``draws`` noise draws per
  step (EOT).
- ``feature_match``: PGD (Linf) moving the input so that its logits and tapped activations match those of a clean,
  correctly classified and unflagged image of the target class (the next class): the attack that broke the
  noise-response detector (Tramer et al. 2020, section 5.13).
- ``cw_l2``: Carlini-Wagner L2 with the detector term (NIC paper, section IV-E): Adam on ``||delta||^2 + c *
  (max(Z_y - max_{j != y} Z_j, -kappa) + max(D(x) - D_served + margin, 0))``, ``c`` searched per image (binary
  search); it reports the mean L2 distortion of its successes.

Success is counted as the literature counts it and judged by the REAL served pipeline, never the surrogate:
misclassified AND not flagged at the served threshold (the verdict's, at the bundle's target FPR; for an attack on one
component alone also that component's own threshold at the same FPR).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pathguard.models.bundle import Bundle, load_bundle, verdict_sha256
from pathguard.models.bundle.pipeline import DetectionPipeline
from pathguard.models.components import Observation
from pathguard.models.components.base import NotDifferentiableError, Relaxation
from pathguard.models.data import interleaved_order, load_dataset
from pathguard.models.evaluation.evaluate import _json_default, _pct
from pathguard.models.verdict import threshold_at_fpr
from pathguard.models.verdict.surrogate import fused_log_p, soft_p_values

__all__ = [
    "BUDGETS",
    "FUSED",
    "AdaptiveSettings",
    "Judgement",
    "VerdictSurrogate",
    "adaptive_evaluate",
    "cw_l2",
    "feature_match",
    "judge",
    "pgd",
    "render_adaptive_markdown",
]

FUSED = "fused"
BUDGETS: dict[str, tuple[str, float]] = {  # name -> (norm, eps); inputs in [0, 1]
    "linf_2": ("linf", 2 / 255),
    "linf_4": ("linf", 4 / 255),
    "linf_8": ("linf", 8 / 255),
    "l2_0.5": ("l2", 0.5),
    "l2_1.0": ("l2", 1.0),
    "linf_0.1": ("linf", 0.1),  # MNIST: the budgets its attacks are usually run at
    "linf_0.3": ("linf", 0.3),
    "l2_2.0": ("l2", 2.0),
}
DEFAULT_BUDGETS = ("linf_2", "linf_4", "linf_8", "l2_0.5", "l2_1.0")


# ------------------------------------------------------------------------------------------------------ surrogate


class VerdictSurrogate:
    """The bundle's detector made differentiable: every fused component's :meth:`Component.surrogate`, its smoothed
    p-value against the verdict's clean calibration (split A) and the verdict's rule.

    Parameters
    ----------
    pipeline : DetectionPipeline
        The served pipeline (its classifier, components and verdict are read, never changed).
    relax : Relaxation
        How the non-smooth steps are relaxed (EOT draws, smoothing, straight through).
    seed : int
        Seed of the EOT noise: draw ``step`` of image ``i`` comes from ``(seed, step, i)``.
    """

    def __init__(self, pipeline: DetectionPipeline, relax: Relaxation | None = None, seed: int = 0) -> None:
        if pipeline.verdict is None:
            raise ValueError("the pipeline has no fused verdict")
        self.pipeline, self.verdict = pipeline, pipeline.verdict
        self.relax = relax or Relaxation()
        self.seed = int(seed)
        self.model = pipeline.classifier
        for p in self.model.parameters():
            p.requires_grad_(False)  # gradients are taken with respect to the input only

    @property
    def fused(self) -> list[str]:
        return list(self.verdict.components)

    def differentiable(self) -> dict[str, str | None]:
        """Fused component -> None if it has a surrogate, else why not (tried on a zero image)."""
        x = torch.zeros(1, *self.model.config.input_shape)
        obs = self.observe(x, 0)
        out: dict[str, str | None] = {}
        for name in self.fused:
            try:
                self.pipeline.components[name].surrogate(obs, self.relax)
                out[name] = None
            except NotDifferentiableError as exc:
                out[name] = str(exc)
        return out

    def observe(self, x: torch.Tensor, step: int) -> Observation:
        """The observation of ``x`` (N, C, H, W) with gradients; EOT noise of ``step``."""
        logits, taps = self.model.forward_with_taps(x)
        gens = [torch.Generator().manual_seed(_mix(self.seed, step, i)) for i in range(len(x))]
        return Observation(x, logits, taps, self.model, gens, self.pipeline.components)

    def log_p(self, obs: Observation, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """(N,) log smoothed p-value of every component of ``names`` against its clean calibration."""
        out = {}
        for name in names:
            raw = self.pipeline.components[name].surrogate(obs, self.relax)
            calib = self.verdict.sorted_calib(name)
            p = soft_p_values(calib, raw, self.relax.bandwidth, self.relax.straight_through)
            out[name] = torch.log(p)
        return out

    def detector_term(self, obs: Observation, target: str) -> torch.Tensor:
        """(N,) ``D = -log p~`` of the target: the fused verdict (``fused``) or one component alone."""
        if target == FUSED:
            return -fused_log_p(self.verdict, self.log_p(obs, self.fused))
        return -self.log_p(obs, [target])[target]

    def served_level(self, target: str) -> float:
        """``D`` at the served threshold of the target (flagged above it)."""
        if target == FUSED:
            return -math.log1p(-self.pipeline.threshold)
        return -math.log(self.pipeline.target_fpr)  # a component's p-value at its threshold is about the target FPR


def _mix(*parts: int) -> int:
    digest = hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------------------------------------------------- judge


@dataclass
class Judgement:
    """The served pipeline's verdict on attacked images (N,) each."""

    predicted: np.ndarray
    misclassified: np.ndarray
    flagged: np.ndarray  # by the fused verdict at the served threshold
    component_flagged: dict[str, np.ndarray]  # each fused component at its own threshold (same target FPR)

    def success(self, target: str = FUSED) -> np.ndarray:
        """Misclassified AND not flagged (by the verdict, or by the target component alone)."""
        flagged = self.flagged if target == FUSED else self.component_flagged[target]
        return self.misclassified & ~flagged


def component_thresholds(pipeline: DetectionPipeline) -> dict[str, float]:
    """Raw-score threshold of every fused component at the pipeline's target FPR, on its clean calibration."""
    assert pipeline.verdict is not None
    v = pipeline.verdict
    return {k: threshold_at_fpr(v.sorted_calib(k), pipeline.target_fpr) for k in v.components}


@torch.no_grad()
def judge(pipeline: DetectionPipeline, x: np.ndarray | torch.Tensor, y: np.ndarray, batch_size: int = 64) -> Judgement:
    """Score attacked images with the served pipeline (the bundle's detect path, its threshold)."""
    xt = torch.as_tensor(x, dtype=torch.float32).detach()
    thresholds = component_thresholds(pipeline)
    pred, flagged = [], []
    comp: dict[str, list[np.ndarray]] = {k: [] for k in thresholds}
    for s in range(0, len(xt), batch_size):
        res, raw = pipeline.detect_with_components(xt[s : s + batch_size])
        pred.append(res.predicted)
        flagged.append(res.adversarial)
        for k, t in thresholds.items():
            comp[k].append(raw[k] > t)
    p = np.concatenate(pred)
    return Judgement(p, p != np.asarray(y), np.concatenate(flagged), {k: np.concatenate(v) for k, v in comp.items()})


# ------------------------------------------------------------------------------------------------------------ PGD


def _project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * (eps / n).clamp_max(1.0).view(-1, *[1] * (delta.ndim - 1))


def _direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    n = grad.flatten(1).norm(dim=1).view(-1, *[1] * (grad.ndim - 1))
    return grad / (n + 1e-7)  # ART's tolerance


def pgd(
    surrogate: VerdictSurrogate,
    x0: torch.Tensor,
    y: torch.Tensor,
    norm: str,
    eps: float,
    steps: int,
    step_size: float,
    lam: torch.Tensor,
    target: str = FUSED,
    random_start: bool = False,
    seed: int = 0,
    kappa: float = 1.0,
) -> torch.Tensor:
    """PGD in the ``norm`` ball of radius ``eps`` (``linf`` or ``l2``), inputs in [0, 1]: each step ascends (sign of
    the gradient, or the L2-normalized gradient), clips to [0, 1], then projects onto the ball (ART's order).

    ``lam`` (N,). Where it is 0 the loss is ``CE(f(x), y)`` and the detector is not evaluated at all (the oblivious
    attack, ART's PGD). Where it is positive the loss is ``min(max_{j != y} Z_j - Z_y, kappa) - lam * D(x)``: the
    classification part is Carlini-Wagner's clamped logit margin, so once the image is misclassified by ``kappa``
    the steps go to the detector term alone (with cross-entropy the classifier's unbounded loss keeps pulling the
    image deeper into the wrong class, where the detectors see it best)."""
    x0 = x0.float().detach()
    x = x0.clone()
    if random_start:
        gen = torch.Generator().manual_seed(seed)
        start = (torch.rand(x0.shape, generator=gen) * 2 - 1) * eps
        x = (x0 + _project(start, norm, eps)).clamp(0.0, 1.0)
    aware = lam > 0
    onehot = F.one_hot(y.long(), surrogate.model.config.num_classes).bool()
    for step in range(steps):
        x.requires_grad_(True)
        logits = surrogate.model(x)
        loss = F.cross_entropy(logits[~aware], y[~aware], reduction="sum")
        if bool(aware.any()):
            z, hot = logits[aware], onehot[aware]
            margin = (z.masked_fill(hot, -torch.inf).amax(1) - z[hot]).clamp_max(kappa)  # > 0: misclassified
            obs = surrogate.observe(x[aware], step)
            loss = loss + margin.sum() - (lam[aware].double() * surrogate.detector_term(obs, target)).sum()
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = (x + step_size * _direction(grad, norm)).clamp(0.0, 1.0)
            x = x0 + _project(x - x0, norm, eps)
    return x.detach()


@dataclass
class Outcome:
    """One attack's result on N images (numpy, per image)."""

    x_adv: np.ndarray
    success: np.ndarray  # judged by the served pipeline
    flagged: np.ndarray
    misclassified: np.ndarray
    iterations: np.ndarray  # gradient steps spent until the kept example
    lam: np.ndarray  # the lambda (or CW constant) of the kept example; nan where none succeeded
    seconds: float

    def distortion(self, x: np.ndarray) -> dict[str, np.ndarray]:
        d = (self.x_adv - x).reshape(len(x), -1)
        return {"l2": np.linalg.norm(d, axis=1), "linf": np.abs(d).max(axis=1)}


def _pgd_batches(
    surrogate: VerdictSurrogate,
    x: torch.Tensor,
    y: torch.Tensor,
    lam: np.ndarray,
    norm: str,
    eps: float,
    steps: int,
    target: str,
    random_start: bool,
    batch_size: int,
) -> np.ndarray:
    out = []
    for s in range(0, len(x), batch_size):
        sl = slice(s, s + batch_size)
        lam_t = torch.from_numpy(np.asarray(lam[sl], dtype=np.float64))
        seed = _mix(surrogate.seed, s)
        step = 2.5 * eps / steps  # Madry et al.'s step: the whole budget crossed 2.5 times
        out.append(pgd(surrogate, x[sl], y[sl], norm, eps, steps, step, lam_t, target, random_start, seed).numpy())
    return np.concatenate(out) if out else np.zeros((0, *x.shape[1:]), np.float32)


def adaptive_pgd(
    surrogate: VerdictSurrogate,
    x: np.ndarray,
    y: np.ndarray,
    norm: str,
    eps: float,
    target: str = FUSED,
    steps: int = 20,
    rounds: int = 4,
    lambda_start: float = 1.0,
    lambda_factor: float = 10.0,
    random_start: bool = False,
    batch_size: int = 32,
) -> tuple[Outcome, Outcome]:
    """(oblivious, adaptive) PGD on the same images, step ``2.5 * eps / steps``: ``lambda`` 0 first (the oblivious
    attack, also the adaptive attack's first round), then ``rounds`` rounds of a per-image ``lambda`` search:
    ``lambda_start`` (divided by ``lambda_factor`` for an image the oblivious attack did not misclassify), times
    ``lambda_factor`` while the image is misclassified but flagged, divided while it is no longer misclassified.
    Every round restarts from the clean image; an image keeps its first example that the served pipeline lets
    through."""
    t0 = time.perf_counter()
    xt, yt = torch.from_numpy(np.asarray(x, np.float32)), torch.from_numpy(np.asarray(y, np.int64))
    args = (norm, eps, steps, target, random_start, batch_size)
    x_adv = _pgd_batches(surrogate, xt, yt, np.zeros(len(x)), *args)
    j = judge(surrogate.pipeline, x_adv, y)
    ok = j.success(target)
    steps_used = np.full(len(x), steps)
    oblivious = Outcome(x_adv, ok, _flags(j, target), j.misclassified, steps_used.copy(),
                        np.where(ok, 0.0, np.nan), time.perf_counter() - t0)  # fmt: skip
    best, done = x_adv.copy(), ok.copy()
    used, flags, mis = oblivious.lam.copy(), oblivious.flagged.copy(), oblivious.misclassified.copy()
    lam = np.where(j.misclassified, lambda_start, lambda_start / lambda_factor)
    for _ in range(rounds):
        idx = np.flatnonzero(~done)
        if not len(idx):
            break
        x_r = _pgd_batches(surrogate, xt[idx], yt[idx], lam[idx], *args)
        jr = judge(surrogate.pipeline, x_r, y[idx])
        ok_r = jr.success(target)
        steps_used[idx] += steps
        best[idx] = x_r  # the last try of an image that never succeeds
        used[idx[ok_r]] = lam[idx[ok_r]]
        done[idx[ok_r]] = True
        flags[idx], mis[idx] = _flags(jr, target), jr.misclassified
        lam[idx] = np.where(jr.misclassified, lam[idx] * lambda_factor, lam[idx] / lambda_factor)
    adaptive = Outcome(best, done, flags, mis, steps_used, used, time.perf_counter() - t0)
    return oblivious, adaptive


def _flags(j: Judgement, target: str) -> np.ndarray:
    return j.flagged if target == FUSED else j.component_flagged[target]


# ------------------------------------------------------------------------------------------- feature matching


def feature_match(
    surrogate: VerdictSurrogate,
    x: np.ndarray,
    guides: np.ndarray,
    eps: float = 8 / 255,
    steps: int = 40,
    batch_size: int = 32,
) -> np.ndarray:
    """Linf PGD that moves each image ``x`` (N, C, H, W) so that its logits and every tapped activation match those
    of its guide (N, C, H, W), a clean image of the target class: minimizes the sum over the logits and the taps of
    the squared distance, each divided by the guide's squared norm (so that no layer dominates by scale)."""
    model = surrogate.model
    out = []
    for s in range(0, len(x), batch_size):
        x0 = torch.from_numpy(np.asarray(x[s : s + batch_size], np.float32))
        with torch.no_grad():
            g_logits, g_taps = model.forward_with_taps(torch.from_numpy(np.asarray(guides[s : s + batch_size])))
        goal = [g_logits, *g_taps.values()]
        scale = [(t.flatten(1) ** 2).sum(1).clamp_min(1e-6) for t in goal]
        xa = x0.clone()
        for _ in range(steps):
            xa.requires_grad_(True)
            logits, taps = model.forward_with_taps(xa)
            loss = torch.stack([
                (((a - g).flatten(1) ** 2).sum(1) / sc).sum()
                for a, g, sc in zip([logits, *taps.values()], goal, scale, strict=True)
            ]).sum()  # fmt: skip
            (grad,) = torch.autograd.grad(loss, xa)
            with torch.no_grad():
                xa = (xa - eps / 4 * grad.sign()).clamp(0.0, 1.0)
                xa = x0 + _project(xa - x0, "linf", eps)
        out.append(xa.detach().numpy())
    return np.concatenate(out)


def pick_guides(
    pipeline: DetectionPipeline, y: np.ndarray, pool_x: np.ndarray, pool_y: np.ndarray, num_classes: int
) -> np.ndarray:
    """Index into the pool of a guide per image: the first pool image of the next class ``(y + 1) mod K`` that the
    served pipeline classifies correctly and does not flag (-1 where the pool has none)."""
    j = judge(pipeline, pool_x, pool_y)
    usable = ~j.misclassified & ~j.flagged
    first = {
        c: int(np.flatnonzero(usable & (pool_y == c))[0]) for c in range(num_classes) if (usable & (pool_y == c)).any()
    }
    return np.array([first.get(int((t + 1) % num_classes), -1) for t in y])


# ------------------------------------------------------------------------------------------------------ CW-L2


def cw_l2(
    surrogate: VerdictSurrogate,
    x: np.ndarray,
    y: np.ndarray,
    target: str = FUSED,
    steps: int = 50,
    searches: int = 3,
    c_start: float = 1.0,
    confidence: float = 0.0,
    lr: float = 0.01,
    margin: float = 0.5,
    batch_size: int = 32,
    detector: bool = True,
) -> Outcome:
    """Carlini-Wagner L2 with the detector term (see the module docstring): Adam on the perturbation (clipped to
    [0, 1] after every step), ``c`` searched per image by ``searches`` rounds of binary search (times 10 until a
    first success); an image keeps its smallest-L2 example that the served pipeline lets through.

    ``detector=False``: the oblivious CW-L2 (no detector term), whose success is misclassification alone; its
    ``success`` then says only that, and ``flagged`` whether the verdict flags the kept example."""
    t0 = time.perf_counter()
    n = len(x)
    xt, yt = torch.from_numpy(np.asarray(x, np.float32)), torch.from_numpy(np.asarray(y, np.int64))
    level = surrogate.served_level(target)
    c = np.full(n, c_start)
    lo, hi = np.zeros(n), np.full(n, np.inf)
    best, best_l2 = np.asarray(x, np.float32).copy(), np.full(n, np.inf)
    used, iters, spent = np.full(n, np.nan), np.zeros(n, np.int64), 0
    flags, mis = np.zeros(n, bool), np.zeros(n, bool)
    for _ in range(searches):
        x_r = np.concatenate([
            _cw_batch(surrogate, xt[s : s + batch_size], yt[s : s + batch_size],
                      torch.from_numpy(c[s : s + batch_size]), target, level, steps, confidence, lr, margin,
                      detector)
            for s in range(0, n, batch_size)
        ])  # fmt: skip
        spent += steps
        j = judge(surrogate.pipeline, x_r, y)
        ok = j.success(target) if detector else j.misclassified
        l2 = np.linalg.norm((x_r - x).reshape(n, -1), axis=1)
        better = ok & (l2 < best_l2)
        first = better & ~np.isfinite(best_l2)
        iters[first] = spent
        best[better], best_l2[better], used[better] = x_r[better], l2[better], c[better]
        none_yet = ~np.isfinite(best_l2)
        best[none_yet] = x_r[none_yet]
        flags = np.where(np.isfinite(best_l2), False, _flags(j, target))
        mis = np.where(np.isfinite(best_l2), True, j.misclassified)
        hi = np.where(ok, np.minimum(hi, c), hi)
        lo = np.where(ok, lo, np.maximum(lo, c))
        c = np.where(np.isfinite(hi), (lo + hi) / 2, c * 10)
    iters[~np.isfinite(best_l2)] = spent
    if not detector:  # whether the verdict flags the kept (smallest misclassified) examples
        flags = _flags(judge(surrogate.pipeline, best, y), target)
    return Outcome(best, np.isfinite(best_l2), flags, mis, iters, used, time.perf_counter() - t0)


def _cw_batch(
    surrogate: VerdictSurrogate,
    x0: torch.Tensor,
    y: torch.Tensor,
    c: torch.Tensor,
    target: str,
    level: float,
    steps: int,
    confidence: float,
    lr: float,
    margin: float,
    detector: bool = True,
) -> np.ndarray:
    delta = torch.zeros_like(x0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    onehot = F.one_hot(y, surrogate.model.config.num_classes).bool()
    for step in range(steps):
        xa = (x0 + delta).clamp(0.0, 1.0)
        if detector:
            obs = surrogate.observe(xa, step)
            z = obs.logits
            det = (surrogate.detector_term(obs, target) - level + margin).clamp_min(0.0)
        else:
            z, det = surrogate.model(xa), torch.zeros(len(xa), dtype=torch.float64)
        f = (z[onehot] - z.masked_fill(onehot, -torch.inf).amax(1)).clamp_min(-confidence)
        loss = ((xa - x0).flatten(1) ** 2).sum(1) + c * (f.double() + det)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    return (x0 + delta.detach()).clamp(0.0, 1.0).numpy()


# ------------------------------------------------------------------------------------------------- evaluation


@dataclass
class AdaptiveSettings:
    """Parameters of :func:`adaptive_evaluate` (CPU-friendly defaults)."""

    n: int = 100
    budgets: list[str] = field(default_factory=lambda: list(DEFAULT_BUDGETS))
    targets: list[str] | None = None  # default: the fused verdict and every differentiable fused component
    component_budgets: list[str] | None = None  # budgets of the one-component targets (None: every budget)
    cw_targets: list[str] = field(default_factory=lambda: [FUSED])  # CW-L2 with the detector term against these
    steps: int = 20
    rounds: int = 4
    lambda_start: float = 1.0
    lambda_factor: float = 10.0
    draws: int = 20
    bandwidth: float = 0.02
    temperature: float = 0.5
    feature_match_steps: int = 40
    cw_steps: int = 50
    cw_searches: int = 3
    seed: int = 0
    batch_size: int = 32
    nic_members: str = "fixed"  # "random": the served NIC draws a randomized member per input; the attack uses EOT


def adaptive_evaluate(bundle_dir: str | Path, out_dir: str | Path, settings: AdaptiveSettings | None = None) -> dict:
    """Attack the first ``n`` correctly classified test images of the bundle's dataset, in class-interleaved order
    (:func:`~pathguard.models.data.interleaved_order`: every class about equally), adaptively; write
    ``report.json`` and ``report.md`` into ``out_dir``."""
    st = settings or AdaptiveSettings()
    unknown = [b for b in st.budgets if b not in BUDGETS]
    if unknown:
        raise KeyError(f"unknown budget(s) {unknown}; known: {list(BUDGETS)}")
    t_start = time.perf_counter()
    bundle = load_bundle(bundle_dir, seed=st.seed)
    if st.nic_members == "random":
        bundle.pipeline.randomize_nic_members()
    elif st.nic_members != "fixed":
        raise ValueError(f"nic_members must be 'fixed' or 'random', got {st.nic_members!r}")
    test = load_dataset(bundle.dataset, "test")
    order = interleaved_order(test.y)
    return _evaluate_on(bundle, test.x[order], test.y[order], out_dir, st, t_start, order)


def _evaluate_on(
    bundle: Bundle,
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    out_dir: str | Path,
    st: AdaptiveSettings,
    t_start: float,
    pool_index: np.ndarray | None = None,
) -> dict:
    """``pool_index[i]``: the test-set index of pool image ``i`` (None: the pool is the test set's order)."""
    n_classes = bundle.classifier.config.num_classes
    pipe = bundle.pipeline
    relax = Relaxation(draws=st.draws, bandwidth=st.bandwidth, temperature=st.temperature)
    sur = VerdictSurrogate(pipe, relax, st.seed)
    reasons = sur.differentiable()
    targets = st.targets or [FUSED, *[k for k, why in reasons.items() if why is None]]
    bad = [t for t in targets if t != FUSED and (t not in reasons or reasons[t] is not None)]
    if bad:
        raise ValueError(f"no differentiable fused component {bad}; fused: {reasons}")
    # the first n test images the served pipeline classifies correctly and does not flag (clean, let through)
    head = min(len(pool_x), 4 * st.n)
    clean = judge(pipe, pool_x[:head], pool_y[:head])
    keep = np.flatnonzero(~clean.misclassified & ~clean.flagged)[: st.n]
    x, y = pool_x[keep], pool_y[keep]
    report: dict[str, Any] = {
        "bundle": {"name": bundle.name, "sha256": bundle.sha256, "verdict_sha256": verdict_sha256(bundle.path),
                   "dataset": bundle.dataset},
        "images": {"n": len(x), "order": "class-interleaved" if pool_index is not None else "as given",
                   "test_indices": (keep if pool_index is None else pool_index[keep]).tolist(),
                   "per_class": np.bincount(y.astype(np.int64), minlength=n_classes).tolist(),
                   "clean_let_through": len(keep), "clean_scored": head},
        "verdict": {"rule": pipe.verdict.rule if pipe.verdict else None, "components": sur.fused,
                    "threshold": pipe.threshold, "target_fpr": pipe.target_fpr},
        "surrogates": {k: v or "differentiable" for k, v in reasons.items()} | {
            "effective_path_relaxation": "BPDA: the served walk's reached neurons held fixed; each neuron's "
            "selection a logistic step around its cut (bandwidth x its contribution range), straight through",
            "squeeze_relaxation": "bit-depth reduction straight through (identity gradient), medians as they are",
            "nic_members": "served: a randomized member drawn per input; attacked: the mean over the members (EOT) "
            "of each one's final score on the verdict's scale" if st.nic_members == "random"
            else "served and attacked: the fixed member",
            "p_value_relaxation": "logistic-smoothed empirical CDF with an exponential tail, straight through"},
        "settings": asdict(st) | {"torch_threads": torch.get_num_threads()},
        "pgd": {}, "feature_match": {}, "cw_l2": {},
    }  # fmt: skip
    for target in targets:
        budgets = st.budgets
        if target != FUSED and st.component_budgets is not None:
            budgets = [b for b in st.budgets if b in st.component_budgets]
        for budget in budgets:
            norm, eps = BUDGETS[budget]
            obl, ada = adaptive_pgd(sur, x, y, norm, eps, target, st.steps, st.rounds, st.lambda_start,
                                    st.lambda_factor, batch_size=st.batch_size)  # fmt: skip
            report["pgd"].setdefault(target, {})[budget] = _summary(obl, ada, x, pipe, y)
            _write_partial(out_dir, report)
            print(f"pgd {target} {budget}: oblivious {obl.success.mean():.0%}, adaptive {ada.success.mean():.0%}",
                  flush=True)  # fmt: skip
    rest_x, rest_y = pool_x[head : head + 20 * bundle.classifier.config.num_classes], pool_y[head:]
    guide = pick_guides(pipe, y, rest_x, rest_y[: len(rest_x)], bundle.classifier.config.num_classes)
    has = guide >= 0
    if has.any():
        t0 = time.perf_counter()
        xf = feature_match(sur, x[has], rest_x[guide[has]], steps=st.feature_match_steps, batch_size=st.batch_size)
        jf = judge(pipe, xf, y[has])
        d = np.linalg.norm((xf - x[has]).reshape(int(has.sum()), -1), axis=1)
        report["feature_match"] = {
            "n": int(has.sum()),
            "eps": 8 / 255,
            "steps": st.feature_match_steps,
            "success": float(jf.success().mean()),
            "misclassified": float(jf.misclassified.mean()),
            "flagged": float(jf.flagged.mean()),
            "mean_l2": float(d.mean()),
            "seconds_per_image": (time.perf_counter() - t0) / int(has.sum()),
        }
    base = cw_l2(sur, x, y, FUSED, st.cw_steps, st.cw_searches, batch_size=st.batch_size, detector=False)
    d = base.distortion(x)
    base_l2 = float(d["l2"][base.success].mean()) if base.success.any() else None
    report["cw_l2"]["oblivious"] = {
        "misclassified": float(base.success.mean()),
        "success": float((base.success & ~base.flagged).mean()),  # misclassified and let through by the verdict
        "mean_l2_of_misclassified": base_l2,
        "mean_iterations": float(base.iterations.mean()),
        "seconds_per_image": base.seconds / max(len(x), 1),
    }
    for target in [t for t in st.cw_targets if t in targets]:
        out = cw_l2(sur, x, y, target, st.cw_steps, st.cw_searches, batch_size=st.batch_size)
        d = out.distortion(x)
        l2 = float(d["l2"][out.success].mean()) if out.success.any() else None
        report["cw_l2"][target] = {
            "success": float(out.success.mean()),
            "mean_l2_of_successes": l2,
            "l2_over_oblivious": None if l2 is None or not base_l2 else l2 / base_l2,
            "mean_iterations": float(out.iterations.mean()),
            "seconds_per_image": out.seconds / max(len(x), 1),
        }
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (out_path / "report.md").write_text(render_adaptive_markdown(report))
    (out_path / "report.partial.json").unlink(missing_ok=True)
    return report


def _write_partial(out_dir: str | Path, report: Mapping[str, Any]) -> None:
    """Keep the cells measured so far in ``report.partial.json`` (a long run that stops keeps them); the final
    ``report.json`` replaces it."""
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    tmp = out_path / f".report.partial.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    tmp.replace(out_path / "report.partial.json")


def _summary(obl: Outcome, ada: Outcome, x: np.ndarray, pipe: DetectionPipeline, y: np.ndarray) -> dict[str, Any]:
    """Success (served), flagged share, distortion and iterations of the oblivious and the adaptive attack."""
    out: dict[str, Any] = {}
    for name, o in (("oblivious", obl), ("adaptive", ada)):
        d = o.distortion(x)
        s = o.success
        out[name] = {
            "success": float(s.mean()) if len(s) else float("nan"),
            "misclassified": float(o.misclassified.mean()) if len(s) else float("nan"),
            "flagged": float(o.flagged.mean()) if len(s) else float("nan"),
            "mean_l2_of_successes": float(d["l2"][s].mean()) if s.any() else None,
            "mean_linf_of_successes": float(d["linf"][s].mean()) if s.any() else None,
            "mean_iterations_of_successes": float(o.iterations[s].mean()) if s.any() else None,
            "lambda_of_successes": _lambda_counts(o.lam[s]),
            "seconds_per_image": o.seconds / max(len(x), 1),
        }
    return out


def _lambda_counts(lam: np.ndarray) -> dict[str, int]:
    vals, counts = np.unique(lam, return_counts=True)
    return {f"{v:g}": int(c) for v, c in zip(vals, counts, strict=True)}


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None or v != v else format(v, fmt)


def _verdict_id(b: Mapping[str, Any]) -> str:
    if "verdict_sha256" not in b:  # reports written before the verdict id
        return ""
    return (
        f", verdict sha256 `{b['verdict_sha256']}` (the classifier, the fused components and their calibration: "
        "what these figures depend on; a bundle with the same verdict id flags every input alike)"
    )


def render_adaptive_markdown(r: Mapping[str, Any]) -> str:
    """The adaptive report's tables as Markdown."""
    b, v, im = r["bundle"], r["verdict"], r["images"]
    lines = [
        f"# Adaptive attacks: `{b['name']}`",
        "",
        f"Bundle sha256 `{b['sha256']}` ({b['dataset']}){_verdict_id(b)}. Verdict `{v['rule']}` over "
        f"{', '.join(f'`{c}`' for c in v['components'])}, threshold {v['threshold']:.6f} (target FPR "
        f"{_pct(v['target_fpr'])}). Images: the first {im['n']} test images ({im.get('order', 'as given')} order; "
        f"per class {im.get('per_class', '-')}) the served pipeline classifies "
        "correctly and lets through. Success = misclassified AND not flagged, judged by the served pipeline "
        "(for an attack on one component: not flagged by that component at its own threshold, same FPR). "
        f"Run time {r['seconds']:.0f} s with {r['settings']['torch_threads']} torch thread(s).",
        "",
        "## Surrogates",
        "",
        "| part | differentiable form |",
        "|---|---|",
        *[f"| `{k}` | {w} |" for k, w in r["surrogates"].items()],
        "",
        "## PGD: oblivious vs adaptive",
        "",
        "| target | budget | oblivious success | adaptive success | adaptive flagged | oblivious L2 | adaptive L2 "
        "| oblivious iterations | adaptive iterations | lambda of successes | s / image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for target, per in r["pgd"].items():
        for budget, s in per.items():
            o, a = s["oblivious"], s["adaptive"]
            lines.append(
                f"| `{target}` | {budget} | {_pct(o['success'])} | {_pct(a['success'])} | {_pct(a['flagged'])} | "
                f"{_num(o['mean_l2_of_successes'])} | {_num(a['mean_l2_of_successes'])} | "
                f"{_num(o['mean_iterations_of_successes'], '.0f')} | {_num(a['mean_iterations_of_successes'], '.0f')}"
                f" | {json.dumps(a['lambda_of_successes'])} | {a['seconds_per_image']:.2f} |"
            )
    fm = r.get("feature_match") or {}
    lines += ["", "## Logit and feature matching (Linf 8/255, towards a clean image of the next class)", ""]
    if fm:
        lines += [
            "| images | success | misclassified | flagged | mean L2 | s / image |",
            "|---|---|---|---|---|---|",
            f"| {fm['n']} | {_pct(fm['success'])} | {_pct(fm['misclassified'])} | {_pct(fm['flagged'])} | "
            f"{_num(fm['mean_l2'])} | {fm['seconds_per_image']:.2f} |",
        ]
    else:
        lines.append("No guide image was available.")
    lines += ["", "## CW-L2: oblivious and with the detector term", "",
              "Oblivious: CW-L2 without the detector term (success there is misclassification; the second column "
              "says how many of its smallest misclassified examples the verdict also lets through). L2 ratio: the "
              "adaptive attack's mean L2 over the oblivious one's on the same images.", "",
              "| attack | success (served) | misclassified | mean L2 | L2 ratio | iterations | s / image |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for target, s in r["cw_l2"].items():
        if target == "oblivious":
            lines.append(f"| oblivious | {_pct(s['success'])} | {_pct(s['misclassified'])} | "
                         f"{_num(s['mean_l2_of_misclassified'])} | 1 | {s['mean_iterations']:.0f} | "
                         f"{s['seconds_per_image']:.2f} |")  # fmt: skip
        else:
            lines.append(f"| adaptive vs `{target}` | {_pct(s['success'])} | - | {_num(s['mean_l2_of_successes'])} | "
                         f"{_num(s['l2_over_oblivious'], '.2f')} | {s['mean_iterations']:.0f} | "
                         f"{s['seconds_per_image']:.2f} |")  # fmt: skip
    return "\n".join([*lines, ""])
