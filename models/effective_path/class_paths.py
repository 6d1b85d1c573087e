"""Per-class effective paths as bit-packed bitmaps; densities, Jaccard similarity, image-class similarity.

The class path of class ``c`` (Qiu et al., CVPR 2019, Sec. 2.2) is the union of the rank-1 effective paths
of the training images labelled ``c`` *and* predicted ``c``. Per layer it is stored as a bitmap over that
layer's synapse ids (see :mod:`pathguard.models.effective_path`), packed with :func:`numpy.packbits` bit order
(bit ``i`` of a class row is ``row[i >> 3] >> (7 - (i & 7)) & 1``): shape ``(num_classes, ceil(n/8))`` uint8.

- densities (paper Eq. 4): selected synapses (or weights) of the union of all class paths over all
  synapses (weights);
- class-wise Jaccard (paper Eq. 5) of synapse sets;
- image-class similarity per layer: ``|S_l ∩ C_l(class)| / |S_l|``, computed from an image's synapse ids by
  bit lookups (no per-image bitmap).

Persistence is plain arrays (:meth:`ClassPaths.to_arrays` / :meth:`ClassPaths.from_arrays`), no pickle.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pathguard.models.effective_path.paths import LayerInfo, PathBatch
from pathguard.models.errors import NotFittedError

if TYPE_CHECKING:
    from pathguard.models.effective_path.extractor import EffectivePathExtractor

__all__ = ["ClassPaths", "NotFittedError", "PathCounts"]

_SCHEMA = 1


@dataclass
class PathCounts:
    """Unfitted class paths of some training images: per layer the flat packed (K * row bytes,) uint8 bitmaps,
    and (K,) the images that entered each class path."""

    packed: dict[str, np.ndarray]
    images_per_class: np.ndarray

    @staticmethod
    def merge(parts: Iterable[PathCounts]) -> PathCounts:
        """The counts of the union of disjoint image sets: bitmaps OR-ed, image counts summed."""
        it = iter(parts)
        first = next(it)
        packed = {n: m.copy() for n, m in first.packed.items()}
        images = np.asarray(first.images_per_class, dtype=np.int64).copy()
        for part in it:
            for n, m in part.packed.items():
                packed[n] |= m
            images += part.images_per_class
        return PathCounts(packed, images)


def _set_bits(packed: np.ndarray, bits: torch.Tensor) -> None:
    """OR bit positions ``bits`` (int64, any order, duplicates allowed) into flat uint8 ``packed`` in place."""
    b = bits.numpy()
    np.bitwise_or.at(packed, b >> 3, (128 >> (b & 7)).astype(np.uint8))


def _popcount(a: np.ndarray, axis: int | None = None) -> np.ndarray:
    return np.bitwise_count(a).sum(axis=axis, dtype=np.int64)


class ClassPaths:
    """Per-class effective-path bitmaps fitted from benign training data.

    Parameters
    ----------
    num_classes : int
        Number of classes K of the classifier.

    Attributes
    ----------
    layers_ : list of str
        Weighted layers covered, in forward order.
    layer_info_ : dict[str, LayerInfo]
        Synapse id geometry per layer.
    layer_sizes_ : np.ndarray
        (L,) int64 synapses per layer.
    synapse_bitmaps_ : dict[str, np.ndarray]
        Layer -> (K, ceil(n_synapses/8)) uint8 packed class bitmaps.
    weight_bitmaps_ : dict[str, np.ndarray]
        Layer -> (K, ceil(n_weights/8)) uint8 packed class bitmaps of unique kernel entries.
    images_per_class_ : np.ndarray
        (K,) int64 training images that entered each class path (labelled and predicted c).
    theta_ : float
        Selection threshold of the extractor used.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    # ---- fitting --------------------------------------------------------------------------------

    def fit(
        self,
        extractor: EffectivePathExtractor,
        x: np.ndarray | torch.Tensor,
        y: np.ndarray | torch.Tensor,
        batch_size: int = 512,
        progress: bool = False,
    ) -> ClassPaths:
        """Aggregate the rank-1 paths of the images of ``x`` (N, C, H, W) whose prediction equals ``y`` (N,)."""
        x = torch.as_tensor(x, dtype=torch.float32)
        y = torch.as_tensor(np.asarray(y), dtype=torch.int64)
        starts = range(0, x.shape[0], batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="class paths", unit="batch")
        return self.fit_batches(extractor, ((x[s : s + batch_size], y[s : s + batch_size]) for s in starts))

    def fit_batches(
        self,
        extractor: EffectivePathExtractor,
        batches: Iterable[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
    ) -> ClassPaths:
        """:meth:`fit` over ``(x, y)`` batches that arrive one at a time (a folder too large to hold at once)."""
        return self.fit_counts(extractor, self.accumulate(extractor, batches))

    def accumulate(
        self,
        extractor: EffectivePathExtractor,
        batches: Iterable[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]],
    ) -> PathCounts:
        """The class paths of ``batches`` before fitting: packed bitmaps and image counts, nothing stored.

        Partial results of disjoint batches combine exactly (:meth:`PathCounts.merge`: OR and sum, in any
        order), so shards of a training set can be aggregated on different machines.
        """
        self._start(extractor)
        packed = {name: np.zeros(self.num_classes * self._row_bytes(name), dtype=np.uint8) for name in self.layers_}
        counts = torch.zeros(self.num_classes, dtype=torch.int64)
        for xb, yb in batches:
            xt = torch.as_tensor(xb, dtype=torch.float32)
            yt = torch.as_tensor(np.asarray(yb), dtype=torch.int64)
            if len(xt):
                counts += self._add_batch(packed, extractor.extract(xt, ranks=(1,)), yt)
        return PathCounts(packed, counts.numpy())

    def fit_counts(self, extractor: EffectivePathExtractor, counts: PathCounts) -> ClassPaths:
        """Fit from :meth:`accumulate` results (merged over every shard of the training images)."""
        self._start(extractor)
        for name in self.layers_:
            if counts.packed[name].shape != (self.num_classes * self._row_bytes(name),):
                raise ValueError(f"path counts of {name} do not match the extractor's layer geometry")
        self.synapse_bitmaps_ = {n: counts.packed[n].reshape(self.num_classes, -1).copy() for n in self.layers_}
        self._pack_flat()
        self.images_per_class_ = np.asarray(counts.images_per_class, dtype=np.int64).copy()
        self.weight_bitmaps_ = {n: self._weight_bitmap(n) for n in self.layers_}
        return self

    def _start(self, extractor: EffectivePathExtractor) -> None:
        info = extractor.layer_info
        self.layers_ = list(extractor.layers)
        self.layer_info_ = {n: info[n] for n in self.layers_}
        self.layer_sizes_ = np.array([info[n].n_synapses for n in self.layers_], dtype=np.int64)
        self.theta_ = float(extractor.theta)

    def _row_bytes(self, name: str, level: str = "synapse") -> int:
        info = self.layer_info_[name]
        n = info.n_synapses if level == "synapse" else info.n_weights
        return (n + 7) // 8

    def _add_batch(self, packed: dict[str, np.ndarray], pb: PathBatch, y: torch.Tensor) -> torch.Tensor:
        """OR the paths of the correctly predicted images of ``pb`` into ``packed``; returns per-class counts."""
        good = pb.classes[1] == y  # (B,)
        for name in self.layers_:
            counts = pb.counts(1, name)
            img = torch.repeat_interleave(torch.arange(len(pb)), counts)
            keep = good.index_select(0, img)
            bits = y.index_select(0, img[keep]) * (self._row_bytes(name) * 8) + pb.ids[1][name][keep]
            _set_bits(packed[name], bits)
        return torch.bincount(y[good], minlength=self.num_classes)

    def _weight_bitmap(self, name: str) -> np.ndarray:
        """(K, ceil(n_weights/8)) union over output positions of each class's synapse bitmap."""
        info = self.layer_info_[name]
        rows = []
        for row in self.synapse_bitmaps_[name]:
            bits = np.unpackbits(row, count=info.n_synapses).astype(bool)
            used = bits.reshape(info.out_channels, info.out_points, info.fan_in).any(axis=1)  # (O, fan_in)
            rows.append(np.packbits(np.asarray(used).reshape(-1)))
        return np.stack(rows)

    @property
    def bitmaps_(self) -> dict[str, np.ndarray]:
        """Alias of :attr:`synapse_bitmaps_`."""
        self._check()
        return self.synapse_bitmaps_

    # ---- queries --------------------------------------------------------------------------------

    def _check(self) -> None:
        if not hasattr(self, "synapse_bitmaps_"):
            raise NotFittedError("ClassPaths is not fitted: call fit() or from_arrays() first")

    def similarity(self, pb: PathBatch) -> dict[int, np.ndarray]:
        """Image-class path similarity per rank and layer.

        Parameters
        ----------
        pb : PathBatch
            Paths of N images; its layers must be among :attr:`layers_`.

        Returns
        -------
        dict[int, np.ndarray]
            rank -> (N, L) float64 ``|S_l ∩ C_l(class_r)| / |S_l|`` (0 for an empty ``S_l``), columns in
            ``pb.layers`` order, ``class_r`` the class at rank r.
        """
        self._check()
        missing = [n for n in pb.layers if n not in self.synapse_bitmaps_]
        if missing:
            raise ValueError(f"layers {missing} are not in the class paths (fitted on {self.layers_})")
        return {r: self._rank_similarity(pb, r) for r in pb.ranks}

    def _pack_flat(self) -> None:
        """Store all layers' synapse bitmaps in one flat array; per-layer bitmaps become views into it."""
        maps = [np.ascontiguousarray(self.synapse_bitmaps_[n], dtype=np.uint8) for n in self.layers_]
        flat = np.concatenate([m.reshape(-1) for m in maps])
        starts = np.concatenate([[0], np.cumsum([m.size for m in maps])]).astype(np.int64)
        views: dict[str, np.ndarray] = {}
        for i, (n, m) in enumerate(zip(self.layers_, maps, strict=True)):
            views[n] = flat[starts[i] : starts[i + 1]].reshape(m.shape)
        self.synapse_bitmaps_ = views
        self._flat = torch.from_numpy(flat)
        self._base_bits = dict(zip(self.layers_, (starts[:-1] * 8).tolist(), strict=True))
        self._lookup_cache: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def _lookup(self, layers: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(L,) bit base of each layer in the flat bitmap and (L,) bits per class row."""
        if layers not in self._lookup_cache:
            base = torch.tensor([self._base_bits[n] for n in layers], dtype=torch.int64)
            row_bits = torch.tensor([self._row_bytes(n) * 8 for n in layers], dtype=torch.int64)
            self._lookup_cache[layers] = (base, row_bits)
        return self._lookup_cache[layers]

    def _rank_similarity(self, pb: PathBatch, r: int) -> np.ndarray:
        """(N, L) similarities of rank ``r``: every layer in one pass of bit lookups.

        In numpy: a dozen small array operations, each far cheaper than a torch op at batch 1.
        """
        base, row_bits = (t.numpy() for t in self._lookup(tuple(pb.layers)))
        flat = self._flat.numpy()
        n, n_layers = len(pb), len(pb.layers)
        offsets = [pb.offsets[r][name].numpy() for name in pb.layers]
        counts = np.stack([o[1:] - o[:-1] for o in offsets])  # (L, N)
        ids = np.concatenate([pb.ids[r][name].numpy() for name in pb.layers])  # layer-major, then image
        seg = np.repeat(np.arange(n_layers * n), counts.reshape(-1))  # l * N + i per id
        layer, img = np.divmod(seg, n)
        bits = base[layer] + pb.classes[r].numpy()[img] * row_bits[layer] + ids
        hit = (flat[bits >> 3] >> (7 - (bits & 7)).astype(np.uint8)) & 1  # np.packbits bit order
        hits = np.bincount(seg, weights=hit.astype(np.float64), minlength=n_layers * n).reshape(n_layers, n)
        return (hits / np.maximum(counts, 1)).T

    def _bitmaps(self, level: str) -> dict[str, np.ndarray]:
        self._check()
        if level not in ("synapse", "weight"):
            raise ValueError(f"level must be 'synapse' or 'weight', not {level!r}")
        return self.synapse_bitmaps_ if level == "synapse" else self.weight_bitmaps_

    def _totals(self, level: str) -> dict[str, int]:
        return {
            n: (self.layer_info_[n].n_synapses if level == "synapse" else self.layer_info_[n].n_weights)
            for n in self.layers_
        }

    def densities(self) -> dict[str, dict[str, float]]:
        """Density (paper Eq. 4) of the overall path (union of all class paths).

        Returns
        -------
        dict
            ``{"synapse": {"overall": d, layer: d_l, ...}, "weight": {...}}``.
        """
        out: dict[str, dict[str, float]] = {}
        for level in ("synapse", "weight"):
            maps, totals = self._bitmaps(level), self._totals(level)
            used = {n: int(_popcount(np.bitwise_or.reduce(maps[n], axis=0))) for n in self.layers_}
            row = {"overall": sum(used.values()) / sum(totals.values())}
            row.update({n: used[n] / totals[n] for n in self.layers_})
            out[level] = row
        return out

    def class_densities(self, level: str = "synapse") -> np.ndarray:
        """(K,) density of each class path over all covered layers."""
        maps, totals = self._bitmaps(level), self._totals(level)
        used = sum(_popcount(maps[n], axis=1) for n in self.layers_)
        return np.asarray(used, dtype=np.float64) / sum(totals.values())

    def jaccard(self, layer: str | None = None, level: str = "synapse") -> np.ndarray:
        """(K, K) class-wise Jaccard similarity (paper Eq. 5) of one layer or of all layers together."""
        maps = self._bitmaps(level)
        names = self.layers_ if layer is None else [layer]
        k = self.num_classes
        inter = np.zeros((k, k), dtype=np.int64)
        union = np.zeros((k, k), dtype=np.int64)
        for n in names:
            m = maps[n]
            for a in range(k):
                inter[a] += _popcount(m[a] & m, axis=1)
                union[a] += _popcount(m[a] | m, axis=1)
        return inter / np.maximum(union, 1)

    def growth(self, order: Sequence[int] | None = None, level: str = "synapse") -> np.ndarray:
        """(K,) density of the union of the first 1, 2, ..., K class paths (paper Fig. 3)."""
        maps, totals = self._bitmaps(level), self._totals(level)
        order = list(range(self.num_classes)) if order is None else list(order)
        acc = {n: np.zeros_like(maps[n][0]) for n in self.layers_}
        out = []
        for c in order:
            for n in self.layers_:
                acc[n] |= maps[n][c]
            out.append(sum(int(_popcount(acc[n])) for n in self.layers_) / sum(totals.values()))
        return np.array(out)

    def nbytes(self) -> dict[str, int]:
        """Bytes of the packed synapse and weight bitmaps (all layers, all classes)."""
        self._check()
        return {
            "synapse": sum(int(m.nbytes) for m in self.synapse_bitmaps_.values()),
            "weight": sum(int(m.nbytes) for m in self.weight_bitmaps_.values()),
        }

    # ---- persistence ----------------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (for ``np.savez``, loadable with ``allow_pickle=False``)."""
        self._check()
        geo = [[i.out_channels, i.out_points, i.fan_in] for i in self.layer_info_.values()]
        out = {
            "schema": np.array(_SCHEMA, dtype=np.int64),
            "num_classes": np.array(self.num_classes, dtype=np.int64),
            "theta": np.array(self.theta_, dtype=np.float64),
            "layers": np.array(self.layers_, dtype=np.str_),
            "kinds": np.array([self.layer_info_[n].kind for n in self.layers_], dtype=np.str_),
            "geometry": np.array(geo, dtype=np.int64).reshape(-1, 3),
            "images_per_class": self.images_per_class_.astype(np.int64),
        }
        for i, n in enumerate(self.layers_):
            out[f"synapses_{i}"] = self.synapse_bitmaps_[n]
            out[f"weights_{i}"] = self.weight_bitmaps_[n]
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray] | np.lib.npyio.NpzFile) -> ClassPaths:
        """Rebuild from :meth:`to_arrays` output (or an ``np.load`` of its npz), validating shapes."""
        if int(arrays["schema"]) != _SCHEMA:
            raise ValueError(f"unsupported class-path schema {int(arrays['schema'])}")
        self = cls(int(arrays["num_classes"]))
        self.theta_ = float(arrays["theta"])
        self.layers_ = [str(n) for n in arrays["layers"]]
        kinds = [str(k) for k in arrays["kinds"]]
        geo = np.asarray(arrays["geometry"]).reshape(-1, 3)
        self.layer_info_ = {
            n: LayerInfo(n, k, int(g[0]), int(g[1]), int(g[2]))
            for n, k, g in zip(self.layers_, kinds, geo, strict=True)
        }
        self.layer_sizes_ = np.array([i.n_synapses for i in self.layer_info_.values()], dtype=np.int64)
        self.images_per_class_ = np.asarray(arrays["images_per_class"], dtype=np.int64)
        self.synapse_bitmaps_, self.weight_bitmaps_ = {}, {}
        for i, n in enumerate(self.layers_):
            syn, wts = np.asarray(arrays[f"synapses_{i}"]), np.asarray(arrays[f"weights_{i}"])
            if syn.dtype != np.uint8 or syn.shape != (self.num_classes, self._row_bytes(n)):
                raise ValueError(f"synapse bitmap of {n} has shape {syn.shape} {syn.dtype}")
            if wts.dtype != np.uint8 or wts.shape != (self.num_classes, self._row_bytes(n, "weight")):
                raise ValueError(f"weight bitmap of {n} has shape {wts.shape} {wts.dtype}")
            self.synapse_bitmaps_[n], self.weight_bitmaps_[n] = syn, wts
        self._pack_flat()
        return self
