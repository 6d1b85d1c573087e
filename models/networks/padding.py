"""Convolution and pooling with ONNX's padding: four pads (top, left, bottom, right) that may differ, and ceil-mode
pooling as onnxruntime computes it.

``torch.nn`` pads both sides of an axis by the same amount; a model exported from another framework often pads one
side more (TensorFlow's 'SAME' padding with a stride of 2 on an even input pads only the bottom and the right). The
modules here are the ``torch.nn`` layers with the four pads applied explicitly in ``forward``; :func:`explicit_pads`
gives the four pads of any Conv2d, MaxPool2d or AvgPool2d.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PaddedAvgPool2d",
    "PaddedConv2d",
    "PaddedMaxPool2d",
    "Pads4",
    "explicit_pads",
    "pool_output_size",
    "window_pads",
]

Pads4 = tuple[int, int, int, int]  # (top, left, bottom, right), the order of ONNX's pads for 2-D layers


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def pool_output_size(
    size: int, kernel: int, stride: int, begin: int, end: int, dilation: int = 1, ceil_mode: bool = False
) -> int:
    """Windows of a pooling layer along one axis of ``size`` inputs padded by ``begin`` and ``end``.

    ``(size + begin + end - span) / stride + 1`` rounded down, or up in ceil mode (``span`` = the dilated kernel
    extent); in ceil mode a last window that would start in the end padding is dropped (onnxruntime and torch agree).
    """
    span = dilation * (kernel - 1) + 1
    room = size + begin + end - span
    out = (-(-room // stride) if ceil_mode else room // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + begin:
        out -= 1
    return out


def window_pads(
    pads: Pads4,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
) -> Pads4:
    """``pads`` with the bottom and right pads extended so that ``out_hw`` windows fit whole in the padded input.

    A ceil-mode window may run past the padded input; the part past it is padding too (never a real input), so with
    the extended pads the windows are the plain (floor-mode) windows of the padded input.
    """
    ends = [
        max(end, (out - 1) * s + d * (k - 1) + 1 - size - begin)
        for size, out, k, s, d, begin, end in zip(
            in_hw, out_hw, kernel, stride, dilation, pads[:2], pads[2:], strict=True
        )
    ]
    return (pads[0], pads[1], ends[0], ends[1])


class PaddedConv2d(nn.Conv2d):
    """``nn.Conv2d`` zero padded by ``pads4`` = (top, left, bottom, right) pixels (its ``padding`` is 0)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        pads4: Pads4,
        stride: tuple[int, int] = (1, 1),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)
        self.pads4 = pads4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, left, bottom, right = self.pads4
        return self._conv_forward(F.pad(x, (left, right, top, bottom)), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pads4={self.pads4}"


class PaddedMaxPool2d(nn.MaxPool2d):
    """ONNX ``MaxPool``: padded by ``pads4`` = (top, left, bottom, right) with -inf (padding never holds the
    maximum), ceil mode as :func:`pool_output_size` (its ``padding`` is 0)."""

    def __init__(
        self,
        kernel_size: tuple[int, int],
        pads4: Pads4,
        stride: tuple[int, int],
        dilation: tuple[int, int] = (1, 1),
        ceil_mode: bool = False,
    ) -> None:
        super().__init__(kernel_size, stride, 0, dilation, ceil_mode=ceil_mode)
        self.pads4 = pads4

    def applied_pads(self, h: int, w: int) -> Pads4:
        """The pads applied to an (h, w) input: ``pads4``, extended to whole ceil-mode windows."""
        k, s, d = _pair(self.kernel_size), _pair(self.stride), _pair(self.dilation)
        top, left, bottom, right = self.pads4
        out = (
            pool_output_size(h, k[0], s[0], top, bottom, d[0], self.ceil_mode),
            pool_output_size(w, k[1], s[1], left, right, d[1], self.ceil_mode),
        )
        return window_pads(self.pads4, k, s, d, (h, w), out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, left, bottom, right = self.applied_pads(int(x.shape[2]), int(x.shape[3]))  # constants in an export
        xp = F.pad(x, (left, right, top, bottom), value=-math.inf)
        return F.max_pool2d(xp, self.kernel_size, self.stride, 0, self.dilation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pads4={self.pads4}"


class PaddedAvgPool2d(nn.AvgPool2d):
    """ONNX ``AveragePool`` as onnxruntime computes it: zero pads ``pads4`` = (top, left, bottom, right), ceil mode
    as :func:`pool_output_size` (its ``padding`` is 0).

    A window's sum is divided by the number of its real inputs (``count_include_pad=False``), or of its inputs and
    pads, the part of a ceil-mode window past the padded input not counted (``count_include_pad=True``).
    """

    def __init__(
        self,
        kernel_size: tuple[int, int],
        pads4: Pads4,
        stride: tuple[int, int],
        ceil_mode: bool = False,
        count_include_pad: bool = False,
    ) -> None:
        super().__init__(kernel_size, stride, 0, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
        self.pads4 = pads4

    def applied_pads(self, h: int, w: int) -> Pads4:
        """The pads applied to an (h, w) input: ``pads4``, extended to whole ceil-mode windows."""
        k, s = _pair(self.kernel_size), _pair(self.stride)
        top, left, bottom, right = self.pads4
        out = (
            pool_output_size(h, k[0], s[0], top, bottom, 1, self.ceil_mode),
            pool_output_size(w, k[1], s[1], left, right, 1, self.ceil_mode),
        )
        return window_pads(self.pads4, k, s, (1, 1), (h, w), out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[2]), int(x.shape[3])  # constants in an ONNX export (the input size is fixed)
        top, left, bottom, right = self.applied_pads(h, w)
        counted = torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)
        if self.count_include_pad:  # the declared pads count, the ceil-mode extension does not
            pt, pl, pb, pr = self.pads4
            counted = F.pad(F.pad(counted, (pl, pr, pt, pb), value=1.0), (0, right - pr, 0, bottom - pb))
        else:
            counted = F.pad(counted, (left, right, top, bottom))
        # mean of the window / mean of its counted positions = sum / count (both means divide by the window size)
        total = F.avg_pool2d(F.pad(x, (left, right, top, bottom)), self.kernel_size, self.stride)
        return total / F.avg_pool2d(counted, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pads4={self.pads4}"


def explicit_pads(module: nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d) -> Pads4:
    """(top, left, bottom, right) pads of a Conv2d, MaxPool2d or AvgPool2d (numeric padding)."""
    if isinstance(module, (PaddedConv2d, PaddedMaxPool2d, PaddedAvgPool2d)):
        return module.pads4
    padding = module.padding
    if isinstance(padding, str):
        raise NotImplementedError(f"string padding {padding!r} is not supported")
    ph, pw = _pair(padding)
    return (ph, pw, ph, pw)
