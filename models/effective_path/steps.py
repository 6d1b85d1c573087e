"""The execution plan's steps: one per supported module, each with a forward pass and the backward walk that
turns the selected neurons of its output into selected synapses and neurons of its input."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pathguard.models.effective_path.paths import LayerInfo
from pathguard.models.effective_path.selection import cat_ids, orient, row_cuts, select_above, select_pairs
from pathguard.models.networks.padding import PaddedMaxPool2d, Pads4, explicit_pads, window_pads

__all__ = [
    "AvgPoolStep",
    "ConvStep",
    "Ctx",
    "LinearStep",
    "MaxPoolStep",
    "PassStep",
    "PrefixStep",
    "ResidualStep",
    "Step",
    "run_backward",
    "run_forward",
]

_FEW_IMAGES = 16  # linear rows from at most this many images: broadcast the input rows instead of gathering
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class Ctx:
    """State of one batched extraction: ``n`` images, ``ranks`` stacked as rows ``r * n + i``.

    ``thresholds`` (weighted layer -> phi > 0) selects those layers' synapses by a sort-free rule
    (:func:`~pathguard.models.effective_path.selection.select_above`: the absolute one, or the relative one when
    ``relative``) instead of the cumulative one; ``cuts``, when set, collects per weighted layer the cumulative
    rule's cut of every row it processed (relative to the row's sum when ``relative``; profiling, see
    :func:`~pathguard.models.effective_path.extractor.profile_thresholds`).
    """

    n: int
    theta: float
    first: int  # index (forward order) of the first covered weighted layer
    ranks: int = 1
    thresholds: Mapping[str, float] = field(default_factory=dict)
    relative: bool = False
    cuts: dict[str, list[torch.Tensor]] | None = None
    acts: dict[int, object] = field(default_factory=dict)
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class Step:
    """One node of the plan. Masks are flat bool (B', F): B' = ranks * images, F = per-image size."""

    uid: int = 0
    w_end: int = 0  # weighted layers up to and including this step, in forward order
    child: int = -1  # index of the top-level child whose output this step produces (-1: none)
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()

    records = False  # whether backward needs this step's input activation

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, ctx: Ctx | None) -> torch.Tensor:
        self.record(x, ctx)
        return self.compute(x)

    def record(self, x: torch.Tensor, ctx: Ctx | None) -> None:
        if self.records and ctx is not None and self.w_end > ctx.first:
            ctx.acts[self.uid] = x

    def backward(self, mask: torch.Tensor, ctx: Ctx) -> torch.Tensor | None:
        return mask

    @property
    def in_size(self) -> int:
        return math.prod(self.in_shape)


class PrefixStep(Step):
    """Any module before the first weighted layer: part of the input, forward only."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backward(self, mask: torch.Tensor, ctx: Ctx) -> torch.Tensor | None:
        return None


class PassStep(Step):
    """ReLU, Dropout (eval), Identity, Flatten: the selected set passes through (masks are flat)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return x if isinstance(self.module, (nn.Dropout, nn.Identity)) else self.module(x)


def _rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected (row, position) pairs of a flat mask (B', F), sorted by row then position."""
    b, p = mask.nonzero().unbind(1)
    return b, p


def _chunks(n_rows: int, row_len: int) -> Iterable[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, row_len))
    for s in range(0, n_rows, step):
        yield slice(s, min(n_rows, s + step))


