"""Attack registry for the evaluation harness (``eval`` extra; never imported by the service).

Every attack takes clean images ``x`` (N, C, H, W) float32 in [0, 1] with their true labels and
returns images of the same shape and dtype in [0, 1]. Gradient attacks and the adversarial patch
run through adversarial-robustness-toolbox (ART); the content-based attacks of the NIC paper
(DeepXplore's lighting, dirt and rectangle patching) and the unrecognizable random-noise inputs
are written here in plain torch because no library ships them.

Parameters per dataset follow the feature-squeezing paper's settings (which the NIC paper reused)
where a setting exists, scaled down to CPU budgets for the Carlini/Wagner optimisers; see
``docs/attacks.md`` for the table and the reasons. Beside them, the budgets the detection literature reports
on CIFAR-10, under names that carry the budget: ``fgsm_k`` and ``bim_k`` (Linf ``k``/255 for k = 2, 4, 8),
``pgd_linf_8`` (8/255, step 2/255, 20 iterations, a random start), ``pgd_l2_0.5`` (L2 0.5), ``square_8``
(the black-box Square attack in the 8/255 ball, 1000 query rounds) and ``cw_l2_k20`` (CW-L2 towards the next
class at confidence 20: far past the decision boundary) and ``deepfool_0.02`` (DeepFool at its authors' overshoot
0.02, just past the boundary; ``deepfool`` on CIFAR-10 keeps feature squeezing's overshoot 10).

Two ART details matter (adversarial-robustness-toolbox 1.20):

- ``CarliniL2Method`` / ``CarliniL0Method`` optimise in tanh space with a line-searched gradient
  step. Pixels at exactly 0 or 1 (most of an MNIST digit) sit where ``tanh'`` is ~2e-6, so they
  never move and about half of the targeted attacks fail. We give the CW estimator a box padded by
  ``pad`` on both sides (0 maps to an interior point of the tanh space), then clip the result back
  to [0, 1]; success is always measured after that clip.
- ``CarliniLInfMethod.generate`` tests targeted success as ``prediction != target``, so targeted
  runs keep no adversarial example. :class:`_CarliniLInfTargetFix` keeps ART's inner Adam solver
  and replaces only the outer tau/const search with Carlini's, using the right success test.
- ``CarliniL0Method`` runs its pixel-freezing loop ``x.shape[1] + 1`` times (the channel count),
  freezing one pixel per round, so its output is a dense L2 perturbation. :func:`_run_cw_l0` keeps
  ART's masked solver and drives Carlini's freezing loop itself.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pathguard.models.bundle import load_classifier
from pathguard.models.data import load_dataset

__all__ = [
    "ATTACKS",
    "DATASETS",
    "Attack",
    "AttackResult",
    "AttackSpec",
    "get_attack",
    "predict_labels",
    "run_attack",
]

DATASETS = ("mnist", "cifar10")

# run(model, x, y, params, batch_size) -> x_adv ; x (N, C, H, W) float32 in [0, 1], y (N,) int64
RunFn = Callable[[nn.Module, np.ndarray, np.ndarray, Mapping[str, Any], int], np.ndarray]


@dataclass(frozen=True)
class AttackSpec:
    """Static description of one registered attack.

    Parameters
    ----------
    name : str
        Registry key.
    family : str
        ``"gradient"``, ``"query"`` (black-box, score-based), ``"patch"``, ``"content"`` or ``"unrecognizable"``.
    norm : str or None
        Distance the attack bounds or minimises (``"Linf"``, ``"L2"``, ``"L0"``), None otherwise.
    target : str or None
        None (untargeted), ``"next"`` (true label + 1 mod K), ``"ll"`` (least-likely class of the
        clean input) or ``"fixed"`` (one class for all inputs, the patch).
    implementation : str
        Library class that does the work, or ``"pathguard"`` for the attacks written here.
    params : Mapping[str, Mapping[str, Any]]
        Default parameters per dataset (JSON-able).
    run : RunFn
        The function that generates the adversarial images.
    deterministic : bool
        Whether equal inputs and params give equal outputs (seeded attacks included).
    """

    name: str
    family: str
    norm: str | None
    target: str | None
    implementation: str
    params: Mapping[str, Mapping[str, Any]]
    run: RunFn
    deterministic: bool = True


@dataclass
class AttackResult:
    """Outcome of :func:`run_attack`.

    Attributes
    ----------
    name : str
        Attack name.
    x_adv : np.ndarray
        (N, C, H, W) float32 in [0, 1]; inputs that were not attempted are returned unchanged.
    attempted : np.ndarray
        (N,) bool: the inputs the attack was run on (correctly classified clean inputs; every
        input for the unrecognizable family).
    success : np.ndarray
        (N,) bool: attempted and the prediction on ``x_adv`` differs from the true label (every
        attempted input for the unrecognizable family, which has no true label).
    pred_adv : np.ndarray
        (N,) int64 predictions on ``x_adv``.
    n_attempted, n_successful : int
        Counts of ``attempted`` and ``success``.
    params : dict
        The parameters the attack ran with (JSON-able).
    seconds : float
        Wall time of the generation step alone.
    """

    name: str
    x_adv: np.ndarray
    attempted: np.ndarray
    success: np.ndarray
    pred_adv: np.ndarray
    n_attempted: int
    n_successful: int
    params: dict[str, Any]
    seconds: float


@dataclass
class Attack:
    """An attack bound to a dataset's parameters. Build with :func:`get_attack`."""

    spec: AttackSpec
    dataset: str
    params: dict[str, Any]
    batch_size: int = 64

    @property
    def name(self) -> str:
        return self.spec.name

    def generate(self, model: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Attack ``x`` (N, C, H, W) float32 in [0, 1] with true labels ``y`` (N,).

        Returns
        -------
        np.ndarray
            (N, C, H, W) float32 in [0, 1].
        """
        _check_inputs(x, y)
        model.eval()
        x_adv = self.spec.run(model, x, np.asarray(y, dtype=np.int64), self.params, self.batch_size)
        return np.clip(np.asarray(x_adv, dtype=np.float32), 0.0, 1.0)


def get_attack(name: str, dataset: str, **overrides: Any) -> Attack:
    """Return attack ``name`` with the default parameters for ``dataset``, updated by ``overrides``.

    Raises
    ------
    KeyError
        Unknown attack or dataset, or an override that is not one of the attack's parameters.
    """
    if name not in ATTACKS:
        raise KeyError(f"unknown attack {name!r}; known: {sorted(ATTACKS)}")
    if dataset not in DATASETS:
        raise KeyError(f"unknown dataset {dataset!r}; known: {list(DATASETS)}")
    spec = ATTACKS[name]
    params = dict(spec.params[dataset])
    unknown = set(overrides) - set(params)
    if unknown:
        raise KeyError(f"{name} has no parameter(s) {sorted(unknown)}; parameters: {sorted(params)}")
    params.update(overrides)
    params = {"implementation": spec.implementation, "target": spec.target, "norm": spec.norm, **params}
    return Attack(spec, dataset, params)


def run_attack(
    model: nn.Module,
    name: str,
    dataset: str,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 64,
    **overrides: Any,
) -> AttackResult:
    """Attack the correctly classified inputs among ``x`` and report which attacks succeeded.

    Parameters
    ----------
    model : nn.Module
        Classifier taking (N, C, H, W) in [0, 1] and returning logits (N, K).
    name, dataset : str
        Registry key and ``"mnist"`` / ``"cifar10"`` (selects the default parameters).
    x : np.ndarray
        (N, C, H, W) float32 in [0, 1].
    y : np.ndarray
        (N,) true labels.
    batch_size : int
        Batch size for the model calls and the library attacks.
    **overrides
        Parameter overrides, see :func:`get_attack`.
    """
    attack = get_attack(name, dataset, **overrides)
    attack.batch_size = batch_size
    y = np.asarray(y, dtype=np.int64)
    _check_inputs(x, y)
    if attack.spec.family == "unrecognizable":
        attempted = np.ones(len(x), dtype=bool)
    else:
        attempted = predict_labels(model, x, batch_size) == y
    x_adv = x.astype(np.float32, copy=True)
    start = time.perf_counter()
    if attempted.any():
        x_adv[attempted] = attack.generate(model, x[attempted], y[attempted])
    seconds = time.perf_counter() - start
    pred_adv = predict_labels(model, x_adv, batch_size)
    unrecognizable = attack.spec.family == "unrecognizable"
    success = attempted.copy() if unrecognizable else attempted & (pred_adv != y)
    return AttackResult(
        name=name,
        x_adv=x_adv,
        attempted=attempted,
        success=success,
        pred_adv=pred_adv,
        n_attempted=int(attempted.sum()),
        n_successful=int(success.sum()),
        params=dict(attack.params),
        seconds=seconds,
    )


# ----------------------------------------------------------------------------------------------
# helpers


def _check_inputs(x: np.ndarray, y: np.ndarray) -> None:
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype != np.float32:
        raise ValueError("x must be a float32 array of shape (N, C, H, W)")
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError("x must lie in [0, 1]")
    if np.asarray(y).shape != (len(x),):
        raise ValueError(f"y must have shape ({len(x)},), got {np.asarray(y).shape}")


@torch.no_grad()
def _logits(model: nn.Module, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Model logits (N, K) for ``x`` (N, C, H, W), computed in batches."""
    out = [model(torch.from_numpy(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def predict_labels(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Predicted class (N,) int64 of ``model`` on ``x`` (N, C, H, W)."""
    model.eval()
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64)
    return _logits(model, x, batch_size).argmax(axis=1).astype(np.int64)


def _targets(model: nn.Module, x: np.ndarray, y: np.ndarray, mode: str | None, batch_size: int) -> np.ndarray:
    """Target class per input: ``next`` = (y + 1) mod K, ``ll`` = least-likely class on clean x."""
    logits = _logits(model, x, batch_size)  # (N, K)
    if mode == "next":
        return (y + 1) % logits.shape[1]
    if mode == "ll":
        return logits.argmin(axis=1).astype(np.int64)
    raise ValueError(f"unknown target mode {mode!r}")


def _estimator(model: nn.Module, x: np.ndarray, pad: float = 0.0) -> Any:
    """ART wrapper: the model normalizes internally, so clip values only and no preprocessing."""
    from art.estimators.classification import PyTorchClassifier

    with torch.no_grad():
        n_classes = int(model(torch.from_numpy(x[:1])).shape[1])
    return PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=n_classes,
        clip_values=(-pad, 1.0 + pad),
        device_type="cpu",
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed Python's and numpy's global generators (ART's patch uses both), restoring them after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _loss_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the summed cross-entropy w.r.t. ``x`` (N, C, H, W), and the predictions (N,)."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
    return grad, logits.argmax(dim=1).detach()


def _batched(
    fn: Callable[[nn.Module, torch.Tensor, torch.Tensor, Mapping[str, Any], torch.Generator], torch.Tensor],
) -> RunFn:
    """Lift a per-batch torch attack to the numpy ``RunFn`` signature with one seeded generator."""

    def run(model: nn.Module, x: np.ndarray, y: np.ndarray, p: Mapping[str, Any], batch_size: int) -> np.ndarray:
        gen = torch.Generator().manual_seed(int(p.get("seed", 0)))
        out = np.empty_like(x)
        for i in range(0, len(x), batch_size):
            xb, yb = torch.from_numpy(x[i : i + batch_size]), torch.from_numpy(y[i : i + batch_size])
            out[i : i + batch_size] = fn(model, xb, yb, p, gen).numpy()
        return out

    return run


# ----------------------------------------------------------------------------------------------
# ART attacks


def _run_fgsm(model: nn.Module, x: np.ndarray, y: np.ndarray, p: Mapping[str, Any], bs: int) -> np.ndarray:
    from art.attacks.evasion import FastGradientMethod

    attack = FastGradientMethod(_estimator(model, x), norm=np.inf, eps=p["eps"], batch_size=bs)
    return attack.generate(x=x, y=y)


def _run_bim(model: nn.Module, x: np.ndarray, y: np.ndarray, p: Mapping[str, Any], bs: int) -> np.ndarray:
    from art.attacks.evasion import BasicIterativeMethod

    attack = BasicIterativeMethod(
        _estimator(model, x), eps=p["eps"], eps_step=p["eps_step"], max_iter=p["max_iter"], batch_size=bs, verbose=False
    )
    return attack.generate(x=x, y=y)


def _run_pgd(model: nn.Module, x: np.ndarray, y: np.ndarray, p: Mapping[str, Any], bs: int) -> np.ndarray:
    """Projected gradient descent (Madry et al.) in the Linf or L2 ball, from a random start (seeded)."""
    from art.attacks.evasion import ProjectedGradientDescentNumpy

    attack = ProjectedGradientDescentNumpy(
        _estimator(model, x),
        norm=np.inf if p["norm"] == "inf" else 2,
        eps=p["eps"],
        eps_step=p["eps_step"],
        max_iter=p["max_iter"],
        num_random_init=p["random_init"],
        batch_size=bs,
        verbose=False,
    )
    with _seeded(int(p["seed"])):
        return attack.generate(x=x, y=y)


def _run_square(model: nn.Module, x: np.ndarray, y: np.ndarray, p: Mapping[str, Any], bs: int) -> np.ndarray:
    """Square attack (Andriushchenko et al. 2020): black-box, score-based, random square updates in the Linf ball;
    it reads only the model's outputs (``max_iter`` query rounds), never a gradient."""
    from art.attacks.evasion import SquareAttack

    attack = SquareAttack(
        _estimator(model, x),
        norm=np.inf,
        eps=p["eps"],
        max_iter=p["max_iter"],
        p_init=p["p_init"],
        nb_restarts=p["restarts"],
        batch_size=bs,
        verbose=False,
    )
    with _seeded(int(p["seed"])):
        return attack.generate(x=x, y=y)


def _run_deepfool(model: nn.Module, x: np.ndarray, y: np.ndarray, p: Mapping[str, Any], bs: int) -> np.ndarray:
    from art.attacks.evasion import DeepFool

    attack = DeepFool(
        _estimator(model, x),
        max_iter=p["max_iter"],
        epsilon=p["overshoot"],
        nb_grads=p["nb_grads"],
        batch_size=bs,
        verbose=False,
    )
    return attack.generate(x=x)


def _run_jsma(model: nn.Module, x: np.ndarray, y: np.ndarray, p: Mapping[str, Any], bs: int) -> np.ndarray:
    from art.attacks.evasion import SaliencyMapMethod

    targets = _targets(model, x, y, p["target"], bs)
    attack = SaliencyMapMethod(_estimator(model, x), theta=p["theta"], gamma=p["gamma"], batch_size=bs, verbose=False)
    return attack.generate(x=x, y=targets)


def _pick(p: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The attack parameters named by ``keys`` (library keyword arguments of the same names)."""
    return {k: p[k] for k in keys}


def _run_cw_l2(model: nn.Module, x: np.ndarray, y: np.ndarray, p: Mapping[str, Any], bs: int) -> np.ndarray:
    from art.attacks.evasion import CarliniL2Method

    targets = _targets(model, x, y, p["target"], bs)
    keys = ("confidence", "learning_rate", "binary_search_steps", "max_iter", "initial_const")
    attack = CarliniL2Method(
        _estimator(model, x, pad=p["pad"]), targeted=True, batch_size=bs, verbose=False, **_pick(p, keys)
    )
    return attack.generate(x=x, y=targets)


def _run_cw_l0(model: nn.Module, x: np.ndarray, y: np.ndarray, p: Mapping[str, Any], bs: int) -> np.ndarray:
    """Carlini's L0 search driven from here: ART's ``CarliniL0Method`` with a ``mask`` of still
    changeable pixels is the inner solver; after each round that still reaches the target, freeze the
    ``shrink`` fraction of changeable pixels the solution changed least; stop at the first failure
    and keep the last success. (ART's own outer loop runs ``x.shape[1] + 1`` rounds, i.e. the
    channel count, freezing one pixel each, which leaves a dense L2 perturbation.)"""
    from art.attacks.evasion import CarliniL0Method

    targets = _targets(model, x, y, p["target"], bs)
    est = _estimator(model, x, pad=p["pad"])
    free = np.ones(x.shape, dtype=bool)  # (N, C, H, W) changeable pixels
    best = x.copy()
    todo = np.arange(len(x))
    for _round in range(int(p["rounds"])):
        attack = CarliniL0Method(
            est,
            confidence=p["confidence"],
            targeted=True,
            learning_rate=p["learning_rate"],
            binary_search_steps=p["binary_search_steps"],
            max_iter=p["max_iter"],
            initial_const=p["initial_const"],
            mask=free[todo].astype(np.float32),
            batch_size=bs,
            verbose=False,
        )
        adv = np.clip(attack.generate(x=x[todo], y=targets[todo]), 0.0, 1.0).astype(np.float32)
        hit = predict_labels(model, adv, bs) == targets[todo]
        best[todo[hit]] = adv[hit]
        for j in np.flatnonzero(hit):
            i = todo[j]
            change = np.where(free[i], np.abs(adv[j] - x[i]), np.inf).ravel()  # (C*H*W,)
            n_freeze = int(free[i].sum() * p["shrink"])
            free[i].ravel()[np.argsort(change, kind="stable")[:n_freeze]] = False
        todo = todo[hit]
        if todo.size == 0:
            break
    return best


def _cw_linf_class() -> type:
    """ART's CW-Linf with Carlini's outer search and a correct targeted success test (see module doc)."""
    from art.attacks.evasion import CarliniLInfMethod

    class _CarliniLInfTargetFix(CarliniLInfMethod):
        box = (0.0, 1.0)  # the real pixel box; the estimator's clip values may be padded

        def _reached(self, x_adv: np.ndarray, target: np.ndarray) -> bool:
            return bool(self.estimator.predict(x_adv).argmax(axis=1)[0] == target.argmax(axis=1)[0])

        def _one(self, xi: np.ndarray, ti: np.ndarray, lo: float, hi: float) -> np.ndarray:
            """Shrink tau while some const in [initial, largest) still reaches the target."""
            best, best_dist, tau = xi.copy(), np.inf, 1.0
            while tau > 1.0 / 256.0:
                const, found = self.initial_const, False
                while const < self.largest_const and not found:
                    cand = self._generate_single(xi, ti, lo, hi, const=const, tau=tau)  # (1, C, H, W)
                    cand = np.clip(cand, *self.box).astype(np.float32)
                    if self._reached(cand, ti):
                        found = True
                        dist = float(np.abs(cand - xi).max())
                        if dist < best_dist:
                            best, best_dist = cand, dist
                    const *= self.const_factor
                if not found:
                    break
                tau = min(tau, best_dist) * self.decrease_factor
            return best

        def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> np.ndarray:
            assert self.targeted and y is not None
            lo, hi = self.estimator.clip_values
            onehot = np.eye(self.estimator.nb_classes, dtype=np.float32)[y]  # (N, K)
            return np.concatenate([self._one(x[[i]], onehot[[i]], lo, hi) for i in range(len(x))])

    return _CarliniLInfTargetFix


def _run_cw_linf(model: nn.Module, x: np.ndarray, y: np.ndarray, p: Mapping[str, Any], bs: int) -> np.ndarray:
    targets = _targets(model, x, y, p["target"], bs)
    keys = ("confidence", "learning_rate", "max_iter", "decrease_factor", "initial_const", "largest_const")
    attack = _cw_linf_class()(
        _estimator(model, x, pad=p["pad"]), targeted=True, verbose=False, **_pick(p, (*keys, "const_factor"))
    )
    return attack.generate(x=x.astype(np.float32), y=targets)


def _run_patch(model: nn.Module, x: np.ndarray, y: np.ndarray, p: Mapping[str, Any], bs: int) -> np.ndarray:
    """Train one universal patch (targeted to ``target_class``) on the first ``train_images`` attacked
    images, then paste it at ``scale`` with a random position and rotation on every image."""
    from art.attacks.evasion import AdversarialPatchNumpy

    class _Patch(AdversarialPatchNumpy):
        # ART 1.20 passes a numpy float32 mean here and then only accepts a Python float.
        def reset_patch(self, initial_patch_value: Any) -> None:
            is_scalar = isinstance(initial_patch_value, np.floating)
            super().reset_patch(float(initial_patch_value) if is_scalar else initial_patch_value)

    est = _estimator(model, x)
    attack = _Patch(
        est,
        target=p["target_class"],
        rotation_max=p["rotation_max"],
        scale_min=p["scale_min"],
        scale_max=p["scale_max"],
        learning_rate=p["learning_rate"],
        max_iter=p["max_iter"],
        batch_size=bs,
        targeted=True,
        verbose=False,
    )
    x_train = x[: int(p["train_images"])]
    onehot = np.zeros((len(x_train), est.nb_classes), dtype=np.float32)
    onehot[:, p["target_class"]] = 1.0
    with _seeded(int(p["seed"])):
        attack.generate(x=x_train, y=onehot)
        return attack.apply_patch(x, scale=p["scale"])


# ----------------------------------------------------------------------------------------------
# content-based attacks (DeepXplore transformations, as evaluated in the NIC paper) and noise


def _lighting(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: Mapping[str, Any], _: torch.Generator):
    """Shift every pixel of an image by the same amount ``delta`` (darker or brighter), growing
    ``|delta|`` by ``step`` per round up to ``max_steps * step``: each round tries the direction the
    loss gradient favours at the clean image first, then the opposite one, and keeps the first shift
    that changes the prediction. Unchanged predictions keep the largest shift in the favoured
    direction. x (B, C, H, W)."""
    d0 = torch.zeros(len(x), 1, 1, 1, requires_grad=True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x + d0), y, reduction="sum"), d0)
    favoured = torch.where(grad >= 0, 1.0, -1.0)  # (B, 1, 1, 1)
    delta = torch.zeros_like(favoured)
    done = torch.zeros(len(x), dtype=torch.bool)
    with torch.no_grad():
        for k in range(1, int(p["max_steps"]) + 1):
            for sign in (1.0, -1.0):
                trial = sign * favoured * k * p["step"]
                flipped = ~done & (model((x + trial).clamp(0.0, 1.0)).argmax(dim=1) != y)
                delta = torch.where(flipped.view(-1, 1, 1, 1), trial, delta)
                done |= flipped
            if done.all():
                break
        delta = torch.where(done.view(-1, 1, 1, 1), delta, favoured * int(p["max_steps"]) * p["step"])
    return (x + delta).clamp(0.0, 1.0)


def _dirt(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: Mapping[str, Any], gen: torch.Generator):
    """Blacken small rectangles one at a time: each step draws ``n_candidates`` random positions
    and blackens the one with the largest first-order loss gain ``-sum(grad * x)``, while that gain
    is positive, until the prediction changes or ``max_rects`` rectangles are placed."""
    h, w = p["rect"]
    xa = x.clone()
    rows = torch.arange(len(x))
    for _step in range(int(p["max_rects"])):
        grad, pred = _loss_grad(model, xa, y)
        active = pred == y
        if not active.any():
            break
        gain = F.avg_pool2d(-(grad * xa).sum(dim=1, keepdim=True), (h, w), stride=1)[:, 0] * (h * w)  # (B, H', W')
        n_pos = gain.shape[1] * gain.shape[2]
        cand = torch.randint(0, n_pos, (len(x), int(p["n_candidates"])), generator=gen)  # (B, M)
        best_gain, best = gain.flatten(1).gather(1, cand).max(dim=1)
        pos = cand[rows, best]
        for i in torch.nonzero(active & (best_gain > 0)).flatten().tolist():
            r, c = divmod(int(pos[i]), gain.shape[2])
            xa[i, :, r : r + h, c : c + w] = 0.0
    return xa


def _rectangle(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: Mapping[str, Any], gen: torch.Generator):
    """One rectangle at a random position per image whose content follows the sign of the loss
    gradient (step ``step``) until the prediction changes or ``max_steps``."""
    h, w = p["rect"]
    n, _, height, width = x.shape
    mask = torch.zeros(n, 1, height, width)
    r0 = torch.randint(0, height - h + 1, (n,), generator=gen)
    c0 = torch.randint(0, width - w + 1, (n,), generator=gen)
    for i in range(n):
        mask[i, :, r0[i] : r0[i] + h, c0[i] : c0[i] + w] = 1.0
    xa = x.clone()
    for _step in range(int(p["max_steps"])):
        grad, pred = _loss_grad(model, xa, y)
        active = (pred == y).view(-1, 1, 1, 1)
        if not active.any():
            break
        xa = (xa + p["step"] * grad.sign() * mask * active).clamp(0.0, 1.0)
    return xa


def _run_noise(model: nn.Module, x: np.ndarray, y: np.ndarray, p: Mapping[str, Any], bs: int) -> np.ndarray:
    """Unrecognizable inputs: i.i.d. uniform [0, 1] pixels, one image per input (labels ignored)."""
    return np.random.default_rng(int(p["seed"])).random(x.shape, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# registry

_EVASION = "art.attacks.evasion."
_CW_MNIST = {"confidence": 10.0, "pad": 0.1, "learning_rate": 0.1, "initial_const": 1.0}
_CW_CIFAR = {"confidence": 5.0, "pad": 0.1, "learning_rate": 0.1, "initial_const": 1.0}
_CW_L2 = {"binary_search_steps": 5, "max_iter": 100}
_CW_L0 = {"binary_search_steps": 3, "max_iter": 30, "rounds": 8, "shrink": 0.5}
_CW_LINF = {"max_iter": 30, "decrease_factor": 0.7, "largest_const": 20.0, "const_factor": 2.0}


def _spec(name: str, family: str, norm: str | None, target: str | None, impl: str, run: RunFn, **params: Any):
    return AttackSpec(name, family, norm, target, impl, params, run)


def _same(p: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {d: dict(p) for d in DATASETS}


def _build_registry() -> dict[str, AttackSpec]:
    specs = [
        _spec("fgsm", "gradient", "Linf", None, _EVASION + "FastGradientMethod", _run_fgsm,
              mnist={"eps": 0.3}, cifar10={"eps": 0.0156}),
        _spec("bim", "gradient", "Linf", None, _EVASION + "BasicIterativeMethod", _run_bim,
              mnist={"eps": 0.3, "eps_step": 0.06, "max_iter": 10},
              cifar10={"eps": 0.008, "eps_step": 0.0012, "max_iter": 10}),
        _spec("deepfool", "gradient", "L2", None, _EVASION + "DeepFool", _run_deepfool,
              mnist={"overshoot": 0.02, "max_iter": 50, "nb_grads": 10},
              cifar10={"overshoot": 10.0, "max_iter": 50, "nb_grads": 10}),
    ]  # fmt: skip
    for k in (2, 4, 8):  # the field's Linf budgets k/255 (Aldahdooh et al.'s review uses 8/255)
        specs += [
            _spec(f"fgsm_{k}", "gradient", "Linf", None, _EVASION + "FastGradientMethod", _run_fgsm,
                  **_same({"eps": k / 255})),
            _spec(f"bim_{k}", "gradient", "Linf", None, _EVASION + "BasicIterativeMethod", _run_bim,
                  **_same({"eps": k / 255, "eps_step": k / 255 / 4, "max_iter": 10})),
        ]  # fmt: skip
    pgd = {"random_init": 1, "max_iter": 20, "seed": 0}
    specs += [
        _spec("pgd_linf_8", "gradient", "Linf", None, _EVASION + "ProjectedGradientDescentNumpy", _run_pgd,
              **_same({**pgd, "norm": "inf", "eps": 8 / 255, "eps_step": 2 / 255})),
        _spec("pgd_l2_0.5", "gradient", "L2", None, _EVASION + "ProjectedGradientDescentNumpy", _run_pgd,
              **_same({**pgd, "norm": "2", "eps": 0.5, "eps_step": 0.1})),
        _spec("square_8", "query", "Linf", None, _EVASION + "SquareAttack", _run_square,
              **_same({"eps": 8 / 255, "max_iter": 1000, "p_init": 0.05, "restarts": 1, "seed": 0})),
    ]  # fmt: skip
    for tgt in ("next", "ll"):
        specs += [
            _spec(f"jsma_{tgt}", "gradient", "L0", tgt, _EVASION + "SaliencyMapMethod", _run_jsma,
                  **_same({"theta": 1.0, "gamma": 0.1})),
            _spec(f"cw_l2_{tgt}", "gradient", "L2", tgt, _EVASION + "CarliniL2Method", _run_cw_l2,
                  mnist={**_CW_MNIST, **_CW_L2}, cifar10={**_CW_CIFAR, **_CW_L2}),
            _spec(f"cw_linf_{tgt}", "gradient", "Linf", tgt, _EVASION + "CarliniLInfMethod", _run_cw_linf,
                  mnist={**_CW_MNIST, **_CW_LINF}, cifar10={**_CW_CIFAR, **_CW_LINF}),
            _spec(f"cw_l0_{tgt}", "gradient", "L0", tgt, _EVASION + "CarliniL0Method", _run_cw_l0,
                  mnist={**_CW_MNIST, **_CW_L0}, cifar10={**_CW_CIFAR, **_CW_L0}),
        ]  # fmt: skip
    specs.append(  # high confidence (kappa 20): lands far past the boundary, where consistency checks are blind
        _spec("cw_l2_k20", "gradient", "L2", "next", _EVASION + "CarliniL2Method", _run_cw_l2,
              mnist={**_CW_MNIST, **_CW_L2, "confidence": 20.0}, cifar10={**_CW_CIFAR, **_CW_L2, "confidence": 20.0})
    )  # fmt: skip
    specs.append(  # the DeepFool authors' overshoot: stops just past the boundary (``deepfool`` on CIFAR-10 uses 10)
        _spec("deepfool_0.02", "gradient", "L2", None, _EVASION + "DeepFool", _run_deepfool,
              **_same({"overshoot": 0.02, "max_iter": 50, "nb_grads": 10}))
    )  # fmt: skip
    patch = {"target_class": 8, "scale": 0.5, "scale_min": 0.4, "scale_max": 0.6, "rotation_max": 22.5,
             "learning_rate": 0.2, "max_iter": 200, "train_images": 64, "seed": 0}  # fmt: skip
    specs += [
        _spec("patch", "patch", None, "fixed", _EVASION + "AdversarialPatchNumpy", _run_patch, **_same(patch)),
        _spec("lighting", "content", None, None, "pathguard", _batched(_lighting),
              **_same({"step": 0.02, "max_steps": 50})),
        _spec("dirt", "content", None, None, "pathguard", _batched(_dirt),
              mnist={"rect": [3, 3], "max_rects": 10, "n_candidates": 20, "seed": 0},
              cifar10={"rect": [3, 3], "max_rects": 10, "n_candidates": 20, "seed": 0}),
        _spec("rectangle", "content", None, None, "pathguard", _batched(_rectangle),
              **_same({"rect": [8, 8], "step": 0.1, "max_steps": 50, "seed": 0})),
        _spec("noise", "unrecognizable", None, None, "pathguard", _run_noise, **_same({"seed": 0})),
    ]  # fmt: skip
    return {s.name: s for s in specs}


ATTACKS: dict[str, AttackSpec] = _build_registry()


# ----------------------------------------------------------------------------------------------
# benchmark: ``python -m pathguard.models.evaluation.attacks --dataset mnist --n 100``


def benchmark(model: nn.Module, dataset: str, x: np.ndarray, y: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    """Run each attack on ``x`` (N, C, H, W) and summarise success, time and distortion per attack."""
    rows = []
    for name in names:
        r = run_attack(model, name, dataset, x, y)
        diff = (r.x_adv - x)[r.success].reshape(r.n_successful, -1)  # (S, D)
        row: dict[str, Any] = {
            "attack": name,
            "n_attempted": r.n_attempted,
            "n_successful": r.n_successful,
            "success_rate": r.n_successful / max(r.n_attempted, 1),
            "seconds_per_image": r.seconds / max(r.n_attempted, 1),
            "mean_linf": float(np.abs(diff).max(axis=1).mean()) if len(diff) else None,
            "mean_l2": float(np.linalg.norm(diff, axis=1).mean()) if len(diff) else None,
            "mean_l0": float((np.abs(diff) > 1e-3).sum(axis=1).mean()) if len(diff) else None,
            "params": r.params,
        }
        target = ATTACKS[name].target
        if target in ("next", "ll"):
            want = _targets(model, x, np.asarray(y, dtype=np.int64), target, 256)
            row["target_hit_rate"] = float((r.pred_adv == want)[r.attempted].mean()) if r.n_attempted else None
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "params"}), flush=True)
    return rows


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    from pathlib import Path

    ap = argparse.ArgumentParser(description="time and score every registered attack on the first N test images")
    ap.add_argument("--dataset", choices=DATASETS, default="mnist")
    ap.add_argument("--classifier", help="classifier folder (default: the committed one)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated names")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    default = {"mnist": "mnist-lenet5", "cifar10": "cifar10-cnn"}[args.dataset]
    model = load_classifier(Path(args.classifier or f"artifacts/classifiers/{default}")).eval()
    split = load_dataset(args.dataset, "test")
    rows = benchmark(model, args.dataset, split.x[: args.n], split.y[: args.n], args.attacks.split(","))
    meta = {"dataset": args.dataset, "n": args.n, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if args.out:
        Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
