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

Supported modules: Conv2d (stride, padding, dilation, groups), Linear, MaxPool2d, AvgPool2d (also ceil mode),
the four-sided padded layers of :mod:`pathguard.models.networks.padding`, AdaptiveAvgPool2d (output size dividing
the input), BatchNorm after Conv2d/Linear (folded, eval statistics),
ReLU, Dropout, Identity, Flatten, nested ``nn.Sequential`` and :class:`Residual`. Modules before the first
weighted layer (e.g. the ``normalize`` affine map) are treated as part of the input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pathguard.models.effective_path.fastpath import FastWalk, warm_up
from pathguard.models.effective_path.paths import DEFAULT_THETA, LayerInfo, PathBatch
from pathguard.models.effective_path.plan import Compiler, Plan
from pathguard.models.effective_path.selection import cat_ids
from pathguard.models.effective_path.steps import Ctx, ResidualStep, run_backward
from pathguard.models.networks import tap_points

__all__ = [
    "EffectivePathExtractor",
    "extract_effective_paths",
    "profile_thresholds",
    "read_thresholds_document",
    "thresholds_document",
]


class EffectivePathExtractor:
    """Batched Effective Path extraction for a (possibly tapped) sequential classifier.

    Parameters
    ----------
    model : nn.Module
        An ``nn.Sequential`` (e.g. :class:`~pathguard.models.networks.TappedSequential`) of supported modules,
        used in eval semantics (Dropout off, BatchNorm running statistics).
    theta : float
        Selection threshold in (0, 1]; the paper's default is 0.5.
    last_k : int, optional
        Extract only the last ``k`` weighted layers (partial extraction); ``None`` = all layers.
    batch_size : int
        Images per internal batch (bounds memory together with the row chunking).
    input_shape : tuple of int, optional
        (C, H, W); default ``model.config.input_shape`` or the shape of the first input seen.
    fast_path : bool
        Walk batches of at most ``fast_max_batch`` images with the compiled kernels of :mod:`.fastpath` (same
        selected sets; far fewer operations at batch 1). Plans with a step the kernels do not know keep the
        torch walk (:attr:`fast_path_reason` says why).
    fast_max_batch : int
        Largest batch the compiled walk takes; larger batches use the batched torch walk.
    thresholds : mapping of str to float, optional
        Weighted layer -> threshold ``phi > 0``: those layers keep every synapse whose oriented contribution is
        positive and at least ``phi`` (the absolute rule) or at least ``phi`` times the neuron's oriented sum of
        contributions (``relative``), sort-free rules profiled offline by :func:`profile_thresholds`, instead of the
        cumulative ``theta`` rule; the others keep the cumulative rule.
    relative : bool
        Whether ``thresholds`` are relative (fractions of each neuron's sum) rather than absolute.
    """

    def __init__(
        self,
        model: nn.Module,
        theta: float = DEFAULT_THETA,
        last_k: int | None = None,
        batch_size: int = 256,
        input_shape: tuple[int, ...] | None = None,
        fast_path: bool = True,
        fast_max_batch: int = 8,
        thresholds: Mapping[str, float] | None = None,
        relative: bool = False,
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
        self.fast_path = bool(fast_path)
        self.fast_max_batch = int(fast_max_batch)
        self.fast_path_reason: str | None = None  # why the compiled walk is not available for the current plan
        self._plan: Plan | None = None
        self._fast: FastWalk | None = None
        self._taps = tap_points(model) if isinstance(model, nn.Sequential) else {}
        self.thresholds: dict[str, float] = {}
        for name, phi in (thresholds or {}).items():
            if not (np.isfinite(phi) and phi > 0):
                raise ValueError(f"the threshold of layer {name!r} must be a positive number, got {phi}")
            self.thresholds[str(name)] = float(phi)
        self.relative = bool(relative)

    @property
    def selection(self) -> str:
        """``"relative"`` or ``"absolute"`` when a layer has a threshold, else ``"cumulative"``."""
        if not self.thresholds:
            return "cumulative"
        return "relative" if self.relative else "absolute"

    # ---- geometry -------------------------------------------------------------------------------

    def _get_plan(self, shape: tuple[int, ...] | None = None) -> Plan:
        if self._plan is None or (shape is not None and tuple(shape) != self._plan.input_shape):
            shape = tuple(shape) if shape is not None else self.input_shape
            if shape is None:
                raise ValueError("input shape unknown: pass input_shape or extract from an input first")
            with torch.no_grad():
                self._plan = Compiler().compile(self.model, tuple(shape))
            unknown = sorted(set(self.thresholds) - {info.name for info in self._plan.layers})
            if unknown:
                raise ValueError(f"thresholds for layers the network does not have: {unknown}")
            self._fast, self.fast_path_reason = None, None
            try:
                self._fast = FastWalk(self._plan)
            except NotImplementedError as exc:
                self.fast_path_reason = str(exc)
        return self._plan

    def uses_fast_path(self, n: int) -> bool:
        """Whether a batch of ``n`` images is walked by the compiled kernels."""
        self._get_plan()
        return self.fast_path and self._fast is not None and n <= self.fast_max_batch

    def warm_up(self) -> None:
        """Compile the fast path's kernels now (numba JIT, once per process) instead of on the first request."""
        if self.fast_path:
            warm_up()

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
        ctx = Ctx(n=1, theta=self.theta, first=len(plan.layers) - len(self.layers))
        fake = {name: torch.zeros(1, 1) for name in self._taps.values()}
        read: list[str] = []
        with torch.inference_mode():
            self._forward_shapes_only(plan, fake, ctx, read)
        return read

    def _forward_shapes_only(self, plan: Plan, fake: dict[str, torch.Tensor], ctx: Ctx, read: list[str]) -> None:
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
            Activations named as :attr:`~pathguard.models.networks.TappedSequential.tap_names`; only
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
        ctx = Ctx(n, self.theta, len(plan.layers) - len(layers), len(ranks), self.thresholds, self.relative)
        out = self._forward(plan, x, taps or {}, ctx, need_output=logits is None)
        logits = out if logits is None else logits
        ranks = [int(r) for r in ranks]
        if min(ranks) < 1 or max(ranks) > logits.shape[1]:
            raise ValueError(f"ranks must be in 1..{logits.shape[1]}, got {ranks}")
        order = torch.sort(logits, dim=1, descending=True, stable=True).indices
        classes = {r: order[:, r - 1].contiguous() for r in ranks}
        if self._fast is not None and self.uses_fast_path(n):
            return self._fast_collect(self._fast, ctx, logits, classes, ranks, n)
        seed = torch.zeros(len(ranks) * n, logits.shape[1], dtype=torch.bool)
        seed[torch.arange(len(ranks) * n), torch.cat([classes[r] for r in ranks])] = True
        run_backward(plan.steps, seed, ctx)
        return self._collect(ctx, logits, classes, ranks, n)

    def _forward(
        self,
        plan: Plan,
        x: torch.Tensor,
        taps: Mapping[str, torch.Tensor],
        ctx: Ctx,
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
            if needs[i] and isinstance(step, ResidualStep):
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

    def _fast_collect(
        self, fast: FastWalk, ctx: Ctx, logits: torch.Tensor, classes: dict[int, torch.Tensor], ranks: list[int], n: int
    ) -> PathBatch:
        seed = np.zeros((len(ranks) * n, logits.shape[1]), np.uint8)  # row rank_index * n + image
        seed[np.arange(len(ranks) * n), np.concatenate([classes[r].numpy() for r in ranks])] = 1
        found = fast.run(seed, ctx)
        ids: dict[int, dict[str, torch.Tensor]] = {r: {} for r in ranks}
        offsets: dict[int, dict[str, torch.Tensor]] = {r: {} for r in ranks}
        empty = (np.zeros(0, np.int64), np.zeros(len(ranks) * n + 1, np.int64))
        for name in self.layers:
            flat, bounds = found.get(name, empty)  # (M,), (B+1,)
            for k, r in enumerate(ranks):  # numpy slices: slicing torch tensors costs microseconds each
                off = bounds[k * n : (k + 1) * n + 1]
                lo = int(off[0])
                ids[r][name] = torch.from_numpy(flat[lo : int(off[-1])])
                offsets[r][name] = torch.from_numpy(off - lo if lo else off)
        return PathBatch(logits, classes, list(self.layers), ids, offsets, self.theta)

    def _collect(
        self, ctx: Ctx, logits: torch.Tensor, classes: dict[int, torch.Tensor], ranks: list[int], n: int
    ) -> PathBatch:
        ids: dict[int, dict[str, torch.Tensor]] = {r: {} for r in ranks}
        offsets: dict[int, dict[str, torch.Tensor]] = {r: {} for r in ranks}
        for name in self.layers:
            img, found = ctx.found.get(name, (cat_ids([]), cat_ids([])))
            counts = torch.bincount(img, minlength=len(ranks) * n)
            bounds = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
            for k, r in enumerate(ranks):
                lo, hi = bounds[k * n], bounds[(k + 1) * n]
                ids[r][name] = found[lo:hi]
                offsets[r][name] = bounds[k * n : (k + 1) * n + 1] - lo
        return PathBatch(logits, classes, list(self.layers), ids, offsets, self.theta)

    @torch.inference_mode()
    def cumulative_cuts(self, x: torch.Tensor | np.ndarray, relative: bool = False) -> dict[str, np.ndarray]:
        """Per covered layer, the cumulative rule's cut (the smallest kept oriented contribution; ``relative``: as a
        fraction of the neuron's oriented sum, neurons with a positive sum only) of every neuron the rank-1 walks of
        ``x`` (N, C, H, W) reach with it, whatever :attr:`thresholds` say."""
        x = torch.as_tensor(x, dtype=torch.float32)
        cuts: dict[str, list[torch.Tensor]] = {}
        for s in range(0, x.shape[0], self.batch_size):
            xb = x[s : s + self.batch_size]
            plan = self._get_plan(tuple(xb.shape[1:]))
            ctx = Ctx(len(xb), self.theta, len(plan.layers) - len(self.layers), relative=relative, cuts=cuts)
            logits = self._forward(plan, xb, {}, ctx)
            seed = torch.zeros(logits.shape, dtype=torch.bool)
            seed[torch.arange(len(xb)), torch.sort(logits, dim=1, descending=True, stable=True).indices[:, 0]] = True
            run_backward(plan.steps, seed, ctx)
        empty = np.zeros(0, np.float32)
        return {name: torch.cat(cuts[name]).numpy() if name in cuts else empty for name in self.layers}


def profile_thresholds(
    extractor: EffectivePathExtractor, x: torch.Tensor | np.ndarray, quantile: float = 0.5, relative: bool = False
) -> dict[str, float]:
    """Thresholds for the covered layers, profiled on benign images ``x``: per layer, the ``quantile`` of the
    cumulative rule's cuts (``relative``: relative cuts) over every neuron the images' rank-1 walks reach (Ptolemy's
    offline profiling).

    A layer none of the walks reaches with a positive cut gets no threshold (it keeps the cumulative rule); a
    ValueError when no layer does.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    out: dict[str, float] = {}
    for name, cuts in extractor.cumulative_cuts(x, relative).items():
        if len(cuts):
            out[name] = float(np.quantile(cuts.astype(np.float64), quantile))
    if not out:
        raise ValueError(f"the {len(x)} profiling images' walks reach no neuron to profile a threshold from")
    return out


def thresholds_document(extractor: EffectivePathExtractor) -> dict[str, object]:
    """What a bundle stores of a sort-free extractor (``ep_thresholds.json``): its rule and per-layer thresholds."""
    return {"rule": extractor.selection, "thresholds": dict(extractor.thresholds)}


def read_thresholds_document(doc: Mapping[str, object]) -> tuple[dict[str, float], bool]:
    """(thresholds, relative) of a stored :func:`thresholds_document`; ValueError for anything else."""
    rule, thresholds = doc.get("rule"), doc.get("thresholds")
    if rule not in ("absolute", "relative") or not isinstance(thresholds, Mapping) or not thresholds:
        raise ValueError(f"not an Effective Path thresholds document: rule {rule!r}")
    return {str(k): float(v) for k, v in thresholds.items()}, rule == "relative"


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
