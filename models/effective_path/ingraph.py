"""Effective Path's exact walk as tensor operations that trace to ONNX: the synapses :mod:`.extractor` selects,
computed inside the guarded graph (:mod:`pathguard.models.guarded`) by onnxruntime.

The walk goes backwards as the exact one does, but every step is a whole-batch tensor operation: at a weighted
layer, the output neurons reached by either rank's walk are gathered (``NonZero``: the only data-dependent shape),
their contributions formed (an input window or vector times a weight row), the rule applied to all of them at once
(a descending ``TopK``, float64 prefix sums), each rank's selected synapses masked out of them, and their inputs
scattered back as the neurons reached below. Pools and residual additions select densely (their candidates are
few). Ties are ordered as the exact walk orders them (lower index first; ONNX's TopK does the same) and padded
positions are never candidates, so the selected sets are equal, not approximately equal.

Its cost follows the reached neurons (about 1% of a LeNet-5's first convolution's outputs) and the unfolded windows
of each covered convolution; its constants are the class paths' bitmaps, one bit per class and synapse. Both grow
with the covered layers' synapses, which :data:`SYNAPSE_BUDGET` bounds: the MNIST LeNet-5 has 0.42 million, the
CIFAR-10 CNN's last three layers 2.2 million; the residual CIFAR-10 network's 22 layers have 40.8 million (its walk
in the graph gives the exact paths too, at 96 ms an image against the compiled walk's 18 ms).

Supported: the exact walk's plan with Conv2d (one group), Linear, MaxPool2d over non-overlapping tiles, AvgPool2d
and AdaptiveAvgPool2d (the plan's forms), residual blocks, and the pass-through modules.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pathguard.models.effective_path.plan import Compiler, Plan
from pathguard.models.effective_path.steps import (
    AvgPoolStep,
    ConvStep,
    LinearStep,
    MaxPoolStep,
    PassStep,
    PrefixStep,
    ResidualStep,
    Step,
)

__all__ = [
    "FIRST_PASS",
    "SYNAPSE_BUDGET",
    "GraphEffectivePath",
    "GraphWalk",
    "dense_rule",
    "export_batched",
    "one_hot_taps",
    "orient_rows",
]

SYNAPSE_BUDGET = 8_000_000  # synapses of the covered layers (the class paths' bits, the walk's largest work)
_BIT_VALUES = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32)  # np.packbits order within a byte
_PADDING = -1.0e30  # a padded candidate's value: sorted after every real one, never kept


def dense_rule(
    c: torch.Tensor,
    total: torch.Tensor,
    theta: float,
    valid: torch.Tensor | None = None,
    single: torch.Tensor | None = None,
) -> torch.Tensor:
    """(..., K) 0/1 selection of oriented contributions ``c`` with oriented sums ``total`` (...,): the paper's rule
    (:func:`~pathguard.models.effective_path.selection.select_pairs`) without a data-dependent shape: values sorted
    descending (lower index first on ties, as ONNX's TopK orders them), exclusive float64 prefix sums, kept while
    below ``theta * total`` and positive; the largest value alone when ``total <= 0`` or ``1 / K >= theta``.

    ``valid`` (broadcastable to ``c``, bool): False marks padded candidates (holding 0 in ``c``), never selected and
    not counted in K; ``single`` (broadcastable to ``total``, bool) then marks the rows whose real candidates are so
    few that ``1 / K >= theta``.

    Rows longer than ``2 * FIRST_PASS`` are ranked in two passes: the largest :data:`FIRST_PASS` values settle the
    rows whose selection ends among them (their prefix reaches the target, or they run out of positive values);
    only the rows still open are ranked in full."""
    k = c.shape[-1]
    if valid is not None:
        c = torch.where(valid, c, torch.full_like(c, _PADDING))
    one = total <= 0
    if single is not None:
        one = one | single
    elif 1.0 / k >= theta:  # static: K is a layer's fan-in
        one = torch.ones_like(one)
    if k > 2 * FIRST_PASS:
        rows = c.reshape(-1, k)
        out = _two_passes(rows, total.reshape(-1), one.expand_as(total).reshape(-1), theta).reshape(c.shape)
    else:
        out = _ranked(c, total, one, theta, k)[0]
    return out * valid.to(c.dtype) if valid is not None else out


FIRST_PASS = 128


def _ranked(
    c: torch.Tensor, total: torch.Tensor, one: torch.Tensor, theta: float, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the rule's selection among the ``width`` largest values of each row, scattered back to ``c``'s shape; the
    float64 running sums of those values; the values), descending, lower index first on ties."""
    if torch.onnx.is_in_onnx_export():  # ONNX's TopK puts the lower index first on ties
        vals, idx = torch.topk(c, width, dim=-1, largest=True, sorted=True)
    else:  # torch's topk does not promise an order of ties; a stable sort does
        vals, idx = torch.sort(c, dim=-1, descending=True, stable=True)
        vals, idx = vals[..., :width], idx[..., :width]
    cum = torch.cumsum(vals.double(), -1)
    prefix = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], -1)  # as the exact walk sums them
    keep = ((prefix < theta * total.double().unsqueeze(-1)) & (vals > 0)).to(c.dtype)
    first = (torch.arange(width) == 0).to(c.dtype).expand_as(keep)
    keep = torch.where(one.unsqueeze(-1), first, keep)
    return torch.zeros_like(c).scatter(-1, idx, keep), cum, vals