def _unique_rows(mask: torch.Tensor, ctx: Ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected (image, position) pairs of a flat mask (ranks*N, F), each neuron once across ranks.

    The selection of a neuron does not depend on which rank's walk reached it, so a neuron on both the
    rank-1 and the rank-2 path is processed once and its synapses are given to both (see :func:`_spread`).
    """
    if ctx.ranks == 1:
        return _rows(mask)
    return _rows(mask.view(ctx.ranks, ctx.n, -1).any(0))


def _spread(mask: torch.Tensor, ctx: Ctx, b: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For pairs whose output neuron is (image ``b``, position ``p``): (pair index, row of mask) per rank.

    Returns the pairs of rank 0, then rank 1, ...; the order within a rank is kept.
    """
    if ctx.ranks == 1:
        return torch.arange(b.numel()), b
    flat, size = mask.reshape(-1), mask.shape[1]
    idx, img = [], []
    for r in range(ctx.ranks):
        sel = flat[(b + r * ctx.n) * size + p].nonzero().squeeze(1)
        idx.append(sel)
        img.append(b.index_select(0, sel) + r * ctx.n)
    return torch.cat(idx), torch.cat(img)


class WeightedStep(Step):
    """Shared backward of Conv2d and Linear: contributions per selected output neuron, selection, ids."""

    records = True
    name: str
    info: LayerInfo
    bias: torch.Tensor

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def contributions(
        self, src: torch.Tensor, b: torch.Tensor, p: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[int, torch.Tensor], torch.Tensor] | None]:
        """Rows (P, fan_in) of contributions for output neurons (b, p); with padding, counts and validity."""
        raise NotImplementedError

    def in_positions(self, p: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """Flat per-image input index of the synapse (output position ``p``, column ``col``)."""
        raise NotImplementedError

    def backward(self, mask: torch.Tensor, ctx: Ctx) -> torch.Tensor | None:
        x = ctx.acts[self.uid]
        assert isinstance(x, torch.Tensor)
        src = self.prepare(x)
        b, p = _unique_rows(mask, ctx)
        o = p // self.info.out_points
        pair_rows, pair_cols = [], []
        phi = ctx.thresholds.get(self.name)
        for sl in _chunks(b.numel(), self.info.fan_in):
            c, nvalid, valid_rows = self.contributions(src, b[sl], p[sl])
            total = orient(c, None, self.bias.index_select(0, o[sl]))
            if phi is not None:
                rr, col = select_above(c, phi, total if ctx.relative else None)
            else:
                rr, col = select_pairs(c, total, ctx.theta, nvalid, valid_rows)
                if ctx.cuts is not None:
                    ctx.cuts.setdefault(self.name, []).append(row_cuts(c, rr, col, total if ctx.relative else None))
            pair_rows.append(rr + sl.start)
            pair_cols.append(col)
        rows, cols = cat_ids(pair_rows), cat_ids(pair_cols)
        pp = p.index_select(0, rows)
        sel, img = _spread(mask, ctx, b.index_select(0, rows), pp)
        ids = (pp * self.info.fan_in + cols).index_select(0, sel)
        in_mask = torch.zeros(mask.shape[0], self.in_size, dtype=torch.bool)
        in_mask[img, self.in_positions(pp, cols).index_select(0, sel)] = True
        ctx.found[self.name] = (img, ids)
        return in_mask


class LinearStep(WeightedStep):
    def __init__(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.name = name
        self.weight = weight.detach().float().contiguous()  # (O, I)
        out = weight.shape[0]
        self.bias = torch.zeros(out) if bias is None else bias.detach().float()
        self.info = LayerInfo(name, "linear", out, 1, weight.shape[1])

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def contributions(
        self, src: torch.Tensor, b: torch.Tensor, p: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[int, torch.Tensor], torch.Tensor] | None]:
        c = self.weight.index_select(0, p)  # (P, I): one allocation, multiplied in place
        first, last = int(b[0]), int(b[-1])  # rows are sorted by image
        if last - first < _FEW_IMAGES:
            counts = torch.bincount(b - first, minlength=last - first + 1).tolist()
            for img, seg in zip(range(first, last + 1), c.split(counts), strict=True):
                seg.mul_(src[img])  # broadcast one input row over its output neurons
        else:
            c.mul_(src.index_select(0, b))
        return c, None, None

    def in_positions(self, p: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        return col


def _index_map(
    in_shape: tuple[int, int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pads: Pads4,
    dil: tuple[int, int],
) -> torch.Tensor:
    """(L, KH*KW) flat spatial input index ``h*W + w`` of each window position; -1 in the padding.

    ``pads`` = (top, left, bottom, right); the windows are those of the padded input (floor mode).
    """
    _, h, w = in_shape
    top, left, bottom, right = pads
    oh_n = (h + top + bottom - dil[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow_n = (w + left + right - dil[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    hh = torch.arange(oh_n)[:, None] * stride[0] - top + torch.arange(kernel[0])[None, :] * dil[0]  # (OH, KH)
    ww = torch.arange(ow_n)[:, None] * stride[1] - left + torch.arange(kernel[1])[None, :] * dil[1]  # (OW, KW)
    h4, w4 = hh[:, None, :, None], ww[None, :, None, :]  # (OH, 1, KH, 1), (1, OW, 1, KW)
    inside = (h4 >= 0) & (h4 < h) & (w4 >= 0) & (w4 < w)
    return torch.where(inside, h4 * w + w4, -1).reshape(oh_n * ow_n, kernel[0] * kernel[1])


def _windows(
    x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], pads: Pads4, dil: tuple[int, int]
) -> torch.Tensor:
    """Sliding windows of ``x`` (N, C, H, W) as a view (N, OH, OW, C, KH, KW), zero padded by ``pads`` = (top,
    left, bottom, right).

    Equivalent to ``F.unfold`` (same column order after reshaping the last three axes) but built from
    strided views: ``F.unfold``'s CPU kernel is orders of magnitude slower on small channel counts.
    """
    if pads != (0, 0, 0, 0):
        x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
    span = (dil[0] * (kernel[0] - 1) + 1, dil[1] * (kernel[1] - 1) + 1)
    v = x.unfold(2, span[0], stride[0]).unfold(3, span[1], stride[1])  # (N, C, OH, OW, spanH, spanW)
    v = v[..., :: dil[0], :: dil[1]]  # (N, C, OH, OW, KH, KW)
    return v.permute(0, 2, 3, 1, 4, 5)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class ConvStep(WeightedStep):
    def __init__(self, name: str, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise NotImplementedError(f"{name}: only numeric zero padding is supported")
        self.name = name
        self.kernel, self.stride = _pair(conv.kernel_size), _pair(conv.stride)
        self.pads, self.dil = explicit_pads(conv), _pair(conv.dilation)  # (top, left, bottom, right)
        self.groups = conv.groups
        self.weight4 = weight.detach().float().contiguous()  # (O, Cg, KH, KW)
        out = weight.shape[0]
        self.weight = self.weight4.view(out, -1)  # (O, Cg*KH*KW)
        self.bias = torch.zeros(out) if bias is None else bias.detach().float()

    def setup(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        c, h, w = in_shape
        o, oh, ow = out_shape
        self.in_shape, self.out_shape = in_shape, out_shape
        self.info = LayerInfo(self.name, "conv", o, oh * ow, self.weight.shape[1])
        spatial = _index_map((c, h, w), self.kernel, self.stride, self.pads, self.dil)  # (L, KK)
        cg, kk = c // self.groups, spatial.shape[1]
        chan = torch.arange(cg).repeat_interleave(kk) * (h * w)  # (Cg*KK,) channel offset, unfold order
        sp = spatial.repeat(1, cg)  # (L, Cg*KK)
        self.in_index = torch.where(sp >= 0, sp + chan, -1)  # (L, Cg*KK) within-group flat input index
        self.group_size = cg * h * w
        self.out_per_group = o // self.groups
        wp = w + self.pads[1] + self.pads[3]
        kh, kw = torch.arange(self.kernel[0]), torch.arange(self.kernel[1])
        self.offsets = ((kh * self.dil[0] * wp)[:, None] + (kw * self.dil[1])[None, :]).reshape(-1)  # (KK,)
        rows, cols = torch.arange(oh) * self.stride[0], torch.arange(ow) * self.stride[1]
        self.origin = (rows[:, None] * wp + cols[None, :]).reshape(-1)  # (L,) window corner, padded plane
        padded = bool((sp < 0).any())
        self.valid = (sp >= 0) if padded else None
        self.nvalid = (sp >= 0).sum(1) if padded else None  # (L,)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        top, left, bottom, right = self.pads
        if (top, left) == (bottom, right):
            return F.conv2d(x, self.weight4, self.bias, self.stride, (top, left), self.dil, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight4, self.bias, self.stride, 0, self.dil, self.groups)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The zero-padded input, channels last, one row per (image, padded position): (N*Hp*Wp, C)."""
        xp = F.pad(x, (self.pads[1], self.pads[3], self.pads[0], self.pads[2]))
        return xp.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    def contributions(
        self, src: torch.Tensor, b: torch.Tensor, p: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[int, torch.Tensor], torch.Tensor] | None]:
        points = self.info.out_points
        o, l_pos = p // points, p % points
        g = o // self.out_per_group
        # each distinct (image, position) window is gathered once, then shared by its output channels
        uniq, inv = torch.unique(b * points + l_pos, return_inverse=True)
        windows = self._gather_windows(src, uniq // points, uniq % points)  # (U*G, Cg*KK)
        c = self.weight.index_select(0, o).mul_(windows.index_select(0, inv * self.groups + g))  # (P, Cg*KK)
        if self.valid is None or self.nvalid is None:
            return c, None, None
        valid = self.valid
        return c, self.nvalid.index_select(0, l_pos), lambda _, rows: valid.index_select(0, l_pos[rows])

    def _gather_windows(self, src: torch.Tensor, b: torch.Tensor, l_pos: torch.Tensor) -> torch.Tensor:
        """Windows of (image ``b``, output position ``l_pos``) in F.unfold column order: (U*G, Cg*KK)."""
        c_in = src.shape[1]
        plane = (self.in_shape[1] + self.pads[0] + self.pads[2]) * (self.in_shape[2] + self.pads[1] + self.pads[3])
        pos = (b * plane + self.origin.index_select(0, l_pos))[:, None] + self.offsets  # (U, KK) padded rows
        win = src.index_select(0, pos.reshape(-1)).view(b.numel(), -1, c_in)  # (U, KK, C)
        return win.transpose(1, 2).reshape(b.numel() * self.groups, self.info.fan_in)

    def in_positions(self, p: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        points = self.info.out_points
        g = (p // points) // self.out_per_group
        return self.in_index[p % points, col] + g * self.group_size


class MaxPoolStep(Step):
    """The selected output takes the input holding the window maximum (first in window order on ties)."""

    records = True

    def __init__(self, module: nn.MaxPool2d) -> None:
        self.module = module
        k, st = _pair(module.kernel_size), _pair(module.stride if module.stride is not None else module.kernel_size)
        plain = k == st and explicit_pads(module) == (0, 0, 0, 0) and _pair(module.dilation) == (1, 1)
        self.tile = k if plain and not module.ceil_mode else None  # non-overlapping tiles: reshape + amax
        self.pads: Pads4 | None = None  # pads applied here (with -inf) before pooling; None: torch's own padding

    def setup(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        if self.tile is not None and (in_shape[1] % self.tile[0] or in_shape[2] % self.tile[1]):
            self.tile = None
        m = self.module
        if isinstance(m, PaddedMaxPool2d):
            k, st, dil = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
            self.pads = window_pads(m.pads4, k, st, dil, (in_shape[1], in_shape[2]), (out_shape[1], out_shape[2]))

    def _tiles(self, x: torch.Tensor) -> torch.Tensor:
        assert self.tile is not None
        n, c, h, w = x.shape
        (kh, kw) = self.tile
        return x.view(n, c, h // kh, kh, w // kw, kw)  # (N, C, OH, KH, OW, KW)

    def _pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output and the flat index ``h*W + w`` of each window's maximum within the (unpadded) input plane."""
        m = self.module
        if self.pads is None:
            return F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)
        top, left, bottom, right = self.pads
        xp = F.pad(x, (left, right, top, bottom), value=-math.inf)
        out, idx = F.max_pool2d(xp, m.kernel_size, m.stride, 0, m.dilation, False, return_indices=True)
        wp = x.shape[3] + left + right
        return out, (idx // wp - top) * x.shape[3] + idx % wp - left

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        if self.tile is not None and x.shape[2] % self.tile[0] == 0 and x.shape[3] % self.tile[1] == 0:
            return self._tiles(x).amax((3, 5))
        return self.module(x)

    def record(self, x: torch.Tensor, ctx: Ctx | None) -> None:
        if ctx is not None and self.w_end > ctx.first:
            ctx.acts[self.uid] = x if self.tile is not None else self._pool(x)[1]

    def forward(self, x: torch.Tensor, ctx: Ctx | None) -> torch.Tensor:
        if self.tile is not None or ctx is None or self.w_end <= ctx.first:
            self.record(x, ctx)
            return self.compute(x)
        out, idx = self._pool(x)
        ctx.acts[self.uid] = idx
        return out

    def backward(self, mask: torch.Tensor, ctx: Ctx) -> torch.Tensor | None:
        act = ctx.acts[self.uid]
        assert isinstance(act, torch.Tensor)
        b, p = _rows(mask)
        out_w = self.out_shape[2]
        out_points = self.out_shape[1] * out_w
        chan, l_pos = p // out_points, p % out_points
        plane = self.in_shape[1] * self.in_shape[2]
        if self.tile is not None:  # argmax over the selected windows only (first maximum in window order)
            (kh, kw), oh, ow = self.tile, l_pos // out_w, l_pos % out_w
            win = self._tiles(act)[b % ctx.n, chan, oh, :, ow, :].reshape(-1, kh * kw)  # (P, KH*KW)
            arg = win.argmax(1)
            local = (oh * kh + arg // kw) * self.in_shape[2] + ow * kw + arg % kw
        else:
            local = act.reshape(act.shape[0], -1)[b % ctx.n, p]  # torch's flat index within the plane
        in_mask = torch.zeros(mask.shape[0], self.in_size, dtype=torch.bool)
        in_mask[b, chan * plane + local] = True
        return in_mask


class AvgPoolStep(Step):
    """AvgPool2d (also ceil mode and four-sided pads) and AdaptiveAvgPool2d (dividing output size): the selection
    rule on the window values (the positive divisor does not change it)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def setup(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        self.in_shape, self.out_shape = in_shape, out_shape
        _, h, w = in_shape
        _, oh, ow = out_shape
        m = self.module
        if isinstance(m, nn.AdaptiveAvgPool2d):
            if h % oh or w % ow:
                raise NotImplementedError("AdaptiveAvgPool2d needs an output size that divides the input size")
            self.kernel = self.stride = (h // oh, w // ow)
            self.pads: Pads4 = (0, 0, 0, 0)
        else:
            assert isinstance(m, nn.AvgPool2d)
            self.kernel = _pair(m.kernel_size)
            self.stride = _pair(m.stride if m.stride is not None else m.kernel_size)
            # ceil mode: the part of a last window past the padded input is padding too
            self.pads = window_pads(explicit_pads(m), self.kernel, self.stride, (1, 1), (h, w), (oh, ow))
        self.in_index = _index_map((1, h, w), self.kernel, self.stride, self.pads, (1, 1))  # (L, KK)
        self.valid = (self.in_index >= 0) if bool((self.in_index < 0).any()) else None

    records = True

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backward(self, mask: torch.Tensor, ctx: Ctx) -> torch.Tensor | None:
        x = ctx.acts[self.uid]
        assert isinstance(x, torch.Tensor)
        _, ch, h, w = x.shape
        cols = _windows(x, self.kernel, self.stride, self.pads, (1, 1)).transpose(1, 3)  # (N, C, OW, OH, KH, KW)
        cols = cols.transpose(2, 3).reshape(-1, self.kernel[0] * self.kernel[1])  # (N*C*L, KK)
        b, p = _rows(mask)
        points = self.in_index.shape[0]
        chan, l_pos = p // points, p % points
        c = cols.index_select(0, ((b % ctx.n) * ch + chan) * points + l_pos)  # (P, KK); the 1/n weight is > 0
        nvalid = valid_rows = None
        if self.valid is not None:
            valid = self.valid
            nvalid = valid.sum(1).index_select(0, l_pos)
            valid_rows = lambda _, rows: valid.index_select(0, l_pos[rows])  # noqa: E731
        rr, col = select_pairs(c, orient(c, None), ctx.theta, nvalid, valid_rows)
        in_mask = torch.zeros(mask.shape[0], self.in_size, dtype=torch.bool)
        pos = chan.index_select(0, rr) * (h * w) + self.in_index[l_pos.index_select(0, rr), col]
        in_mask[b.index_select(0, rr), pos] = True
        return in_mask


class ResidualStep(Step):
    """``shortcut(x) + body(x)``: the selection rule on the two branch values of every selected neuron."""

    def __init__(self, body: list[Step], shortcut: list[Step]) -> None:
        self.body, self.shortcut = body, shortcut

    records = True  # its forward records the branch values (and the inner steps' inputs)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x, None)

    def forward(self, x: torch.Tensor, ctx: Ctx | None) -> torch.Tensor:
        skip = run_forward(self.shortcut, x, ctx)
        main = run_forward(self.body, x, ctx)
        if ctx is not None and self.w_end > ctx.first:
            ctx.acts[self.uid] = (skip.reshape(skip.shape[0], -1), main.reshape(main.shape[0], -1))
        return skip + main

    def backward(self, mask: torch.Tensor, ctx: Ctx) -> torch.Tensor | None:
        pair = ctx.acts[self.uid]
        assert isinstance(pair, tuple)
        skip, main = pair  # (N, F) each
        b, p = _rows(mask)
        bn = b % ctx.n
        c = torch.stack([skip[bn, p], main[bn, p]], 1)  # (P, 2)
        rr, col = select_pairs(c, orient(c, None), ctx.theta)
        branch = [torch.zeros_like(mask), torch.zeros_like(mask)]
        for k in (0, 1):
            sel = rr[col == k]
            branch[k][b[sel], p[sel]] = True
        from_skip = run_backward(self.shortcut, branch[0], ctx) if self.shortcut else branch[0]
        from_body = run_backward(self.body, branch[1], ctx)
        if from_skip is None or from_body is None:
            return from_skip if from_body is None else from_body
        return from_skip | from_body


def run_forward(steps: Sequence[Step], x: torch.Tensor, ctx: Ctx | None) -> torch.Tensor:
    for step in steps:
        x = step.forward(x, ctx)
    return x


def run_backward(steps: Sequence[Step], mask: torch.Tensor, ctx: Ctx) -> torch.Tensor | None:
    out: torch.Tensor | None = mask
    for step in reversed(steps):
        if step.w_end <= ctx.first or out is None:
            return None
        out = step.backward(out, ctx)
    return out
