"""The Effective Path selection rule (Qiu et al., Eq. 1-3), vectorized over rows of contributions."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pathguard.models.effective_path.paths import DEFAULT_THETA

__all__ = ["cat_ids", "orient", "row_cuts", "select_above", "select_pairs", "select_synapses"]

_SMALL_BLOCK = 1 << 15  # up to this many contributions, rows are sorted at once
_SHORT_ROW = 256  # rows up to this length use _max_steps first
_LONG_ROW = 2048  # rows at least this long skip the narrowest top-k pass
_MAX_STEPS = 8
_TOPK_STEPS = (8, 32, 128)  # widths of the partial passes before a full sort (each only if K > 2*width)


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
    total = orient(c, out_value)
    rows, cols = select_pairs(c, total, theta, nvalid, None if valid is None else valid.index_select)
    keep = torch.zeros(r, k, dtype=torch.bool)
    keep[rows, cols] = True
    return keep


def orient(c: torch.Tensor, y: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
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


def select_pairs(
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
    key = torch.sort(cat_ids(out_r) * k + cat_ids(out_c)).values
    return key // k, key % k


def select_above(c: torch.Tensor, phi: float, total: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sort-free rules (Ptolemy's backward selection with a threshold profiled offline): the (row, column) pairs
    of oriented contributions ``c`` (R, K) that are positive and at least the row's cut, sorted by row then column.

    The cut is ``phi`` (the absolute rule) or, with the rows' oriented sums ``total`` (R,), ``phi * total`` (the
    relative rule). A row whose contributions all lie below its cut selects nothing; padded positions hold 0 and
    are never selected."""
    cut = torch.tensor(phi, dtype=c.dtype) if total is None else phi * total.unsqueeze(1)
    rows, cols = ((c >= cut) & (c > 0)).nonzero().unbind(1)
    return rows, cols


def row_cuts(
    c: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, total: torch.Tensor | None = None
) -> torch.Tensor:
    """The cut of every row that selected a positive contribution: its smallest selected oriented contribution
    (divided by the row's oriented sum ``total`` (R,) when given: the relative cut, rows with a positive sum only).

    ``c`` (R, K) oriented contributions and the selected (row, column) pairs of :func:`select_pairs`; rows whose
    selection holds no positive value (the single largest of an all-negative row) are left out."""
    vals = c[rows, cols]
    pos = vals > 0
    if total is not None:
        pos &= total[rows] > 0
    rows, vals = rows[pos], vals[pos]
    if total is not None:
        vals = vals / total[rows]
    cut = torch.full((c.shape[0],), math.inf, dtype=c.dtype).scatter_reduce(0, rows, vals, "amin")
    return cut[torch.isfinite(cut)]


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
    return cat_ids(out_r), cat_ids(out_c)


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
            return cat_ids(rows), cat_ids(cols), active[:0]
        sel = going.nonzero().squeeze(1)
        work, active, before, tgt = work.index_select(0, sel), active[sel], before[sel], tgt[sel]
        work[torch.arange(sel.numel()), i[sel]] = -math.inf
    open_rows = torch.zeros(r, dtype=torch.bool)
    open_rows[active] = True
    pr, pc = cat_ids(rows), cat_ids(cols)
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


def cat_ids(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