def _two_passes(c: torch.Tensor, total: torch.Tensor, one: torch.Tensor, theta: float) -> torch.Tensor:
    """:func:`dense_rule` of long rows (R, K): see its docstring."""
    out, cum, vals = _ranked(c, total, one, theta, FIRST_PASS)
    done = one | (cum[:, -1] >= theta * total.double()) | (vals[:, -1] <= 0)
    still = torch.nonzero(~done).reshape(-1)
    full = _ranked(
        c.index_select(0, still), total.index_select(0, still), one.index_select(0, still), theta, c.shape[1]
    )
    return out.scatter(0, still.unsqueeze(1).expand(-1, c.shape[1]), full[0])


def orient_rows(c: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(oriented contributions, oriented sums): rows whose output ``y`` is negative negated (sums without bias)."""
    sign = torch.where(y < 0, -torch.ones_like(y), torch.ones_like(y))
    c = c * sign.unsqueeze(-1)
    return c, c.sum(-1)


def export_batched(
    module: nn.Module, args: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str], opset: int
) -> bytes:
    """``module`` traced to ONNX bytes, every input and output batched along its first axis."""
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent Python branches (static here)
        torch.onnx.export(
            module,
            args,
            buf,  # type: ignore[arg-type]
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in [*inputs, *outputs]},
            opset_version=opset,
            dynamo=False,
        )
    return buf.getvalue()


def one_hot_taps(channels: int, kernel: tuple[int, int]) -> torch.Tensor:
    """(C*KK, 1, KH, KW) kernels copying each tap of each channel: with ``groups=C`` a convolution by them gives
    ``F.unfold``'s columns (channel-major, then kernel rows and columns) as channels, a transposed one folds them
    back (summing overlaps)."""
    kh, kw = kernel
    eye = torch.eye(kh * kw).reshape(kh * kw, 1, kh, kw)
    return eye.repeat(channels, 1, 1, 1).contiguous()


class _Windows:
    """Unfold and fold of one windowed step (a convolution or an average pool) as convolutions (traceable)."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        kernel: tuple[int, int],
        stride: tuple[int, int],
        pads: tuple[int, int, int, int],
        dil: tuple[int, int],
        in_index: torch.Tensor,
    ) -> None:
        self.c, self.h, self.w = (int(v) for v in in_shape)
        self.oh, self.ow = int(out_shape[1]), int(out_shape[2])
        self.kernel, self.stride, self.pads, self.dil = kernel, stride, pads, dil
        self.taps = one_hot_taps(self.c, kernel)
        self.kk = kernel[0] * kernel[1]
        valid = in_index >= 0  # (L, KK) of one channel
        self.padded = bool((~valid).any())
        self.valid = valid  # (L, KK)
        self.nvalid = valid.sum(1)  # (L,)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, C, KK) window values (zero in the padding)."""
        top, left, bottom, right = self.pads
        xp = F.pad(x, (left, right, top, bottom)) if any(self.pads) else x
        cols = F.conv2d(xp, self.taps, stride=self.stride, dilation=self.dil, groups=self.c)  # (N, C*KK, OH, OW)
        return cols.reshape(-1, self.c, self.kk, self.oh * self.ow).permute(0, 3, 1, 2)

    def fold(self, cols: torch.Tensor) -> torch.Tensor:
        """(N, L, C, KK) 0/1 selection of window entries -> (N, C*H*W) 0/1 mask of the inputs they read."""
        top, left, bottom, right = self.pads
        planes = cols.permute(0, 2, 3, 1).reshape(-1, self.c * self.kk, self.oh, self.ow)
        full = F.conv_transpose2d(planes, self.taps, stride=self.stride, dilation=self.dil, groups=self.c)
        hp, wp = self.h + top + bottom, self.w + left + right
        extra_h, extra_w = hp - full.shape[2], wp - full.shape[3]  # static: windows may stop short of the edge
        if extra_h > 0 or extra_w > 0:
            full = F.pad(full, (0, max(extra_w, 0), 0, max(extra_h, 0)))
        inside = full[:, :, top : top + self.h, left : left + self.w]
        return (inside > 0).to(cols.dtype).reshape(-1, self.c * self.h * self.w)


