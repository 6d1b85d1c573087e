"""How a bundle's training images are split (recorded in its manifest; the test set is never used).

- ``fit`` (all but ``n_calib`` images): class-path bitmaps and every NIC component;
- the ``n_calib`` held-out images, in three disjoint parts: ``ep_fit`` (20%) fits the benign Effective Path
  score, ``calib_a`` (40%) calibrates each component, ``calib_b`` (40%) sets the fused threshold.
"""

from __future__ import annotations

import numpy as np

from pathguard.models.data import Split

__all__ = ["calibration_split_indices", "training_split_indices", "training_splits"]


def training_splits(train: Split, n_calib: int, seed: int = 0, n_train: int | None = None) -> dict[str, Split]:
    """Cut the training set into ``fit``, ``ep_fit``, ``calib_a`` and ``calib_b`` (seeded permutation).

    ``n_train`` keeps only a seeded random subset of that many images (small test bundles). The builder and the
    evaluation both call this with the manifest's ``build.config`` values, so they agree on which training images
    a bundle has seen.
    """
    return {k: train.subset(v) for k, v in training_split_indices(len(train), n_calib, seed, n_train).items()}


def training_split_indices(n: int, n_calib: int, seed: int = 0, n_train: int | None = None) -> dict[str, np.ndarray]:
    """The image indices of :func:`training_splits` for a training set of ``n`` images (nothing read)."""
    perm = np.random.default_rng(seed).permutation(n)[:n_train]
    if len(perm) <= n_calib:
        raise ValueError(f"n_calib={n_calib} leaves no training images to fit on ({len(perm)} available)")
    n_ep = n_calib // 5
    n_a = (n_calib - n_ep) // 2
    cut = np.cumsum([n_ep, n_a, n_calib - n_ep - n_a])
    return {
        "ep_fit": perm[: cut[0]],
        "calib_a": perm[cut[0] : cut[1]],
        "calib_b": perm[cut[1] : cut[2]],
        "fit": perm[cut[2] :],
    }


def calibration_split_indices(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``ep_fit`` (20%), ``calib_a`` (40%) and ``calib_b`` (40%) image indices of a separate calibration set of
    ``n`` images (seeded), for a classifier whose own training images all go into ``fit``."""
    if n < 10:
        raise ValueError(f"the calibration set has {n} images; need at least 10")
    perm = np.random.default_rng(seed).permutation(n)
    n_ep = n // 5
    n_a = (n - n_ep) // 2
    return {"ep_fit": perm[:n_ep], "calib_a": perm[n_ep : n_ep + n_a], "calib_b": perm[n_ep + n_a :]}
