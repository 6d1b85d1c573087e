"""NIC: neural-network invariant checking (Ma et al., NDSS 2019, section III).

For every checked layer ``l`` (default: the input, every post-ReLU conv/linear tap, the pooling outputs,
the flatten output when it is not a mere reshape of the pool before it, and the network's softmax):

1. Reduction: flatten, per-neuron standardization, then PCA to ``pca_dim`` for layers wider than that
   (randomized PCA). Folded into one affine map ``feats = act @ W + b`` (float32). With
   ``reduction="channel_mean"`` a convolution map is first averaged per channel over its positions (also
   affine, folded into the same map), which keeps one feature per channel instead of a PCA of every position.
2. Value invariant VI_l: an RBF one-class SVM on the reduced benign features.
3. Derived model D_l: a linear softmax head on the frozen reduced features, trained with cross-entropy on
   the training labels; the softmax layer's derived model is the network's own softmax (identity head).
4. Provenance invariant PI_{l,l+1}: an RBF one-class SVM on ``concat(D_l(x), D_{l+1}(x))``.
5. Final detector: an RBF one-class SVM on the standardized vector of all VI and PI values.

Sign convention: every score exposed here is ``-decision_function``, so **higher = more anomalous**.
Violation probabilities are ``1 - p`` with the empirical p-value
``p = (1 + #{calibration scores >= s}) / (n + 1)`` against a held-out clean calibration split
(:mod:`pathguard.models.verdict.calibration`); ``NICScores.score`` is the final detector's violation probability.

Randomization (paper III-D): with ``n_random = R > 0`` the detector holds ``R`` extra members, each fitted
on ``g(f_l(x)) = round(f_l(x) * c_l) / c_l`` where ``round`` is floor or ceil (drawn per layer) and the
scale ``c_l = u / sigma_l`` has ``u ~ U(random_levels)`` quantization steps per activation standard
deviation ``sigma_l`` (drawn per layer). At run time one random member (``randomize="one"``) or three
(``"majority3"``) are used; for three, every reported quantity is the element-wise median, so thresholding
the median score is exactly the majority vote of the three members at that threshold.

Scoring uses torch and exported arrays only (:meth:`NICDetector.from_arrays`); scikit-learn is imported
only while fitting.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pathguard.models.errors import NotCalibratedError, NotFittedError
from pathguard.models.nic.layers import INPUT, SOFTMAX, default_layers, layer_activation
from pathguard.models.nic.sizing import NICSizes, NICSizeWarning, size_to_data
from pathguard.models.nic.svm import BatchedOCSVM, ExportedOCSVM, fit_ocsvm
from pathguard.models.verdict import columnwise_p_values, threshold_at_fpr, violation_probability

__all__ = [
    "NICDetector",
    "NICScores",
]

_FORMAT = "pathguard-nic-1"


@dataclass
class NICScores:
    """NIC scores of N inputs; every number is higher for more anomalous inputs.

    Attributes
    ----------
    layers : list of str
        The L checked layers.
    pairs : list of str
        The L-1 consecutive pairs, ``"a->b"``.
    value : np.ndarray
        (N, L) VI scores (``-decision_function``).
    provenance : np.ndarray
        (N, L-1) PI scores.
    final : np.ndarray
        (N,) final detector score.
    value_violation, provenance_violation : np.ndarray
        (N, L), (N, L-1) violation probabilities ``1 - p`` in [0, 1].
    score : np.ndarray
        (N,) final violation probability in [0, 1].
    members : list of int
        Detector members used (0 = unrandomized; the median over them is reported).
    """

    layers: list[str]
    pairs: list[str]
    value: np.ndarray
    provenance: np.ndarray
    final: np.ndarray
    value_violation: np.ndarray
    provenance_violation: np.ndarray
    score: np.ndarray
    members: list[int] = field(default_factory=lambda: [0])


@dataclass
class _Stage:
    """Per-layer pipeline of one member: transform -> affine reduction -> VI SVM, and the derived head."""

    weight: torch.Tensor  # (width, d) float32
    bias: torch.Tensor  # (d,)
    scale: float  # randomization scale c_l; 0 = no transform
    ceil: bool
    head_weight: torch.Tensor | None = None  # (d, K); None = identity head (the network's softmax)
    head_bias: torch.Tensor | None = None  # (K,)
    vi: ExportedOCSVM | None = None

    def reduce(self, act: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
        """``straight_through`` (adaptive attacks): the quantization's forward value with the identity's gradient
        (its own is zero almost everywhere)."""
        flat = act.reshape(act.shape[0], -1).float()  # (N, width)
        if self.scale > 0:
            q = (torch.ceil(flat * self.scale) if self.ceil else torch.floor(flat * self.scale)) / self.scale
            flat = flat + (q - flat).detach() if straight_through else q
        return torch.addmm(self.bias, flat, self.weight)  # (N, d)

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        if self.head_weight is None or self.head_bias is None:
            return feats
        return torch.softmax(torch.addmm(self.head_bias, feats, self.head_weight), dim=-1)


@dataclass
class _Member:
    stages: dict[str, _Stage]
    pi: list[ExportedOCSVM] = field(default_factory=list)
    final: ExportedOCSVM | None = None
    final_mean: torch.Tensor | None = None  # (2L-1,) float64
    final_std: torch.Tensor | None = None
    calib_value: np.ndarray | None = None  # (n, L)
    calib_provenance: np.ndarray | None = None  # (n, L-1)
    calib_final: np.ndarray | None = None  # (n,)
    _vi_batch: BatchedOCSVM | None = None
    _pi_batch: BatchedOCSVM | None = None
    _sorted_calib: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def sorted_calib(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Calibration scores sorted ascending per column: (n, L), (n, L-1), (n,)."""
        if self.calib_value is None or self.calib_provenance is None or self.calib_final is None:
            raise NotCalibratedError("NICDetector is not calibrated: call calibrate(model, x_calib)")
        if self._sorted_calib is None:
            self._sorted_calib = (
                np.sort(self.calib_value, axis=0),
                np.sort(self.calib_provenance, axis=0),
                np.sort(self.calib_final),
            )
        return self._sorted_calib

    def vi_batch(self, layers: Sequence[str]) -> BatchedOCSVM:
        if self._vi_batch is None:
            self._vi_batch = BatchedOCSVM([_req(self.stages[name].vi) for name in layers])
        return self._vi_batch

    def pi_batch(self) -> BatchedOCSVM:
        if self._pi_batch is None:
            self._pi_batch = BatchedOCSVM(self.pi)
        return self._pi_batch


