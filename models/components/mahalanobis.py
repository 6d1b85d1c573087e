"""Class-conditional Gaussians (a benign-only Mahalanobis detector over tapped layers) as a verdict component."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from pathguard.models.components.base import (
    BuildContext,
    Component,
    FileReader,
    Observation,
    Relaxation,
    npz_blob,
    one_torch_thread,
    read_npz,
)
from pathguard.models.components.graph import GraphContext
from pathguard.models.errors import BundleIntegrityError
from pathguard.models.mahalanobis import POOLS, ClassGaussian
from pathguard.models.networks import TappedSequential
from pathguard.models.networks.taps import INPUT, LOGITS, activation
from pathguard.models.verdict.surrogate import soft_p_values

__all__ = ["GaussianComponent", "gaussian_activation"]

MAHALANOBIS_FILE = "mahalanobis.npz"
_CHUNK = 500


def gaussian_activation(
    name: str, x: torch.Tensor, logits: torch.Tensor, taps: dict[str, torch.Tensor]
) -> torch.Tensor:
    """A class-Gaussian layer's activation: a tap, the ``input`` or the ``logits`` (the networks' one lookup)."""
    return activation(name, x, logits, taps)


class GaussianComponent(Component):
    """Per-layer Mahalanobis distance to the closest class mean, Fisher-combined over the layers.

    Build parameters: ``layers`` (tap names, ``input`` or ``logits``; default every tap), ``pool`` (``mean`` or
    ``mean_std``) and ``shrinkage``. Fitted on the build's benign sample, calibrated on split A.
    """

    name = "mahalanobis"
    files = (MAHALANOBIS_FILE,)
    params = ("layers", "pool", "shrinkage")

    def __init__(self, gaussian: ClassGaussian) -> None:
        self.gaussian = gaussian

    @classmethod
    def check(cls, model: TappedSequential, params: Mapping[str, Any]) -> None:
        known = [INPUT, *model.tap_names, LOGITS]
        unknown = [n for n in params.get("layers") or [] if n not in known]
        if unknown:
            raise ValueError(f"mahalanobis layers {unknown} are not layers of this model; choose from {known}")
        if params.get("pool", "mean") not in POOLS:
            raise ValueError(f"mahalanobis pool must be one of {list(POOLS)}, got {params['pool']!r}")

    @classmethod
    def build(cls, ctx: BuildContext, params: Mapping[str, Any]) -> GaussianComponent:
        p = dict(params)
        gaussian = ClassGaussian(list(p.pop("layers", None) or ctx.model.tap_names), **p)
        x, y = ctx.sample()
        gaussian.fit(_batches(ctx.model, gaussian.layers, x, y), ctx.num_classes)
        assert ctx.job is not None
        ctx.job = ctx.job.with_fitted(**{MAHALANOBIS_FILE: npz_blob(gaussian.to_arrays())})
        done = ctx.passes.ordered(gaussian_pass, ctx.job, "calib_a", "class-Gaussian calibration")
        gaussian.calibrate(np.concatenate([r.value for r in done if r.images]))
        return cls(gaussian)

    def to_files(self) -> dict[str, bytes]:
        return {MAHALANOBIS_FILE: npz_blob(self.gaussian.to_arrays())}

    @classmethod
    def from_files(
        cls, read: FileReader, model: TappedSequential, built: Mapping[str, Component], entry: Mapping[str, Any]
    ) -> GaussianComponent:
        try:
            blob = read(MAHALANOBIS_FILE)
        except KeyError:
            raise BundleIntegrityError(
                MAHALANOBIS_FILE, f"the verdict fuses {cls.name}, but {MAHALANOBIS_FILE} is missing"
            ) from None
        return cls(ClassGaussian.from_arrays(read_npz(blob)))

    def manifest(self) -> dict[str, Any]:
        return self.gaussian.config()

    def activations(self, x: torch.Tensor, logits: torch.Tensor, taps: dict[str, torch.Tensor]) -> dict:
        return {n: gaussian_activation(n, x, logits, taps) for n in self.gaussian.layers}

    def raw(self, obs: Observation) -> np.ndarray:
        acts = self.activations(obs.x, obs.logits, obs.taps)
        return obs.get(self.name, lambda: self.gaussian.score(acts), timing=self.name)

    def surrogate(self, obs: Observation, relax: Relaxation) -> torch.Tensor:
        """Mahalanobis distances in torch (the closest class by ``min``), per-layer p-values smoothed
        (:func:`soft_p_values`), Fisher-combined as served."""
        layer_scores = self.gaussian.differentiable_layer_scores(self.activations(obs.x, obs.logits, obs.taps))
        p = soft_p_values(self.gaussian.calib_, layer_scores, relax.bandwidth, relax.straight_through)
        return -2.0 * torch.log(p).sum(1)

    def graph(self, g: GraphContext) -> str:
        """:meth:`ClassGaussian.score` in the graph: float64 pooled features, the squared distance to every class
        mean through the tied precision (closest class), per-layer p-values, Fisher's ``-2 sum log p``."""
        gs = self.gaussian
        cols = []
        for name in gs.layers:
            act = g.x if name == INPUT else g.logits32 if name == LOGITS else g.tap(name)
            f = _pooled_graph(g, g.double(act), len(g.shapes[name]) == 3, gs.pool)  # (N, D) float64
            mu, prec = gs.means_[name], gs.precisions_[name]
            fp = g.op("MatMul", f, g.const(prec))  # (N, D)
            ff = g.reduce("ReduceSum", g.op("Mul", fp, f), [1], keepdims=True)  # (N, 1)
            cross = g.op("MatMul", fp, g.const(np.ascontiguousarray(mu.T)))  # (N, K)
            const = np.einsum("kd,de,ke->k", mu, prec, mu)[None, :]  # (1, K)
            quad = g.op("Add", g.op("Sub", ff, g.op("Mul", g.scalar(2.0), cross)), g.const(const))
            cols.append(g.unsqueeze(g.op("Max", g.reduce("ReduceMin", quad, [1]), g.scalar(0.0)), [1]))
        p = g.p_value(gs.calib_, g.op("Concat", *cols, axis=1))  # (N, L)
        return g.op("Mul", g.scalar(-2.0), g.reduce("ReduceSum", g.op("Log", p), [1]))

    def fields(self, obs: Observation, violation: np.ndarray) -> dict[str, Any]:
        return {"layers": list(self.gaussian.layers), "score": violation}

    def graph_fields(self, g: GraphContext, violation: str) -> dict[str, Any]:
        return {"layers": list(self.gaussian.layers), "score": violation}


