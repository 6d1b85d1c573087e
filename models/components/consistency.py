"""The prediction-consistency family: how fragile the prediction is (benign-only, beyond the two papers).

Attacks that stop just past the decision boundary (CW, DeepFool, PGD-L2, Square) leave the layer activations
inside their class's clean range, but their prediction sits on a knife edge. Each component here turns that into a
raw score (higher = more anomalous), calibrated to p-values on clean images like every other component:

- ``margin``: the logit margin of the prediction, top-1 minus top-2 (scored negated: a small margin is suspicious);
- ``noise_flip``, ``noise_l1``, ``noise_drop``: K Gaussian-noise copies of the input (sigma chosen on benign data
  only: the largest of a grid at which the clean copies' mean class-flip share stays within ``flip_rate``), and
  the share of copies whose class flips, the mean L1 change of the softmax, the mean drop of the predicted class's
  logit (Roth et al., ICML 2019, use this noise response);
- ``squeeze``: feature squeezing (Xu et al., NDSS 2018): bit-depth reduction and median filters, the largest L1
  distance between the softmax of the input and of a squeezed copy.

Every transformed copy of a batch (of all consistency components in the bundle) runs in ONE forward pass together
with the original images (:func:`copies_logits`); each input's noise comes from its own generator of the
observation, drawn per request unless a seed is set.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pathguard.models.components.base import (
    BuildContext,
    Component,
    FileReader,
    Observation,
    Relaxation,
    json_blob,
    served_raw,
    straight_through,
)
from pathguard.models.components.graph import GraphContext
from pathguard.models.networks import TappedSequential

__all__ = [
    "ConsistencyComponent",
    "MarginComponent",
    "NoiseDropComponent",
    "NoiseFlipComponent",
    "NoiseL1Component",
    "SqueezeComponent",
    "Transform",
    "bit_depth",
    "choose_sigma",
    "copies_logits",
    "default_squeezers",
    "flip_rates",
    "has_copies",
    "median_filter",
    "probe",
    "probe_inputs",
]

SIGMA_GRID = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2)
_SIGMA_SAMPLE = 1000  # benign images the sigma is chosen on


@dataclass(frozen=True)
class Transform:
    """``copies`` transformed versions of a batch: ``apply(x (N, C, H, W), generators) -> (copies, N, C, H, W)``,
    one generator per input; ``graph(g, x)`` writes the same into an ONNX graph (the guarded graph) and returns the
    (copies, N, C, H, W) tensor's name."""

    key: str
    copies: int
    apply: Callable[[torch.Tensor, Sequence[torch.Generator]], torch.Tensor]
    graph: Callable[[GraphContext, str], str] | None = None


class ConsistencyComponent(Component):
    """A component scored from the logits of transformed copies of the input (see :func:`copies_logits`)."""

    family = "consistency"

    def transforms(self) -> list[Transform]:
        return []

    def graph_unavailable(self) -> str | None:
        why = super().graph_unavailable()
        missing = [t.key for t in self.transforms() if t.graph is None]
        if why is None and missing:
            return f"component {self.name!r}: its copies {missing} have no in-graph form"
        return why


PROBE = "consistency"  # the observation's key (and timing) of the copies' forward pass


def probe(obs: Observation, own: list[Transform] | None = None) -> dict[str, torch.Tensor]:
    """The logits of the originals (key ``""``, (N, K)) and of every transform's copies (its key, (copies, N, K))
    of every consistency component of the observation's bundle (and ``own``), deduplicated by key, from ONE forward
    pass. Thread-safe: it reads the observation and draws from its generators only."""
    return probe_inputs(obs.x, obs.generators, obs.components, obs.forward, own)


def has_copies(components: Mapping[str, Component]) -> bool:
    """Whether any of ``components`` scores transformed copies (the margin alone reads the logits: no probe)."""
    return any(isinstance(c, ConsistencyComponent) and c.transforms() for c in components.values())


