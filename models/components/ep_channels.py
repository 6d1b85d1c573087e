"""Channel-level Effective Path as a verdict component (``ep_channels``): the image's channel-level paths at ranks
1 and 2 (:mod:`pathguard.models.effective_path.channels`), their similarity with each class's benign profile, and
the benign Effective Path score over them. It has an in-graph form (the dense walk exported to ONNX), so a bundle
that fuses it instead of the exact ``effective_path`` exports as one guarded graph."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import torch

from pathguard.models.components.base import (
    BuildContext,
    Component,
    FileReader,
    Observation,
    json_blob,
    npz_blob,
    read_npz,
)
from pathguard.models.components.effective_path import similarity_fields
from pathguard.models.components.graph import GraphContext
from pathguard.models.effective_path import BenignEPScore
from pathguard.models.effective_path.channels import ChannelProfiles, ChannelWalk, DenseChannelWalk
from pathguard.models.networks import TappedSequential

__all__ = ["ChannelEPComponent"]

ARRAYS, CONFIG = "ep_channels.npz", "ep_channels.json"


class ChannelEPComponent(Component):
    """Build parameters: ``theta`` (selection threshold, default 0.5), ``n_fit`` (benign fit images aggregated into
    the class profiles, default 5000) and ``n_score`` (further benign fit images the score is fitted on, default
    1000)."""

    name = "ep_channels"
    files = (ARRAYS, CONFIG)
    params = ("theta", "n_fit", "n_score")

    def __init__(self, walk: ChannelWalk, profiles: ChannelProfiles, score: BenignEPScore) -> None:
        self.walk, self.profiles, self.score = walk, profiles, score
        self.dense = DenseChannelWalk(walk, profiles, score)
        self.layers: list[str] = list(profiles.layers_)

    @classmethod
    def build(cls, ctx: BuildContext, params: Mapping[str, Any]) -> ChannelEPComponent:
        theta, n_fit, n_score = (
            float(params.get("theta", 0.5)),
            int(params.get("n_fit", 5000)),
            int(params.get("n_score", 1000)),
        )
        x, y = ctx.sample(n_fit + n_score)
        if len(x) < n_score + ctx.num_classes:
            raise ValueError(f"ep_channels needs more than {n_score} benign fit images, got {len(x)}")
        fit = max(len(x) - n_score, len(x) // 2)
        walk = ChannelWalk(ctx.model, ctx.model.config.input_shape, theta)
        profiles = ChannelProfiles(ctx.num_classes).fit(walk, x[:fit], y[:fit])
        sims = profiles.similarity(walk.walk(x[fit:]))
        score = BenignEPScore().fit(np.concatenate([sims[1], sims[2]], 1))
        ctx.report["ep_channels"] = {"profile_images": int(profiles.images_.sum()), "score_images": len(x) - fit}
        return cls(walk, profiles, score)

    def to_files(self) -> dict[str, bytes]:
        arrays = {f"profiles/{k}": v for k, v in self.profiles.to_arrays().items()}
        arrays |= {f"score/{k}": np.asarray(v) for k, v in self.score.to_arrays().items()}
        return {ARRAYS: npz_blob(arrays), CONFIG: json_blob({"theta": self.walk.theta})}

    @classmethod
    def from_files(
        cls, read: FileReader, model: TappedSequential, built: Mapping[str, Component], entry: Mapping[str, Any]
    ) -> ChannelEPComponent:
        arrays = read_npz(read(ARRAYS))
        theta = float(json.loads(read(CONFIG))["theta"])
        part = {k.removeprefix("profiles/"): v for k, v in arrays.items() if k.startswith("profiles/")}
        score = BenignEPScore.from_arrays(
            {k.removeprefix("score/"): v for k, v in arrays.items() if k.startswith("score/")}
        )
        return cls(ChannelWalk(model, model.config.input_shape, theta), ChannelProfiles.from_arrays(part), score)

    def manifest(self) -> dict[str, Any]:
        return {"theta": self.walk.theta, "layers": self.layers}

    # ------------------------------------------------------------------ scoring
    def analysis(self, obs: Observation) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, 2L): rank-1 then rank-2 similarities, raw score (N,)) of the batch, computed once."""

        def compute() -> tuple[np.ndarray, np.ndarray]:
            with torch.no_grad():
                _, feats, score = self.dense(obs.x.float())
            return feats.numpy(), score.numpy()

        return obs.get(self.name, compute, timing=self.name)

    def raw(self, obs: Observation) -> np.ndarray:
        return self.analysis(obs)[1]

    def graph(self, g: GraphContext) -> str:
        model = onnx.load_from_string(self.dense.to_onnx(g.opset))
        return g.get(self.name, lambda: g.embed(model, "ep_channels/", [g.x]) + "ep_score")

    def graph_fields(self, g: GraphContext, violation: str) -> dict[str, Any]:
        self.graph(g)
        return similarity_fields(g, "ep_channels/ep_features", list(self.layers), violation)

    def fields(self, obs: Observation, violation: np.ndarray) -> dict[str, Any]:
        feats = self.analysis(obs)[0]
        n = len(self.layers)
        return {
            "layers": list(self.layers),
            "rank1_similarity": feats[:, :n],
            "rank2_similarity": feats[:, n:],
            "score": violation,
        }
