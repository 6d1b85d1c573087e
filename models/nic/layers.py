"""Which activations NIC checks: the input, tapped layers and the softmax, by name."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pathguard.models.networks.taps import INPUT, POOLS, SOFTMAX, activation

__all__ = ["INPUT", "SOFTMAX", "default_layers", "layer_activation"]


def default_layers(model: Any) -> list[str]:
    """Default checked layers of a :class:`~pathguard.models.networks.TappedSequential`: ``input``, its taps
    except the logits, minus a ``flatten`` that directly follows a pooling tap (the same numbers), and
    ``softmax``."""
    taps = list(model.tap_names)
    if taps and model.weighted_layer_names and taps[-1] == model.weighted_layer_names[-1]:
        taps = taps[:-1]  # the last Linear has no ReLU: its tap is the logits, checked as the softmax
    children = list(model.named_children())
    index = {name: i for i, (name, _) in enumerate(children)}

    def repeats_pool(tap: str) -> bool:  # a Flatten right after a pooling layer: the same numbers again
        i = index.get(tap, 0)
        return i > 0 and isinstance(children[i][1], nn.Flatten) and isinstance(children[i - 1][1], POOLS)

    return [INPUT, *(t for t in taps if not repeats_pool(t)), SOFTMAX]


def layer_activation(layer: str, x: torch.Tensor, logits: torch.Tensor, taps: dict[str, torch.Tensor]) -> torch.Tensor:
    """The activation NIC checks for ``layer``: the input ``x``, ``softmax(logits)`` or a tap (the networks' one
    lookup, :func:`~pathguard.models.networks.taps.activation`)."""
    return activation(layer, x, logits, taps)
