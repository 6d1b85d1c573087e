"""Results of an extraction: the synapse id space of a weighted layer and the per-image paths of a batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["DEFAULT_THETA", "LayerInfo", "PathBatch"]

DEFAULT_THETA = 0.5


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