def _pooled_graph(g: GraphContext, act: str, spatial: bool, pool: str) -> str:
    """:func:`~pathguard.models.mahalanobis.detector.pooled` of a float64 activation in the graph."""
    if not spatial:
        return g.op("Flatten", act, axis=1)
    flat = g.op("Reshape", act, g.const([0, 0, -1], np.int64))  # (N, C, H*W)
    mean = g.reduce("ReduceMean", flat, [2])  # (N, C)
    if pool == "mean":
        return mean
    centred = g.op("Sub", flat, g.unsqueeze(mean, [2]))
    std = g.op("Sqrt", g.reduce("ReduceMean", g.op("Mul", centred, centred), [2]))
    return g.op("Concat", mean, std, axis=1)


def _batches(
    model: TappedSequential, layers: list[str], x: np.ndarray, y: np.ndarray
) -> Iterator[tuple[dict[str, torch.Tensor], np.ndarray]]:
    """(activations of ``layers``, labels) of the images ``x`` in chunks, for :meth:`ClassGaussian.fit`."""
    for s in range(0, len(x), _CHUNK):
        xb = torch.from_numpy(x[s : s + _CHUNK])
        with torch.no_grad():
            logits, taps = model.forward_with_taps(xb)
        yield {n: gaussian_activation(n, xb, logits, taps) for n in layers}, y[s : s + _CHUNK]


@one_torch_thread
@torch.no_grad()
def gaussian_pass(ctx: Any, shard: Any) -> tuple[np.ndarray, list[str], int]:
    """(N, L) per-layer Mahalanobis scores of the class Gaussians (their calibration scores); a build pass run on
    the executor."""
    assert ctx.gaussian is not None
    out, skipped = [], []
    for split, bad in shard.read():
        skipped.extend(bad)
        if len(split):
            x = torch.from_numpy(split.x)
            logits, taps = ctx.model.forward_with_taps(x)
            out.append(
                ctx.gaussian.layer_scores({n: gaussian_activation(n, x, logits, taps) for n in ctx.gaussian.layers})
            )
    scores = np.concatenate(out) if out else np.empty((0, len(ctx.gaussian.layers)))
    return scores, skipped, len(scores)
