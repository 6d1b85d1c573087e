"""Channel-level Effective Path: the paths of Qiu et al. at the granularity of channels (a coarse form in the manner
of Ptolemy, Gan et al., MICRO 2020), cheap enough to run beside every request.

The exact walk (:mod:`.extractor`) selects synapses between single neurons: on the residual CIFAR-10 bundle it
builds 40.8 million contributions per image. Here a convolution's unit is a channel pair: the contribution of input
channel ``c`` to output channel ``o`` is the sum, over every output position and kernel tap, of ``x * w``, i.e.
``A[o, c] = sum_k w[o, c, k] * S[c, k]`` with ``S[c, k]`` the sum of the input's (zero-padded) channel ``c`` over
the windows' tap ``k``: one depthwise convolution with one-hot tap kernels, one reduction and one small product per
layer. The
selection rule is the paper's, unchanged, on those values (a selected output channel's contributions, oriented by
the sign of its summed pre-activation including the bias over its positions; kept while the sum before them is
below ``theta`` of the total). Linear layers keep the exact neuron-level rule (their synapses are few). Max and
average pools pass a channel's selection through; a residual addition applies the rule to the two branches'
channel sums; a Flatten maps a selected flat neuron to its channel.

A path is a dense bool mask per weighted layer over its channel synapses (``o * Cg + c`` for a convolution with
``Cg`` input channels per group; ``o * in + i`` for a linear layer), rank 1 seeded at the top class, rank 2 at the
second. :class:`ChannelProfiles` holds, per class, how often each channel synapse is on the rank-1 paths of benign
training images labelled and predicted as that class (a frequency, not the paper's union: at channel granularity
the union of a class's paths covers nearly every synapse); the similarity of a path with class ``k`` is the mean
frequency under class ``k`` of its synapses, which is the paper's ``|S ∩ C| / |S|`` when frequencies are 0 or 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pathguard.models.effective_path.ingraph import dense_rule, export_batched, one_hot_taps, orient_rows
from pathguard.models.effective_path.plan import Compiler, Plan
from pathguard.models.effective_path.steps import (
    AvgPoolStep,
    ConvStep,
    LinearStep,
    MaxPoolStep,
    PassStep,
    PrefixStep,
    ResidualStep,
    Step,
)

__all__ = ["ChannelPaths", "ChannelProfiles", "ChannelWalk", "DenseChannelWalk", "dense_rule"]


@dataclass
class ChannelPaths:
    """Channel-level paths of N images: ``logits`` (N, K), ``classes[r]`` (N,) the class at rank r, ``masks[r]``
    layer -> (N, units) bool."""

    logits: torch.Tensor
    classes: dict[int, np.ndarray]
    masks: dict[int, dict[str, np.ndarray]]


class ChannelWalk:
    """The channel-level walk over a network's compiled plan (the exact walk's plan, see the module docstring).

    Every selection is a dense 0/1 mask of fixed shape (no data-dependent sizes), so the same code runs eagerly
    (:meth:`walk`) and traces to ONNX (:class:`DenseChannelWalk`).

    Parameters
    ----------
    model : nn.Module
        A network the exact walk supports (its plan compiler's modules).
    input_shape : tuple of int
        (C, H, W) of one input.
    theta : float
        The selection threshold.
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], theta: float = 0.5) -> None:
        if not 0.0 < theta <= 1.0:
            raise ValueError(f"theta must be in (0, 1], got {theta}")
        self.theta = float(theta)
        with torch.no_grad():
            self.plan: Plan = Compiler().compile(model.eval(), tuple(input_shape))
        self.layers: list[str] = [info.name for info in self.plan.layers]
        self.units: dict[str, int] = {}
        self.taps: dict[str, torch.Tensor] = {}  # one-hot tap kernels of each convolution (its channel sums)
        self._index(self.plan.steps)

    def _index(self, steps: Sequence[Step]) -> None:
        for step in steps:
            if isinstance(step, ConvStep):
                self.units[step.name] = step.weight4.shape[0] * step.weight4.shape[1]
                self.taps[step.name] = one_hot_taps(step.in_shape[0], step.kernel)  # (C*KK, 1, KH, KW)
            elif isinstance(step, LinearStep):
                self.units[step.name] = step.weight.shape[0] * step.weight.shape[1]
            elif isinstance(step, ResidualStep):
                self._index(step.shortcut)
                self._index(step.body)

    @torch.no_grad()
    def walk(self, x: torch.Tensor | np.ndarray, ranks: Sequence[int] = (1, 2)) -> ChannelPaths:
        """The paths of a batch at the given ranks (one forward pass through the plan, then one walk per rank)."""
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float()
        logits, classes, masks = self.trace(xt, ranks)
        return ChannelPaths(
            logits,
            {r: c.numpy() for r, c in classes.items()},
            {r: {layer: m.numpy() > 0 for layer, m in per.items()} for r, per in masks.items()},
        )

    def trace(
        self, x: torch.Tensor, ranks: Sequence[int] = (1, 2)
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
        """(logits (N, K), rank -> class (N,), rank -> layer -> (N, units) 0/1 float mask), in tensor operations
        only (traceable)."""
        acts: dict[int, Any] = {}
        logits = self._forward(self.plan.steps, x, acts)
        top = torch.topk(logits, max(ranks), dim=1).indices  # (N, R)
        classes, masks = {}, {}
        for r in ranks:
            cls = top[:, r - 1]
            seed = (torch.arange(logits.shape[1]).unsqueeze(0) == cls.unsqueeze(1)).to(logits.dtype)
            found: dict[str, torch.Tensor] = {}
            self._backward(self.plan.steps, seed, False, acts, found)
            classes[r] = cls
            masks[r] = {layer: found[layer] if layer in found else torch.zeros(x.shape[0], self.units[layer])
                        for layer in self.layers}  # fmt: skip
        return logits, classes, masks

    # ------------------------------------------------------------------ the walk
    def _forward(self, steps: Sequence[Step], x: torch.Tensor, acts: dict[int, Any]) -> torch.Tensor:
        for step in steps:
            if isinstance(step, ResidualStep):
                skip = self._forward(step.shortcut, x, acts) if step.shortcut else x
                main = self._forward(step.body, x, acts)
                acts[step.uid] = (skip, main)
                x = skip + main
            else:
                acts[step.uid] = x
                x = step.compute(x)
        return x

    def _backward(
        self, steps: Sequence[Step], mask: torch.Tensor, chan: bool, acts: dict[int, Any], found: dict[str, Any]
    ) -> tuple[torch.Tensor, bool] | None:
        """Walk ``steps`` backwards from ``mask`` (units: channels when ``chan``, else flat neurons); returns the
        input's mask and its kind (None: the walk left the weighted layers)."""
        for step in reversed(steps):
            if isinstance(step, PrefixStep):
                return None
            if isinstance(step, LinearStep):
                if chan:
                    raise NotImplementedError(f"{step.name}: a linear layer reading a channel map")
                x = acts[step.uid]  # (N, I)
                c = x.unsqueeze(1) * step.weight.unsqueeze(0)  # (N, O, I)
                c, total = orient_rows(c, c.sum(-1) + step.bias)
                keep = dense_rule(c, total, self.theta) * mask.unsqueeze(-1)
                found[step.name] = keep.reshape(keep.shape[0], -1)
                mask = keep.amax(1)
            elif isinstance(step, ConvStep):
                mask = _channels(mask, step.out_shape, chan)
                mask, chan = self._conv(step, acts[step.uid], mask, found), True
            elif isinstance(step, (MaxPoolStep, AvgPoolStep)):
                mask, chan = _channels(mask, step.out_shape, chan), True  # a channel's selection passes through
            elif isinstance(step, ResidualStep):
                out = self._residual(step, mask, chan, acts, found)
                if out is None:
                    return None
                mask, chan = out
            elif isinstance(step, PassStep):
                if isinstance(step.module, nn.Flatten) and len(step.in_shape) == 3:
                    mask, chan = _channels(mask, step.in_shape, False), True
            else:
                raise NotImplementedError(f"{type(step).__name__} has no channel-level walk")
        return mask, chan

    def contributions(self, step: ConvStep, x: torch.Tensor) -> torch.Tensor:
        """(N, O, Cg) contribution of each input channel (within the output channel's group) to each output
        channel: ``sum over positions and taps of x * w``, zero padding included (one depthwise convolution with
        one-hot tap kernels gives every channel's sum at every tap)."""
        w = step.weight4  # (O, Cg, KH, KW)
        o, cg, kh, kw = w.shape
        groups, c_in = step.groups, int(step.in_shape[0])
        top, left, bottom, right = step.pads
        xp = F.pad(x, (left, right, top, bottom))
        s = F.conv2d(xp, self.taps[step.name], stride=step.stride, dilation=step.dil, groups=c_in)
        s = s.sum((2, 3)).reshape(x.shape[0], groups, 1, cg, kh * kw)  # (N, G, 1, Cg, KK)
        return (s * w.reshape(1, groups, o // groups, cg, kh * kw)).sum(-1).reshape(x.shape[0], o, cg)

    def _conv(self, step: ConvStep, x: torch.Tensor, mask: torch.Tensor, found: dict[str, Any]) -> torch.Tensor:
        a = self.contributions(step, x)  # (N, O, Cg)
        n, o, cg = a.shape
        positions = step.out_shape[1] * step.out_shape[2]
        c, total = orient_rows(a, a.sum(-1) + step.bias * positions)
        keep = dense_rule(c, total, self.theta) * mask.unsqueeze(-1)  # (N, O, Cg)
        found[step.name] = keep.reshape(n, -1)
        return keep.reshape(n, step.groups, o // step.groups, cg).amax(2).reshape(n, step.groups * cg)

    def _residual(
        self, step: ResidualStep, mask: torch.Tensor, chan: bool, acts: dict[int, Any], found: dict[str, Any]
    ) -> tuple[torch.Tensor, bool] | None:
        skip, main = acts[step.uid]
        n = skip.shape[0]
        if chan:
            skip, main = skip.reshape(n, skip.shape[1], -1).sum(2), main.reshape(n, main.shape[1], -1).sum(2)
        else:
            skip, main = skip.reshape(n, -1), main.reshape(n, -1)
        vals = torch.stack([skip, main], -1)  # (N, U, 2): the two branches' values of every unit
        c, total = orient_rows(vals, vals.sum(-1))
        keep = dense_rule(c, total, self.theta) * mask.unsqueeze(-1)
        short = (
            self._backward(step.shortcut, keep[..., 0], chan, acts, found) if step.shortcut else (keep[..., 0], chan)
        )
        body = self._backward(step.body, keep[..., 1], chan, acts, found)
        if short is None or body is None:
            return short if body is None else body
        if short[1] != body[1]:  # one branch ends on a channel map, the other flat: compare as channels
            shape = step.in_shape
            return torch.maximum(_channels(short[0], shape, short[1]), _channels(body[0], shape, body[1])), True
        return torch.maximum(short[0], body[0]), short[1]


def _channels(mask: torch.Tensor, shape: Sequence[int], chan: bool) -> torch.Tensor:
    """A mask over a (C, H, W) tensor's units as a channel mask (a flat neuron mask: any of the channel's)."""
    if chan:
        return mask
    return mask.reshape(mask.shape[0], int(shape[0]), -1).amax(2)


class ChannelProfiles:
    """Per class, the frequency of every channel synapse on the rank-1 paths of its benign images."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def fit(self, walk: ChannelWalk, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> ChannelProfiles:
        """Aggregate the rank-1 paths of the images labelled and predicted as the same class."""
        counts = {layer: np.zeros((self.num_classes, walk.units[layer])) for layer in walk.layers}
        images = np.zeros(self.num_classes)
        for s in range(0, len(x), batch_size):
            paths = walk.walk(x[s : s + batch_size], ranks=(1,))
            label = np.asarray(y[s : s + batch_size], dtype=np.int64)
            keep = paths.classes[1] == label
            np.add.at(images, label[keep], 1)
            for layer in walk.layers:
                np.add.at(counts[layer], label[keep], paths.masks[1][layer][keep])
        if (images == 0).any():
            raise ValueError(f"classes {np.flatnonzero(images == 0).tolist()} have no correctly classified image")
        self.layers_ = list(walk.layers)
        self.images_ = images
        self.freq_ = {layer: (counts[layer] / images[:, None]).astype(np.float32) for layer in walk.layers}
        return self

    def similarity(self, paths: ChannelPaths) -> dict[int, np.ndarray]:
        """rank -> (N, L) mean class frequency of the path's synapses under the class at that rank (1.0 for an
        empty path: nothing is off the class's paths)."""
        out = {}
        for r, masks in paths.masks.items():
            cols = []
            for layer in self.layers_:
                m = masks[layer].astype(np.float32)  # (N, U)
                f = self.freq_[layer][paths.classes[r]]  # (N, U)
                size = m.sum(1)
                cols.append(np.where(size > 0, (m * f).sum(1) / np.maximum(size, 1), 1.0))
            out[r] = np.stack(cols, 1).astype(np.float64)
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {f"freq/{layer}": self.freq_[layer] for layer in self.layers_}
        out["images"] = self.images_
        out["layers"] = np.array(self.layers_)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ChannelProfiles:
        layers = [str(v) for v in arrays["layers"]]
        self = cls(len(arrays["images"]))
        self.layers_ = layers
        self.images_ = np.asarray(arrays["images"], dtype=np.float64)
        self.freq_ = {layer: np.asarray(arrays[f"freq/{layer}"], dtype=np.float32) for layer in layers}
        return self


class DenseChannelWalk(nn.Module):
    """:class:`ChannelWalk`, :class:`ChannelProfiles` and a benign score as one module: ``forward(x)`` -> (logits
    (N, K), features (N, 2L): rank-1 then rank-2 similarities, score (N,)). It exports to ONNX (:meth:`to_onnx`) and
    runs inside the guarded graph."""

    def __init__(self, walk: ChannelWalk, profiles: ChannelProfiles, score: Any) -> None:
        super().__init__()
        self.walk = walk
        self.layers = list(profiles.layers_)
        self.freq = {layer: torch.from_numpy(profiles.freq_[layer]) for layer in self.layers}
        self.median = torch.from_numpy(np.asarray(score.median_, dtype=np.float64))
        self.scale = torch.from_numpy(np.asarray(score.scale_, dtype=np.float64))
        self.orientation = torch.from_numpy(np.asarray(score.orientation_, dtype=np.float64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, classes, masks = self.walk.trace(x, (1, 2))
        feats = []
        for r in (1, 2):
            for layer in self.layers:
                m = masks[r][layer]
                size = m.sum(1)
                hit = (m * self.freq[layer][classes[r]]).sum(1)
                feats.append(torch.where(size > 0, hit / size.clamp_min(1.0), torch.ones_like(size)))
        features = torch.stack(feats, 1).double()
        z = (self.orientation * (features - self.median) / self.scale).clamp_min(0.0)
        return logits, features, z.mean(1)

    def to_onnx(self, opset: int = 17) -> bytes:
        """The module as an ONNX model: input ``input`` (N, C, H, W), outputs ``ep_logits``, ``ep_features``,
        ``ep_score``."""
        x = torch.zeros(2, *self.walk.plan.input_shape)
        return export_batched(self, (x,), ["input"], ["ep_logits", "ep_features", "ep_score"], opset)
