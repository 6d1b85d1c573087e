"""A differentiable relaxation of the image-class path similarity, for adaptive attacks (never served).

The similarity of layer ``l`` is ``|S_l ∩ C_l| / |S_l|``: ``S_l`` the synapses the selection rule keeps for the
output neurons the backward walk reaches, ``C_l`` the class path. Both steps are discrete: which neurons are
reached, and which of a reached neuron's contributions form the smallest prefix reaching ``theta`` of its output.

The relaxation (a BPDA, Athalye et al. 2018, in two parts):

- the reached neurons are those of the served walk, held fixed for the step (no gradient through reaching);
- each reached neuron's selection becomes soft: a candidate synapse with oriented contribution ``c`` (the neuron's
  sign applied, as the rule applies it) has weight ``sigmoid((c - cut) / tau)``, ``cut`` halfway between the
  smallest kept and the largest dropped contribution and ``tau`` = ``bandwidth`` times the neuron's range of
  contributions. The similarity is the weighted share of candidates in the class path,
  ``sum_s w_s [s in C_l] / sum_s w_s``; with straight-through weights (the served selection forward, the soft
  one's gradient) its value is the served similarity exactly.

The contributions ``x_j * w_j`` are recomputed with gradients from the layer inputs of a grad-enabled pass through
the extractor's plan, so the gradient reaches the image: raising contributions inside the class path and lowering
those outside it is what moves an image's path towards its class.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from pathguard.models.effective_path.class_paths import ClassPaths
from pathguard.models.effective_path.extractor import EffectivePathExtractor
from pathguard.models.effective_path.paths import PathBatch
from pathguard.models.effective_path.steps import ConvStep, Ctx, ResidualStep, Step, WeightedStep, run_forward

__all__ = ["relaxed_similarity"]


def relaxed_similarity(
    extractor: EffectivePathExtractor,
    class_paths: ClassPaths,
    x: torch.Tensor,
    logits: torch.Tensor,
    taps: Mapping[str, torch.Tensor],
    bandwidth: float,
    straight_through: bool = True,
) -> dict[int, torch.Tensor]:
    """Rank-1 and rank-2 similarities (N, L) of the images ``x`` (N, C, H, W), differentiable in ``x``.

    ``logits`` and ``taps`` are the served forward pass (the walk reads them, detached); ``bandwidth`` 0 keeps the
    served selection without gradient through it.
    """
    x = x.float()
    served = extractor.extract_from_taps(x.detach(), logits.detach(), {k: v.detach() for k, v in taps.items()})
    plan = extractor._get_plan(tuple(x.shape[1:]))
    ctx = Ctx(n=len(x), theta=extractor.theta, first=len(plan.layers) - len(extractor.layers))
    run_forward(plan.steps, x, ctx)  # records every covered layer's input, with gradients
    steps = {s.name: s for s in _weighted(plan.steps)}
    out: dict[int, list[torch.Tensor]] = {1: [], 2: []}
    for name in extractor.layers:
        step = steps[name]
        act = ctx.acts[step.uid]
        assert isinstance(act, torch.Tensor)
        bitmap = torch.from_numpy(np.ascontiguousarray(class_paths.synapse_bitmaps_[name]))
        for r in out:
            args = (step, act.reshape(len(x), -1), served, r, bitmap)
            out[r].append(_layer_similarity(*args, bandwidth=bandwidth, straight_through=straight_through))
    return {r: torch.stack(cols, 1) for r, cols in out.items()}


def _weighted(steps: Sequence[Step]) -> Iterator[WeightedStep]:
    for s in steps:
        if isinstance(s, WeightedStep):
            yield s
        elif isinstance(s, ResidualStep):
            yield from _weighted(s.shortcut)
            yield from _weighted(s.body)


def _layer_similarity(
    step: WeightedStep,
    act: torch.Tensor,
    served: PathBatch,
    rank: int,
    bitmap: torch.Tensor,
    bandwidth: float,
    straight_through: bool,
) -> torch.Tensor:
    """(N,) relaxed similarity of one layer and rank; ``act`` (N, in_size) the layer's input with gradients."""
    n, info = act.shape[0], step.info
    fan, points = info.fan_in, info.out_points
    ids = served.ids[rank][step.name]
    img = torch.repeat_interleave(torch.arange(n), served.counts(rank, step.name))
    outputs = info.out_channels * points
    uniq, inv = torch.unique(img * outputs + ids // fan, return_inverse=True)  # reached neurons (U,)
    u_img, u_pos = uniq // outputs, uniq % outputs
    kept = torch.zeros(len(uniq), fan, dtype=torch.bool)
    kept[inv, ids % fan] = True
    cols = torch.arange(fan).expand(len(uniq), fan)
    if isinstance(step, ConvStep):
        where = step.in_positions(u_pos[:, None].expand(-1, fan), cols)
        valid = step.in_index.index_select(0, u_pos % points) >= 0  # (U, fan); False in the zero padding
    else:
        where, valid = cols, torch.ones(len(uniq), fan, dtype=torch.bool)
    chan = u_pos // points
    weights: torch.Tensor = step.weight  # type: ignore[attr-defined]  # (O, fan_in): Conv2d and Linear steps
    c = act[u_img[:, None], where.clamp_min(0)] * weights.index_select(0, chan) * valid  # (U, fan)
    sign = torch.where(c.detach().sum(1) + step.bias.index_select(0, chan) < 0, -1.0, 1.0)  # the rule's orientation
    oc = (c * sign[:, None]).double()
    weight = kept.double()
    if bandwidth > 0 and len(uniq):
        w = _soft_selection(oc, kept, valid, bandwidth)
        weight = weight + (w - w.detach()) if straight_through else w
    cls = served.classes[rank].index_select(0, u_img)  # (U,)
    bit = u_pos[:, None] * fan + cols  # synapse ids of every candidate
    byte = bitmap[cls[:, None], bit >> 3].long()
    hit = ((byte >> (7 - (bit & 7))) & 1).double()  # np.packbits bit order
    num = torch.zeros(n, dtype=torch.float64).index_add(0, u_img, (weight * hit).sum(1))
    den = torch.zeros(n, dtype=torch.float64).index_add(0, u_img, weight.sum(1))
    return num / den.clamp_min(1.0)


def _soft_selection(oc: torch.Tensor, kept: torch.Tensor, valid: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """(U, fan) logistic membership of each candidate around its neuron's cut (see the module docstring)."""
    d = oc.detach()
    low = d.masked_fill(~kept, torch.inf).amin(1)  # smallest kept
    high = d.masked_fill(kept | ~valid, -torch.inf).amax(1)  # largest dropped
    span = (d.masked_fill(~valid, -torch.inf).amax(1) - d.masked_fill(~valid, torch.inf).amin(1)).clamp_min(1e-12)
    cut = torch.where(torch.isfinite(high), (low + high) / 2, low - span)
    tau = bandwidth * span
    return torch.sigmoid((oc - cut[:, None]) / tau[:, None]) * valid
