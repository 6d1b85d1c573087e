"""Batch-norm folding: an eval-mode BatchNorm after a Conv2d/Linear becomes part of that layer's weight and bias.

``w' = w * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta`` (per output channel).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from pathguard.models.networks.blocks import Residual
from pathguard.models.networks.config import ClassifierConfig
from pathguard.models.networks.taps import TappedSequential

__all__ = ["fold_batchnorm", "folded_parameters"]


@torch.no_grad()
def folded_parameters(layer: nn.Conv2d | nn.Linear, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of ``layer`` with the eval-mode BatchNorm ``bn`` (or ``None``) folded in.

    Returns
    -------
    weight : torch.Tensor
        Same shape as ``layer.weight``, (O, ...).
    bias : torch.Tensor or None
        (O,); ``None`` only when there is no ``bn`` and the layer has no bias.
    """
    if bn is None:
        return layer.weight, layer.bias
    assert isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d))
    assert bn.running_var is not None and bn.running_mean is not None
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
    scale = gamma / torch.sqrt(bn.running_var + bn.eps)  # (O,)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
    weight = layer.weight * scale.view(-1, *([1] * (layer.weight.dim() - 1)))
    return weight, (bias - bn.running_mean) * scale + beta


@torch.no_grad()
def fold_batchnorm(model: TappedSequential) -> TappedSequential:
    """Return an equivalent eval-mode model with every ``Conv2d -> BatchNorm2d`` pair folded into the conv, also
    inside the body and shortcut of residual blocks."""
    cfg = ClassifierConfig(**{**model.config.__dict__, "batchnorm": False})
    return TappedSequential(_folded_children(model), cfg).eval()


def _folded_children(seq: nn.Sequential) -> OrderedDict[str, nn.Module]:
    items = list(seq.named_children())
    out: OrderedDict[str, nn.Module] = OrderedDict()
    i = 0
    while i < len(items):
        name, m = items[i]
        nxt = items[i + 1][1] if i + 1 < len(items) else None
        if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
            weight, bias = folded_parameters(m, nxt)
            conv = copy.deepcopy(m)
            conv.weight = nn.Parameter(weight)
            conv.bias = nn.Parameter(bias) if bias is not None else None
            out[name] = conv
            i += 2
            continue
        if isinstance(m, Residual):
            body = nn.Sequential(_folded_children(m.body)) if isinstance(m.body, nn.Sequential) else m.body
            short = m.shortcut
            if isinstance(short, nn.Sequential):
                short = nn.Sequential(_folded_children(short))
            m = Residual(body, short)
        out[name] = m
        i += 1
    return out
