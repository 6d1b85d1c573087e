"""Effective Path extraction (Qiu et al., CVPR 2019, Eq. 1-3), batched and vectorized with torch.

For one active output neuron with pre-activation ``y`` and contributions ``c_i = x_i * w_i`` (bias excluded):

- if ``y < 0``, ``c`` is negated;
- if ``sum(c) <= 0`` or ``1 / len(c) >= theta``, only ``argmax(c)`` is selected (first index on ties);
- otherwise ``c`` is ordered by value, descending (lower index first on ties), and element ``j`` is kept iff
  the sum of the elements before it is ``< theta * sum(c)`` and ``c_j > 0``.

The walk starts at the rank-r logit and goes backwards: the inputs of every selected synapse are the active
neurons of the layer below. Padded positions are never candidates (``len(c)`` counts real inputs only).

Synapse ids (per layer, the public contract of :func:`extract_effective_paths`):

- Linear with ``I`` inputs: ``o * I + i``;
- Conv2d with output (O, OH, OW) and kernel (Cg, KH, KW) (``Cg`` = input channels per group):
  ``((o * OH + oh) * OW + ow) * (Cg*KH*KW) + (c*KH + kh)*KW + kw`` (the ``F.unfold`` column order).

Vectorization: every selected output neuron is one row of contributions (its receptive field times its
kernel row, or its input vector times its weight row) and the selection runs on all rows of a layer at once,
for all images of a batch and both ranks (a neuron on both paths is processed once). Cheap passes settle most
rows (row-maximum rounds for short rows, blocked ``topk`` for long ones); only the rows still open are fully
sorted. See docs/effective_path.md.

Supported modules: Conv2d (stride, padding, dilation, groups), Linear, MaxPool2d, AvgPool2d,
AdaptiveAvgPool2d (output size dividing the input), BatchNorm after Conv2d/Linear (folded, eval statistics),
ReLU, Dropout, Identity, Flatten, nested ``nn.Sequential`` and :class:`Residual`. Modules before the first
weighted layer (e.g. the ``normalize`` affine map) are treated as part of the input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.classifiers import tap_points

__all__ = [
    "DEFAULT_THETA",
    "EffectivePathExtractor",
    "LayerInfo",
    "PathBatch",
    "Residual",
    "extract_effective_paths",
    "select_synapses",
]

DEFAULT_THETA = 0.5
_FEW_IMAGES = 16  # linear rows from at most this many images: broadcast the input rows instead of gathering
_SMALL_BLOCK = 1 << 15  # up to this many contributions, rows are sorted at once
_SHORT_ROW = 256  # rows up to this length use _max_steps first
_LONG_ROW = 2048  # rows at least this long skip the narrowest top-k pass
_MAX_STEPS = 8
_TOPK_STEPS = (8, 32, 128)  # widths of the partial passes before a full sort (each only if K > 2*width)
_CHUNK_ELEMENTS = 1 << 22
_PASS_THROUGH = (nn.ReLU, nn.Dropout, nn.Identity, nn.Flatten)
_PREFIX_OK = "only before the first Conv2d/Linear layer"


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


@dataclass(frozen=True)
class LayerInfo:
    """Geometry of one weighted layer's synapse id space.

    Attributes
    ----------
    name : str
        Module name as in ``model.named_modules()``.
    kind : str
        ``"conv"`` or ``"linear"``.
    out_channels : int
        O (output channels or output neurons).
    out_points : int
        OH * OW for a conv, 1 for a linear layer.
    fan_in : int
        Cg*KH*KW for a conv, the number of inputs for a linear layer.
    """

    name: str
    kind: str
    out_channels: int
    out_points: int
    fan_in: int

    @property
    def n_synapses(self) -> int:
        return self.out_channels * self.out_points * self.fan_in

    @property
    def n_weights(self) -> int:
        return self.out_channels * self.fan_in

    def weight_ids(self, synapse_ids: torch.Tensor) -> torch.Tensor:
        """Map synapse ids (any shape, int64) to weight ids ``o * fan_in + j`` (unique kernel entries)."""
        if self.kind == "linear":
            return synapse_ids
        o = synapse_ids // (self.out_points * self.fan_in)
        return o * self.fan_in + synapse_ids % self.fan_in


# --------------------------------------------------------------------------------------------------
# Selection rule
# --------------------------------------------------------------------------------------------------


def select_synapses(
    contrib: torch.Tensor,
    out_value: torch.Tensor | None = None,
    theta: float = DEFAULT_THETA,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply the per-neuron selection rule to many neurons at once.

    Parameters
    ----------
    contrib : torch.Tensor
        (R, K) float contributions ``x_i * w_i`` of R output neurons (bias excluded).
    out_value : torch.Tensor, optional
        (R,) pre-activation outputs ``y`` (with bias); rows with ``y < 0`` are negated.
        Default: the row sums of ``contrib``.
    theta : float
        Fraction of the (possibly negated) row sum the kept prefix must reach, in (0, 1].
    valid : torch.Tensor, optional
        (R, K) bool; False marks padded positions, which are ignored (never selected, not counted in K).

    Returns
    -------
    torch.Tensor
        (R, K) bool mask of selected contributions.
    """
    c = contrib.float().clone()
    r, k = c.shape
    nvalid = None
    if valid is not None:
        c.masked_fill_(~valid, 0.0)
        nvalid = valid.sum(1)
    total = _orient(c, out_value)
    rows, cols = _select_pairs(c, total, theta, nvalid, None if valid is None else valid.index_select)
    keep = torch.zeros(r, k, dtype=torch.bool)
    keep[rows, cols] = True
    return keep