def probe_inputs(
    x: torch.Tensor,
    generators: Sequence[torch.Generator],
    components: Mapping[str, Component],
    forward: Callable[[torch.Tensor], torch.Tensor],
    own: list[Transform] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`probe` given the inputs alone: it needs neither their logits nor their taps, so it can start before
    the classifier's forward pass of the same batch."""
    family = [c for c in components.values() if isinstance(c, ConsistencyComponent)]
    todo = {t.key: t for c in family for t in c.transforms()}
    todo.update({t.key: t for t in own or [] if t.key not in todo})
    keys = sorted(todo)  # the order the noise is drawn in
    x = x.float()
    n, shape = len(x), tuple(x.shape[1:])
    batch = [x] + [todo[k].apply(x, generators).reshape(-1, *shape) for k in keys]
    with torch.no_grad():
        logits = forward(torch.cat(batch)).double()  # ((1 + sum copies) * N, K)
    out = {"": logits[:n]}
    start = n
    for k in keys:
        m = todo[k].copies * n
        out[k] = logits[start : start + m].reshape(todo[k].copies, n, -1)
        start += m
    return out


def copies_logits(obs: Observation, key: str, own: list[Transform]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of the originals (N, K), logits of the copies of transform ``key`` (copies, N, K)).

    The first call of a batch runs :func:`probe` (unless the pipeline ran it already, beside the other components);
    later calls read its result."""
    res = obs.get(PROBE, lambda: probe(obs, own), timing=PROBE)
    if key not in res:  # a transform not known when the batch's probe ran
        res.update({key: _run_one(obs, next(t for t in own if t.key == key))})
    return res[""], res[key]


def _run_one(obs: Observation, t: Transform) -> torch.Tensor:
    x = obs.x.float()
    with torch.no_grad():
        logits = obs.forward(t.apply(x, obs.generators).reshape(-1, *x.shape[1:])).double()
    return logits.reshape(t.copies, len(x), -1)


# ------------------------------------------------------------------------------------------------------- margin


class MarginComponent(ConsistencyComponent):
    """Negated logit margin (top-1 minus top-2) of the prediction; needs no fitting and no forward pass."""

    name = "margin"

    @classmethod
    def build(cls, ctx: BuildContext, params: Mapping[str, Any]) -> MarginComponent:
        return cls()

    def to_files(self) -> dict[str, bytes]:
        return {}

    @classmethod
    def from_files(
        cls, read: FileReader, model: TappedSequential, built: Mapping[str, Component], entry: Mapping[str, Any]
    ) -> MarginComponent:
        return cls()

    @staticmethod
    def margin(logits: torch.Tensor) -> np.ndarray:
        return logit_margin(logits).numpy()

    def raw(self, obs: Observation) -> np.ndarray:
        return -self.margin(obs.logits)

    def surrogate(self, obs: Observation, relax: Relaxation) -> torch.Tensor:
        return -logit_margin(obs.logits)

    def graph(self, g: GraphContext) -> str:
        values, _ = g.ops("TopK", [g.logits, g.const([2], np.int64)], 2, axis=1)  # (N, 2) top-1, top-2
        top1, top2 = (g.squeeze(g.op("Slice", values, *(g.const([v], np.int64) for v in (i, i + 1, 1))), [1])
                      for i in (0, 1))  # fmt: skip
        return g.op("Sub", top2, top1)  # -(top-1 - top-2)

    def fields(self, obs: Observation, violation: np.ndarray) -> dict[str, Any]:
        return {"margin": self.margin(obs.logits), "score": violation}

    def graph_fields(self, g: GraphContext, violation: str) -> dict[str, Any]:
        return {"margin": g.op("Neg", self.graph(g)), "score": violation}


# -------------------------------------------------------------------------------------------------- noise response


class _NoiseComponent(ConsistencyComponent):
    """Statistics of K Gaussian-noise copies of the input, sigma chosen on benign data.

    Build parameters: ``copies`` (K, default 8), ``flip_rate`` (default 0.02: the largest sigma of
    :data:`SIGMA_GRID` whose clean copies flip class at most this often on average) or ``sigma`` (fixed).
    """

    params = ("copies", "flip_rate", "sigma")
    statistic = ""

    def __init__(self, sigma: float, copies: int) -> None:
        if not sigma > 0 or copies < 1:
            raise ValueError(f"noise needs sigma > 0 and copies >= 1, got sigma={sigma}, copies={copies}")
        self.sigma = float(sigma)
        self.copies = int(copies)

    @classmethod
    def build(cls, ctx: BuildContext, params: Mapping[str, Any]) -> _NoiseComponent:
        copies = int(params.get("copies", 8))
        if "sigma" in params:
            return cls(float(params["sigma"]), copies)
        flip_rate = float(params.get("flip_rate", 0.02))
        key = f"noise_sigma/{copies}/{flip_rate}"  # the three noise statistics share one search
        if key not in ctx.shared:
            x, _ = ctx.sample()
            ctx.shared[key] = choose_sigma(ctx.model, x[:_SIGMA_SAMPLE], copies, flip_rate, ctx.seed)
        return cls(ctx.shared[key]["sigma"], copies)

    def to_files(self) -> dict[str, bytes]:
        return {self.files[0]: json_blob({"sigma": self.sigma, "copies": self.copies})}

    @classmethod
    def from_files(
        cls, read: FileReader, model: TappedSequential, built: Mapping[str, Component], entry: Mapping[str, Any]
    ) -> _NoiseComponent:
        cfg = json.loads(read(cls.files[0]))
        return cls(float(cfg["sigma"]), int(cfg["copies"]))

    def manifest(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "copies": self.copies}

    def transforms(self) -> list[Transform]:
        return [noise_transform(self.sigma, self.copies)]

    def stats(self, obs: Observation) -> dict[str, np.ndarray]:
        t = self.transforms()
        return obs.get(t[0].key + "/stats", lambda: noise_statistics(*copies_logits(obs, t[0].key, t)))

    def raw(self, obs: Observation) -> np.ndarray:
        return self.stats(obs)[self.statistic]

    def surrogate(self, obs: Observation, relax: Relaxation) -> torch.Tensor:
        """The statistic over ``relax.draws`` noise copies drawn from the observation's generators (one draw per
        batch: the three noise statistics of a bundle share it), the flips softened by ``relax.temperature``."""
        t = noise_transform(self.sigma, relax.draws or self.copies)
        orig, copies = obs.get(f"surrogate/{t.key}", lambda: copies_with_grad(obs, t))
        return noise_tensors(orig, copies, relax)[self.statistic]

    def graph(self, g: GraphContext) -> str:
        key = self.transforms()[0].key
        return g.get(f"{key}/stats", lambda: noise_statistics_graph(g, key))[self.statistic]

    def fields(self, obs: Observation, violation: np.ndarray) -> dict[str, Any]:
        return {self.statistic: served_raw(obs, self), "score": violation}

    def graph_fields(self, g: GraphContext, violation: str) -> dict[str, Any]:
        return {self.statistic: self.graph(g), "score": violation}


class NoiseFlipComponent(_NoiseComponent):
    """Share of the noise copies whose predicted class differs from the input's."""

    name = "noise_flip"
    files = ("noise_flip.json",)
    statistic = "flip_share"