class Found:
    """The selected synapses of one layer, both ranks together, one entry per (rank, image, synapse): ``rank`` (M,)
    its rank's index (0: rank 1), ``image`` (M,) and ``ids`` (M,) its synapse id (the extractor's)."""

    def __init__(self, rank: torch.Tensor, image: torch.Tensor, ids: torch.Tensor) -> None:
        self.rank, self.image, self.ids = rank, image, ids

    def per_image(self, values: torch.Tensor, ranks: int, n: int) -> torch.Tensor:
        """(R, N) sums of the entries' ``values`` (M,) per rank and image."""
        at = self.rank * n + self.image
        return torch.zeros(ranks * n, dtype=values.dtype).scatter_add(0, at, values).reshape(ranks, n)

    def dense(self, ranks: int, n: int, size: int) -> torch.Tensor:
        """(R, N, size) 0/1 mask over the layer's synapse ids (for tests and inspection)."""
        out = torch.zeros(ranks * n * size)
        out[(self.rank * n + self.image) * size + self.ids] = 1.0
        return out.reshape(ranks, n, size)


class GraphWalk:
    """The exact walk of :class:`~pathguard.models.effective_path.EffectivePathExtractor` over a compiled plan, in
    whole-batch tensor operations (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        A network the exact walk supports.
    input_shape : tuple of int
        (C, H, W) of one input.
    theta : float
        The selection threshold.
    last_k : int, optional
        Walk only the last ``k`` weighted layers (as the extractor's ``last_k``).
    taps : mapping of int to str, optional
        The model's tap points (child index -> tap name, :func:`~pathguard.models.networks.tap_points`): the walk's
        forward pass then starts at the last tap before the first step it needs, :attr:`start_tap` (None: the
        input).
    budget : int, optional
        Largest number of covered synapses accepted (default :data:`SYNAPSE_BUDGET`).
    thresholds : mapping of str to float, optional
        The extractor's sort-free thresholds (layer -> phi): those layers keep the positive oriented contributions
        at least phi (``relative``: phi times the neuron's oriented sum), one comparison instead of the ranking.
    relative : bool
        Whether the thresholds are relative.

    Raises
    ------
    NotImplementedError
        A step with no such form, or more synapses than ``budget``.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        theta: float = 0.5,
        last_k: int | None = None,
        taps: Mapping[int, str] | None = None,
        budget: int | None = None,
        thresholds: Mapping[str, float] | None = None,
        relative: bool = False,
    ) -> None:
        if not 0.0 < theta <= 1.0:
            raise ValueError(f"theta must be in (0, 1], got {theta}")
        self.theta = float(theta)
        self.thresholds = {str(k): float(v) for k, v in (thresholds or {}).items()}
        self.relative = bool(relative)
        with torch.no_grad():
            self.plan: Plan = Compiler().compile(model.eval(), tuple(input_shape))
        n_layers = len(self.plan.layers)
        self.first = n_layers - (n_layers if last_k is None else min(int(last_k), n_layers))
        covered = self.plan.layers[self.first :]
        self.layers: list[str] = [info.name for info in covered]
        self.synapses: dict[str, int] = {info.name: info.n_synapses for info in covered}
        size = sum(self.synapses.values())
        budget = SYNAPSE_BUDGET if budget is None else budget
        if size > budget:
            raise NotImplementedError(
                f"its {len(self.layers)} layers have {size / 1e6:.1f} million synapses, over the in-graph walk's "
                f"budget of {budget / 1e6:.1f} million (the compiled walk outside the graph serves it)"
            )
        self.windows: dict[int, _Windows] = {}
        self._prepare(self.plan.steps)
        self.start, self.start_tap = self._start(taps or {})

    # ------------------------------------------------------------------ setup
    def _needed(self, step: Step) -> bool:
        return step.w_end > self.first and not isinstance(step, (PassStep, PrefixStep))

    def _prepare(self, steps: Sequence[Step]) -> None:
        for step in steps:
            if not self._needed(step):
                continue
            if isinstance(step, ConvStep):
                if step.groups != 1:
                    raise NotImplementedError(f"{step.name}: a grouped convolution has no in-graph walk")
                spatial = step.in_index[:, : step.kernel[0] * step.kernel[1]]  # channel 0's taps
                self.windows[step.uid] = _Windows(
                    step.in_shape, step.out_shape, step.kernel, step.stride, step.pads, step.dil, spatial
                )
            elif isinstance(step, AvgPoolStep):
                w = _Windows(
                    (1, *step.in_shape[1:]), step.out_shape, step.kernel, step.stride, step.pads, (1, 1), step.in_index
                )
                self.windows[step.uid] = w
            elif isinstance(step, MaxPoolStep):
                if step.tile is None:
                    raise NotImplementedError("a max pool over overlapping or padded windows has no in-graph walk")
            elif isinstance(step, ResidualStep):
                self._prepare(step.shortcut)
                self._prepare(step.body)
            elif not isinstance(step, LinearStep):
                raise NotImplementedError(f"{type(step).__name__} has no in-graph walk")

    def _start(self, taps: Mapping[int, str]) -> tuple[int, str | None]:
        """(index of the first top-level step the forward pass runs, the tap it reads; None: the input)."""
        steps = self.plan.steps
        need = next(i for i, s in enumerate(steps) if s.w_end > self.first and s.records)
        for i in range(need, 0, -1):
            prev = steps[i - 1]
            if prev.child in taps and steps[i].child != prev.child:
                return i, taps[prev.child]
        return 0, None

    @property
    def start_shape(self) -> tuple[int, ...]:
        """Per-input shape of what :meth:`trace` reads (the input, or the start tap's activation)."""
        return tuple(self.plan.steps[self.start].in_shape)

    # ------------------------------------------------------------------ the walk
    def trace(
        self, inp: torch.Tensor, logits: torch.Tensor, ranks: Sequence[int] = (1, 2)
    ) -> tuple[torch.Tensor, dict[str, Found]]:
        """(classes (R, N): the class at each rank, layer -> :class:`Found`) of the batch whose
        :attr:`start_shape` activation is ``inp`` and whose logits are ``logits``; traceable."""
        x = inp.float().reshape(-1, *self.start_shape)
        acts: dict[int, Any] = {}
        self._forward(self.plan.steps[self.start :], x, acts)
        if torch.onnx.is_in_onnx_export():
            order = torch.topk(logits, max(ranks), dim=1).indices
        else:
            order = torch.sort(logits, dim=1, descending=True, stable=True).indices
        classes = torch.stack([order[:, r - 1] for r in ranks])  # (R, N)
        seed = (torch.arange(logits.shape[1]).reshape(1, 1, -1) == classes.unsqueeze(-1)).to(x.dtype)  # (R, N, K)
        found: dict[str, Found] = {}
        self._backward(self.plan.steps, seed, acts, found)
        return classes, found

    def _forward(self, steps: Sequence[Step], x: torch.Tensor, acts: dict[int, Any]) -> torch.Tensor:
        """Run ``steps``, keeping what each needed step's backward reads (its input, or a dense selection)."""
        for step in steps:
            if isinstance(step, ResidualStep):
                skip = self._forward(step.shortcut, x, acts) if step.shortcut else x
                main = self._forward(step.body, x, acts)
                if self._needed(step):
                    n = skip.shape[0]
                    vals = torch.stack([skip.reshape(n, -1), main.reshape(n, -1)], -1)  # (N, F, 2)
                    c, total = orient_rows(vals, vals.sum(-1))
                    acts[step.uid] = dense_rule(c, total, self.theta)
                x = skip + main
                continue
            if isinstance(step, (LinearStep, ConvStep)) and self._needed(step):
                acts[step.uid] = x
            elif self._needed(step):
                acts[step.uid] = self._dense_selection(step, x)
            x = step.compute(x)
        return x

    def _dense_selection(self, step: Step, x: torch.Tensor) -> torch.Tensor:
        """The selection of every output of a pool: (N, C, L, KK) for an average pool, (N, C, OH, OW, KK) one-hot
        of each tile's first maximum for a max pool."""
        if isinstance(step, AvgPoolStep):
            win = self.windows[step.uid]
            n, ch = x.shape[0], x.shape[1]
            cols = win.unfold(x.reshape(n * ch, 1, win.h, win.w)).reshape(n, ch, win.oh * win.ow, win.kk)
            c, total = orient_rows(cols, cols.sum(-1))  # the positive divisor does not change the rule
            valid, single = self._validity(win, 1)
            return dense_rule(c, total, self.theta, valid, single)
        assert isinstance(step, MaxPoolStep) and step.tile is not None
        (kh, kw), (ch, h, w) = step.tile, step.in_shape
        tiles = x.reshape(-1, ch, h // kh, kh, w // kw, kw).permute(0, 1, 2, 4, 3, 5)
        arg = tiles.reshape(-1, ch, h // kh, w // kw, kh * kw).argmax(-1, keepdim=True)  # first maximum
        return (torch.arange(kh * kw) == arg).to(x.dtype)

    def _validity(self, win: _Windows, channels: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(valid (L, C*KK), single (L,)) of a padded step's windows; (None, None) without padding."""
        if not win.padded:
            return None, None
        valid = win.valid.repeat(1, channels)  # (L, C*KK): channel-major, as the columns
        single = 1.0 / (win.nvalid.double() * channels) >= self.theta
        return valid, single

    def _weighted(self, step: LinearStep | ConvStep, x: torch.Tensor, mask: torch.Tensor) -> tuple[Found, torch.Tensor]:
        """The rule on the output neurons either rank reached (``mask`` (R, N, O*L)); returns the layer's selected
        synapses and the (R, N, in) mask of the inputs they read."""
        r, n = mask.shape[0], mask.shape[1]
        o_n = step.weight.shape[0]
        if isinstance(step, LinearStep):
            points, fan_in, in_size = 1, step.weight.shape[1], step.weight.shape[1]
            rows = x.reshape(-1, fan_in)  # (N, I): one "window" per image
        else:
            win = self.windows[step.uid]
            points, fan_in, in_size = win.oh * win.ow, win.c * win.kk, win.c * win.h * win.w
            rows = win.unfold(x).reshape(-1, fan_in)  # (N*L, F)
        flat = mask.amax(0).reshape(-1)  # (N*O*L,) neuron reached by either rank
        hit = torch.nonzero(flat > 0).reshape(-1)  # (P,) flat (image, o, l)
        image, rest = torch.div(hit, o_n * points, rounding_mode="floor"), hit % (o_n * points)
        o, pos = torch.div(rest, points, rounding_mode="floor"), rest % points
        c = rows.index_select(0, image * points + pos) * step.weight.index_select(0, o)  # (P, F)
        c, total = orient_rows(c, c.sum(-1) + step.bias.index_select(0, o))
        phi = self.thresholds.get(step.name)
        if phi is not None:  # a padded candidate holds 0: never kept
            cut = phi * total.unsqueeze(-1) if self.relative else torch.tensor(phi, dtype=c.dtype)
            sel = ((c >= cut) & (c > 0)).to(c.dtype)
        if isinstance(step, LinearStep):
            sel = dense_rule(c, total, self.theta) if phi is None else sel
            cols = torch.arange(fan_in).unsqueeze(0) + torch.zeros_like(o).unsqueeze(1)  # (P, I): the input read
        elif phi is not None:
            cols = step.in_index.index_select(0, pos)
        else:
            valid, single = self._validity(win, win.c)
            sel = dense_rule(
                c,
                total,
                self.theta,
                None if valid is None else valid.index_select(0, pos),
                None if single is None else single.index_select(0, pos),
            )
            cols = step.in_index.index_select(0, pos)  # (P, F) flat input index, -1 in the padding
        syn = sel.unsqueeze(0) * mask.reshape(r, -1).index_select(1, hit).unsqueeze(-1)  # (R, P, F)
        # from here on the selected entries only (a few percent of the rows' candidates)
        rank, row, col = torch.nonzero(syn > 0).unbind(1)  # (M,) each; no division by P, which may be 0
        img = image.index_select(0, row)
        ids = rest.index_select(0, row) * fan_in + col  # (o*L + l)*F + f
        source = cols.reshape(-1).index_select(0, row * fan_in + col)  # the input it reads (never padding)
        at = (rank * n + img) * in_size + source
        below = torch.zeros(r * n * in_size).scatter_add(0, at, torch.ones_like(at, dtype=mask.dtype)) > 0
        return Found(rank, img, ids), below.reshape(r, n, in_size).to(mask.dtype)

    def _backward(
        self, steps: Sequence[Step], mask: torch.Tensor, acts: dict[int, Any], found: dict[str, Found]
    ) -> torch.Tensor | None:
        """Walk ``steps`` backwards from the (R, N, F) neuron masks of their output; returns the input's masks
        (None: the walk left the covered layers)."""
        for step in reversed(steps):
            if step.w_end <= self.first or isinstance(step, PrefixStep):
                return None
            r = mask.shape[0]
            if isinstance(step, (LinearStep, ConvStep)):
                found[step.name], mask = self._weighted(step, acts[step.uid], mask)
            elif isinstance(step, AvgPoolStep):
                win = self.windows[step.uid]
                s = acts[step.uid]  # (N, C, L, KK)
                keep = s.unsqueeze(0) * mask.reshape(r, -1, s.shape[1], s.shape[2], 1)
                planes = keep.reshape(-1, s.shape[2], 1, win.kk)  # (R*N*C, L, 1, KK)
                mask = win.fold(planes).reshape(r, -1, s.shape[1] * win.h * win.w)
            elif isinstance(step, MaxPoolStep):
                assert step.tile is not None
                (kh, kw), (ch, h, w) = step.tile, step.in_shape
                hit = acts[step.uid].unsqueeze(0) * mask.reshape(r, -1, ch, h // kh, w // kw, 1)
                hit = hit.reshape(r, -1, ch, h // kh, w // kw, kh, kw).permute(0, 1, 2, 3, 5, 4, 6)
                mask = hit.reshape(r, -1, ch * h * w)
            elif isinstance(step, ResidualStep):
                keep = acts[step.uid].unsqueeze(0) * mask.unsqueeze(-1)  # (R, N, F, 2)
                skip = self._backward(step.shortcut, keep[..., 0], acts, found) if step.shortcut else keep[..., 0]
                body = self._backward(step.body, keep[..., 1], acts, found)
                if skip is None or body is None:
                    if skip is None and body is None:
                        return None
                    mask = skip if body is None else body  # type: ignore[assignment]
                    continue
                mask = torch.maximum(skip, body)
        return mask


class GraphEffectivePath(nn.Module):
    """:class:`GraphWalk`, the class paths' similarities and the benign Effective Path score as one module:
    ``forward(inp, logits)`` -> (features (N, 2L) float64: rank-1 then rank-2 similarities, score (N,) float64),
    equal to :meth:`ClassPaths.similarity <pathguard.models.effective_path.ClassPaths.similarity>` and
    :meth:`BenignEPScore.score <pathguard.models.effective_path.BenignEPScore.score>` of the exact paths. It exports
    to ONNX (:meth:`to_onnx`). The class paths stay bit-packed; a selected synapse's bit is read by its byte and
    position."""

    def __init__(self, walk: GraphWalk, class_paths: Any, score: Any) -> None:
        super().__init__()
        self.walk = walk
        missing = [layer for layer in walk.layers if layer not in class_paths.synapse_bitmaps_]
        if missing:
            raise ValueError(f"layers {missing} are not in the class paths")
        self.packed = {
            layer: torch.from_numpy(np.ascontiguousarray(class_paths.synapse_bitmaps_[layer], dtype=np.uint8))
            for layer in walk.layers
        }  # (K, bytes); a gathered byte is read as int32 (integer division and remainder give its bits)
        self.median = torch.from_numpy(np.asarray(score.median_, dtype=np.float64))
        self.scale = torch.from_numpy(np.asarray(score.scale_, dtype=np.float64))
        self.orientation = torch.from_numpy(np.asarray(score.orientation_, dtype=np.float64))
        self.num_classes = int(class_paths.num_classes)

    def forward(self, inp: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        classes, found = self.walk.trace(inp, logits, (1, 2))
        n = logits.shape[0]
        sims = []
        for layer in self.walk.layers:
            if layer not in found:  # never reached: an empty path
                sims.append(torch.zeros(2, n, dtype=torch.float64))
                continue
            f = found[layer]
            packed = self.packed[layer]
            cls = classes.reshape(-1).index_select(0, f.rank * n + f.image)  # (M,) the class of the entry's rank
            bit = cls * (packed.shape[1] * 8) + f.ids  # (M,) position in the flat bitmap
            byte = packed.reshape(-1).index_select(0, torch.div(bit, 8, rounding_mode="floor")).to(torch.int32)
            on = (torch.div(byte, _BIT_VALUES.index_select(0, bit % 8), rounding_mode="floor") % 2).double()
            hits, size = f.per_image(on, 2, n), f.per_image(torch.ones_like(on), 2, n)  # (R, N)
            sims.append(hits / size.clamp_min(1.0))  # 0 for an empty path, as the class paths say
        features = torch.cat([torch.stack([s[r] for s in sims], 1) for r in (0, 1)], 1)  # (N, 2L)
        z = (self.orientation * (features - self.median) / self.scale).clamp_min(0.0)
        return features, z.mean(1)

    def to_onnx(self, opset: int = 17) -> bytes:
        """The module as an ONNX model: inputs ``input`` (N, *start_shape) and ``logits`` (N, K) float32, outputs
        ``ep_features`` and ``ep_score``."""
        x, logits = torch.zeros(2, *self.walk.start_shape), torch.zeros(2, self.num_classes)
        return export_batched(self, (x, logits), ["input", "logits"], ["ep_features", "ep_score"], opset)
