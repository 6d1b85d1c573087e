"""Which activations NIC checks: the input, tapped layers and the softmax, by name."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["INPUT", "SOFTMAX", "default_layers", "layer_activation"]

INPUT, SOFTMAX = "input", "softmax"


def default_layers(model: Any) -> list[str]:
    """Default checked layers of a :class:`~pathguard.models.networks.TappedSequential`: ``input``, its taps
    except the logits, minus a ``flatten`` that directly follows a pooling tap (the same numbers), and
    ``softmax``."""
    taps = list(model.tap_names)
    if taps and model.weighted_layer_names and taps[-1] == model.weighted_layer_names[-1]:
        taps = taps[:-1]  # the last Linear has no ReLU: its tap is the logits, checked as the softmax
    keep = [t for i, t in enumerate(taps) if not (t == "flatten" and i > 0 and taps[i - 1].startswith("pool"))]
    return [INPUT, *keep, SOFTMAX]


def layer_activation(layer: str, x: torch.Tensor, logits: torch.Tensor, taps: dict[str, torch.Tensor]) -> torch.Tensor:
    """The activation NIC checks for ``layer``: the input ``x``, ``softmax(logits)`` or a tap."""
    if layer == INPUT:
        return x
    if layer == SOFTMAX:
        return torch.softmax(logits, dim=-1)
    return taps[layer]
