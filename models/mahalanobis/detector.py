"""Class-conditional Gaussians with a tied covariance per tapped layer: a benign-only Mahalanobis detector.

After Lee et al. (NeurIPS 2018, "A simple unified framework for detecting out-of-distribution samples and
adversarial attacks"), without the parts that need adversarial data (their input pre-processing magnitude and the
logistic regression that weighs the layers are tuned on attacks): per layer ``l``, a pooled feature ``f_l(x)``
(per-channel spatial statistics of a convolution map, the vector itself for a flat layer), class means
``mu_{l,c}`` and one covariance ``Sigma_l`` shared by the classes (shrunk towards its diagonal mean), all from
benign training images with their labels. The layer's score is the distance to the closest class::

    M_l(x) = min_c (f_l(x) - mu_{l,c})^T Sigma_l^{-1} (f_l(x) - mu_{l,c})

Each layer's score becomes an empirical p-value against clean calibration images (:meth:`calibrate`), and the
layers are combined by Fisher's method, ``-2 sum_l log p_l``: one strongly anomalous layer is not averaged away
by the others. Fitting streams: only per-class sums and one second-moment matrix per layer are accumulated.
Persistence is plain arrays (:meth:`to_arrays`), no pickle.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from pathguard.models.errors import NotCalibratedError, NotFittedError
from pathguard.models.verdict.calibration import columnwise_p_values

__all__ = ["POOLS", "ClassGaussian"]

POOLS = ("mean", "mean_std")
_SCHEMA = 1


def pooled(act: torch.Tensor, pool: str = "mean") -> torch.Tensor:
    """(N, D) float64 feature of a layer's activation: a (N, C, H, W) map pooled per channel (spatial mean, or
    mean and standard deviation), anything else flattened."""
    return pooled_with_grad(act.detach(), pool)


def pooled_with_grad(act: torch.Tensor, pool: str = "mean") -> torch.Tensor:
    """:func:`pooled` keeping the activation's gradient (adaptive attacks)."""
    a = act.to(torch.float64)
    if a.ndim == 4:
        flat = a.flatten(2)  # (N, C, H*W)
        mean = flat.mean(2)
        return mean if pool == "mean" else torch.cat([mean, flat.std(2, correction=0)], 1)
    return a.reshape(a.shape[0], -1)


