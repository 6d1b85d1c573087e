"""Effective Path as a verdict component: per-layer image-vs-class path similarity (rank 1 and 2) and the benign
Effective Path score over them (Qiu et al., CVPR 2019)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from pathguard.models.bundle.format import EP_THRESHOLDS
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
from pathguard.models.components.graph import GraphContext, NotInGraphError, Rows
from pathguard.models.effective_path import (
    BenignEPScore,
    ClassPaths,
    ClassSimilarityRanges,
    EffectivePathExtractor,
    PathCounts,
)
from pathguard.models.effective_path.extractor import (
    profile_thresholds,
    read_thresholds_document,
    thresholds_document,
)
from pathguard.models.effective_path.ingraph import GraphEffectivePath, GraphWalk
from pathguard.models.effective_path.relaxed import relaxed_similarity
from pathguard.models.errors import DatasetError
from pathguard.models.networks import TappedSequential, tap_points

__all__ = ["EPPartial", "EffectivePathComponent", "ep_features"]

CLASS_PATHS, EP_SCORE, RANGES = "class_paths.npz", "ep_score.npz", "benign_similarity.npz"
SELECTIONS = ("cumulative", "absolute", "relative")
_GRAPH_OPSET = 16  # ScatterElements with reduction="add"


@dataclass
class EPPartial:
    """Effective Path result for a batch: per-rank similarities (N, L) and the raw benign EP score (N,)."""

    sims: dict[int, np.ndarray]
    raw: np.ndarray
    seconds: float


class EffectivePathComponent(Component):
    """Class-path similarity of the image's effective path, scored by :class:`BenignEPScore`.

    Build parameters: ``theta`` (selection threshold), ``last_k`` (only the last k weighted layers), ``n_fit``
    (fit-split images aggregated into class paths; ``None`` = all) and ``selection``: ``"cumulative"`` (the paper's
    rule, default), ``"absolute"`` or ``"relative"`` (sort-free rules after Ptolemy: per layer, the synapses whose
    contribution is at least a threshold, or at least that fraction of the neuron's sum, profiled on ``n_profile``
    benign fit images, default 1000, as the ``quantile`` of the cumulative rule's cuts, default 0.5;
    :func:`~pathguard.models.effective_path.extractor.profile_thresholds`). The class paths are then aggregated
    with the same rule.
    """

    name = "effective_path"
    files = (CLASS_PATHS, EP_SCORE, EP_THRESHOLDS)  # the thresholds: with a sort-free rule only
    params = ("theta", "last_k", "n_fit", "selection", "n_profile", "quantile")

    def __init__(
        self,
        extractor: EffectivePathExtractor,
        class_paths: ClassPaths,
        ep_score: BenignEPScore,
        ranges: ClassSimilarityRanges | None = None,
    ) -> None:
        self.extractor = extractor
        self.class_paths = class_paths
        self.ep_score = ep_score
        self.ranges = ranges
        self.layers: list[str] = list(extractor.layers)
        self._walk: GraphWalk | NotImplementedError | None = None

    @classmethod
    def build(cls, ctx: BuildContext, params: Mapping[str, Any]) -> EffectivePathComponent:
        """Class paths over the fit split, then the benign score and per-class ranges on ``ep_fit``."""
        t = time.perf_counter()
        extractor = EffectivePathExtractor(ctx.model, theta=params.get("theta", 0.5), last_k=params.get("last_k"))
        selection = params.get("selection", "cumulative")
        if selection != "cumulative":
            relative = selection == "relative"
            x, _ = ctx.sample(int(params.get("n_profile", 1000)))
            thresholds = profile_thresholds(extractor, x, float(params.get("quantile", 0.5)), relative)
            extractor = EffectivePathExtractor(
                ctx.model, theta=extractor.theta, last_k=extractor.last_k, thresholds=thresholds, relative=relative
            )
            assert ctx.job is not None  # the workers walk with them:
            ctx.job = ctx.job.with_fitted(**{EP_THRESHOLDS: json_blob(thresholds_document(extractor))})
            ctx.report["ep_profile"] = {"images": len(x), "quantile": float(params.get("quantile", 0.5))}
        fit_idx = ctx.passes.parts["fit"][1]
        counts: PathCounts | None = None
        fit_images = 0
        for r in ctx.passes.run(paths_pass, ctx.job, "fit", "class paths", fit_idx[: params.get("n_fit")]):
            counts = r.value if counts is None else PathCounts.merge([counts, r.value])  # reduced as they finish
            fit_images += r.images
        assert counts is not None
        class_paths = ClassPaths(ctx.num_classes).fit_counts(extractor, counts)
        ctx.report["fit_images"], ctx.report["paths_s"] = fit_images, time.perf_counter() - t
        assert ctx.job is not None
        ctx.job = ctx.job.with_fitted(**{CLASS_PATHS: npz_blob(class_paths.to_arrays())})
        features, predicted = ep_features(ctx.passes, ctx.job)
        ep_score = BenignEPScore().fit(features)
        ranges = ClassSimilarityRanges().fit(features, predicted, ctx.num_classes)
        ctx.report["ep_fit"] = len(features)
        return cls(extractor, class_paths, ep_score, ranges)

    @classmethod
    def check(cls, model: TappedSequential, params: Mapping[str, Any]) -> None:
        selection = params.get("selection", "cumulative")
        if selection not in SELECTIONS:
            raise ValueError(f"effective_path selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        if not 0.0 <= float(params.get("quantile", 0.5)) <= 1.0:
            raise ValueError(f"effective_path quantile must be in [0, 1], got {params['quantile']}")
        if int(params.get("n_profile", 1000)) < 1:
            raise ValueError(f"effective_path n_profile must be positive, got {params['n_profile']}")

    def to_files(self) -> dict[str, bytes]:
        out = {CLASS_PATHS: npz_blob(self.class_paths.to_arrays()), EP_SCORE: npz_blob(self.ep_score.to_arrays())}
        if self.ranges is not None:
            out[RANGES] = npz_blob(self.ranges.to_arrays())
        if self.extractor.thresholds:
            out[EP_THRESHOLDS] = json_blob(thresholds_document(self.extractor))
        return out

    @classmethod
    def from_files(
        cls, read: FileReader, model: TappedSequential, built: Mapping[str, Component], entry: Mapping[str, Any]
    ) -> EffectivePathComponent:
        thresholds, relative = read_thresholds(read)
        extractor = EffectivePathExtractor(
            model, theta=entry.get("theta", 0.5), last_k=entry.get("last_k"), thresholds=thresholds, relative=relative
        )
        try:
            ranges = ClassSimilarityRanges.from_arrays(read_npz(read(RANGES)))
        except KeyError:  # bundles built before the per-class ranges
            ranges = None
        class_paths = ClassPaths.from_arrays(read_npz(read(CLASS_PATHS)))
        return cls(extractor, class_paths, BenignEPScore.from_arrays(read_npz(read(EP_SCORE))), ranges)

    def manifest(self) -> dict[str, Any]:
        ex = self.extractor
        return {"theta": ex.theta, "last_k": ex.last_k, "selection": ex.selection, "layers": self.layers}

    # ------------------------------------------------------------------ in the graph
    #: Served beside the guarded graph: on CPU its compiled walk (numba, on a worker thread while the graph runs) is
    #: faster than the in-graph walk (MNIST LeNet-5, batch 1: 0.8 ms against 2.7 ms; docs/effective_path.md). An
    #: exported graph (``pathguard export``) holds the in-graph walk.
    beside_graph = True

    def graph_walk(self) -> GraphWalk:
        """The exact walk as graph operations (:mod:`pathguard.models.effective_path.ingraph`), built once; raises
        NotImplementedError when the network or its size has no such form."""
        if self._walk is None:
            ex = self.extractor
            taps = tap_points(ex.model) if isinstance(ex.model, nn.Sequential) else {}
            try:
                if ex.input_shape is None:
                    raise NotImplementedError("the walk's input shape is unknown")
                self._walk = GraphWalk(
                    ex.model, ex.input_shape, ex.theta, ex.last_k, taps, thresholds=ex.thresholds, relative=ex.relative
                )
            except NotImplementedError as exc:
                self._walk = exc
        if isinstance(self._walk, NotImplementedError):
            raise self._walk
        return self._walk

    def graph_unavailable(self) -> str | None:
        try:
            self.graph_walk()
        except NotImplementedError as exc:
            return f"component {self.name!r}: {exc}"
        return None

    def graph(self, g: GraphContext) -> str:
        """The exact walk, the class paths' similarities and the benign score, exported from torch
        (:class:`~pathguard.models.effective_path.ingraph.GraphEffectivePath`): it reads the originals' logits and
        the tap its forward pass starts from (the input when none is nearer)."""
        walk = self.graph_walk()
        if g.opset < _GRAPH_OPSET:
            raise NotInGraphError(f"Effective Path's in-graph walk needs opset >= {_GRAPH_OPSET}, not {g.opset}")

        def write() -> str:
            module = GraphEffectivePath(walk, self.class_paths, self.ep_score)
            model = onnx.load_from_string(module.to_onnx(g.opset))
            start = g.x if walk.start_tap is None else g.tap(walk.start_tap)
            return g.embed(model, "effective_path/", [start, g.logits32]) + "ep_score"

        return g.get(self.name, write)

    def graph_fields(self, g: GraphContext, violation: str) -> dict[str, Any]:
        self.graph(g)
        return similarity_fields(g, "effective_path/ep_features", list(self.layers), violation)

    def warm_up(self) -> None:
        self.extractor.warm_up()  # compile the small-batch kernels now (numba JIT), not on the first request

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def extract(self, x: torch.Tensor, logits: torch.Tensor, taps: dict[str, torch.Tensor]) -> EPPartial:
        """Extraction (seeded at the logits), similarities and raw score; thread-safe."""
        t0 = time.perf_counter()
        paths = self.extractor.extract_from_taps(x, logits, taps, ranks=(1, 2))
        sims = self.class_paths.similarity(paths)
        raw = self.ep_score.score(np.concatenate([sims[1], sims[2]], axis=1))
        return EPPartial(sims, raw, time.perf_counter() - t0)

    def partial(self, obs: Observation) -> EPPartial:
        ep: EPPartial = obs.get(self.name, lambda: self.extract(obs.x, obs.logits, obs.taps))
        obs.timings_s[self.name] = ep.seconds
        return ep

    def raw(self, obs: Observation) -> np.ndarray:
        return self.partial(obs).raw

    def surrogate(self, obs: Observation, relax: Relaxation) -> torch.Tensor:
        """The benign score of the relaxed similarities (:mod:`pathguard.models.effective_path.relaxed`: the served
        walk's reached neurons held fixed, each neuron's selection a logistic step around its cut, straight
        through)."""
        sims = relaxed_similarity(
            self.extractor, self.class_paths, obs.x, obs.logits, obs.taps, relax.bandwidth, relax.straight_through
        )
        features = torch.cat([sims[1], sims[2]], dim=1)  # (N, 2L)
        s = self.ep_score
        z = torch.from_numpy(s.orientation_) * (features - torch.from_numpy(s.median_)) / torch.from_numpy(s.scale_)
        return z.clamp_min(0.0).mean(1)

    def fields(self, obs: Observation, violation: np.ndarray) -> dict[str, Any]:
        ep = self.partial(obs)
        return {
            "layers": list(self.layers),
            "rank1_similarity": ep.sims[1],
            "rank2_similarity": ep.sims[2],
            "score": violation,
        }


def read_thresholds(read: FileReader) -> tuple[dict[str, float] | None, bool]:
    """(thresholds, relative) of a sort-free rule stored beside the class paths; (None, False) for the cumulative
    rule."""
    try:
        blob = read(EP_THRESHOLDS)
    except KeyError:
        return None, False
    return read_thresholds_document(json.loads(blob))


def similarity_fields(g: GraphContext, features: str, layers: list[str], violation: str) -> dict[str, Any]:
    """Effective Path's response fields in the graph from its (N, 2L) ``features`` tensor (rank-1 | rank-2)."""
    n = len(layers)

    def part(start: int, stop: int) -> str:
        return g.op("Slice", features, *(g.const([v], np.int64) for v in (start, stop, 1)))

    return {
        "layers": layers,
        "rank1_similarity": Rows(part(0, n), n),
        "rank2_similarity": Rows(part(n, 2 * n), n),
        "score": violation,
    }


