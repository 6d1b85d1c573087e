"""Building blocks of the networks the detectors walk: in-model normalization and the residual block."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Normalize", "Residual"]


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; an affine map the detectors treat as part of the input."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Residual(nn.Module):
    """``y = shortcut(x) + body(x)`` (``shortcut`` defaults to the identity).

    Parameters
    ----------
    body : nn.Module
        Usually an ``nn.Sequential`` of supported modules; its output shape equals the shortcut's.
    shortcut : nn.Module, optional
        Projection for the skip branch (e.g. a 1x1 strided Conv2d); ``None`` means identity.
    """

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip + self.body(x)