class NoiseL1Component(_NoiseComponent):
    """Mean L1 change of the softmax under the noise copies."""

    name = "noise_l1"
    files = ("noise_l1.json",)
    statistic = "softmax_l1"


class NoiseDropComponent(_NoiseComponent):
    """Mean drop of the predicted class's logit under the noise copies."""

    name = "noise_drop"
    files = ("noise_drop.json",)
    statistic = "logit_drop"


def noise_transform(sigma: float, copies: int) -> Transform:
    def apply(x: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
        per_input = [torch.randn((copies, *x.shape[1:]), generator=g, dtype=x.dtype) for g in gens]
        noise = torch.stack(per_input, dim=1) * sigma  # (copies, N, C, H, W)
        return (x.unsqueeze(0) + noise).clamp(0.0, 1.0)

    key = f"noise/{sigma:.6g}/{copies}"

    def graph(g: GraphContext, x: str) -> str:
        shape = g.op("Concat", g.const([copies], np.int64), g.op("Shape", x), axis=0)  # (copies, N, C, H, W)
        xs = g.op("Expand", g.unsqueeze(x, [0]), shape)
        noise = g.op("Mul", g.noise(key, xs), g.const(np.float32(sigma)))
        return g.op("Clip", g.op("Add", xs, noise), g.const(np.float32(0)), g.const(np.float32(1)))

    return Transform(key, copies, apply, graph)


def noise_statistics_graph(g: GraphContext, key: str) -> dict[str, str]:
    """:func:`noise_tensors` written into the graph ``g`` for the copies of transform ``key`` (no relaxation)."""
    copies, copies32 = g.copies[key], g.copies32[key]  # (M, N, K)
    copy_class = g.op("ArgMax", copies32, axis=2, keepdims=0)  # (M, N)
    flip = g.double(g.op("Not", g.op("Equal", copy_class, g.unsqueeze(g.predicted, [0]))))
    shape = g.op("Shape", copies)
    index = g.op("Expand", g.unsqueeze(g.predicted, [0, 2]), g.op("Concat", g.op("Slice", shape, *(
        g.const([v], np.int64) for v in (0, 2))), g.const([1], np.int64), axis=0))  # fmt: skip  # (M, N, 1)
    own_copy = g.squeeze(g.op("GatherElements", copies, index, axis=2), [2])  # (M, N)
    own = g.squeeze(g.op("GatherElements", g.logits, g.unsqueeze(g.predicted, [1]), axis=1), [1])  # (N,)
    change = g.op("Sub", g.op("Softmax", copies, axis=2), g.unsqueeze(g.op("Softmax", g.logits, axis=1), [0]))
    l1 = g.reduce("ReduceMean", g.reduce("ReduceSum", g.op("Abs", change), [2]), [0])
    drop = g.reduce("ReduceMean", g.op("Sub", g.unsqueeze(own, [0]), own_copy), [0])
    return {"flip_share": g.reduce("ReduceMean", flip, [0]), "softmax_l1": l1, "logit_drop": drop}


def noise_statistics(orig: torch.Tensor, copies: torch.Tensor) -> dict[str, np.ndarray]:
    """Flip share, mean softmax L1 change and mean predicted-logit drop of the copies' logits (M, N, K) against the
    originals' (N, K); each (N,)."""
    return {k: v.numpy() for k, v in noise_tensors(orig, copies).items()}


def noise_tensors(orig: torch.Tensor, copies: torch.Tensor, relax: Relaxation | None = None) -> dict[str, torch.Tensor]:
    """:func:`noise_statistics` as tensors; with ``relax`` (adaptive attacks) a copy's flip is also the logistic
    ``sigmoid((best other logit - own logit) / temperature)`` (straight through: the hard flip forward)."""
    pred = orig.argmax(1)  # (N,)
    own_copy = copies.gather(2, pred[None, :, None].expand(copies.shape[0], -1, 1))[..., 0]  # (M, N)
    flip = (copies.argmax(2) != pred.unsqueeze(0)).double()
    if relax is not None and relax.temperature > 0:
        others = copies.masked_fill(F.one_hot(pred, copies.shape[2]).bool().unsqueeze(0), -torch.inf).amax(2)
        flip = straight_through(flip, torch.sigmoid((others - own_copy) / relax.temperature), relax)
    l1 = (torch.softmax(copies, 2) - torch.softmax(orig, 1).unsqueeze(0)).abs().sum(2).mean(0)
    own = orig.gather(1, pred[:, None])[:, 0]  # (N,)
    drop = (own.unsqueeze(0) - own_copy).mean(0)
    return {"flip_share": flip.mean(0), "softmax_l1": l1, "logit_drop": drop}


def copies_with_grad(obs: Observation, t: Transform) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of the originals (N, K), of transform ``t``'s copies (copies, N, K)), float64, from one forward
    pass through ``obs.forward`` with gradients (the adaptive attacks' :meth:`Component.surrogate`)."""
    x = obs.x.float()
    n = len(x)
    logits = obs.forward(torch.cat([x, t.apply(x, obs.generators).reshape(-1, *x.shape[1:])])).double()
    return logits[:n], logits[n:].reshape(t.copies, n, -1)


@torch.no_grad()
def flip_rates(
    model: TappedSequential, x: np.ndarray, copies: int, seed: int, stop_above: float = 1.0
) -> dict[float, float]:
    """Mean class-flip share of ``copies`` noise copies of the benign images ``x`` at each sigma of
    :data:`SIGMA_GRID`, ascending; the grid stops after the first sigma whose rate exceeds ``stop_above``."""
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    rates: dict[float, float] = {}
    for sigma in SIGMA_GRID:
        t = noise_transform(sigma, copies)
        flips = []
        for s in range(0, len(xt), 250):
            xb = xt[s : s + 250]
            logits = model(torch.cat([xb, t.apply(xb, [gen] * len(xb)).reshape(-1, *xb.shape[1:])]))
            stats = noise_statistics(logits[: len(xb)], logits[len(xb) :].reshape(copies, len(xb), -1))
            flips.append(stats["flip_share"])
        rates[sigma] = float(np.concatenate(flips).mean())
        if rates[sigma] > stop_above:
            break
    return rates


def pick_sigma(rates: dict[float, float], flip_rate: float) -> float:
    """The largest sigma whose flip rate is at most ``flip_rate`` (the smallest of the grid when none is)."""
    ok = [s for s, r in rates.items() if r <= flip_rate]
    return max(ok) if ok else SIGMA_GRID[0]


def choose_sigma(model: TappedSequential, x: np.ndarray, copies: int, flip_rate: float, seed: int) -> dict[str, Any]:
    """The largest sigma of :data:`SIGMA_GRID` whose noise copies of the benign images ``x`` flip class at most
    ``flip_rate`` of the time on average (the smallest sigma of the grid when none does), with the flip rates
    measured up to the first sigma above it."""
    rates = flip_rates(model, x, copies, seed, stop_above=flip_rate)
    return {"sigma": pick_sigma(rates, flip_rate), "flip_rates": rates}


# ------------------------------------------------------------------------------------------------ feature squeezing


class SqueezeComponent(ConsistencyComponent):
    """Largest L1 distance between the softmax of the input and of its squeezed copies.

    Build parameters: ``bits`` (colour bit depth) and ``median`` (median filter sizes). Defaults follow the feature
    squeezing paper by input: one channel (MNIST-like) 1 bit and 2x2, 3x3 medians; colour images up to 64 pixels
    wide (CIFAR-10-like) 5 bits and a 2x2 median; larger ones 4 bits and 2x2, 3x3 medians.
    """

    name = "squeeze"
    files = ("squeeze.json",)
    params = ("bits", "median")

    def __init__(self, bits: int, median: list[int]) -> None:
        if not 1 <= bits <= 8 or any(k < 2 for k in median):
            raise ValueError(f"squeeze needs 1 <= bits <= 8 and median sizes >= 2, got {bits}, {median}")
        self.bits = int(bits)
        self.median = [int(k) for k in median]

    @classmethod
    def build(cls, ctx: BuildContext, params: Mapping[str, Any]) -> SqueezeComponent:
        bits, median = default_squeezers(ctx.model.config.input_shape)
        return cls(int(params.get("bits", bits)), list(params.get("median", median)))

    def to_files(self) -> dict[str, bytes]:
        return {"squeeze.json": json_blob(self.manifest())}

    @classmethod
    def from_files(
        cls, read: FileReader, model: TappedSequential, built: Mapping[str, Component], entry: Mapping[str, Any]
    ) -> SqueezeComponent:
        cfg = json.loads(read("squeeze.json"))
        return cls(int(cfg["bits"]), list(cfg["median"]))

    def manifest(self) -> dict[str, Any]:
        return {"bits": self.bits, "median": self.median}

    def transforms(self) -> list[Transform]:
        bits = self.bits

        def squeeze_bits(x: torch.Tensor, _gens: Sequence[torch.Generator]) -> torch.Tensor:
            return bit_depth(x, bits).unsqueeze(0)

        def squeeze_median(k: int) -> Callable[[torch.Tensor, Sequence[torch.Generator]], torch.Tensor]:
            return lambda x, _gens: median_filter(x, k).unsqueeze(0)

        def graph_bits(g: GraphContext, x: str) -> str:
            levels = g.const(np.float32(2**bits - 1))
            return g.unsqueeze(g.op("Div", g.op("Round", g.op("Mul", x, levels)), levels), [0])

        def graph_median(k: int) -> Callable[[GraphContext, str], str]:
            return lambda g, x: g.unsqueeze(median_filter_graph(g, x, k), [0])

        return [Transform(f"bits/{bits}", 1, squeeze_bits, graph_bits)] + [
            Transform(f"median/{k}", 1, squeeze_median(k), graph_median(k)) for k in self.median
        ]

    def distance(self, obs: Observation) -> np.ndarray:
        def compute() -> np.ndarray:
            ts = self.transforms()
            pairs = [copies_logits(obs, t.key, ts) for t in ts]
            return squeeze_distance(pairs[0][0], [copy[0] for _, copy in pairs]).numpy()

        return obs.get(self.name, compute)

    def raw(self, obs: Observation) -> np.ndarray:
        return self.distance(obs)

    def surrogate(self, obs: Observation, relax: Relaxation) -> torch.Tensor:
        """The same distance through ``obs.forward`` with gradients; the bit-depth reduction passes the gradient
        straight through (its forward value is exact), the median filters are differentiable as they are."""
        x = obs.x.float()
        n = len(x)
        bits = x + (bit_depth(x, self.bits) - x).detach()  # (N, C, H, W): straight-through quantization
        logits = obs.forward(torch.cat([x, bits, *(median_filter(x, k) for k in self.median)])).double()
        return squeeze_distance(logits[:n], list(logits[n:].split(n)))

    def graph(self, g: GraphContext) -> str:
        p = g.op("Softmax", g.logits, axis=1)
        per_copy = []
        for t in self.transforms():
            copy = g.squeeze(g.copies[t.key], [0])  # (N, K)
            l1 = g.reduce("ReduceSum", g.op("Abs", g.op("Sub", g.op("Softmax", copy, axis=1), p)), [1], keepdims=True)
            per_copy.append(l1)
        return g.reduce("ReduceMax", g.op("Concat", *per_copy, axis=1), [1])

    def fields(self, obs: Observation, violation: np.ndarray) -> dict[str, Any]:
        return {"softmax_l1": served_raw(obs, self), "score": violation}

    def graph_fields(self, g: GraphContext, violation: str) -> dict[str, Any]:
        return {"softmax_l1": self.graph(g), "score": violation}


def logit_margin(logits: torch.Tensor) -> torch.Tensor:
    """(N,) top-1 minus top-2 logit of (N, K) logits, float64."""
    top2 = torch.topk(logits.double(), 2, dim=1).values  # (N, 2)
    return top2[:, 0] - top2[:, 1]


def squeeze_distance(orig: torch.Tensor, copies: list[torch.Tensor]) -> torch.Tensor:
    """(N,) largest L1 distance between the softmax of the originals' logits (N, K) and of each squeezed copy's."""
    p = torch.softmax(orig, 1)
    return torch.stack([(torch.softmax(c, 1) - p).abs().sum(1) for c in copies], 1).max(1).values


def default_squeezers(input_shape: tuple[int, int, int]) -> tuple[int, list[int]]:
    """(bits, median sizes) of feature squeezing for inputs (C, H, W): one channel 1 bit and 2x2, 3x3 medians;
    colour images up to 64 pixels wide 5 bits and a 2x2 median; larger ones 4 bits and 2x2, 3x3 medians."""
    c, _, w = input_shape
    return (1, [2, 3]) if c == 1 else (5, [2]) if w <= 64 else (4, [2, 3])


def bit_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] reduced to ``2**bits`` levels."""
    levels = 2**bits - 1
    return torch.round(x * levels) / levels


def median_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, H, W) median over each pixel's k x k window (reflected at the border; even k: the window reaches
    right and down, and the median is the mean of the two middle values)."""
    lo = (k - 1) // 2
    padded = F.pad(x, (lo, k - 1 - lo, lo, k - 1 - lo), mode="reflect")
    windows = padded.unfold(2, k, 1).unfold(3, k, 1).reshape(*x.shape, k * k)  # (N, C, H, W, k*k)
    ordered = windows.sort(dim=-1).values
    mid = k * k // 2
    return ordered[..., mid] if k % 2 else (ordered[..., mid - 1] + ordered[..., mid]) / 2


def median_filter_graph(g: GraphContext, x: str, k: int) -> str:
    """:func:`median_filter` written into the graph ``g`` (input (N, C, H, W) with static H, W): the k x k windows
    stacked on a last axis and their largest ``k*k//2 + 1`` values by TopK; the same middle values, so the same
    float32 result."""
    _, h, w = g.input_shape
    lo = (k - 1) // 2
    hi = k - 1 - lo
    padded = g.op("Pad", x, g.const([0, 0, lo, lo, 0, 0, hi, hi], np.int64), mode="reflect")
    windows = []
    for i in range(k):
        for j in range(k):
            starts, ends, axes = g.const([i, j], np.int64), g.const([i + h, j + w], np.int64), g.const([2, 3], np.int64)
            windows.append(g.unsqueeze(g.op("Slice", padded, starts, ends, axes), [4]))
    stacked = g.op("Concat", *windows, axis=4)  # (N, C, H, W, k*k)
    mid = k * k // 2
    top, _ = g.ops("TopK", [stacked, g.const([mid + 1], np.int64)], 2, axis=4, largest=1, sorted=1)  # descending

    def nth(i: int) -> str:  # the i-th largest, (N, C, H, W)
        return g.squeeze(g.op("Slice", top, *(g.const([v], np.int64) for v in (i, i + 1, 4))), [4])

    if k % 2:
        return nth(mid)
    # ascending ordered[mid - 1] + ordered[mid] are the (mid)-th and (mid - 1)-th largest: the same sum
    return g.op("Div", g.op("Add", nth(mid), nth(mid - 1)), g.const(np.float32(2)))
