"""RBF one-class SVMs: fitting with scikit-learn, export to plain arrays, and torch scoring.

A fitted RBF one-class SVM decides::

    f(x) = sum_i alpha_i * exp(-gamma * ||x - sv_i||^2) + intercept        (intercept = -rho)

which is scikit-learn's ``OneClassSVM.decision_function`` (positive = inlier). The exported form keeps only
``support_vectors`` (S, D), ``dual_coef`` (S,), ``intercept`` and ``gamma`` as numpy arrays, so scoring
needs neither scikit-learn nor pickle. scikit-learn is imported only inside :func:`fit_ocsvm` and
:meth:`ExportedOCSVM.from_sklearn`.

Scoring runs in float64 by default: the decision value is a sum of up to ``nu * n_fit`` kernel terms,
so float32 cannot reproduce scikit-learn's (double precision) values to 1e-5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from sklearn.svm import OneClassSVM

__all__ = ["BatchedOCSVM", "ExportedOCSVM", "fit_ocsvm"]

_FIELDS = ("support_vectors", "dual_coef", "intercept", "gamma")


def fit_ocsvm(X: np.ndarray, nu: float = 0.1, gamma: float | str = "scale", cache_size: float = 500.0) -> OneClassSVM:
    """Fit an RBF one-class SVM on benign samples.

    Parameters
    ----------
    X : np.ndarray, shape (n, D)
        Benign feature vectors (converted to float64).
    nu : float
        Upper bound on the training outlier fraction, lower bound on the support-vector fraction.
    gamma : float or {"scale", "auto"}
        RBF width; ``"scale"`` is ``1 / (D * X.var())``.
    cache_size : float
        Kernel cache in MB.

    Returns
    -------
    sklearn.svm.OneClassSVM
        The fitted estimator.
    """
    from sklearn.svm import OneClassSVM

    X64 = np.ascontiguousarray(X, dtype=np.float64)
    if X64.ndim != 2 or X64.shape[0] < 2:
        raise ValueError(f"X must be (n >= 2, D), got shape {X64.shape}")
    return OneClassSVM(kernel="rbf", nu=nu, gamma=gamma, cache_size=cache_size).fit(X64)


def _rbf_decision(
    X: torch.Tensor, two_g_sv_t: torch.Tensor, neg_g_sv_sq: torch.Tensor, alpha: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    """``sum_i alpha_i exp(-gamma ||x - sv_i||^2)`` for X (..., N, D) -> (..., N).

    Precomputed: ``two_g_sv_t = 2 gamma sv^T`` (..., D, S), ``neg_g_sv_sq = -gamma ||sv||^2`` (..., 1, S),
    ``alpha`` (..., S, 1). The exponent ``-gamma ||x||^2 + 2 gamma x.sv - gamma ||sv||^2`` is one fused
    matmul-add plus the ``||x||^2`` term (few ops: at batch 1 the per-op overhead dominates).
    """
    x_sq = (X * X).sum(-1, keepdim=True)  # (..., N, 1)
    arg = torch.baddbmm(neg_g_sv_sq, X, two_g_sv_t) if X.ndim == 3 else torch.addmm(neg_g_sv_sq, X, two_g_sv_t)
    arg = arg.sub_(gamma * x_sq).clamp_max_(0.0)  # (..., N, S); <= 0 up to rounding
    return (arg.exp_() @ alpha).squeeze(-1)


@dataclass
class ExportedOCSVM:
    """An RBF one-class SVM as plain arrays, scored with torch.

    Attributes
    ----------
    support_vectors : np.ndarray
        (S, D) float64.
    dual_coef : np.ndarray
        (S,) float64, the alphas (all >= 0 for a one-class SVM).
    intercept : float
        ``-rho``; scikit-learn's ``intercept_[0]``.
    gamma : float
        The RBF gamma actually used (``"scale"`` resolved).
    """

    support_vectors: np.ndarray
    dual_coef: np.ndarray
    intercept: float
    gamma: float

    def __post_init__(self) -> None:
        self.support_vectors = np.ascontiguousarray(self.support_vectors, dtype=np.float64)
        self.dual_coef = np.ascontiguousarray(self.dual_coef, dtype=np.float64).reshape(-1)
        self.intercept, self.gamma = float(self.intercept), float(self.gamma)
        if self.support_vectors.ndim != 2 or self.support_vectors.shape[0] != self.dual_coef.shape[0]:
            raise ValueError(
                f"support_vectors {self.support_vectors.shape} and dual_coef {self.dual_coef.shape} do not match"
            )
        self._cache: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}

    @property
    def n_features(self) -> int:
        return int(self.support_vectors.shape[1])

    @property
    def n_support(self) -> int:
        return int(self.support_vectors.shape[0])

    @classmethod
    def from_sklearn(cls, svm: Any) -> ExportedOCSVM:
        """Export a fitted scikit-learn ``OneClassSVM`` with an RBF kernel."""
        if getattr(svm, "kernel", None) != "rbf" or not hasattr(svm, "support_vectors_"):
            raise ValueError("expected a fitted OneClassSVM with kernel='rbf'")
        return cls(svm.support_vectors_, svm.dual_coef_[0], float(svm.intercept_[0]), float(svm._gamma))

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Arrays ``{prefix}support_vectors``, ``{prefix}dual_coef``, ``{prefix}intercept`` (1,),
        ``{prefix}gamma`` (1,); many SVMs fit in one npz/safetensors file with distinct prefixes."""
        return {
            f"{prefix}support_vectors": self.support_vectors,
            f"{prefix}dual_coef": self.dual_coef,
            f"{prefix}intercept": np.array([self.intercept], dtype=np.float64),
            f"{prefix}gamma": np.array([self.gamma], dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "") -> ExportedOCSVM:
        """Inverse of :meth:`to_arrays`."""
        missing = [f"{prefix}{k}" for k in _FIELDS if f"{prefix}{k}" not in arrays]
        if missing:
            raise KeyError(f"missing SVM arrays: {missing}")
        a = {k: np.asarray(arrays[f"{prefix}{k}"]) for k in _FIELDS}
        return cls(
            a["support_vectors"], a["dual_coef"], float(a["intercept"].reshape(-1)[0]), float(a["gamma"].reshape(-1)[0])
        )

    def _tensors(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        if dtype not in self._cache:
            sv = torch.from_numpy(self.support_vectors)  # float64: precompute in double, then cast
            g = self.gamma
            two_g_sv_t = (2.0 * g * sv.T).contiguous().to(dtype)  # (D, S)
            neg_g_sv_sq = (-g * (sv * sv).sum(-1)).view(1, -1).to(dtype)  # (1, S)
            alpha = torch.from_numpy(self.dual_coef).view(-1, 1).to(dtype)  # (S, 1)
            self._cache[dtype] = (two_g_sv_t, neg_g_sv_sq, alpha, torch.tensor(g, dtype=dtype))
        return self._cache[dtype]

    def decision_function(self, X: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """scikit-learn's ``decision_function`` in torch (positive = inlier).

        Parameters
        ----------
        X : torch.Tensor, shape (N, D)
        dtype : torch.dtype
            Compute dtype (float64 reproduces scikit-learn to ~1e-10).

        Returns
        -------
        torch.Tensor
            (N,) in ``dtype``.
        """
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"expected X of shape (N, {self.n_features}), got {tuple(X.shape)}")
        return _rbf_decision(X.to(dtype), *self._tensors(dtype)) + self.intercept


class BatchedOCSVM:
    """Several exported SVMs scored in a handful of batched ops (one ``bmm`` for all of them).

    Support vectors are zero-padded to (L, S_max, D_max) with zero dual coefficients on padded rows, and
    inputs are zero-padded to D_max: padded dimensions add nothing to distances and padded rows add nothing
    to the sum, so every column equals its SVM's own ``decision_function``.

    Parameters
    ----------
    svms : sequence of ExportedOCSVM
        L exported SVMs (dimensions and support counts may differ).
    dtype : torch.dtype
        Compute dtype.
    """

    def __init__(self, svms: Sequence[ExportedOCSVM], dtype: torch.dtype = torch.float64) -> None:
        if not svms:
            raise ValueError("need at least one SVM")
        self.dims = [s.n_features for s in svms]
        self.d_max = max(self.dims)
        s_max = max(s.n_support for s in svms)
        sv = torch.zeros(len(svms), s_max, self.d_max, dtype=dtype)  # (L, S, D)
        alpha = torch.zeros(len(svms), s_max, dtype=dtype)  # (L, S)
        for i, s in enumerate(svms):
            sv[i, : s.n_support, : s.n_features] = torch.from_numpy(s.support_vectors)
            alpha[i, : s.n_support] = torch.from_numpy(s.dual_coef)
        gamma = torch.tensor([s.gamma for s in svms], dtype=dtype).view(-1, 1, 1)  # (L, 1, 1)
        self.two_g_sv_t = (2.0 * gamma * sv).transpose(1, 2).contiguous()  # (L, D, S)
        self.neg_g_sv_sq = -gamma * (sv * sv).sum(-1, keepdim=True).transpose(1, 2)  # (L, 1, S)
        self.alpha, self.gamma = alpha.unsqueeze(-1), gamma  # (L, S, 1), (L, 1, 1)
        self.intercept = torch.tensor([s.intercept for s in svms], dtype=dtype)  # (L,)
        self.dtype = dtype
        self.same_dims = len(set(self.dims)) == 1

    def stack_inputs(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Pad and stack L inputs (N, D_l) into (L, N, D_max) in the compute dtype."""
        if len(xs) != len(self.dims):
            raise ValueError(f"expected {len(self.dims)} inputs, got {len(xs)}")
        if self.same_dims:
            return torch.stack(list(xs)).to(self.dtype)
        return torch.stack([torch.nn.functional.pad(x, (0, self.d_max - x.shape[1])) for x in xs]).to(self.dtype)

    def decision_function(self, xs: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Decision values of all SVMs.

        Parameters
        ----------
        xs : sequence of L tensors (N, D_l), or a tensor (L, N, D_max) already padded

        Returns
        -------
        torch.Tensor
            (N, L): column l is SVM l's decision value (positive = inlier).
        """
        X = xs.to(self.dtype) if isinstance(xs, torch.Tensor) else self.stack_inputs(xs)  # (L, N, D_max)
        dec = _rbf_decision(X, self.two_g_sv_t, self.neg_g_sv_sq, self.alpha, self.gamma)  # (L, N)
        return (dec + self.intercept.unsqueeze(-1)).T
