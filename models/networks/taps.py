"""The one tap mechanism both detectors read activations through.

Every served classifier is a :class:`TappedSequential`: an ``nn.Sequential`` whose children carry stable
names (``conv1``, ``relu1``, ``pool1``, ...). Module names are part of the public contract: the
Effective Path API keys its output by them and the bundle records them.

Taps are the activations a detector may look at, in forward order:

- every Conv2d / Linear output, taken *after* its ReLU when one follows (named after the layer,
  e.g. ``conv1``); the last Linear has no ReLU, so its tap is the logits;
- every pooling output (``pool1``, ...);
- the flatten output (``flatten``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from pathguard.models.networks.blocks import Residual
from pathguard.models.networks.config import ClassifierConfig

__all__ = [
    "ACTIVATIONS",
    "INPUT",
    "LOGITS",
    "NORMS",
    "POOLS",
    "SOFTMAX",
    "WEIGHTED",
    "OnnxTapWrapper",
    "TappedSequential",
    "activation",
    "tap_points",
]

# The one table of module kinds every part reads (the taps, Effective Path's plan, NIC's default layers):
WEIGHTED = (nn.Conv2d, nn.Linear)  # the layers whose synapses Effective Path walks; tapped (after their ReLU)
ACTIVATIONS = (nn.ReLU, nn.ReLU6)  # element-wise, order-keeping: a tap is taken after them
NORMS = (nn.BatchNorm2d, nn.BatchNorm1d)  # folded into the weighted layer before them
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)  # tapped
IDENTITIES = (nn.Dropout, nn.Identity)  # no effect at inference
_PASS_THROUGH = (*ACTIVATIONS, nn.Dropout, *NORMS)  # what a weighted layer's tap is taken after

# Activations that are not taps, by name: the input, the logits and their softmax.
INPUT, LOGITS, SOFTMAX = "input", "logits", "softmax"


def activation(name: str, x: torch.Tensor, logits: torch.Tensor, taps: dict[str, torch.Tensor]) -> torch.Tensor:
    """The activation called ``name``: the input ``x``, the ``logits``, their ``softmax``, or a tap. The one
    lookup every detector uses. Raises KeyError naming the known names for anything else."""
    if name == INPUT:
        return x
    if name == LOGITS:
        return logits
    if name == SOFTMAX:
        return torch.softmax(logits, dim=-1)
    try:
        return taps[name]
    except KeyError:
        raise KeyError(f"no activation {name!r}; known: {INPUT}, {LOGITS}, {SOFTMAX}, {sorted(taps)}") from None


def tap_points(seq: nn.Sequential) -> dict[int, str]:
    """Map child index -> tap name for the children whose *output* is a tap.

    A Conv2d/Linear or a :class:`~pathguard.models.networks.Residual` block is tapped at the output of the last
    pass-through module (BatchNorm, ReLU, ReLU6, Dropout) that directly follows it, so the tap is its post-ReLU
    activation.
    """
    names = list(seq._modules.keys())
    mods = list(seq._modules.values())
    points: dict[int, str] = {}
    i = 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, (*WEIGHTED, Residual)):
            j = i
            while j + 1 < len(mods) and isinstance(mods[j + 1], _PASS_THROUGH):
                j += 1
            points[j] = names[i]
            i = j + 1
            continue
        if isinstance(m, (*POOLS, nn.Flatten)):
            points[i] = names[i]
        i += 1
    return points


class TappedSequential(nn.Sequential):
    """``nn.Sequential`` with named taps. ``forward`` returns logits; ``forward_with_taps`` also
    returns an ordered ``name -> activation`` dict."""

    def __init__(self, layers: OrderedDict[str, nn.Module], config: ClassifierConfig) -> None:
        super().__init__(layers)
        self.config = config
        self._taps = tap_points(self)

    @property
    def tap_names(self) -> list[str]:
        return [self._taps[i] for i in sorted(self._taps)]

    @property
    def weighted_layer_names(self) -> list[str]:
        return [n for n, m in self.named_children() if isinstance(m, WEIGHTED)]

    def forward_with_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the network on ``x`` (N, C, H, W) in [0, 1].

        Returns
        -------
        logits : torch.Tensor
            (N, num_classes).
        taps : dict[str, torch.Tensor]
            Activations in forward order, keyed by :attr:`tap_names`.
        """
        taps: dict[str, torch.Tensor] = {}
        for i, module in enumerate(self):
            x = module(x)
            name = self._taps.get(i)
            if name is not None:
                taps[name] = x
        return x, taps


class OnnxTapWrapper(nn.Module):
    """Forward returning ``(logits, *taps)`` for ONNX export with named outputs."""

    def __init__(self, model: TappedSequential) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, taps = self.model.forward_with_taps(x)
        return (logits, *taps.values())