def _orient(c: torch.Tensor, y: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Negate in place the rows of ``c`` (R, K) whose output is negative; return the oriented row sums (R,).

    The output is ``y`` when given, else ``sum(c) + bias`` (bias (R,) defaults to 0).
    """
    total = c.sum(1)  # float32: a float64 reduction is ~30x slower on CPU
    out = y if y is not None else (total if bias is None else total + bias)
    neg = out < 0
    if bool(neg.any()):
        sign = 1.0 - 2.0 * neg.to(c.dtype)  # (R,) +-1
        c.mul_(sign[:, None])
        total = total * sign
    return total


def _select_pairs(
    c: torch.Tensor,
    total: torch.Tensor,
    theta: float,
    nvalid: torch.Tensor | None = None,
    valid_rows: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected (row, column) pairs of oriented rows, sorted by row then column.

    Parameters
    ----------
    c : torch.Tensor
        (R, K) oriented contributions; padded positions must hold 0.
    total : torch.Tensor
        (R,) oriented row sums.
    nvalid : torch.Tensor, optional
        (R,) number of real (non-padded) candidates per row; default K.
    valid_rows : callable, optional
        ``valid_rows(0, rows)`` -> (len(rows), K) bool validity of those rows (only needed with padding).
    """
    r, k = c.shape
    count = torch.full((r,), float(k)) if nvalid is None else nvalid.to(torch.float32)
    single = (total <= 0) | (1.0 / count >= theta)
    out_r, out_c = [], []
    rows = single.nonzero().squeeze(1)
    if rows.numel():
        sub = c.index_select(0, rows)
        if valid_rows is not None:
            sub = sub.masked_fill(~valid_rows(0, rows), -math.inf)
        best, col = sub.max(1)  # first maximal index on ties
        ok = best > -math.inf  # a receptive field lying entirely in the padding selects nothing
        out_r.append(rows[ok])
        out_c.append(col[ok])
    rows = (~single).nonzero().squeeze(1)
    if rows.numel():
        sub = c if rows.numel() == r else c.index_select(0, rows)
        pr, pc = _prefix_pairs(sub, theta * total.index_select(0, rows).double())
        out_r.append(rows.index_select(0, pr))
        out_c.append(pc)
    key = torch.sort(_cat(out_r) * k + _cat(out_c)).values
    return key // k, key % k


def _prefix_pairs(c: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest descending prefix reaching ``target`` per row: (row, column) pairs, unsorted.

    ``c`` (R, K), ``target`` (R,) float64. Short rows first go through :func:`_max_steps`; long rows through
    ``topk`` passes (widths :data:`_TOPK_STEPS`) that settle the rows whose values strictly above the k-th
    largest already reach the target and hold no tie among the positive ones (ties are ordered by column,
    which ``topk`` does not guarantee). Rows still open are sorted in full with a stable sort.
    """
    r, k = c.shape
    out_r, out_c = [], []
    rest = torch.arange(r)
    if r * k <= _SMALL_BLOCK:
        pass  # few elements: one stable sort beats several passes (per-op overhead dominates)
    elif k <= _SHORT_ROW:
        pr, pc, rest = _max_steps(c, target, _MAX_STEPS)
        out_r.append(pr)
        out_c.append(pc)
    for width in _TOPK_STEPS:
        if k >= _LONG_ROW and width < 32:
            continue  # on very long rows a narrow pass costs about as much as a wide one
        if k <= 2 * width or not rest.numel() or r * k <= _SMALL_BLOCK:
            break
        sub = c if rest.numel() == r else c.index_select(0, rest)
        vals, idx = _topk(sub, width)  # (R', width) descending
        above = vals > vals[:, -1:]
        sub_target = target.index_select(0, rest)
        reach = torch.where(above, vals, 0.0).sum(1).double() >= sub_target
        tie = ((vals[:, 1:] == vals[:, :-1]) & above[:, 1:] & (vals[:, 1:] > 0)).any(1)
        ok = reach & ~tie
        if not bool(ok.all()):
            rows = ok.nonzero().squeeze(1)
            vals, idx, sub_target = vals.index_select(0, rows), idx.index_select(0, rows), sub_target[rows]
            settled, rest = rest.index_select(0, rows), rest[~ok]
        else:
            settled, rest = rest, rest[:0]
        ri, pos = _prefix_mask(vals, sub_target).nonzero().unbind(1)
        out_r.append(settled.index_select(0, ri))
        out_c.append(idx[ri, pos])
    if rest.numel():
        sub = c if rest.numel() == r else c.index_select(0, rest)
        vals, idx = torch.sort(sub, dim=1, descending=True, stable=True)
        ri, pos = _prefix_mask(vals, target.index_select(0, rest)).nonzero().unbind(1)
        out_r.append(rest.index_select(0, ri))
        out_c.append(idx[ri, pos])
    return _cat(out_r), _cat(out_c)


def _max_steps(c: torch.Tensor, target: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to ``steps`` rounds of "take the row maximum": exact order (value desc, first index on ties).

    Returns the (row, column) pairs of the rows that finished, and the rows still open (to be redone).
    Each round costs one max pass over the rows still open; at theta 0.5 most rows finish in 2-5 rounds.
    If more than half of the rows are open after 4 rounds, the rest is left to the caller's sort.
    """
    r = c.shape[0]
    work = c.clone()
    active = torch.arange(r)
    before = torch.zeros(r, dtype=torch.float64)
    tgt = target
    rows, cols = [], []
    for step in range(steps):
        if step == 4 and active.numel() > r // 2:
            break  # long prefixes (high theta, flat contributions): a sort is cheaper than more rounds
        v, i = work.max(1)  # first maximal index on ties
        keep = (before < tgt) & (v > 0)
        rows.append(active[keep])
        cols.append(i[keep])
        before = before + v.double()
        going = keep & (before < tgt)
        if not bool(going.any()):
            return _cat(rows), _cat(cols), active[:0]
        sel = going.nonzero().squeeze(1)
        work, active, before, tgt = work.index_select(0, sel), active[sel], before[sel], tgt[sel]
        work[torch.arange(sel.numel()), i[sel]] = -math.inf
    open_rows = torch.zeros(r, dtype=torch.bool)
    open_rows[active] = True
    pr, pc = _cat(rows), _cat(cols)
    done = ~open_rows[pr]
    return pr[done], pc[done], active


def _block_size(k: int, width: int) -> int:
    """Divisor ``b`` of ``k`` minimizing the top-k work ``k/b + width*b`` (>= 2*width blocks); 0 if not worth it."""
    if k < 256:
        return 0
    sizes = [b for b in range(4, 129) if k % b == 0 and k // b >= 2 * width]
    best = min(sizes, key=lambda b: k // b + width * b, default=0)
    return best if best and k // best + width * best < k // 2 else 0


def _topk(c: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``c.topk(width, 1)`` for long rows via block maxima: (R, width) values and column indices.

    The ``width`` largest elements of a row lie in the ``width`` blocks with the largest maxima (a block
    holding one of them has a maximum at least the ``width``-th value; fewer than ``width`` blocks exceed
    it), so one cheap max pass plus ``topk`` over ``width`` gathered blocks returns the exact top values.
    Among elements equal to the ``width``-th value the indices may differ from ``topk``'s; callers only rely
    on the elements strictly above it.
    """
    r, k = c.shape
    bs = _block_size(k, width)
    if not bs:
        return c.topk(width, 1)
    blocks = c.view(r, k // bs, bs)  # (R, NB, B)
    best = blocks.amax(2).topk(width, 1).indices  # (R, width) block ids
    cand = blocks.gather(1, best[:, :, None].expand(r, width, bs)).reshape(r, width * bs)
    vals, pos = cand.topk(width, 1)
    cols = best.gather(1, pos // bs) * bs + pos % bs
    return vals, cols


def _prefix_mask(vals: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Keep sorted ``vals`` (R, k) whose exclusive prefix sum is below ``target`` (R,) and that are > 0."""
    cum = vals.double().cumsum(1)
    before = torch.cat([torch.zeros(vals.shape[0], 1, dtype=torch.float64), cum[:, :-1]], 1)
    return (before < target[:, None]) & (vals > 0)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


# --------------------------------------------------------------------------------------------------
# Execution plan: a flat description of the network, compiled once per input shape
# --------------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    """State of one batched extraction: ``n`` images, ``ranks`` stacked as rows ``r * n + i``."""

    n: int
    theta: float
    first: int  # index (forward order) of the first covered weighted layer
    ranks: int = 1
    acts: dict[int, object] = field(default_factory=dict)
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class _Step:
    """One node of the plan. Masks are flat bool (B', F): B' = ranks * images, F = per-image size."""

    uid: int = 0
    w_end: int = 0  # weighted layers up to and including this step, in forward order
    child: int = -1  # index of the top-level child whose output this step produces (-1: none)
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()

    records = False  # whether backward needs this step's input activation

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, ctx: _Ctx | None) -> torch.Tensor:
        self.record(x, ctx)
        return self.compute(x)

    def record(self, x: torch.Tensor, ctx: _Ctx | None) -> None:
        if self.records and ctx is not None and self.w_end > ctx.first:
            ctx.acts[self.uid] = x

    def backward(self, mask: torch.Tensor, ctx: _Ctx) -> torch.Tensor | None:
        return mask

    @property
    def in_size(self) -> int:
        return math.prod(self.in_shape)


class _Prefix(_Step):
    """Any module before the first weighted layer: part of the input, forward only."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backward(self, mask: torch.Tensor, ctx: _Ctx) -> torch.Tensor | None:
        return None


class _Pass(_Step):
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


def _unique_rows(mask: torch.Tensor, ctx: _Ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected (image, position) pairs of a flat mask (ranks*N, F), each neuron once across ranks.

    The selection of a neuron does not depend on which rank's walk reached it, so a neuron on both the
    rank-1 and the rank-2 path is processed once and its synapses are given to both (see :func:`_spread`).
    """
    if ctx.ranks == 1:
        return _rows(mask)
    return _rows(mask.view(ctx.ranks, ctx.n, -1).any(0))


def _spread(mask: torch.Tensor, ctx: _Ctx, b: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


class _Weighted(_Step):
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

    def backward(self, mask: torch.Tensor, ctx: _Ctx) -> torch.Tensor | None:
        x = ctx.acts[self.uid]
        assert isinstance(x, torch.Tensor)
        src = self.prepare(x)
        b, p = _unique_rows(mask, ctx)
        o = p // self.info.out_points
        pair_rows, pair_cols = [], []
        for sl in _chunks(b.numel(), self.info.fan_in):
            c, nvalid, valid_rows = self.contributions(src, b[sl], p[sl])
            total = _orient(c, None, self.bias.index_select(0, o[sl]))
            rr, col = _select_pairs(c, total, ctx.theta, nvalid, valid_rows)
            pair_rows.append(rr + sl.start)
            pair_cols.append(col)
        rows, cols = _cat(pair_rows), _cat(pair_cols)
        pp = p.index_select(0, rows)
        sel, img = _spread(mask, ctx, b.index_select(0, rows), pp)
        ids = (pp * self.info.fan_in + cols).index_select(0, sel)
        in_mask = torch.zeros(mask.shape[0], self.in_size, dtype=torch.bool)
        in_mask[img, self.in_positions(pp, cols).index_select(0, sel)] = True
        ctx.found[self.name] = (img, ids)
        return in_mask


class _Linear(_Weighted):
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
    pad: tuple[int, int],
    dil: tuple[int, int],
) -> torch.Tensor:
    """(L, KH*KW) flat spatial input index ``h*W + w`` of each window position; -1 in the padding."""
    _, h, w = in_shape
    oh_n = (h + 2 * pad[0] - dil[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow_n = (w + 2 * pad[1] - dil[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    hh = torch.arange(oh_n)[:, None] * stride[0] - pad[0] + torch.arange(kernel[0])[None, :] * dil[0]  # (OH, KH)
    ww = torch.arange(ow_n)[:, None] * stride[1] - pad[1] + torch.arange(kernel[1])[None, :] * dil[1]  # (OW, KW)
    h4, w4 = hh[:, None, :, None], ww[None, :, None, :]  # (OH, 1, KH, 1), (1, OW, 1, KW)
    inside = (h4 >= 0) & (h4 < h) & (w4 >= 0) & (w4 < w)
    return torch.where(inside, h4 * w + w4, -1).reshape(oh_n * ow_n, kernel[0] * kernel[1])


def _windows(
    x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int], dil: tuple[int, int]
) -> torch.Tensor:
    """Sliding windows of ``x`` (N, C, H, W) as a view (N, OH, OW, C, KH, KW), zero padded.

    Equivalent to ``F.unfold`` (same column order after reshaping the last three axes) but built from
    strided views: ``F.unfold``'s CPU kernel is orders of magnitude slower on small channel counts.
    """
    if pad != (0, 0):
        x = F.pad(x, (pad[1], pad[1], pad[0], pad[0]))
    span = (dil[0] * (kernel[0] - 1) + 1, dil[1] * (kernel[1] - 1) + 1)
    v = x.unfold(2, span[0], stride[0]).unfold(3, span[1], stride[1])  # (N, C, OH, OW, spanH, spanW)
    v = v[..., :: dil[0], :: dil[1]]  # (N, C, OH, OW, KH, KW)
    return v.permute(0, 2, 3, 1, 4, 5)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _Conv(_Weighted):
    def __init__(self, name: str, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise NotImplementedError(f"{name}: only numeric zero padding is supported")
        self.name = name
        self.kernel, self.stride = _pair(conv.kernel_size), _pair(conv.stride)
        self.pad, self.dil = _pair(conv.padding), _pair(conv.dilation)
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
        spatial = _index_map((c, h, w), self.kernel, self.stride, self.pad, self.dil)  # (L, KK)
        cg, kk = c // self.groups, spatial.shape[1]
        chan = torch.arange(cg).repeat_interleave(kk) * (h * w)  # (Cg*KK,) channel offset, unfold order
        sp = spatial.repeat(1, cg)  # (L, Cg*KK)
        self.in_index = torch.where(sp >= 0, sp + chan, -1)  # (L, Cg*KK) within-group flat input index
        self.group_size = cg * h * w
        self.out_per_group = o // self.groups
        wp = w + 2 * self.pad[1]
        kh, kw = torch.arange(self.kernel[0]), torch.arange(self.kernel[1])
        self.offsets = ((kh * self.dil[0] * wp)[:, None] + (kw * self.dil[1])[None, :]).reshape(-1)  # (KK,)
        rows, cols = torch.arange(oh) * self.stride[0], torch.arange(ow) * self.stride[1]
        self.origin = (rows[:, None] * wp + cols[None, :]).reshape(-1)  # (L,) window corner, padded plane
        padded = bool((sp < 0).any())
        self.valid = (sp >= 0) if padded else None
        self.nvalid = (sp >= 0).sum(1) if padded else None  # (L,)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight4, self.bias, self.stride, self.pad, self.dil, self.groups)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The zero-padded input, channels last, one row per (image, padded position): (N*Hp*Wp, C)."""
        xp = F.pad(x, (self.pad[1], self.pad[1], self.pad[0], self.pad[0]))
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
        plane = (self.in_shape[1] + 2 * self.pad[0]) * (self.in_shape[2] + 2 * self.pad[1])
        pos = (b * plane + self.origin.index_select(0, l_pos))[:, None] + self.offsets  # (U, KK) padded rows
        win = src.index_select(0, pos.reshape(-1)).view(b.numel(), -1, c_in)  # (U, KK, C)
        return win.transpose(1, 2).reshape(b.numel() * self.groups, self.info.fan_in)

    def in_positions(self, p: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        points = self.info.out_points
        g = (p // points) // self.out_per_group
        return self.in_index[p % points, col] + g * self.group_size


class _MaxPool(_Step):
    """The selected output takes the input holding the window maximum (first in window order on ties)."""

    records = True

    def __init__(self, module: nn.MaxPool2d) -> None:
        self.module = module
        k, st = _pair(module.kernel_size), _pair(module.stride if module.stride is not None else module.kernel_size)
        plain = k == st and _pair(module.padding) == (0, 0) and _pair(module.dilation) == (1, 1)
        self.tile = k if plain and not module.ceil_mode else None  # non-overlapping tiles: reshape + amax

    def setup(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        if self.tile is not None and (in_shape[1] % self.tile[0] or in_shape[2] % self.tile[1]):
            self.tile = None

    def _tiles(self, x: torch.Tensor) -> torch.Tensor:
        assert self.tile is not None
        n, c, h, w = x.shape
        (kh, kw) = self.tile
        return x.view(n, c, h // kh, kh, w // kw, kw)  # (N, C, OH, KH, OW, KW)

    def _pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.module
        return F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        if self.tile is not None and x.shape[2] % self.tile[0] == 0 and x.shape[3] % self.tile[1] == 0:
            return self._tiles(x).amax((3, 5))
        return self.module(x)

    def record(self, x: torch.Tensor, ctx: _Ctx | None) -> None:
        if ctx is not None and self.w_end > ctx.first:
            ctx.acts[self.uid] = x if self.tile is not None else self._pool(x)[1]

    def forward(self, x: torch.Tensor, ctx: _Ctx | None) -> torch.Tensor:
        if self.tile is not None or ctx is None or self.w_end <= ctx.first:
            self.record(x, ctx)
            return self.compute(x)
        out, idx = self._pool(x)
        ctx.acts[self.uid] = idx
        return out

    def backward(self, mask: torch.Tensor, ctx: _Ctx) -> torch.Tensor | None:
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


class _AvgPool(_Step):
    """AvgPool2d and AdaptiveAvgPool2d (dividing output size): the selection rule on the window values."""

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
            self.pad = (0, 0)
        else:
            assert isinstance(m, nn.AvgPool2d)
            if m.ceil_mode:
                raise NotImplementedError("AvgPool2d with ceil_mode=True is not supported")
            self.kernel, self.pad = _pair(m.kernel_size), _pair(m.padding)
            self.stride = _pair(m.stride if m.stride is not None else m.kernel_size)
        self.in_index = _index_map((1, h, w), self.kernel, self.stride, self.pad, (1, 1))  # (L, KK)
        self.valid = (self.in_index >= 0) if bool((self.in_index < 0).any()) else None

    records = True

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backward(self, mask: torch.Tensor, ctx: _Ctx) -> torch.Tensor | None:
        x = ctx.acts[self.uid]
        assert isinstance(x, torch.Tensor)
        _, ch, h, w = x.shape
        cols = _windows(x, self.kernel, self.stride, self.pad, (1, 1)).transpose(1, 3)  # (N, C, OW, OH, KH, KW)
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
        rr, col = _select_pairs(c, _orient(c, None), ctx.theta, nvalid, valid_rows)
        in_mask = torch.zeros(mask.shape[0], self.in_size, dtype=torch.bool)
        pos = chan.index_select(0, rr) * (h * w) + self.in_index[l_pos.index_select(0, rr), col]
        in_mask[b.index_select(0, rr), pos] = True
        return in_mask


class _Residual(_Step):
    """``shortcut(x) + body(x)``: the selection rule on the two branch values of every selected neuron."""

    def __init__(self, body: list[_Step], shortcut: list[_Step]) -> None:
        self.body, self.shortcut = body, shortcut

    records = True  # its forward records the branch values (and the inner steps' inputs)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x, None)

    def forward(self, x: torch.Tensor, ctx: _Ctx | None) -> torch.Tensor:
        skip = _run_forward(self.shortcut, x, ctx)
        main = _run_forward(self.body, x, ctx)
        if ctx is not None and self.w_end > ctx.first:
            ctx.acts[self.uid] = (skip.reshape(skip.shape[0], -1), main.reshape(main.shape[0], -1))
        return skip + main

    def backward(self, mask: torch.Tensor, ctx: _Ctx) -> torch.Tensor | None:
        pair = ctx.acts[self.uid]
        assert isinstance(pair, tuple)
        skip, main = pair  # (N, F) each
        b, p = _rows(mask)
        bn = b % ctx.n
        c = torch.stack([skip[bn, p], main[bn, p]], 1)  # (P, 2)
        rr, col = _select_pairs(c, _orient(c, None), ctx.theta)
        branch = [torch.zeros_like(mask), torch.zeros_like(mask)]
        for k in (0, 1):
            sel = rr[col == k]
            branch[k][b[sel], p[sel]] = True
        from_skip = _run_backward(self.shortcut, branch[0], ctx) if self.shortcut else branch[0]
        from_body = _run_backward(self.body, branch[1], ctx)
        if from_skip is None or from_body is None:
            return from_skip if from_body is None else from_body
        return from_skip | from_body


def _run_forward(steps: Sequence[_Step], x: torch.Tensor, ctx: _Ctx | None) -> torch.Tensor:
    for step in steps:
        x = step.forward(x, ctx)
    return x


def _run_backward(steps: Sequence[_Step], mask: torch.Tensor, ctx: _Ctx) -> torch.Tensor | None:
    out: torch.Tensor | None = mask
    for step in reversed(steps):
        if step.w_end <= ctx.first or out is None:
            return None
        out = step.backward(out, ctx)
    return out


# --------------------------------------------------------------------------------------------------
# Compilation of an nn.Module into a plan
# --------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    steps: list[_Step]
    layers: list[LayerInfo]
    input_shape: tuple[int, ...]


class _Compiler:
    def __init__(self) -> None:
        self.uid = 0
        self.layers: list[LayerInfo] = []

    def compile(self, model: nn.Module, input_shape: tuple[int, ...]) -> _Plan:
        children = list(model.named_children()) if isinstance(model, nn.Sequential) else [("", model)]
        steps, _ = self._sequence(children, "", input_shape, top=True)
        if not self.layers:
            raise NotImplementedError("the model has no Conv2d or Linear layer")
        return _Plan(steps, self.layers, input_shape)

    def _sequence(
        self, children: list[tuple[str, nn.Module]], prefix: str, shape: tuple[int, ...], top: bool = False
    ) -> tuple[list[_Step], tuple[int, ...]]:
        steps: list[_Step] = []
        i = 0
        while i < len(children):
            name, mod = children[i]
            nxt = children[i + 1][1] if i + 1 < len(children) else None
            new, consumed = self._module(prefix + name, mod, nxt, shape)
            for step in new:
                step.child = i + consumed - 1 if top else -1
                shape = step.out_shape
            steps += new
            i += consumed
        return steps, shape

    def _module(
        self, name: str, mod: nn.Module, nxt: nn.Module | None, shape: tuple[int, ...]
    ) -> tuple[list[_Step], int]:
        """Steps for ``mod`` (and a BatchNorm ``nxt`` folded into it); returns (steps, children consumed)."""
        if isinstance(mod, nn.Sequential):
            steps, _ = self._sequence(list(mod.named_children()), name + ".", shape)
            return steps, 1
        if isinstance(mod, Residual):
            body, out = self._sequence(_children(mod.body), name + ".body" + ("." if _is_seq(mod.body) else ""), shape)
            short: list[_Step] = []
            if mod.shortcut is not None:
                sc_prefix = name + ".shortcut" + ("." if _is_seq(mod.shortcut) else "")
                short, _ = self._sequence(_children(mod.shortcut), sc_prefix, shape)
            return [self._finish(_Residual(body, short), shape, out, weighted=False)], 1
        fold = isinstance(mod, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d)
        fold |= isinstance(mod, nn.Linear) and isinstance(nxt, nn.BatchNorm1d)
        step = self._leaf(name, mod, nxt if fold else None, shape)
        out = tuple(step.compute(torch.zeros(1, *shape)).shape[1:])
        if isinstance(step, (_Conv, _AvgPool, _MaxPool)):
            step.setup(shape, out)
        weighted = isinstance(step, (_Conv, _Linear))
        if weighted:
            self.layers.append(step.info)  # type: ignore[attr-defined]
        return [self._finish(step, shape, out, weighted)], 2 if fold else 1

    def _finish(self, step: _Step, shape: tuple[int, ...], out: tuple[int, ...], weighted: bool) -> _Step:
        step.uid, self.uid = self.uid, self.uid + 1
        step.in_shape, step.out_shape = shape, out
        step.w_end = len(self.layers)
        return step

    def _leaf(self, name: str, mod: nn.Module, bn: nn.Module | None, shape: tuple[int, ...]) -> _Step:
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            weight, bias = _folded(mod, bn)
            if isinstance(mod, nn.Conv2d):
                return _Conv(name, mod, weight, bias)
            return _Linear(name, weight, bias)
        if isinstance(mod, nn.MaxPool2d):
            return _MaxPool(mod)
        if isinstance(mod, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            return _AvgPool(mod)
        if isinstance(mod, _PASS_THROUGH):
            if isinstance(mod, nn.Flatten) and mod.start_dim != 1:
                raise NotImplementedError(f"{name}: Flatten must keep the batch axis (start_dim=1)")
            return _Pass(mod)
        if not self.layers:
            return _Prefix(mod)
        raise NotImplementedError(f"{name}: {type(mod).__name__} is supported {_PREFIX_OK}")


def _is_seq(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Sequential)


def _children(mod: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(mod.named_children()) if isinstance(mod, nn.Sequential) else [("", mod)]


@torch.no_grad()
def _folded(mod: nn.Conv2d | nn.Linear, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of ``mod`` with an eval-mode BatchNorm ``bn`` folded in (same formula as fold_batchnorm)."""
    if bn is None:
        return mod.weight, mod.bias
    assert isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d))
    assert bn.running_var is not None and bn.running_mean is not None
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
    scale = gamma / torch.sqrt(bn.running_var + bn.eps)  # (O,)
    bias = mod.bias if mod.bias is not None else torch.zeros_like(scale)
    weight = mod.weight * scale.view(-1, *([1] * (mod.weight.dim() - 1)))
    return weight, (bias - bn.running_mean) * scale + beta


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class PathBatch:
    """Effective paths of N images, per rank and layer in CSR form.

    Attributes
    ----------
    logits : torch.Tensor
        (N, K) float32.
    classes : dict[int, torch.Tensor]
        rank -> (N,) int64 class at that rank (rank 1 = prediction).
    layers : list[str]
        Weighted layers covered, in forward order.
    ids : dict[int, dict[str, torch.Tensor]]
        rank -> layer -> concatenated sorted synapse ids of all images, int64.
    offsets : dict[int, dict[str, torch.Tensor]]
        rank -> layer -> (N+1,) int64; image i owns ``ids[offsets[i]:offsets[i+1]]``.
    theta : float
        Selection threshold used.
    """

    logits: torch.Tensor
    classes: dict[int, torch.Tensor]
    layers: list[str]
    ids: dict[int, dict[str, torch.Tensor]]
    offsets: dict[int, dict[str, torch.Tensor]]
    theta: float = DEFAULT_THETA

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    @property
    def ranks(self) -> list[int]:
        return sorted(self.ids)

    def counts(self, rank: int, layer: str) -> torch.Tensor:
        """(N,) int64 number of selected synapses per image."""
        return self.offsets[rank][layer].diff()

    def image(self, rank: int, i: int) -> dict[str, torch.Tensor]:
        """Synapse ids of image ``i``: layer -> sorted 1-D int64 tensor."""
        out = {}
        for name in self.layers:
            off = self.offsets[rank][name]
            out[name] = self.ids[rank][name][int(off[i]) : int(off[i + 1])]
        return out

    def per_image(self, rank: int = 1) -> list[dict[str, torch.Tensor]]:
        return [self.image(rank, i) for i in range(len(self))]

    @staticmethod
    def concat(batches: Sequence[PathBatch]) -> PathBatch:
        """Concatenate batches extracted with the same layers, ranks and theta."""
        first = batches[0]
        ids: dict[int, dict[str, torch.Tensor]] = {r: {} for r in first.ranks}
        offsets: dict[int, dict[str, torch.Tensor]] = {r: {} for r in first.ranks}
        for r in first.ranks:
            for name in first.layers:
                ids[r][name] = torch.cat([pb.ids[r][name] for pb in batches])
                counts = torch.cat([pb.counts(r, name) for pb in batches])
                offsets[r][name] = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        classes = {r: torch.cat([pb.classes[r] for pb in batches]) for r in first.ranks}
        logits = torch.cat([pb.logits for pb in batches])
        return PathBatch(logits, classes, list(first.layers), ids, offsets, first.theta)


# --------------------------------------------------------------------------------------------------
# Public extractor
# --------------------------------------------------------------------------------------------------


class EffectivePathExtractor:
    """Batched Effective Path extraction for a (possibly tapped) sequential classifier.

    Parameters
    ----------
    model : nn.Module
        An ``nn.Sequential`` (e.g. :class:`~models.classifiers.TappedSequential`) of supported modules,
        used in eval semantics (Dropout off, BatchNorm running statistics).
    theta : float
        Selection threshold in (0, 1]; the paper's default is 0.5.
    last_k : int, optional
        Extract only the last ``k`` weighted layers (partial extraction); ``None`` = all layers.
    batch_size : int
        Images per internal batch (bounds memory together with the row chunking).
    input_shape : tuple of int, optional
        (C, H, W); default ``model.config.input_shape`` or the shape of the first input seen.
    """

    def __init__(
        self,
        model: nn.Module,
        theta: float = DEFAULT_THETA,
        last_k: int | None = None,
        batch_size: int = 256,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        if not 0.0 < theta <= 1.0:
            raise ValueError(f"theta must be in (0, 1], got {theta}")
        if last_k is not None and last_k < 1:
            raise ValueError(f"last_k must be >= 1, got {last_k}")
        self.model = model
        self.theta = float(theta)
        self.last_k = last_k
        self.batch_size = int(batch_size)
        config = getattr(model, "config", None)
        self.input_shape = input_shape or getattr(config, "input_shape", None)
        self._plan: _Plan | None = None
        self._taps = tap_points(model) if isinstance(model, nn.Sequential) else {}

    # ---- geometry -------------------------------------------------------------------------------

    def _get_plan(self, shape: tuple[int, ...] | None = None) -> _Plan:
        if self._plan is None or (shape is not None and tuple(shape) != self._plan.input_shape):
            shape = tuple(shape) if shape is not None else self.input_shape
            if shape is None:
                raise ValueError("input shape unknown: pass input_shape or extract from an input first")
            with torch.no_grad():
                self._plan = _Compiler().compile(self.model, tuple(shape))
        return self._plan

    @property
    def all_layers(self) -> list[str]:
        """Every weighted layer (Conv2d/Linear) in forward order."""
        return [info.name for info in self._get_plan().layers]

    @property
    def layers(self) -> list[str]:
        """The weighted layers covered (the last ``last_k`` if set), in forward order."""
        names = self.all_layers
        return names if self.last_k is None else names[-self.last_k :]

    @property
    def layer_info(self) -> dict[str, LayerInfo]:
        """Synapse id geometry of every covered layer."""
        plan = self._get_plan()
        return {info.name: info for info in plan.layers if info.name in self.layers}

    @property
    def required_taps(self) -> list[str]:
        """Tap names :meth:`extract_from_taps` reads when all taps are given (the rest is not needed)."""
        plan = self._get_plan()
        ctx = _Ctx(n=1, theta=self.theta, first=len(plan.layers) - len(self.layers))
        fake = {name: torch.zeros(1, 1) for name in self._taps.values()}
        read: list[str] = []
        with torch.inference_mode():
            self._forward_shapes_only(plan, fake, ctx, read)
        return read

    def _forward_shapes_only(self, plan: _Plan, fake: dict[str, torch.Tensor], ctx: _Ctx, read: list[str]) -> None:
        """Replay :meth:`_forward` on zero tensors of the right shapes to learn which taps it reads."""
        shapes = {self._taps[s.child]: s.out_shape for s in plan.steps if s.child in self._taps}
        taps = {k: torch.zeros(1, *shapes[k]) for k in fake if k in shapes}
        self._forward(plan, torch.zeros(1, *plan.input_shape), taps, ctx, need_output=False, read=read)

    # ---- extraction -----------------------------------------------------------------------------

    def extract(self, x: torch.Tensor | np.ndarray, ranks: Sequence[int] = (1, 2)) -> PathBatch:
        """Forward ``x`` (N, C, H, W) and extract the rank-r paths for every r in ``ranks``."""
        x = torch.as_tensor(x, dtype=torch.float32)
        out = []
        for s in range(0, x.shape[0], self.batch_size):
            out.append(self._extract_batch(x[s : s + self.batch_size], None, None, ranks))
        return PathBatch.concat(out) if len(out) != 1 else out[0]

    def extract_from_taps(
        self,
        x: torch.Tensor | np.ndarray,
        logits: torch.Tensor | np.ndarray,
        taps: Mapping[str, torch.Tensor | np.ndarray],
        ranks: Sequence[int] = (1, 2),
    ) -> PathBatch:
        """Extract from an already computed forward pass (e.g. onnxruntime outputs), no second forward.

        Parameters
        ----------
        x : array (N, C, H, W)
            The input in [0, 1].
        logits : array (N, K)
        taps : mapping tap name -> array
            Activations named as :attr:`~models.classifiers.TappedSequential.tap_names`; only
            :attr:`required_taps` are read, anything missing is recomputed from the previous activation.
        """
        x = torch.as_tensor(x, dtype=torch.float32)
        logits = torch.as_tensor(logits, dtype=torch.float32)
        given = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in taps.items()}
        return self._extract_batch(x, logits, given, ranks)

    @torch.inference_mode()
    def _extract_batch(
        self,
        x: torch.Tensor,
        logits: torch.Tensor | None,
        taps: dict[str, torch.Tensor] | None,
        ranks: Sequence[int],
    ) -> PathBatch:
        plan = self._get_plan(tuple(x.shape[1:]))
        n, layers = x.shape[0], self.layers
        ctx = _Ctx(n=n, theta=self.theta, first=len(plan.layers) - len(layers), ranks=len(ranks))
        out = self._forward(plan, x, taps or {}, ctx, need_output=logits is None)
        logits = out if logits is None else logits
        ranks = [int(r) for r in ranks]
        if min(ranks) < 1 or max(ranks) > logits.shape[1]:
            raise ValueError(f"ranks must be in 1..{logits.shape[1]}, got {ranks}")
        order = torch.sort(logits, dim=1, descending=True, stable=True).indices
        classes = {r: order[:, r - 1].contiguous() for r in ranks}
        seed = torch.zeros(len(ranks) * n, logits.shape[1], dtype=torch.bool)
        seed[torch.arange(len(ranks) * n), torch.cat([classes[r] for r in ranks])] = True
        _run_backward(plan.steps, seed, ctx)
        return self._collect(ctx, logits, classes, ranks, n)

    def _forward(
        self,
        plan: _Plan,
        x: torch.Tensor,
        taps: Mapping[str, torch.Tensor],
        ctx: _Ctx,
        need_output: bool = True,
        read: list[str] | None = None,
    ) -> torch.Tensor:
        """Run the plan, jumping to a given tap whenever no step in between needs its input recorded.

        Step ``i`` needs its input when ``step.records`` and ``step.w_end > ctx.first``; a Residual that needs
        recording always runs in full. Tap names used are appended to ``read``.
        """
        steps = plan.steps
        given = {i: self._taps[s.child] for i, s in enumerate(steps) if self._taps.get(s.child) in taps}
        needs = [s.records and s.w_end > ctx.first for s in steps]
        end = len(steps) if need_output else max(i for i, need in enumerate(needs) if need) + 1
        i = 0
        while i < end:
            step = steps[i]
            if needs[i] and isinstance(step, _Residual):
                x, i = step.forward(x, ctx), i + 1
                continue
            if not need_output and i == end - 1:
                step.record(x, ctx)
                break
            j = i
            while j + 1 < end and not needs[j + 1]:
                j += 1
            jump = max((k for k in given if i <= k <= j), default=None)
            if jump is None:
                x, i = step.forward(x, ctx), i + 1
                continue
            step.record(x, ctx)
            x, i = taps[given[jump]].reshape(x.shape[0], *steps[jump].out_shape), jump + 1
            if read is not None:
                read.append(given[jump])
        return x

    def _collect(
        self, ctx: _Ctx, logits: torch.Tensor, classes: dict[int, torch.Tensor], ranks: list[int], n: int
    ) -> PathBatch:
        ids: dict[int, dict[str, torch.Tensor]] = {r: {} for r in ranks}
        offsets: dict[int, dict[str, torch.Tensor]] = {r: {} for r in ranks}
        for name in self.layers:
            img, found = ctx.found.get(name, (_cat([]), _cat([])))
            counts = torch.bincount(img, minlength=len(ranks) * n)
            bounds = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
            for k, r in enumerate(ranks):
                lo, hi = bounds[k * n], bounds[(k + 1) * n]
                ids[r][name] = found[lo:hi]
                offsets[r][name] = bounds[k * n : (k + 1) * n + 1] - lo
        return PathBatch(logits, classes, list(self.layers), ids, offsets, self.theta)


def extract_effective_paths(
    model: nn.Module, x: torch.Tensor, theta: float = DEFAULT_THETA, rank: int = 1
) -> list[dict[str, torch.Tensor]]:
    """Effective path of every image of ``x`` (N, C, H, W), seeded at the rank-``rank`` logit.

    Returns
    -------
    list of dict
        One dict per image: module name (as in ``model.named_modules()``) of every Conv2d and Linear
        layer -> sorted 1-D int64 tensor of selected synapse ids (see the module docstring for the ids).
    """
    shape = tuple(x.shape[1:])
    extractor = EffectivePathExtractor(model, theta=theta, input_shape=shape, batch_size=max(1, x.shape[0]))
    return extractor.extract(x, ranks=(rank,)).per_image(rank)
