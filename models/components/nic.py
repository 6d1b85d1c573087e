"""NIC (Ma et al., NDSS 2019) as verdict components: the final one-class model over the value and provenance
invariants (``nic``), and the value invariants alone with two-sided per-layer p-values (``nic_vi``).

NIC's per-layer work (reduction, value invariant, derived head) only needs that layer's activation, so the serving
runtime runs it on worker threads during the forward pass (:meth:`NICComponent.layer_check`) or inside the served
graph; the pipeline hands those results to the observation (``nic/partials``, ``nic/graph``) and the component
finishes from them: the softmax layer's check, the provenance invariants and the final model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pathguard.models.components.base import (
    BuildContext,
    Component,
    FileReader,
    Observation,
    Relaxation,
    json_blob,
    npz_blob,
    one_torch_thread,
    read_npz,
)
from pathguard.models.components.graph import Columns, GraphContext
from pathguard.models.networks import TappedSequential
from pathguard.models.nic import INPUT, SOFTMAX, NICDetector, layer_activation
from pathguard.models.nic.onnx_export import GraphNICScores, nic_output_names, with_nic_outputs
from pathguard.models.verdict.calibration import two_sided_fisher
from pathguard.models.verdict.surrogate import soft_p_values

__all__ = ["LayerPartial", "NICAnalysis", "NICComponent", "NICValueComponent", "on_scale", "on_scale_soft"]

NIC_ARRAYS, NIC_CONFIG = "nic.npz", "nic.json"
PARTIALS, GRAPH = "nic/partials", "nic/graph"


@dataclass
class LayerPartial:
    """NIC's per-layer result for a batch: VI score (N,) and derived-head probabilities (N, K)."""

    value: torch.Tensor
    probs: torch.Tensor


@dataclass
class NICAnalysis:
    """NIC's scores of a batch: raw VI (N, L), PI (N, L-1), final (N,) and the violation probabilities."""

    value: np.ndarray
    provenance: np.ndarray
    final: np.ndarray
    value_violation: np.ndarray
    provenance_violation: np.ndarray