class ClassGaussian:
    """Benign-only Mahalanobis detector over several layers.

    Parameters
    ----------
    layers : sequence of str
        Tap names to model (activations are passed in by name).
    pool : str
        ``mean`` (per-channel spatial mean of convolution maps) or ``mean_std`` (mean and standard deviation).
    shrinkage : float
        Weight of the diagonal mean in the covariance, ``(1 - s) Sigma + s * tr(Sigma)/D * I``; keeps it invertible
        when a layer has more dimensions than informative directions.

    Attributes
    ----------
    means_ : dict[str, np.ndarray]
        Layer -> (K, D) class means.
    precisions_ : dict[str, np.ndarray]
        Layer -> (D, D) inverse of the shrunk tied covariance.
    calib_ : np.ndarray
        (n, L) clean calibration scores, each column sorted (after :meth:`calibrate`).
    """

    def __init__(self, layers: Sequence[str], pool: str = "mean", shrinkage: float = 0.01) -> None:
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if not 0.0 <= shrinkage < 1.0:
            raise ValueError(f"shrinkage must be in [0, 1), got {shrinkage}")
        if not layers:
            raise ValueError("at least one layer is needed")
        self.layers = list(layers)
        self.pool = pool
        self.shrinkage = float(shrinkage)

    # ------------------------------------------------------------------ fitting
    def fit(self, batches: Iterable[tuple[dict[str, torch.Tensor], np.ndarray]], num_classes: int) -> ClassGaussian:
        """Fit from ``(activations by layer, labels)`` batches of benign training images (streamed)."""
        sums: dict[str, np.ndarray] = {}
        second: dict[str, np.ndarray] = {}
        counts = np.zeros(num_classes, dtype=np.int64)
        for acts, y in batches:
            y = np.asarray(y, dtype=np.int64)
            onehot = np.eye(num_classes)[y]  # (B, K)
            for name in self.layers:
                f = pooled(acts[name], self.pool).numpy()
                if name not in sums:
                    sums[name] = np.zeros((num_classes, f.shape[1]))
                    second[name] = np.zeros((f.shape[1], f.shape[1]))
                sums[name] += onehot.T @ f
                second[name] += f.T @ f
            counts += np.bincount(y, minlength=num_classes)
        if not counts.any():
            raise ValueError("no training images")
        if (counts == 0).any():
            raise ValueError(f"classes {np.flatnonzero(counts == 0).tolist()} have no training images")
        n = int(counts.sum())
        self.means_, self.precisions_ = {}, {}
        for name in self.layers:
            mu = sums[name] / counts[:, None]
            # within-class scatter: sum_i f f^T - sum_c n_c mu_c mu_c^T
            cov = (second[name] - (mu * counts[:, None]).T @ mu) / n
            d = cov.shape[0]
            cov = (1 - self.shrinkage) * cov + self.shrinkage * (np.trace(cov) / d + 1e-12) * np.eye(d)
            self.means_[name] = mu
            self.precisions_[name] = np.linalg.inv(cov)
        self.num_classes_ = num_classes
        self.n_fit_ = n
        return self

    def _check(self) -> None:
        if not hasattr(self, "means_"):
            raise NotFittedError("ClassGaussian is not fitted: call fit() or from_arrays() first")

    # ------------------------------------------------------------------ scoring
    def layer_scores(self, acts: dict[str, torch.Tensor]) -> np.ndarray:
        """(N, L) squared Mahalanobis distance to the closest class mean, per layer (higher = more anomalous)."""
        self._check()
        cols = []
        for name in self.layers:
            f = pooled(acts[name], self.pool).numpy()
            mu, prec = self.means_[name], self.precisions_[name]
            fp = f @ prec  # (N, D)
            # (f - mu)^T P (f - mu) = f P f - 2 f P mu + mu P mu, for every class at once
            quad = np.einsum("nd,nd->n", fp, f)[:, None] - 2 * fp @ mu.T + np.einsum("kd,de,ke->k", mu, prec, mu)
            cols.append(np.maximum(quad.min(1), 0.0))
        return np.stack(cols, 1)

    def differentiable_layer_scores(self, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`layer_scores` in torch with the activations' gradients (adaptive attacks): (N, L) float64, equal
        to it up to the summation order of the matrix products."""
        self._check()
        cols = []
        for name in self.layers:
            f = pooled_with_grad(acts[name], self.pool)  # (N, D)
            mu, prec = torch.from_numpy(self.means_[name]), torch.from_numpy(self.precisions_[name])
            diff = f[:, None, :] - mu[None]  # (N, K, D)
            quad = torch.einsum("nkd,de,nke->nk", diff, prec, diff)  # (N, K)
            cols.append(quad.min(1).values.clamp_min(0.0))
        return torch.stack(cols, 1)

    def calibrate(self, calib_scores: np.ndarray) -> ClassGaussian:
        """Store the clean calibration images' :meth:`layer_scores` (images never used to fit)."""
        self._check()
        s = np.asarray(calib_scores, dtype=np.float64)
        if s.ndim != 2 or s.shape[1] != len(self.layers) or len(s) == 0:
            raise ValueError(f"expected calibration scores (n, {len(self.layers)}), got {s.shape}")
        self.calib_ = np.sort(s, axis=0)
        return self

    def p_values(self, layer_scores: np.ndarray) -> np.ndarray:
        """(N, L) empirical p-values of each layer's score against its clean calibration scores."""
        if not hasattr(self, "calib_"):
            raise NotCalibratedError("ClassGaussian is not calibrated: call calibrate() first")
        return columnwise_p_values(self.calib_, layer_scores)

    def score(self, acts: dict[str, torch.Tensor], two_sided: bool = False) -> np.ndarray:
        """(N,) Fisher combination ``-2 sum_l log p_l`` of the per-layer p-values (higher = more anomalous).

        ``two_sided``: each layer's p-value counts a distance far *below* the clean ones as well (``2 min(upper,
        lower)``, capped at 1): small perturbations can make activations more typical of their class than clean
        inputs are.
        """
        ls = self.layer_scores(acts)
        return fisher(self.two_sided_p_values(ls) if two_sided else self.p_values(ls))

    def two_sided_p_values(self, layer_scores: np.ndarray) -> np.ndarray:
        """(N, L) ``min(1, 2 min(p_upper, p_lower))`` per layer, ``p_lower = (1 + #{calib <= s}) / (n + 1)``."""
        upper = self.p_values(layer_scores)
        n = len(self.calib_)
        below = np.stack(
            [np.searchsorted(self.calib_[:, j], layer_scores[:, j], side="right") for j in range(len(self.layers))], 1
        )
        return np.minimum(1.0, 2.0 * np.minimum(upper, (1.0 + below) / (n + 1)))

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict[str, Any]:
        self._check()
        return {"layers": self.layers, "pool": self.pool, "shrinkage": self.shrinkage, "n_fit": self.n_fit_}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (for ``np.savez``, loadable with ``allow_pickle=False``)."""
        self._check()
        out = {
            "schema": np.array(_SCHEMA, dtype=np.int64),
            "layers": np.array(self.layers, dtype=np.str_),
            "pool": np.array(self.pool, dtype=np.str_),
            "shrinkage": np.array(self.shrinkage, dtype=np.float64),
            "n_fit": np.array(self.n_fit_, dtype=np.int64),
        }
        for i, name in enumerate(self.layers):
            out[f"means_{i}"], out[f"precision_{i}"] = self.means_[name], self.precisions_[name]
        if hasattr(self, "calib_"):
            out["calib"] = self.calib_
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray] | np.lib.npyio.NpzFile) -> ClassGaussian:
        """Rebuild from :meth:`to_arrays` output, validating shapes."""
        if int(arrays["schema"]) != _SCHEMA:
            raise ValueError(f"unsupported class-Gaussian schema {int(arrays['schema'])}")
        self = cls([str(n) for n in arrays["layers"]], str(arrays["pool"]), float(arrays["shrinkage"]))
        self.n_fit_ = int(arrays["n_fit"])
        self.means_, self.precisions_ = {}, {}
        for i, name in enumerate(self.layers):
            mu, prec = np.asarray(arrays[f"means_{i}"], np.float64), np.asarray(arrays[f"precision_{i}"], np.float64)
            if mu.ndim != 2 or prec.shape != (mu.shape[1], mu.shape[1]):
                raise ValueError(f"class Gaussian of {name}: means {mu.shape} and precision {prec.shape} disagree")
            self.means_[name], self.precisions_[name] = mu, prec
        self.num_classes_ = next(iter(self.means_.values())).shape[0]
        if "calib" in arrays:
            calib = np.asarray(arrays["calib"], np.float64)
            if calib.ndim != 2 or calib.shape[1] != len(self.layers):
                raise ValueError(f"class Gaussian calibration has shape {calib.shape}")
            self.calib_ = calib
        return self


def fisher(p: np.ndarray) -> np.ndarray:
    """(N,) ``-2 sum_j log p_j`` over the columns of (N, J) p-values."""
    return -2.0 * np.log(np.asarray(p, dtype=np.float64)).sum(1)