def _req(svm: ExportedOCSVM | None) -> ExportedOCSVM:
    if svm is None:
        raise NotFittedError("NIC stage is not fitted")
    return svm


def _to_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return x.float() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


REDUCTIONS = ("pca", "channel_mean")


class NICDetector:
    """Value/provenance invariant checker with trained derived heads and a final one-class SVM.

    Parameters
    ----------
    layers : list of str, optional
        Checked layers in forward order: ``"input"``, tap names of the classifier, ``"softmax"``.
        Default: :func:`default_layers`.
    pca_dim : int
        Reduced dimension for layers wider than this (standardization only otherwise).
    reduction : str
        ``pca`` (the paper's reading: the flattened activation, standardized per neuron, then PCA to ``pca_dim``)
        or ``channel_mean`` (a convolution map's per-channel spatial means, standardized, then PCA if there are
        more than ``pca_dim`` channels; flat layers as with ``pca``). Both are affine maps of the activation.
    nu : float
        One-class SVM ``nu`` of the VI and PI models.
    gamma : float or "scale"
        RBF gamma of all SVMs (``"scale"`` = ``1 / (D * X.var())`` per SVM).
    n_fit : int
        Benign training samples the VI/PI SVMs are fitted on.
    n_final : int
        Further benign training samples (disjoint from ``n_fit``) the final SVM is fitted on.
    n_pca : int
        Samples (a prefix of the ``n_fit`` set) the standardization and PCA are fitted on.
    n_head : int
        Training samples the derived heads are trained on.
    head_epochs : int
        Epochs of Adam (batch 128) per head.
    head_lr : float
        Adam learning rate of the heads.
    holdout : int
        Training samples held out for ``head_accuracy_`` when no validation data is passed to ``fit``.
    final_nu : float, optional
        ``nu`` of the final SVM (default: ``nu``).
    n_random : int
        Number of randomized members (paper III-D) fitted in addition to the plain one.
    random_levels : tuple of float
        Range of quantization steps per activation standard deviation of the randomized transforms.
    batch_size : int
        Forward-pass chunk size while fitting and calibrating.
    seed : int
        Seed of every random choice (subsamples, PCA, heads, transforms).
    """

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        pca_dim: int = 64,
        reduction: str = "pca",
        nu: float = 0.1,
        gamma: float | str = "scale",
        n_fit: int = 2000,
        n_final: int = 1000,
        n_pca: int = 1000,
        n_head: int = 10000,
        head_epochs: int = 10,
        head_lr: float = 1e-2,
        holdout: int = 2000,
        final_nu: float | None = None,
        n_random: int = 0,
        random_levels: tuple[float, float] = (4.0, 16.0),
        batch_size: int = 500,
        seed: int = 0,
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.layers = layers
        self.pca_dim = pca_dim
        self.reduction = reduction
        self.nu = nu
        self.gamma = gamma
        self.n_fit = n_fit
        self.n_final = n_final
        self.n_pca = n_pca
        self.n_head = n_head
        self.head_epochs = head_epochs
        self.head_lr = head_lr
        self.holdout = holdout
        self.final_nu = final_nu
        self.n_random = n_random
        self.random_levels = random_levels
        self.batch_size = batch_size
        self.seed = seed

    # ------------------------------------------------------------------ parameters and state
    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (JSON-able)."""
        return {
            "layers": list(self.layers) if self.layers is not None else None,
            "pca_dim": self.pca_dim,
            "reduction": self.reduction,
            "nu": self.nu,
            "gamma": self.gamma,
            "n_fit": self.n_fit,
            "n_final": self.n_final,
            "n_pca": self.n_pca,
            "n_head": self.n_head,
            "head_epochs": self.head_epochs,
            "head_lr": self.head_lr,
            "holdout": self.holdout,
            "final_nu": self.final_nu,
            "n_random": self.n_random,
            "random_levels": list(self.random_levels),
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def _check_fitted(self) -> None:
        if not hasattr(self, "members_"):
            raise NotFittedError("NICDetector is not fitted: call fit(model, x, y) or NICDetector.from_arrays()")

    @property
    def calibrated(self) -> bool:
        """Whether :meth:`calibrate` has run (violation probabilities available)."""
        return hasattr(self, "members_") and all(m.calib_final is not None for m in self.members_)

    @property
    def pairs_(self) -> list[str]:
        """Names ``"a->b"`` of the L-1 consecutive layer pairs."""
        self._check_fitted()
        return [f"{a}->{b}" for a, b in zip(self.layers_[:-1], self.layers_[1:], strict=True)]

    @property
    def n_members(self) -> int:
        self._check_fitted()
        return len(self.members_)

    # ------------------------------------------------------------------ activations
    @torch.no_grad()
    def activations(self, model: Any, x: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run ``model.forward_with_taps`` on ``x`` (N, C, H, W) in [0, 1].

        Returns
        -------
        logits : torch.Tensor
            (N, K).
        acts : dict[str, torch.Tensor]
            Activation of every checked layer (see :func:`layer_activation`).
        """
        self._check_fitted()
        return _checked_activations(model, _to_tensor(x), self.layers_)

    # ------------------------------------------------------------------ per-layer scoring
    def _member(self, member: int) -> _Member:
        self._check_fitted()
        if not 0 <= member < len(self.members_):
            raise IndexError(f"member {member} out of range (detector has {len(self.members_)})")
        return self.members_[member]

    @torch.no_grad()
    def reduce(self, layer: str, act: torch.Tensor, member: int = 0) -> torch.Tensor:
        """Reduced features of one layer.

        Parameters
        ----------
        layer : str
            A checked layer.
        act : torch.Tensor
            (N, ...) its activation (as from :func:`layer_activation`).
        member : int
            Detector member (0 = unrandomized).

        Returns
        -------
        torch.Tensor
            (N, d_l) float32.
        """
        return self._member(member).stages[layer].reduce(act)

    @torch.no_grad()
    def value_score(self, layer: str, feats: torch.Tensor, member: int = 0) -> torch.Tensor:
        """VI score (N,) float64 of reduced features (N, d_l); higher = more anomalous."""
        return -_req(self._member(member).stages[layer].vi).decision_function(feats)

    @torch.no_grad()
    def head_probs(self, layer: str, feats: torch.Tensor, member: int = 0) -> torch.Tensor:
        """Derived model output D_l: class probabilities (N, K) from reduced features (N, d_l)."""
        return self._member(member).stages[layer].head(feats)

    @torch.no_grad()
    def check_layer(self, layer: str, act: torch.Tensor, member: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything NIC needs from one layer, runnable as soon as its activation exists.

        Returns
        -------
        value : torch.Tensor
            (N,) VI score.
        probs : torch.Tensor
            (N, K) derived-model probabilities (input to the PI checks).
        """
        feats = self.reduce(layer, act, member)
        return self.value_score(layer, feats, member), self.head_probs(layer, feats, member)

    def _pair_index(self, pair: int | str) -> int:
        return self.pairs_.index(pair) if isinstance(pair, str) else int(pair)

    @torch.no_grad()
    def provenance_score(
        self, pair: int | str, probs_l: torch.Tensor, probs_next: torch.Tensor, member: int = 0
    ) -> torch.Tensor:
        """PI score (N,) of pair ``pair`` (index or ``"a->b"``) from the two derived-model outputs (N, K)."""
        return self._provenance(self._pair_index(pair), probs_l, probs_next, member)

    def _provenance(self, pair: int, probs_l: torch.Tensor, probs_next: torch.Tensor, member: int) -> torch.Tensor:
        svm = self._member(member).pi[pair]
        return -svm.decision_function(torch.cat([probs_l, probs_next], dim=1))

    @torch.no_grad()
    def final_score(self, value: torch.Tensor, provenance: torch.Tensor, member: int = 0) -> torch.Tensor:
        """Final detector score (N,) from VI scores (N, L) and PI scores (N, L-1)."""
        return self._final(value, provenance, member)

    def _final(self, value: torch.Tensor, provenance: torch.Tensor, member: int) -> torch.Tensor:
        m = self._member(member)
        if m.final is None or m.final_mean is None or m.final_std is None:
            raise NotFittedError("final detector is not fitted")
        z = (torch.cat([value, provenance], dim=1).double() - m.final_mean) / m.final_std  # (N, 2L-1)
        return -m.final.decision_function(z)

    def differentiable_scores(
        self, acts: dict[str, torch.Tensor], member: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """VI (N, L), PI (N, L-1) and final (N,) scores (float64) of checked-layer activations with gradients
        (adaptive attacks): the served per-layer path (:meth:`check_layer`, :meth:`provenance_score`,
        :meth:`final_score`) with the same operations, outside ``no_grad``. Every part is smooth (affine
        reductions, softmax heads, RBF kernels); a randomized member's quantization passes the gradient straight
        through (BPDA), its forward value within float32 rounding of the served one."""
        m = self._member(member)
        feats = [m.stages[name].reduce(acts[name], straight_through=True) for name in self.layers_]
        svms = [_req(m.stages[name].vi) for name in self.layers_]
        value = torch.stack([-svm.decision_function(f) for svm, f in zip(svms, feats, strict=True)], 1).double()
        probs = [m.stages[name].head(f) for name, f in zip(self.layers_, feats, strict=True)]
        prov = torch.stack(
            [self._provenance(i, probs[i], probs[i + 1], member) for i in range(len(self.pairs_))], 1
        ).double()
        return value, prov, self._final(value, prov, member)

    # ------------------------------------------------------------------ violation probabilities
    def value_violation(self, value: np.ndarray | torch.Tensor, member: int = 0) -> np.ndarray:
        """Per-layer VI violation probabilities (N, L) from VI scores (N, L)."""
        return _columnwise_violation(self._member(member).sorted_calib()[0], np.asarray(value, dtype=np.float64))

    def value_calibration(self, member: int = 0) -> np.ndarray:
        """(n, L) clean calibration VI scores, each column sorted ascending."""
        return self._member(member).sorted_calib()[0]

    def calibration(self, member: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The clean calibration scores behind the violation probabilities, sorted ascending per column: VI (n, L),
        PI (n, L-1) and final (n,)."""
        return self._member(member).sorted_calib()

    @property
    def calibration_size(self) -> int:
        """Number of clean calibration inputs behind the violation probabilities."""
        return len(self._member(0).sorted_calib()[2])

    def provenance_violation(self, provenance: np.ndarray | torch.Tensor, member: int = 0) -> np.ndarray:
        """Per-pair PI violation probabilities (N, L-1) from PI scores (N, L-1)."""
        calib = self._member(member).sorted_calib()[1]
        return _columnwise_violation(calib, np.asarray(provenance, dtype=np.float64))

    def final_violation(self, final: np.ndarray | torch.Tensor, member: int = 0) -> np.ndarray:
        """Final violation probability (N,) in [0, 1]: the detector's ``score``."""
        calib = self._member(member).sorted_calib()[2]
        return violation_probability(calib, np.asarray(final, dtype=np.float64), assume_sorted=True)

    def threshold(self, target_fpr: float, member: int = 0) -> float:
        """Threshold on ``NICScores.score`` (flag ``score > threshold``) with calibration FPR <= target_fpr.

        Raises ``ValueError`` for a target below ``1 / n_calibration``.
        """

        calib = self._member(member).sorted_calib()[2]
        return threshold_at_fpr(violation_probability(calib, calib, assume_sorted=True), target_fpr)

    # ------------------------------------------------------------------ whole-input scoring
    @torch.no_grad()
    def raw_scores(
        self, acts: dict[str, torch.Tensor], member: int = 0, batched: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """VI (N, L), PI (N, L-1) and final (N,) scores (float64) from checked-layer activations.

        ``batched=True`` scores all VI SVMs in one padded ``bmm`` and all PI SVMs in another.
        """
        m = self._member(member)
        feats = [m.stages[name].reduce(acts[name]) for name in self.layers_]
        probs = [m.stages[name].head(f) for name, f in zip(self.layers_, feats, strict=True)]
        if batched:
            value = -m.vi_batch(self.layers_).decision_function(feats)
            pi_in = torch.stack([torch.cat(p, dim=1) for p in itertools.pairwise(probs)])
            prov = -m.pi_batch().decision_function(pi_in)
        else:
            value = torch.stack(
                [-_req(m.stages[n].vi).decision_function(f) for n, f in zip(self.layers_, feats, strict=True)], 1
            )
            prov = torch.stack(
                [self.provenance_score(i, probs[i], probs[i + 1], member) for i in range(len(self.pairs_))], 1
            )
        return value, prov, self.final_score(value, prov, member)

    def select_members(self, randomize: str | None = None, rng: np.random.Generator | int | None = None) -> list[int]:
        """Members to score with: ``None`` -> ``[0]``; ``"one"`` -> one random randomized member;
        ``"majority3"`` -> three distinct random randomized members. ``rng`` (a Generator or a seed) makes
        the choice reproducible."""
        self._check_fitted()
        if randomize in (None, "none"):
            return [0]
        pool = np.arange(1, len(self.members_))
        need = {"one": 1, "majority3": 3}.get(str(randomize))
        if need is None:
            raise ValueError(f"randomize must be None, 'one' or 'majority3', not {randomize!r}")
        if pool.size < need:
            raise ValueError(f"randomize={randomize!r} needs n_random >= {need}; this detector has {pool.size}")
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        return [int(i) for i in gen.choice(pool, size=need, replace=False)]

    @torch.no_grad()
    def score_activations(
        self,
        acts: dict[str, torch.Tensor],
        randomize: str | None = None,
        rng: np.random.Generator | int | None = None,
        batched: bool = True,
    ) -> NICScores:
        """Calibrated scores from checked-layer activations (see :meth:`activations`)."""
        members = self.select_members(randomize, rng)
        parts = [self._scores_one(acts, k, batched) for k in members]
        med = [np.median(np.stack(arrs), axis=0) if len(arrs) > 1 else arrs[0] for arrs in zip(*parts, strict=True)]
        value, prov, final, v_viol, p_viol, score = med
        return NICScores(list(self.layers_), self.pairs_, value, prov, final, v_viol, p_viol, score, members)

    def _scores_one(self, acts: dict[str, torch.Tensor], member: int, batched: bool) -> tuple[np.ndarray, ...]:
        v, p, f = (t.numpy() for t in self.raw_scores(acts, member, batched))
        return (
            v,
            p,
            f,
            self.value_violation(v, member),
            self.provenance_violation(p, member),
            self.final_violation(f, member),
        )

    @torch.no_grad()
    def score(
        self,
        model: Any,
        x: np.ndarray | torch.Tensor,
        randomize: str | None = None,
        rng: np.random.Generator | int | None = None,
        batched: bool = True,
    ) -> NICScores:
        """Run ``model`` on ``x`` (N, C, H, W) and return calibrated :class:`NICScores`.

        ``randomize`` / ``rng``: see :meth:`select_members`.
        """
        _, acts = self.activations(model, x)
        return self.score_activations(acts, randomize, rng, batched)

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        model: Any,
        x: np.ndarray | torch.Tensor,
        y: np.ndarray | torch.Tensor,
        x_val: np.ndarray | torch.Tensor | None = None,
        y_val: np.ndarray | torch.Tensor | None = None,
    ) -> NICDetector:
        """Fit on benign training data.

        Parameters
        ----------
        model : TappedSequential
            Eval-mode classifier with ``forward_with_taps``.
        x : array or tensor, shape (N, C, H, W)
            Benign training inputs in [0, 1].
        y : array or tensor, shape (N,)
            Training labels (for the derived heads).
        x_val, y_val : optional
            Labelled data for ``head_accuracy_`` (e.g. the clean test set); default: ``holdout`` training
            samples not used for fitting.

        Returns
        -------
        NICDetector
            ``self``, with ``layers_``, ``members_``, ``n_classes_``, ``head_accuracy_`` (per layer, member 0),
            ``sizes_`` (the sizes used: the parameters, or scaled down to ``len(x)`` with a
            :class:`~pathguard.models.nic.sizing.NICSizeWarning` stating the cost, see
            :func:`~pathguard.models.nic.sizing.size_to_data`; ``scaled_`` says which) and ``fit_seconds_``.

        Raises
        ------
        DatasetError
            Too few images for NIC at all (the message says how many it needs and for what).
        """
        t0 = time.perf_counter()
        xt, yt = _to_tensor(x), torch.as_tensor(np.asarray(y), dtype=torch.long)
        layers = list(self.layers) if self.layers is not None else default_layers(model)
        _validate_layers(layers, model)
        self.layers_ = layers
        with torch.no_grad():
            self.n_classes_ = int(model(xt[:1]).shape[1])
        has_val = x_val is not None and y_val is not None
        self.sizes_, note = size_to_data(self._configured_sizes(), len(xt), has_validation=has_val)
        self.scaled_ = note is not None
        if note is not None:
            warnings.warn(note, NICSizeWarning, stacklevel=2)
        splits = [self._split(len(xt), k) for k in range(self.n_random + 1)]
        self.members_ = [self._fit_member(model, xt, yt, k, splits[k]) for k in range(self.n_random + 1)]
        if has_val:
            assert x_val is not None and y_val is not None
            xv, yv = _to_tensor(x_val), torch.as_tensor(np.asarray(y_val), dtype=torch.long)
        else:
            xv, yv = xt[splits[0]["hold"]], yt[splits[0]["hold"]]
        self.head_accuracy_ = self._head_accuracy(model, xv, yv)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def check_layers(self, model: Any) -> None:
        """Refuse checked layers that ``model`` does not have, before any data is read (``ValueError``)."""
        if self.layers is not None:
            _validate_layers(list(self.layers), model)

    def _configured_sizes(self) -> NICSizes:
        return NICSizes(self.n_fit, self.n_final, self.n_pca, self.holdout, self.pca_dim)

    def _split(self, n: int, member: int) -> dict[str, torch.Tensor]:
        """Seeded disjoint positions of ``sizes_`` (``hold``, ``fit``, ``final``; ``head`` overlaps ``fit``)."""
        size = self.sizes_
        perm = torch.from_numpy(np.random.default_rng([self.seed, member]).permutation(n))
        rest = perm[size.holdout :]
        return {
            "hold": perm[: size.holdout],
            "fit": rest[: size.n_fit],
            "final": rest[size.n_fit : size.n_fit + size.n_final],
            "head": rest[: max(self.n_head, 1)],
        }

    def _fit_member(
        self, model: Any, x: torch.Tensor, y: torch.Tensor, k: int, split: dict[str, torch.Tensor]
    ) -> _Member:
        rng = np.random.default_rng([self.seed, k, 1])
        raw, shapes = _collect_raw(model, x[split["fit"][: self.sizes_.n_pca]], self.layers_, self.batch_size)
        stages = {
            name: self._fit_reducer(name, raw[name], rng if k > 0 else None, shapes[name]) for name in self.layers_
        }
        del raw
        member = _Member(stages)
        # features of every sample this member uses, through the same torch path as scoring
        union, inverse = torch.unique(torch.cat([split["fit"], split["final"], split["head"]]), return_inverse=True)
        feats = _collect_features(model, x[union], member, self.layers_, self.batch_size)
        pos = {name: inverse[o : o + len(split[name])] for name, o in _offsets(split, ("fit", "final", "head"))}
        for i, name in enumerate(self.layers_):
            st = stages[name]
            if name != SOFTMAX:
                st.head_weight, st.head_bias = _train_head(
                    feats[name][pos["head"]], y[split["head"]], self.n_classes_, self.head_epochs, self.head_lr,
                    seed=self.seed * 1000 + k * 100 + i,
                )  # fmt: skip
            st.vi = ExportedOCSVM.from_sklearn(fit_ocsvm(feats[name][pos["fit"]].double().numpy(), self.nu, self.gamma))
        probs = {name: stages[name].head(feats[name]) for name in self.layers_}
        for a, b in zip(self.layers_[:-1], self.layers_[1:], strict=True):
            pin = torch.cat([probs[a], probs[b]], dim=1)[pos["fit"]]
            member.pi.append(ExportedOCSVM.from_sklearn(fit_ocsvm(pin.double().numpy(), self.nu, self.gamma)))
        self._fit_final(member, {n: f[pos["final"]] for n, f in feats.items()})
        return member

    def _fit_reducer(
        self, layer: str, raw: np.ndarray, rng: np.random.Generator | None, shape: tuple[int, ...] = ()
    ) -> _Stage:
        scale, ceil = 0.0, False
        if rng is not None:
            sigma = float(raw.std()) or 1.0
            scale, ceil = float(rng.uniform(*self.random_levels)) / sigma, bool(rng.integers(2))
            raw = (np.ceil(raw * scale) if ceil else np.floor(raw * scale)) / scale
        width = raw.shape[1]
        if layer == SOFTMAX:
            return _Stage(torch.eye(width), torch.zeros(width), scale, ceil)
        pool: np.ndarray | None = None  # (width, C) per-channel spatial averaging, applied before the rest
        if self.reduction == "channel_mean" and len(shape) == 3 and shape[1] * shape[2] > 1:
            c, hw = shape[0], shape[1] * shape[2]
            pool = np.kron(np.eye(c), np.full((hw, 1), 1.0 / hw))  # flat index ch*hw + p -> channel ch
            raw = raw @ pool
            width = c
        mu, sd = raw.mean(0), raw.std(0)
        sd = np.where(sd > 1e-6, sd, 1.0)
        if width <= self.sizes_.pca_dim:
            w, b = np.diag(1.0 / sd), -mu / sd
        else:
            from sklearn.decomposition import PCA

            pca = PCA(self.sizes_.pca_dim, svd_solver="randomized", iterated_power=4, random_state=self.seed)
            pca.fit((raw - mu) / sd)
            comp = pca.components_  # (d, width)
            w = (comp / sd[None, :]).T  # (width, d)
            b = -((mu / sd) + pca.mean_) @ comp.T
        if pool is not None:
            w = pool @ w  # (C*H*W, d): the averaging folded into the one affine map
        return _Stage(
            torch.from_numpy(np.ascontiguousarray(w, np.float32)), torch.from_numpy(b.astype(np.float32)), scale, ceil
        )

    def _fit_final(self, member: _Member, feats: dict[str, torch.Tensor]) -> None:
        st = member.stages
        value = torch.stack([-_req(st[n].vi).decision_function(feats[n]) for n in self.layers_], 1)
        probs = [st[n].head(feats[n]) for n in self.layers_]
        prov = torch.stack(
            [
                -svm.decision_function(torch.cat([a, b], 1))
                for svm, a, b in zip(member.pi, probs[:-1], probs[1:], strict=True)
            ],
            1,
        )
        z = torch.cat([value, prov], 1)  # (n_final, 2L-1) float64
        member.final_mean, member.final_std = z.mean(0), z.std(0).clamp_min(1e-12)
        zs = ((z - member.final_mean) / member.final_std).numpy()
        member.final = ExportedOCSVM.from_sklearn(fit_ocsvm(zs, self.final_nu or self.nu, self.gamma))

    @torch.no_grad()
    def _head_accuracy(self, model: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        correct = dict.fromkeys(self.layers_, 0)
        for lo in range(0, len(x), self.batch_size):
            _, acts = _checked_activations(model, x[lo : lo + self.batch_size], self.layers_)
            yb = y[lo : lo + self.batch_size]
            for name in self.layers_:
                probs = self.head_probs(name, self.reduce(name, acts[name]))
                correct[name] += int((probs.argmax(1) == yb).sum())
        return {name: c / max(len(x), 1) for name, c in correct.items()}

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def calibrate(self, model: Any, x_calib: np.ndarray | torch.Tensor) -> NICDetector:
        """Store clean calibration scores (VI, PI, final) of every member.

        Parameters
        ----------
        model : TappedSequential
        x_calib : array or tensor, shape (n, C, H, W)
            Held-out clean inputs, disjoint from the data the detector was fitted on.

        Returns
        -------
        NICDetector
            ``self``.
        """
        self._check_fitted()
        xc = _to_tensor(x_calib)
        step = self.batch_size
        return self.calibrate_scores(
            [self.calibration_scores(model, xc[lo : lo + step]) for lo in range(0, len(xc), step)]
        )

    @torch.no_grad()
    def calibration_scores(self, model: Any, x: np.ndarray | torch.Tensor) -> list[tuple[np.ndarray, ...]]:
        """Raw (value, provenance, final) scores of every member on clean inputs ``x``, one forward pass: what
        :meth:`calibrate_scores` stores (computed where the images are, e.g. on the workers of a cluster)."""
        self._check_fitted()
        acts = self.activations(model, _to_tensor(x))[1]
        return [tuple(t.numpy() for t in self.raw_scores(acts, k)) for k in range(len(self.members_))]

    def calibrate_scores(self, chunks: Sequence[list[tuple[np.ndarray, ...]]]) -> NICDetector:
        """:meth:`calibrate` from :meth:`calibration_scores` of consecutive chunks of the calibration images."""
        self._check_fitted()
        for k, m in enumerate(self.members_):
            m.calib_value, m.calib_provenance, m.calib_final = (
                np.concatenate([c[k][i] for c in chunks]) for i in range(3)
            )
            m._sorted_calib = None
        return self

    @property
    def sample_size(self) -> int:
        """Training images :meth:`fit` draws from when it holds out its own validation images: a random sample
        of this many is as good as the whole training set."""
        return max(self.n_head, self.holdout + self.n_fit + self.n_final)

    # ------------------------------------------------------------------ export
    def config(self) -> dict[str, Any]:
        """Small JSON-able description needed (with :meth:`to_arrays`) to restore the detector."""
        self._check_fitted()
        out = {
            "format": _FORMAT,
            "params": self.get_params(),
            "layers": list(self.layers_),
            "pairs": self.pairs_,
            "n_classes": self.n_classes_,
            "n_members": len(self.members_),
            "calibrated": self.calibrated,
            "head_accuracy": dict(self.head_accuracy_),
        }
        if self.scaled_:  # scaled to a short training set: record what was used
            out["fitted_sizes"] = self.sizes_.to_dict()
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every learned number as named numpy arrays (for npz / safetensors; no pickle)."""
        self._check_fitted()
        out: dict[str, np.ndarray] = {}
        for k, m in enumerate(self.members_):
            out.update(_member_arrays(m, f"m{k}.", self.layers_))
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> NICDetector:
        """Restore a detector from :meth:`to_arrays` + :meth:`config`; scoring then needs only torch."""
        if config.get("format") != _FORMAT:
            raise ValueError(f"unsupported NIC config format {config.get('format')!r}; expected {_FORMAT!r}")
        params = dict(config["params"])
        params["random_levels"] = tuple(params["random_levels"])
        det = cls(**params)
        det.layers_ = list(config["layers"])
        det.n_classes_ = int(config["n_classes"])
        det.scaled_ = "fitted_sizes" in config
        det.sizes_ = NICSizes(**config["fitted_sizes"]) if det.scaled_ else det._configured_sizes()
        det.head_accuracy_ = {str(k): float(v) for k, v in config["head_accuracy"].items()}
        if config.get("fit_seconds") is not None:
            det.fit_seconds_ = float(config["fit_seconds"])
        det.members_ = [_member_from_arrays(arrays, f"m{k}.", det.layers_) for k in range(int(config["n_members"]))]
        return det


# ---------------------------------------------------------------------- helpers
def _validate_layers(layers: list[str], model: Any) -> None:
    known = {INPUT, SOFTMAX, *model.tap_names}
    unknown = [name for name in layers if name not in known]
    if unknown or len(layers) < 2 or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be >= 2 distinct names from {sorted(known)}; bad: {unknown or layers}")


def _checked_activations(
    model: Any, x: torch.Tensor, layers: Sequence[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits, taps = model.forward_with_taps(x)
    return logits, {name: layer_activation(name, x, logits, taps) for name in layers}


@torch.no_grad()
def _collect_raw(
    model: Any, x: torch.Tensor, layers: Sequence[str], batch: int
) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    """Flattened float32 activations (n, width) of every layer, and each layer's activation shape (no batch)."""
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    shapes: dict[str, tuple[int, ...]] = {}
    for lo in range(0, len(x), batch):
        _, acts = _checked_activations(model, x[lo : lo + batch], layers)
        for name in layers:
            shapes[name] = tuple(acts[name].shape[1:])
            chunks[name].append(acts[name].reshape(acts[name].shape[0], -1).numpy().copy())
    return {name: np.concatenate(c) for name, c in chunks.items()}, shapes


@torch.no_grad()
def _collect_features(
    model: Any, x: torch.Tensor, member: _Member, layers: Sequence[str], batch: int
) -> dict[str, torch.Tensor]:
    """Reduced features (n, d_l) of every layer."""
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    for lo in range(0, len(x), batch):
        _, acts = _checked_activations(model, x[lo : lo + batch], layers)
        for name in layers:
            chunks[name].append(member.stages[name].reduce(acts[name]))
    return {name: torch.cat(c) for name, c in chunks.items()}


def _offsets(split: dict[str, torch.Tensor], keys: Sequence[str]) -> list[tuple[str, int]]:
    out, o = [], 0
    for key in keys:
        out.append((key, o))
        o += len(split[key])
    return out


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run many tiny ops on one thread: intra-op threads only add synchronization cost there (and stall
    badly when the CPU is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_head(
    feats: torch.Tensor, y: torch.Tensor, n_classes: int, epochs: int, lr: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear softmax head on frozen features (n, d) trained with cross-entropy (Adam, batch 128, zero init).

    Returns ``(W (d, K), b (K,))`` in the original feature units (the internal per-dimension scaling is
    folded into W and b).
    """
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mu) / sd  # (n, d) unit-variance inputs condition the optimization
    w = torch.zeros(feats.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad(), _single_thread():
        for _ in range(epochs):
            for idx in torch.randperm(len(z), generator=gen).split(128):
                opt.zero_grad()
                F.cross_entropy(z[idx] @ w + b, y[idx]).backward()
                opt.step()
    w_eff = (w.detach() / sd[:, None]).contiguous()
    return w_eff, (b.detach() - mu @ w_eff).contiguous()


def _columnwise_violation(calib: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Column-wise violation probabilities of ``values`` (N, C) against ascending-sorted ``calib`` (n, C)."""
    if values.ndim != 2 or values.shape[1] != calib.shape[1]:
        raise ValueError(f"expected scores (N, {calib.shape[1]}), got {values.shape}")
    return 1.0 - columnwise_p_values(calib, values)


def _member_arrays(m: _Member, p: str, layers: Sequence[str]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {
        f"{p}transform_scale": np.array([m.stages[n].scale for n in layers], dtype=np.float64),
        f"{p}transform_ceil": np.array([m.stages[n].ceil for n in layers], dtype=np.int64),
    }
    for name in layers:
        st = m.stages[name]
        out[f"{p}{name}.reduce_weight"] = st.weight.numpy()
        out[f"{p}{name}.reduce_bias"] = st.bias.numpy()
        if st.head_weight is not None and st.head_bias is not None:
            out[f"{p}{name}.head_weight"] = st.head_weight.numpy()
            out[f"{p}{name}.head_bias"] = st.head_bias.numpy()
        out.update(_req(st.vi).to_arrays(f"{p}{name}.vi."))
    for i, svm in enumerate(m.pi):
        out.update(svm.to_arrays(f"{p}pi{i}."))
    if m.final is None or m.final_mean is None or m.final_std is None:
        raise NotFittedError("final detector is not fitted")
    out.update(m.final.to_arrays(f"{p}final."))
    out[f"{p}final_mean"], out[f"{p}final_std"] = m.final_mean.numpy(), m.final_std.numpy()
    if m.calib_final is not None and m.calib_value is not None and m.calib_provenance is not None:
        out[f"{p}calib_value"], out[f"{p}calib_provenance"] = m.calib_value, m.calib_provenance
        out[f"{p}calib_final"] = m.calib_final
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _member_from_arrays(a: dict[str, np.ndarray], p: str, layers: Sequence[str]) -> _Member:
    def t(key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if key not in a:
            raise KeyError(f"missing NIC array {key!r}")
        return torch.from_numpy(np.array(a[key])).to(dtype)

    scales, ceils = np.asarray(a[f"{p}transform_scale"]), np.asarray(a[f"{p}transform_ceil"])
    stages = {}
    for i, name in enumerate(layers):
        has_head = f"{p}{name}.head_weight" in a
        stages[name] = _Stage(
            t(f"{p}{name}.reduce_weight"), t(f"{p}{name}.reduce_bias"), float(scales[i]), bool(ceils[i]),
            t(f"{p}{name}.head_weight") if has_head else None, t(f"{p}{name}.head_bias") if has_head else None,
            ExportedOCSVM.from_arrays(a, f"{p}{name}.vi."),
        )  # fmt: skip
    m = _Member(stages, [ExportedOCSVM.from_arrays(a, f"{p}pi{i}.") for i in range(len(layers) - 1)])
    m.final = ExportedOCSVM.from_arrays(a, f"{p}final.")
    m.final_mean, m.final_std = t(f"{p}final_mean", torch.float64), t(f"{p}final_std", torch.float64)
    if f"{p}calib_final" in a:
        m.calib_value = np.asarray(a[f"{p}calib_value"], dtype=np.float64)
        m.calib_provenance = np.asarray(a[f"{p}calib_provenance"], dtype=np.float64)
        m.calib_final = np.asarray(a[f"{p}calib_final"], dtype=np.float64)
    return m