class NICComponent(Component):
    """NIC's final one-class model (build parameters: :class:`NICDetector`'s)."""

    name = "nic"
    files = (NIC_ARRAYS, NIC_CONFIG)
    params = None  # any NICDetector parameter (it checks them)

    def __init__(self, nic: NICDetector) -> None:
        self.nic = nic
        self.value_layers: list[str] = list(nic.layers_)
        self.pairs: list[str] = list(nic.pairs_)
        self.checked_taps = [n for n in self.value_layers if n not in (INPUT, SOFTMAX)]
        self._reference: np.ndarray | None = None  # set by draw_members: the scale the final scores are put on

    # ------------------------------------------------------------------ randomization (NIC paper III-D)
    @property
    def randomized(self) -> bool:
        return self._reference is not None

    def draw_members(self, reference: np.ndarray | None = None) -> None:
        """Score every input with one of the detector's randomized members (members 1..R), drawn per input from its
        generator (fresh per request, or derived from the seed and its pixels), instead of member 0.

        A member's final score is mapped onto ``reference`` (the sorted clean split-A final scores the verdict
        calibrates NIC with; default member 0's own) by its rank among the member's own split-A scores, so its
        p-value, and with it the verdict's calibration, is exactly what that member's own calibration gives. Raises
        ValueError for a bundle built without randomized members."""
        if self.nic.n_members < 2:
            raise ValueError(
                "this bundle's NIC has no randomized members to draw from; rebuild it with "
                "--nic '{\"n_random\": 3}' (NIC paper III-D)"
            )
        self._reference = np.sort(np.asarray(reference if reference is not None else self._calib_final(0)))

    def _calib_final(self, member: int) -> np.ndarray:
        return self.nic._member(member).sorted_calib()[2]

    def members_of(self, obs: Observation) -> np.ndarray:
        """(N,) the member scoring each input: 0, or with :meth:`draw_members` one of 1..R per input's generator."""
        if not self.randomized:
            return np.zeros(len(obs), dtype=np.int64)
        r = self.nic.n_members - 1
        return obs.get("nic/members", lambda: np.array([1 + g.initial_seed() % r for g in obs.generators]))

    @classmethod
    def check(cls, model: TappedSequential, params: Mapping[str, Any]) -> None:
        NICDetector(**params).check_layers(model)  # a misnamed layer fails now, not after a pass over the images

    @classmethod
    def build(cls, ctx: BuildContext, params: Mapping[str, Any]) -> NICComponent:
        """Fit on the benign sample of the fit split, calibrate on split A (streamed through the passes)."""
        nic = NICDetector(**{"seed": ctx.seed, **params})
        x, y = ctx.sample(nic.sample_size)
        nic.fit(ctx.model, x, y)
        assert ctx.job is not None
        ctx.job = ctx.job.with_fitted(**cls(nic).to_files())
        scores = ctx.passes.ordered(nic_pass, ctx.job, "calib_a", "NIC calibration")
        nic.calibrate_scores([chunk for r in scores for chunk in r.value])
        return cls(nic)

    def to_files(self) -> dict[str, bytes]:
        return {NIC_ARRAYS: npz_blob(self.nic.to_arrays()), NIC_CONFIG: json_blob(self.nic.config())}

    @classmethod
    def from_files(
        cls, read: FileReader, model: TappedSequential, built: Mapping[str, Component], entry: Mapping[str, Any]
    ) -> NICComponent:
        return cls(NICDetector.from_arrays(read_npz(read(NIC_ARRAYS)), json.loads(read(NIC_CONFIG))))

    def manifest(self) -> dict[str, Any]:
        return {"layers": self.value_layers, "pairs": self.pairs, "head_accuracy": self.nic.head_accuracy_}

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def layer_check(self, name: str, activation: torch.Tensor) -> LayerPartial:
        """NIC work of one checked layer (``"input"``, a tap name or ``"softmax"``); thread-safe."""
        value, probs = self.nic.check_layer(name, activation)
        return LayerPartial(value, probs)

    def analysis(self, obs: Observation) -> NICAnalysis:
        return obs.get(self.name, lambda: self._analyse(obs), timing=self.name)

    def _analyse(self, obs: Observation) -> NICAnalysis:
        if self.randomized:
            return self._analyse_members(obs)
        graph: GraphNICScores | None = obs.memo.get(GRAPH)
        partials = dict(obs.memo.get(PARTIALS) or {})
        if graph is not None and graph.provenance is not None and graph.final is not None:
            # the guarded graph's whole NIC (its softmax layer's checks on onnxruntime's softmax: see the module
            # docstring of pathguard.models.guarded for what that rounding may move)
            v, p = graph.value.double().numpy(), graph.provenance.double().numpy()
            f = graph.final.double().numpy()
            return NICAnalysis(v, p, f, self.nic.value_violation(v), self.nic.provenance_violation(p))
        if graph is not None:
            # the graph's results stand in for the checks of every layer but the softmax; the derived models'
            # outputs are torch's softmax of the graph's head logits, one (N, K) slice at a time: one (N, L, K)
            # softmax is parallelized by torch, and waking its second thread cost 5-8 ms per request on 2 cores
            partials = {
                name: LayerPartial(graph.value[:, j], torch.softmax(graph.head_logits[:, j], dim=-1))
                for j, name in enumerate(self.value_layers)
                if name != SOFTMAX
            }
        for name in self.value_layers:
            if name not in partials:
                partials[name] = self.layer_check(name, layer_activation(name, obs.x, obs.logits, obs.taps))
        value = torch.stack([partials[n].value for n in self.value_layers], dim=1).double()  # (N, L)
        pairs = zip(self.value_layers, self.value_layers[1:], strict=False)
        prov = torch.stack(
            [self.nic.provenance_score(i, partials[a].probs, partials[b].probs) for i, (a, b) in enumerate(pairs)],
            dim=1,
        ).double()  # (N, L-1)
        final = self.nic.final_score(value, prov)
        v, p = value.numpy(), prov.numpy()
        return NICAnalysis(v, p, final.numpy(), self.nic.value_violation(v), self.nic.provenance_violation(p))

    def _analyse_members(self, obs: Observation) -> NICAnalysis:
        """Each input scored by its drawn member (no per-layer partials: those are member 0's)."""
        members = self.members_of(obs)
        acts = {n: layer_activation(n, obs.x, obs.logits, obs.taps) for n in self.value_layers}
        n, n_layers, n_pairs = len(obs), len(self.value_layers), len(self.pairs)
        value, prov = np.empty((n, n_layers)), np.empty((n, n_pairs))
        value_v, prov_v, final = np.empty((n, n_layers)), np.empty((n, n_pairs)), np.empty(n)
        assert self._reference is not None
        for m in np.unique(members).tolist():
            idx = np.flatnonzero(members == m)
            rows = torch.from_numpy(idx)
            v, p, f = (t.numpy() for t in self.nic.raw_scores({k: a[rows] for k, a in acts.items()}, member=m))
            value[idx], prov[idx] = v, p
            value_v[idx], prov_v[idx] = self.nic.value_violation(v, m), self.nic.provenance_violation(p, m)
            final[idx] = on_scale(f, self._calib_final(m), self._reference)
        return NICAnalysis(value, prov, final, value_v, prov_v)

    def raw(self, obs: Observation) -> np.ndarray:
        return self.analysis(obs).final

    def differentiable(self, obs: Observation, member: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """VI (N, L), PI (N, L-1) and final (N,) scores of ``member`` with gradients (once per observation)."""

        def compute() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            acts = {n: layer_activation(n, obs.x, obs.logits, obs.taps) for n in self.value_layers}
            return self.nic.differentiable_scores(acts, member=member)

        return obs.get(f"surrogate/nic/{member}", compute)

    def surrogate_members(self) -> list[int]:
        """The members an attack averages over: the drawn ones (EOT), else the fixed member 0."""
        return list(range(1, self.nic.n_members)) if self.randomized else [0]

    def surrogate(self, obs: Observation, relax: Relaxation) -> torch.Tensor:
        """NIC's RBF one-class SVMs, affine reductions and softmax heads are differentiable as they are. With
        drawn members (:meth:`draw_members`): the expectation over the randomized members (EOT) of each member's
        final score put on the verdict's scale (:func:`on_scale`, linearly interpolated between calibration scores);
        a member's randomized quantization passes the gradient straight through."""
        if not self.randomized:
            return self.differentiable(obs)[2]
        assert self._reference is not None
        finals = [
            on_scale_soft(self.differentiable(obs, m)[2], self._calib_final(m), self._reference)
            for m in self.surrogate_members()
        ]
        return torch.stack(finals).mean(0)

    def graph(self, g: GraphContext) -> str:
        return nic_graph(g, self)["final"]

    def graph_fields(self, g: GraphContext, violation: str) -> dict[str, Any]:
        value, prov, final = self.nic.calibration()
        names = nic_graph(g, self)
        _, _, provenance, _ = nic_output_names(0)

        def violation_of(calib: np.ndarray, scores: str) -> str:
            return g.op("Sub", g.scalar(1.0), g.p_value(calib, scores))

        return {
            "value_violation": Columns(violation_of(value, names["value"]), tuple(self.value_layers)),
            "provenance_violation": Columns(violation_of(prov, provenance), tuple(self.pairs)),
            "score": violation_of(final, names["final"]),  # NIC's own calibration on split A
        }

    def fields(self, obs: Observation, violation: np.ndarray) -> dict[str, Any]:
        a = self.analysis(obs)
        return {
            "value_violation": {n: a.value_violation[:, j] for j, n in enumerate(self.value_layers)},
            "provenance_violation": {n: a.provenance_violation[:, j] for j, n in enumerate(self.pairs)},
            "score": self.nic.final_violation(a.final),  # NIC's own calibration on split A
        }


class NICValueComponent(Component):
    """NIC's value invariants alone: Fisher's combination of two-sided per-layer p-values (deep-layer invariants
    find confident adversarial activations *too* typical). No files of its own: it reads NIC's."""

    name = "nic_vi"
    requires = ("nic",)

    def __init__(self, nic: NICComponent) -> None:
        self.nic = nic

    @classmethod
    def build(cls, ctx: BuildContext, params: Mapping[str, Any]) -> NICValueComponent:
        nic = ctx.built["nic"]
        assert isinstance(nic, NICComponent)
        return cls(nic)

    def to_files(self) -> dict[str, bytes]:
        return {}

    @classmethod
    def from_files(
        cls, read: FileReader, model: TappedSequential, built: Mapping[str, Component], entry: Mapping[str, Any]
    ) -> NICValueComponent:
        nic = built["nic"]
        assert isinstance(nic, NICComponent)
        return cls(nic)

    def raw(self, obs: Observation) -> np.ndarray:
        t0 = time.perf_counter()
        out = two_sided_fisher(self.nic.analysis(obs).value_violation, self.nic.nic.calibration_size)
        obs.timings_s["nic"] = obs.timings_s.get("nic", 0.0) + time.perf_counter() - t0
        return out

    def surrogate(self, obs: Observation, relax: Relaxation) -> torch.Tensor:
        """The two-sided Fisher statistic over smoothed per-layer p-values (:func:`soft_p_values`; no floor at
        ``1 / (n + 1)``, so the tails keep a gradient); with drawn NIC members, its mean over the members (EOT),
        each against its own calibration."""
        stats = []
        for m in self.nic.surrogate_members():
            value = self.nic.differentiable(obs, m)[0]
            calib = self.nic.nic.value_calibration(m)
            upper = soft_p_values(calib, value, relax.bandwidth, relax.straight_through)
            lower = soft_p_values(calib, value, relax.bandwidth, relax.straight_through, lower=True)
            p = (2.0 * torch.minimum(upper, lower)).clamp_max(1.0)
            stats.append(-torch.log(p).sum(1))
        return torch.stack(stats).mean(0)

    def graph(self, g: GraphContext) -> str:
        """:func:`~pathguard.models.verdict.calibration.two_sided_fisher` of the per-layer VI p-values, in the
        graph."""
        floor = 1.0 / (self.nic.nic.calibration_size + 1)
        upper = g.p_value(self.nic.nic.value_calibration(), nic_graph(g, self.nic)["value"])  # (N, L)
        upper = g.op("Clip", upper, g.scalar(floor), g.scalar(1.0))
        lower = g.op("Add", g.op("Sub", g.scalar(1.0), upper), g.scalar(floor))
        two = g.op("Min", g.op("Mul", g.scalar(2.0), g.op("Min", upper, lower)), g.scalar(1.0))
        p = g.op("Clip", two, g.scalar(floor), g.scalar(1.0))
        return g.op("Neg", g.reduce("ReduceSum", g.op("Log", p), [1]))

    def graph_fields(self, g: GraphContext, violation: str) -> dict[str, Any]:
        return {}

    def fields(self, obs: Observation, violation: np.ndarray) -> dict[str, Any]:
        return {}  # reported through NIC's value violations


def on_scale(scores: np.ndarray, own: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``scores`` of a detector whose sorted clean calibration scores are ``own``, moved onto the scale of another
    one's (``reference``, as many scores): a score with ``k`` calibration scores of its own at or above it becomes
    one with ``k`` of the reference's at or above it (the reference's own value at that rank, or past its largest
    by as much as the score passes its own largest), so its empirical p-value is unchanged."""
    if len(own) != len(reference):
        raise ValueError(f"calibrations of different sizes: {len(own)} and {len(reference)}")
    pos = np.searchsorted(own, scores, side="left")  # #{own < s}
    inside = reference[np.minimum(pos, len(own) - 1)]
    return np.where(pos < len(own), inside, reference[-1] + (scores - own[-1]))


def on_scale_soft(scores: torch.Tensor, own: np.ndarray, reference: np.ndarray) -> torch.Tensor:
    """:func:`on_scale` as a continuous, piecewise-linear map with a gradient: between two calibration scores of its
    own, the score moves linearly between the reference's scores of the same ranks; beyond either end, it is shifted
    by the ends' difference. Equal to :func:`on_scale` at the calibration scores themselves."""
    o = torch.as_tensor(np.asarray(own, dtype=np.float64))
    r = torch.as_tensor(np.asarray(reference, dtype=np.float64))
    s = scores.double()
    hi = torch.searchsorted(o, s.detach()).clamp(1, len(o) - 1)
    lo = hi - 1
    w = (s - o[lo]) / (o[hi] - o[lo]).clamp_min(1e-12)
    inside = r[lo] + w * (r[hi] - r[lo])
    below, above = r[0] + (s - o[0]), r[-1] + (s - o[-1])
    return torch.where(s < o[0], below, torch.where(s > o[-1], above, inside))


def nic_graph(g: GraphContext, nic: NICComponent) -> dict[str, str]:
    """NIC's member-0 scores in the graph ``g`` (written once): ``value`` (N, L) and ``final`` (N,) float64, by the
    served graph's exporter (:func:`~pathguard.models.nic.onnx_export.with_nic_outputs`) reading the originals'
    taps and logits."""

    def write() -> dict[str, str]:
        for name in nic.checked_taps:
            g.tap(name)
        value, _, _, final = nic_output_names(0)
        g.adopt(with_nic_outputs(g.model(), nic.nic, members=(0,), logits=g.logits32))
        return {"value": value, "final": final}

    return g.get("nic", write)


@one_torch_thread
@torch.no_grad()
def nic_pass(ctx: Any, shard: Any) -> tuple[list[list[tuple[np.ndarray, ...]]], list[str], int]:
    """NIC's raw scores of every member, per chunk (what :meth:`NICDetector.calibrate_scores` takes); a build
    pass run on the executor."""
    assert ctx.nic is not None
    out, skipped, images = [], [], 0
    for split, bad in shard.read():
        skipped.extend(bad)
        if len(split):
            out.append(ctx.nic.calibration_scores(ctx.model, split.x))
            images += len(split)
    return out, skipped, images