def ep_features(passes: Any, job: Any) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2L) Effective Path features and (N,) predictions of the readable ``ep_fit`` images, in order."""
    results = passes.ordered(ep_pass, job, "ep_fit", "Effective Path features")
    features = np.concatenate([r.value[0] for r in results])
    if not len(features):
        raise DatasetError(f"none of the {len(passes.parts['ep_fit'][1])} ep_fit calibration images could be read")
    return features, np.concatenate([r.value[1] for r in results])


# ------------------------------------------------------------------------------ build passes (run on the executor)


@torch.no_grad()
def paths_pass(ctx: Any, shard: Any) -> tuple[PathCounts, list[str], int]:
    """Class-path counts (rank-1 paths of the correctly predicted images) of a shard of the fit split."""
    skipped: list[str] = []
    images = 0

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        nonlocal images
        for split, bad in shard.read():
            skipped.extend(bad)
            images += len(split)
            yield split.x, split.y

    counts = ClassPaths(ctx.model.config.num_classes).accumulate(ctx.extractor, batches())
    return counts, skipped, images


@one_torch_thread
@torch.no_grad()
def ep_pass(ctx: Any, shard: Any) -> tuple[tuple[np.ndarray, np.ndarray], list[str], int]:
    """(N, 2L) Effective Path features (rank-1 then rank-2 similarities) and (N,) predicted classes."""
    assert ctx.class_paths is not None
    feats, preds, skipped = [], [], []
    for split, bad in shard.read():
        skipped.extend(bad)
        if len(split):
            pb = ctx.extractor.extract(torch.from_numpy(split.x), ranks=(1, 2))
            sims = ctx.class_paths.similarity(pb)
            feats.append(np.concatenate([sims[1], sims[2]], axis=1))
            preds.append(pb.classes[1].numpy())
    width = 2 * len(ctx.extractor.layers)
    f = np.concatenate(feats) if feats else np.empty((0, width))
    p = np.concatenate(preds) if preds else np.empty(0, np.int64)
    return (f, p), skipped, len(f)
