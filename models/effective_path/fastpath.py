"""The small-batch Effective Path walk: one compiled (numba) kernel call per step of the plan.

At batch 1 the batched torch walk (:mod:`.steps`) is bound by per-operation overhead: about 700 tiny torch ops
per LeNet-5 image. Here every weighted layer is one kernel call that, for each selected output neuron, builds its
contributions, applies the selection rule (:mod:`.selection`, exactly: value descending, lower index first on
ties, exclusive prefix sums in float64) with a partial selection (one pass keeping the 16 largest values in
order; a neuron that needs more sorts only the values above a partition cut, widened x4 until its prefix reaches
the target), and writes the synapse ids and the selected input neurons. The forward pass and its recorded
activations are the torch plan's (``Ctx.acts``), so both walks read the same numbers.

Weighted layers with a fan-in above 2048 keep the torch step's batched backward inside this walk (its large vector
operations beat the scalar kernel on long rows). A neuron reached by several ranks' walks is processed once and its
synapses are given to every row that reached it. Results per layer: synapse ids grouped by row
(``rank * n + image``), sorted within a row, and row bounds.

The kernels are compiled by numba's JIT on their first call (a few seconds per process, nothing at install time);
:func:`warm_up` compiles them on tiny inputs so that no request pays for it. Plans with a step type this module
does not know raise ``NotImplementedError`` in :class:`FastWalk`; the extractor then keeps the torch walk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from numba import njit

from pathguard.models.effective_path.plan import Plan
from pathguard.models.effective_path.steps import (
    AvgPoolStep,
    ConvStep,
    Ctx,
    LinearStep,
    MaxPoolStep,
    PassStep,
    PrefixStep,
    ResidualStep,
    Step,
    WeightedStep,
)

__all__ = ["FastWalk", "warm_up"]

_TOP = 16  # largest values kept in order in one pass; rows needing more sort the rest
_WIDE = 2048  # weighted layers with a larger fan-in keep the torch step's batched backward (vector ops win there)

Found = dict[str, tuple[np.ndarray, np.ndarray]]  # layer -> (ids grouped by row, (B+1,) row bounds)
F = TypeVar("F", bound=Callable[..., Any])


def _compiled(fn: F) -> F:
    """numba-compile ``fn``, caching the machine code on disk (next to this file, or in the user's cache folder) so
    only the first process pays the compile time; without a writable cache location, compile in memory."""
    try:
        return njit(cache=True, nogil=True)(fn)  # type: ignore[return-value]
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return njit(cache=False, nogil=True)(fn)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------- kernels


@_compiled
def _select(
    c: np.ndarray, k: int, c_sum: float, y: float, theta: float, out: np.ndarray, top_v: np.ndarray, top_i: np.ndarray
) -> int:  # pragma: no cover
    """The selection rule on the contributions ``c[:k]`` (float32, float64 sum ``c_sum``) of one neuron with output
    ``y``; comparisons and prefix sums in float64.

    Writes the kept positions to ``out`` in ascending order and returns how many. One pass keeps the :data:`_TOP`
    largest positive (oriented) values in exact order (value descending, lower index first: an equal later value
    ranks behind); only if their prefix does not reach ``theta * sum`` does :func:`_select_rest` take over.
    ``top_v``/``top_i``: (_TOP,) workspace; ``out``: (k,).
    """
    if k == 0:
        return 0
    sign = -1.0 if y < 0 else 1.0
    total = sign * c_sum  # == the sum of the negated values: negation commutes with rounding
    if total <= 0 or 1.0 / k >= theta:
        best = 0
        for j in range(1, k):
            if sign * c[j] > sign * c[best]:
                best = j
        out[0] = best
        return 1
    cnt = 0
    for j in range(k):
        v = sign * c[j]
        if v <= 0 or (cnt == _TOP and v <= top_v[_TOP - 1]):
            continue  # non-positive values are never kept
        q = cnt if cnt < _TOP else _TOP - 1
        cnt = min(cnt + 1, _TOP)
        while q > 0 and top_v[q - 1] < v:
            top_v[q], top_i[q] = top_v[q - 1], top_i[q - 1]
            q -= 1
        top_v[q], top_i[q] = v, j
    target, before, kept = theta * total, 0.0, 0
    while kept < cnt and before < target:
        before += top_v[kept]
        kept += 1
    if before < target and cnt == _TOP:  # more than _TOP values needed
        return _select_rest(c, k, sign, target, out)
    for t in range(kept):  # insertion sort of the kept positions (few)
        j, q = top_i[t], t
        while q > 0 and out[q - 1] > j:
            out[q] = out[q - 1]
            q -= 1
        out[q] = j
    return kept


@_compiled
def _select_above(
    c: np.ndarray, k: int, c_sum: float, y: float, phi: float, relative: bool, out: np.ndarray
) -> int:  # pragma: no cover
    """The sort-free rules on ``c[:k]`` (sum ``c_sum``) of a neuron with output ``y``: the positions whose oriented
    value is positive and at least the cut (``phi``; relative: ``phi`` times the oriented sum), ascending, written to
    ``out``; returns how many (possibly none)."""
    sign = -1.0 if y < 0 else 1.0
    cut = phi * sign * c_sum if relative else phi
    m = 0
    for j in range(k):
        v = sign * c[j]
        if v > 0 and v >= cut:
            out[m] = j
            m += 1
    return m


@_compiled
def _select_rest(c: np.ndarray, k: int, sign: float, target: float, out: np.ndarray) -> int:  # pragma: no cover
    """The prefix of a neuron that needs more than :data:`_TOP` values, exactly, without sorting the whole row.

    The values strictly above the w-th largest positive value are the first elements of the order; if their
    prefix (stable sort: lower index first on ties) reaches ``target``, the kept set lies among them. Otherwise
    w grows (x4) until it covers every positive value, which are then sorted in full.
    """
    vals, idx = np.empty(k, np.float64), np.empty(k, np.int64)
    m = 0
    for j in range(k):
        v = sign * c[j]
        if v > 0:  # in index order
            vals[m], idx[m] = v, j
            m += 1
    width = 4 * _TOP
    while True:
        if width >= m:
            cand_v, cand_i = vals[:m], idx[:m]
        else:
            thr = -np.partition(-vals[:m], width - 1)[width - 1]  # the width-th largest value
            keep = vals[:m] > thr
            cand_v, cand_i = vals[:m][keep], idx[:m][keep]
        before, kept = 0.0, 0
        for t in np.argsort(-cand_v, kind="mergesort"):  # stable: lower index first on ties
            if before >= target:
                break
            out[kept] = cand_i[t]
            kept += 1
            before += cand_v[t]
        if before >= target or width >= m:
            out[:kept] = np.sort(out[:kept])
            return kept
        width *= 4


@_compiled
def _gather(mask: np.ndarray, n: int) -> tuple:  # pragma: no cover
    """Selected neurons of a (B, P) mask with rows ``rank * n + image``.

    Returns (u_n, img, pos, uid, sel, row_start): ``u_n`` distinct (image, position) neurons, their image and
    position (U,), ``uid`` (n, P) neuron index or -1, and every row's selected positions in ascending order,
    ``sel[row_start[b]:row_start[b+1]]``.
    """
    b_n, p_n = mask.shape
    total = 0
    for b in range(b_n):
        for p in range(p_n):
            if mask[b, p]:
                total += 1
    uid = np.full((n, p_n), -1, np.int64)
    img, pos, sel = np.empty(total, np.int64), np.empty(total, np.int64), np.empty(total, np.int64)
    row_start = np.zeros(b_n + 1, np.int64)
    u_n, t = 0, 0
    for r in range(b_n // n):
        for i in range(n):
            b = r * n + i
            for p in range(p_n):
                if mask[b, p]:
                    sel[t] = p
                    t += 1
                    if uid[i, p] < 0:
                        uid[i, p] = u_n
                        img[u_n], pos[u_n] = i, p
                        u_n += 1
            row_start[b + 1] = t
    return u_n, img, pos, uid, sel, row_start


@_compiled
def _emit(
    n: int,
    uid: np.ndarray,
    sel: np.ndarray,
    row_start: np.ndarray,
    start: np.ndarray,
    length: np.ndarray,
    cols: np.ndarray,
    src: np.ndarray,
    fan_in: int,
    in_mask: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """Give every row the synapses of its selected neurons: sets ``in_mask`` at their inputs ``src`` and returns the
    ids ``p * fan_in + col`` grouped by row (ascending within a row; ``fan_in`` 0: no ids) and (B+1,) row bounds:
    row ``b`` owns ``ids[bounds[b]:bounds[b+1]]``."""
    b_n = row_start.shape[0] - 1
    bounds = np.zeros(b_n + 1, np.int64)
    for b in range(b_n):
        bounds[b + 1] = bounds[b]
        for t in range(row_start[b], row_start[b + 1]):
            bounds[b + 1] += length[uid[b % n, sel[t]]]
    ids = np.empty(bounds[b_n] if fan_in > 0 else 0, np.int64)
    k = 0
    for b in range(b_n):
        for t in range(row_start[b], row_start[b + 1]):
            p = sel[t]
            u = uid[b % n, p]
            for s in range(start[u], start[u] + length[u]):
                in_mask[b, src[s]] = 1
                if fan_in > 0:
                    ids[k] = p * fan_in + cols[s]
                    k += 1
    return ids, bounds


@_compiled
def _linear_back(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray,
    mask: np.ndarray,
    n: int,
    theta: float,
    phi: float,
    relative: bool,
    in_mask: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """Linear layer: ``x`` (N, I), ``w`` (O, I), ``mask`` (B, O) -> ``in_mask`` (B, I) set; (ids, bounds). ``phi``
    > 0: the sort-free rule at that threshold (absolute, or ``relative``) instead of the cumulative one at
    ``theta``."""
    i_n = w.shape[1]
    u_n, img, pos, uid, sel, row_start = _gather(mask, n)
    start, length = np.zeros(u_n, np.int64), np.zeros(u_n, np.int64)
    cols = np.empty(u_n * i_n, np.int64)
    c, kept = np.empty(i_n, np.float32), np.empty(i_n, np.int64)
    top_v, top_i = np.empty(_TOP, np.float64), np.empty(_TOP, np.int64)
    t = 0
    for u in range(u_n):
        xi, wo = x[img[u]], w[pos[u]]
        for j in range(i_n):
            c[j] = xi[j] * wo[j]  # float32 products, as torch (a loop without dependencies: vectorized)
        y = 0.0
        for j in range(i_n):
            y += c[j]
        o = pos[u]
        if phi > 0:
            m = _select_above(c, i_n, y, y + bias[o], phi, relative, kept)
        else:
            m = _select(c, i_n, y, y + bias[o], theta, kept, top_v, top_i)
        start[u], length[u] = t, m
        for q in range(m):
            cols[t] = kept[q]
            t += 1
    return _emit(n, uid, sel, row_start, start, length, cols, cols, i_n, in_mask)


@_compiled
def _conv_back(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray,
    table: np.ndarray,
    groups: int,
    mask: np.ndarray,
    n: int,
    theta: float,
    phi: float,
    relative: bool,
    in_mask: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """Conv2d: ``x`` (N, C*H*W), ``w`` (O, Cg*KH*KW), ``table`` (OH*OW, Cg*KH*KW) int32 within-group flat input
    index of every window column (-1: padding, never a candidate), ``mask`` (B, O*OH*OW) -> ``in_mask`` (B, C*H*W)
    set; (ids, bounds). ``phi`` and ``relative`` as :func:`_linear_back`."""
    o_n, fan_in = w.shape
    points = table.shape[0]
    group_size, opg = x.shape[1] // groups, o_n // groups
    u_n, img, pos, uid, sel, row_start = _gather(mask, n)
    start, length = np.zeros(u_n, np.int64), np.zeros(u_n, np.int64)
    cols, src = np.empty(u_n * fan_in, np.int64), np.empty(u_n * fan_in, np.int64)
    c, kept = np.empty(fan_in, np.float32), np.empty(fan_in, np.int64)
    top_v, top_i = np.empty(_TOP, np.float64), np.empty(_TOP, np.int64)
    col_of, pos_of = np.empty(fan_in, np.int64), np.empty(fan_in, np.int64)
    t = 0
    for u in range(u_n):
        i, p = img[u], pos[u]
        o, lp = p // points, p % points
        base = (o // opg) * group_size
        k, y = 0, 0.0
        for j in range(fan_in):  # ascending column = window order
            q = table[lp, j]
            if q < 0:
                continue
            c[k] = x[i, base + q] * w[o, j]  # float32 product, as torch
            y += c[k]
            col_of[k], pos_of[k] = j, base + q
            k += 1
        if phi > 0:
            m = _select_above(c, k, y, y + bias[o], phi, relative, kept)
        else:
            m = _select(c, k, y, y + bias[o], theta, kept, top_v, top_i)
        start[u], length[u] = t, m
        for q in range(m):
            cols[t], src[t] = col_of[kept[q]], pos_of[kept[q]]
            t += 1
    return _emit(n, uid, sel, row_start, start, length, cols, src, fan_in, in_mask)


@_compiled
def _maxpool_back(x: np.ndarray, geo: np.ndarray, mask: np.ndarray, in_mask: np.ndarray) -> None:  # pragma: no cover
    """Max pool, plain tiles: ``x`` (N, C, H, W), ``geo`` = (KH, KW, OH, OW); first maximum in window order."""
    n, _, h_n, w_n = x.shape
    kh_n, kw_n, oh_n, ow_n = geo
    points = oh_n * ow_n
    for b in range(mask.shape[0]):
        i = b % n
        for p in range(mask.shape[1]):
            if not mask[b, p]:
                continue
            ch, lp = p // points, p % points
            h0, w0 = (lp // ow_n) * kh_n, (lp % ow_n) * kw_n
            best_h, best_w = h0, w0
            for a in range(kh_n):
                for e in range(kw_n):
                    if x[i, ch, h0 + a, w0 + e] > x[i, ch, best_h, best_w]:
                        best_h, best_w = h0 + a, w0 + e
            in_mask[b, (ch * h_n + best_h) * w_n + best_w] = 1


@_compiled
def _maxpool_index_back(idx: np.ndarray, plane: int, mask: np.ndarray, in_mask: np.ndarray) -> None:  # pragma: no cover
    """Max pool, general: ``idx`` (N, C*OH*OW) torch's flat argmax within the input plane."""
    n = idx.shape[0]
    points = idx.shape[1] // (in_mask.shape[1] // plane)
    for b in range(mask.shape[0]):
        for p in range(mask.shape[1]):
            if mask[b, p]:
                in_mask[b, (p // points) * plane + idx[b % n, p]] = 1


@_compiled
def _avgpool_back(
    x: np.ndarray, geo: np.ndarray, mask: np.ndarray, n: int, theta: float, in_mask: np.ndarray
) -> None:  # pragma: no cover
    """Average pool: the rule on the window values; ``geo`` = (KH, KW, sh, sw, ph, pw, OH, OW), ``ph``/``pw`` the top
    and left pads (window positions outside the input, bottom and right pads and ceil mode included, are skipped)."""
    _, _, h_n, w_n = x.shape
    kh_n, kw_n, sh, sw, ph, pw, oh_n, ow_n = geo
    points, kk = oh_n * ow_n, kh_n * kw_n
    u_n, img, pos, uid, sel, row_start = _gather(mask, n)
    start, length, src = np.zeros(u_n, np.int64), np.zeros(u_n, np.int64), np.empty(u_n * kk, np.int64)
    c, kept, pos_of = np.empty(kk, np.float32), np.empty(kk, np.int64), np.empty(kk, np.int64)
    top_v, top_i = np.empty(_TOP, np.float64), np.empty(_TOP, np.int64)
    t = 0
    for u in range(u_n):
        i, p = img[u], pos[u]
        ch, lp = p // points, p % points
        oh, ow = lp // ow_n, lp % ow_n
        k, y = 0, 0.0
        for a in range(kh_n):
            hh = oh * sh - ph + a
            if hh < 0 or hh >= h_n:
                continue
            for e in range(kw_n):
                ww = ow * sw - pw + e
                if ww < 0 or ww >= w_n:
                    continue
                c[k] = x[i, ch, hh, ww]
                y += c[k]
                pos_of[k] = (ch * h_n + hh) * w_n + ww
                k += 1
        m = _select(c, k, y, y, theta, kept, top_v, top_i)
        start[u], length[u] = t, m
        for q in range(m):
            src[t] = pos_of[kept[q]]
            t += 1
    _emit(n, uid, sel, row_start, start, length, src, src, 0, in_mask)


@_compiled
def _residual_split(
    skip: np.ndarray, main: np.ndarray, mask: np.ndarray, n: int, theta: float, to_skip: np.ndarray, to_main: np.ndarray
) -> None:  # pragma: no cover
    """Residual addition: the rule on (skip, main) of every selected neuron; ``skip``/``main`` (N, F)."""
    c, kept = np.empty(2, np.float32), np.empty(2, np.int64)
    top_v, top_i = np.empty(_TOP, np.float64), np.empty(_TOP, np.int64)
    u_n, img, pos, uid, sel, row_start = _gather(mask, n)
    branch = np.empty(u_n, np.int64)  # bit 0: skip kept, bit 1: main kept
    for u in range(u_n):
        i, p = img[u], pos[u]
        c[0], c[1] = skip[i, p], main[i, p]
        y = float(c[0]) + float(c[1])
        branch[u] = 0
        for q in range(_select(c, 2, y, y, theta, kept, top_v, top_i)):
            branch[u] += 1 + kept[q]  # position 0 (skip) adds 1, position 1 (main) adds 2
    for b in range(mask.shape[0]):
        for t in range(row_start[b], row_start[b + 1]):
            p = sel[t]
            kept = branch[uid[b % n, p]]
            if kept & 1:
                to_skip[b, p] = 1
            if kept & 2:
                to_main[b, p] = 1


# --------------------------------------------------------------------------------------------------- the walk


def _f32(t: object) -> np.ndarray:
    """A recorded activation (torch tensor) as a C-contiguous, writable float32 array (one kernel signature)."""
    assert isinstance(t, torch.Tensor)
    arr = t.detach().numpy()
    if arr.dtype != np.float32 or not arr.flags.c_contiguous or not arr.flags.writeable:
        arr = np.array(arr, dtype=np.float32, order="C")
    return arr


def _phi(ctx: Ctx, name: str) -> float:
    """The layer's absolute threshold, 0.0 for the cumulative rule (the kernels' convention)."""
    return float(ctx.thresholds.get(name, 0.0))


class _Node:
    def __init__(self, step: Step) -> None:
        self.step = step
        self.uid, self.w_end, self.in_size = step.uid, step.w_end, step.in_size

    def back(self, mask: np.ndarray, ctx: Ctx, found: Found) -> np.ndarray | None:
        return mask


class _Stop(_Node):
    def back(self, mask: np.ndarray, ctx: Ctx, found: Found) -> np.ndarray | None:
        return None


class _Linear(_Node):
    def __init__(self, step: LinearStep) -> None:
        super().__init__(step)
        self.name = step.name
        self.w = np.ascontiguousarray(step.weight.numpy(), dtype=np.float32)  # (O, I)
        self.bias = np.ascontiguousarray(step.bias.numpy(), dtype=np.float32)  # (O,)

    def back(self, mask: np.ndarray, ctx: Ctx, found: Found) -> np.ndarray | None:
        x = _f32(ctx.acts[self.uid]).reshape(ctx.n, -1)  # (N, I)
        in_mask = np.zeros((mask.shape[0], self.in_size), np.uint8)
        found[self.name] = _linear_back(
            x, self.w, self.bias, mask, ctx.n, ctx.theta, _phi(ctx, self.name), ctx.relative, in_mask
        )
        return in_mask


class _TorchWeighted(_Node):
    """A weighted layer with fan-in above :data:`_WIDE`: the torch step's own backward (same selected sets), whose
    few large vectorized operations beat the scalar kernel on long rows (e.g. AlexNet's fc6, fan-in 9216)."""

    def __init__(self, step: WeightedStep) -> None:
        super().__init__(step)
        self.weighted, self.name = step, step.name

    def back(self, mask: np.ndarray, ctx: Ctx, found: Found) -> np.ndarray | None:
        in_mask = self.weighted.backward(torch.from_numpy(mask.view(np.bool_)), ctx)
        assert in_mask is not None
        img, ids = ctx.found.pop(self.name)  # rows rank-major, ids sorted within a row
        bounds = np.zeros(mask.shape[0] + 1, np.int64)
        np.cumsum(np.bincount(img.numpy(), minlength=mask.shape[0]), out=bounds[1:])
        found[self.name] = (np.ascontiguousarray(ids.numpy()), bounds)
        return np.ascontiguousarray(in_mask.numpy()).view(np.uint8)


class _Conv(_Node):
    def __init__(self, step: ConvStep) -> None:
        super().__init__(step)
        self.name = step.name
        self.w = np.ascontiguousarray(step.weight.numpy(), dtype=np.float32)  # (O, Cg*KH*KW)
        self.bias = np.ascontiguousarray(step.bias.numpy(), dtype=np.float32)
        self.table = np.ascontiguousarray(step.in_index.numpy(), dtype=np.int32)  # (OH*OW, Cg*KH*KW)
        self.groups = step.groups

    def back(self, mask: np.ndarray, ctx: Ctx, found: Found) -> np.ndarray | None:
        x = _f32(ctx.acts[self.uid]).reshape(ctx.n, -1)  # (N, C*H*W)
        in_mask = np.zeros((mask.shape[0], self.in_size), np.uint8)
        found[self.name] = _conv_back(
            x,
            self.w,
            self.bias,
            self.table,
            self.groups,
            mask,
            ctx.n,
            ctx.theta,
            _phi(ctx, self.name),
            ctx.relative,
            in_mask,
        )
        return in_mask


class _MaxPool(_Node):
    def __init__(self, step: MaxPoolStep) -> None:
        super().__init__(step)
        _, oh, ow = step.out_shape
        self.tile = step.tile
        self.geo = np.array([*(step.tile or (0, 0)), oh, ow], np.int64)
        self.plane = step.in_shape[1] * step.in_shape[2]

    def back(self, mask: np.ndarray, ctx: Ctx, found: Found) -> np.ndarray | None:
        act = ctx.acts[self.uid]
        assert isinstance(act, torch.Tensor)
        in_mask = np.zeros((mask.shape[0], self.in_size), np.uint8)
        if self.tile is not None:  # the recorded input
            _maxpool_back(_f32(act), self.geo, mask, in_mask)
        else:  # torch's argmax indices (N, C, OH, OW)
            idx = np.ascontiguousarray(act.reshape(ctx.n, -1).numpy(), dtype=np.int64)
            _maxpool_index_back(idx, self.plane, mask, in_mask)
        return in_mask


class _AvgPool(_Node):
    def __init__(self, step: AvgPoolStep) -> None:
        super().__init__(step)
        _, oh, ow = step.out_shape
        self.geo = np.array([*step.kernel, *step.stride, step.pads[0], step.pads[1], oh, ow], np.int64)

    def back(self, mask: np.ndarray, ctx: Ctx, found: Found) -> np.ndarray | None:
        x = _f32(ctx.acts[self.uid])  # (N, C, H, W)
        in_mask = np.zeros((mask.shape[0], self.in_size), np.uint8)
        _avgpool_back(x, self.geo, mask, ctx.n, ctx.theta, in_mask)
        return in_mask


class _Residual(_Node):
    def __init__(self, step: ResidualStep) -> None:
        super().__init__(step)
        self.body = [_node(s) for s in step.body]
        self.shortcut = [_node(s) for s in step.shortcut]

    def back(self, mask: np.ndarray, ctx: Ctx, found: Found) -> np.ndarray | None:
        pair = ctx.acts[self.uid]
        assert isinstance(pair, tuple)
        skip, main = (_f32(t).reshape(ctx.n, -1) for t in pair)  # (N, F) each
        to_skip, to_main = np.zeros_like(mask), np.zeros_like(mask)
        _residual_split(skip, main, mask, ctx.n, ctx.theta, to_skip, to_main)
        from_skip = _walk(self.shortcut, to_skip, ctx, found) if self.shortcut else to_skip
        from_body = _walk(self.body, to_main, ctx, found)
        if from_skip is None or from_body is None:
            return from_skip if from_body is None else from_body
        return from_skip | from_body


def _node(step: Step) -> _Node:
    """The compiled counterpart of one plan step; unknown step types raise ``NotImplementedError``."""
    kinds: list[tuple[type[Step], type[_Node]]] = [
        (PrefixStep, _Stop),
        (PassStep, _Node),
        (LinearStep, _Linear),
        (ConvStep, _Conv),
        (MaxPoolStep, _MaxPool),
        (AvgPoolStep, _AvgPool),
        (ResidualStep, _Residual),
    ]
    if type(step) in (LinearStep, ConvStep) and isinstance(step, WeightedStep) and step.info.fan_in > _WIDE:
        return _TorchWeighted(step)
    for kind, node in kinds:
        if type(step) is kind:
            return node(step)
    raise NotImplementedError(f"the compiled walk has no kernel for {type(step).__name__}")


def _walk(nodes: Sequence[_Node], mask: np.ndarray, ctx: Ctx, found: Found) -> np.ndarray | None:
    """Backward over ``nodes`` like :func:`.steps.run_backward`, on (B, F) uint8 masks."""
    out: np.ndarray | None = mask
    for node in reversed(nodes):
        if node.w_end <= ctx.first or out is None:
            return None
        out = node.back(out, ctx, found)
    return out


class FastWalk:
    """The compiled backward walk of a :class:`~.plan.Plan`.

    Raises ``NotImplementedError`` (naming the step) when the plan holds a step type without a kernel.
    """

    def __init__(self, plan: Plan) -> None:
        self.nodes = [_node(s) for s in plan.steps]

    def run(self, seed: np.ndarray, ctx: Ctx) -> Found:
        """Walk from ``seed`` (B, K) uint8 (one selected logit per row ``rank * n + image``) after the forward
        pass recorded ``ctx.acts``. Returns layer -> (ids grouped by row and sorted within it, (B+1,) row bounds)."""
        found: Found = {}
        _walk(self.nodes, seed, ctx, found)
        return found


def warm_up() -> None:
    """Compile every kernel now (tiny inputs), so the first extraction does not pay numba's compile time."""
    u8, f32 = np.uint8, np.float32
    x4, x2 = np.ones((1, 1, 2, 2), f32), np.ones((1, 4), f32)
    mask4, mask1 = np.ones((1, 4), u8), np.ones((1, 1), u8)
    _linear_back(x2, np.ones((1, 4), f32), np.zeros(1, f32), mask1, 1, 0.5, 0.0, False, np.zeros((1, 4), u8))
    table = np.arange(4, dtype=np.int32).reshape(1, 4)
    _conv_back(x2, np.ones((1, 4), f32), np.zeros(1, f32), table, 1, mask1, 1, 0.5, 0.0, False, np.zeros((1, 4), u8))
    _maxpool_back(x4, np.array([2, 2, 1, 1], np.int64), mask1, np.zeros((1, 4), u8))
    _maxpool_index_back(np.zeros((1, 1), np.int64), 4, mask1, np.zeros((1, 4), u8))
    _avgpool_back(x4, np.array([2, 2, 2, 2, 0, 0, 1, 1], np.int64), mask1, 1, 0.5, np.zeros((1, 4), u8))
    _residual_split(x2, x2, mask4, 1, 0.5, np.zeros((1, 4), u8), np.zeros((1, 4), u8))
