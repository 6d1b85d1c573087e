"""The verdict-component protocol and its registry: one place that the builder, the bundle loader, the detection
pipeline, the response and the evaluation loop over.

A component turns one batch's forward pass into a raw anomaly score per input (higher = more anomalous). It is

- **fitted** on benign data only (:meth:`Component.build`, given a :class:`BuildContext`: the classifier, a labelled
  benign sample of the fit split, the build's passes over images and the components built before it);
- **stored** as plain files (:meth:`Component.to_files`: npz / JSON bytes, nothing pickled) and read back from the
  verified bundle bytes (:meth:`Component.from_files`);
- **scored** on an :class:`Observation` (the batch, its logits and taps, and the analyses already computed on it,
  each once: NIC's per-layer checks, the Effective Path extraction, the consistency copies' logits);
- **calibrated** by the verdict: its raw scores on the clean split A become empirical p-values, and its
  response fields carry the violation probability ``1 - p`` as ``score``.

Adding a component is one module that subclasses :class:`Component` and calls :func:`register` once; the
manifest names it in ``verdict.components`` (fused) or ``components`` (built and reported).
"""

from __future__ import annotations

import functools
import io
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch

from pathguard.models.bundle.result import row_of
from pathguard.models.networks import TappedSequential

if TYPE_CHECKING:
    from pathguard.models.builder.shards import Job
    from pathguard.models.components.graph import GraphContext

__all__ = [
    "REGISTRY",
    "BuildContext",
    "Component",
    "FileReader",
    "NotDifferentiableError",
    "Observation",
    "Relaxation",
    "component_class",
    "npz_blob",
    "one_torch_thread",
    "read_npz",
    "register",
    "row_of",
    "served_raw",
    "straight_through",
]

GIVEN_RAW = "given/raw"
"""The observation's key of raw scores computed elsewhere (the guarded graph's): ``{component: (N,) array}``."""

T = TypeVar("T")
FileReader = Callable[[str], bytes]
"""Reads a verified bundle file (or a build job's fitted blob) by name; raises KeyError when absent."""


class Component(ABC):
    """One detector of the verdict (see the module docstring).

    Class attributes
    ----------------
    name : str
        Registry key; the fusion name in the manifest and the key of its fields in the /v1/detect response.
    family : str
        ``layer`` (statistics of the activations) or ``consistency`` (how the prediction responds to small
        input changes); the fusion may combine within a family first. ``reported`` components (the supervised
        detector) are built, stored and served like the others but never fused: they decide at their own
        threshold (:meth:`operate_at`).
    files : tuple of str
        The bundle files it owns (empty when it derives everything from another component).
    requires : tuple of str
        Components that must be built (and loaded) before it, e.g. NIC's value invariants need NIC.
    """

    name: ClassVar[str]
    family: ClassVar[str] = "layer"
    files: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    params: ClassVar[tuple[str, ...] | None] = ()  # build parameters it accepts (None: any, checked by build)

    # ------------------------------------------------------------------ build
    @classmethod
    @abstractmethod
    def build(cls, ctx: BuildContext, params: Mapping[str, Any]) -> Component:
        """Fit on benign data (the build's sample or passes); returns the fitted component."""

    @abstractmethod
    def to_files(self) -> dict[str, bytes]:
        """The component's bundle files (names in :attr:`files`)."""

    @classmethod
    @abstractmethod
    def from_files(
        cls, read: FileReader, model: TappedSequential, built: Mapping[str, Component], entry: Mapping[str, Any]
    ) -> Component:
        """Rebuild from its files; ``built`` holds the components listed in :attr:`requires`, ``entry`` is its
        :meth:`manifest` entry as the bundle recorded it."""

    @classmethod
    def check(cls, model: TappedSequential, params: Mapping[str, Any]) -> None:
        """Refuse parameters this model cannot take before any image is read (default: accept)."""
        return None

    def manifest(self) -> dict[str, Any]:
        """Its entry under the manifest's ``components`` (settings worth reading without loading arrays)."""
        return {}

    # ------------------------------------------------------------------ scoring
    @abstractmethod
    def raw(self, obs: Observation) -> np.ndarray:
        """(N,) raw anomaly score of the observed batch, higher = more anomalous."""

    def surrogate(self, obs: Observation, relax: Relaxation) -> torch.Tensor:
        """(N,) differentiable stand-in of :meth:`raw` for adaptive attacks (``pathguard evaluate --adaptive``).

        ``obs`` holds tensors that carry gradients (its ``forward`` too); steps of :meth:`raw` that have no useful
        gradient (an argmax, a quantization, a selection, an empirical p-value) are relaxed as ``relax`` says. Its
        forward value equals :meth:`raw` (exactly with ``relax.straight_through``, else within the smoothing).
        Default: :class:`NotDifferentiableError`."""
        raise NotDifferentiableError(f"component {self.name!r} gives no differentiable score")

    #: Scored beside the guarded graph when served even though it has an in-graph form (its form outside the graph
    #: is the faster one on the serving machine); an exported graph still holds it.
    beside_graph = False

    def graph_unavailable(self) -> str | None:
        """Why :meth:`graph` cannot write this component (None: it can)."""
        if type(self).graph is Component.graph:
            return f"component {self.name!r} has no in-graph form yet"
        return None

    def graph(self, g: GraphContext) -> str:
        """Write :meth:`raw` into an ONNX graph (the guarded graph, :mod:`pathguard.models.guarded`): append nodes to
        ``g`` that compute the (N,) float64 raw score from ``g``'s tensors and return its name. Its value equals
        :meth:`raw` up to the rounding of onnxruntime's kernels. Default:
        :class:`~pathguard.models.components.graph.NotInGraphError`."""
        from pathguard.models.components.graph import NotInGraphError

        raise NotInGraphError(f"component {self.name!r} has no in-graph form yet")

    def graph_fields(self, g: GraphContext, violation: str) -> dict[str, Any]:
        """:meth:`fields` in the graph ``g``, after :meth:`graph` wrote this component: the same keys, each an (N,)
        float tensor's name, a constant (a list), a :class:`~pathguard.models.components.graph.Rows` (an (N, L)
        tensor), a :class:`~pathguard.models.components.graph.Columns` or a nested dict. ``violation``: the (N,)
        tensor of ``1 - p``. The stored guarded graph outputs them: a server without torch answers in the same
        shape."""
        return {"score": violation}

    def fields(self, obs: Observation, violation: np.ndarray) -> dict[str, Any]:
        """Its part of the /v1/detect response for the batch: arrays whose first axis is the batch (indexed per
        image by :func:`row_of`), constants (lists of names) and nested dicts. ``violation`` (N,) is ``1 - p`` of
        :meth:`raw` against the clean calibration split."""
        return {"score": violation}

    def operate_at(self, target_fpr: float) -> None:
        """Set the operating point of a component that decides by itself (family ``reported``; default: none)."""
        return None

    def warm_up(self) -> None:
        """Prepare for serving (e.g. compile kernels) so the first request pays no setup cost."""
        return None


REGISTRY: dict[str, type[Component]] = {}


def register(cls: type[Component]) -> type[Component]:
    """Add a component class to the registry (usable as a class decorator); its name must be new."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} has no name")
    if name in REGISTRY and REGISTRY[name] is not cls:
        raise ValueError(f"a component named {name!r} is registered already ({REGISTRY[name].__name__})")
    REGISTRY[name] = cls
    return cls


def component_class(name: str) -> type[Component]:
    """The registered component class of ``name``; a ValueError naming the known ones otherwise (the package
    registers the built-in ones when it is imported)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown component {name!r}; this pathguard knows {sorted(REGISTRY)}")
    return REGISTRY[name]


# ---------------------------------------------------------------------------------------------------- surrogates


class NotDifferentiableError(NotImplementedError):
    """A component has no differentiable form (:meth:`Component.surrogate`), e.g. a tree ensemble."""


@dataclass(frozen=True)
class Relaxation:
    """How a component's :meth:`Component.surrogate` relaxes the steps of its score that have no useful gradient.

    Attributes
    ----------
    draws : int or None
        Noise draws per input and step for randomized components (expectation over transformation); None: the
        component's own number of copies (then, with the same generators, the served noise exactly).
    bandwidth : float
        Width of the logistic steps that replace empirical p-values and Effective Path's selection cut, as a share
        of the spread of the values they compare (the calibration scores' 5-95% range, a neuron's contributions);
        0: the hard steps (no gradient through them).
    temperature : float
        Logit temperature of the soft class flips (noise flip share); 0: hard flips.
    straight_through : bool
        Forward the exact (hard) value and take the gradient of the relaxed one (BPDA, Athalye et al. 2018), so
        that the surrogate's value equals the served score; False: the relaxed value itself.
    """

    draws: int | None = 20
    bandwidth: float = 0.02
    temperature: float = 0.5
    straight_through: bool = True

    def __post_init__(self) -> None:
        if self.draws is not None and self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {self.draws}")
        if self.bandwidth < 0 or self.temperature < 0:
            raise ValueError(f"bandwidth and temperature must be >= 0, got {self.bandwidth}, {self.temperature}")


def straight_through(hard: torch.Tensor, soft: torch.Tensor, relax: Relaxation) -> torch.Tensor:
    """``hard`` forward and ``soft``'s gradient backward with ``relax.straight_through``, else ``soft``."""
    if not relax.straight_through:
        return soft
    return hard.to(soft.dtype) + (soft - soft.detach())


# ---------------------------------------------------------------------------------------------------- observation


class Observation:
    """One batch's forward pass and everything computed on it, each analysis once.

    Parameters
    ----------
    x : torch.Tensor
        (N, C, H, W) inputs in [0, 1].
    logits : torch.Tensor
        (N, K) the classifier's logits.
    taps : dict[str, torch.Tensor]
        The tapped activations of the same pass.
    forward : callable
        Logits (M, K) of further inputs (M, C, H, W) through the same classifier (the consistency copies).
    generators : sequence of torch.Generator
        The randomness of each input's checks, one generator per input (drawn per request unless a seed is set;
        seeded, it derives from the input's pixels, so an input gets the same noise alone or in any batch).
    """

    def __init__(
        self,
        x: torch.Tensor,
        logits: torch.Tensor,
        taps: dict[str, torch.Tensor],
        forward: Callable[[torch.Tensor], torch.Tensor],
        generators: Sequence[torch.Generator],
        components: Mapping[str, Component] | None = None,
    ) -> None:
        self.x, self.logits, self.taps = x, logits, taps
        self.forward = forward
        self.generators = list(generators)
        if len(self.generators) != len(x):
            raise ValueError(f"{len(self.generators)} generators for a batch of {len(x)}")
        self.components: Mapping[str, Component] = components or {}
        self.memo: dict[str, Any] = {}
        self.timings_s: dict[str, float] = {}

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def get(self, key: str, compute: Callable[[], T], timing: str | None = None) -> T:
        """The analysis ``key`` of this batch, computed by ``compute`` on first use (its seconds added to
        ``timings_s[timing]`` when ``timing`` is given)."""
        if key not in self.memo:
            t0 = time.perf_counter()
            self.memo[key] = compute()
            if timing is not None:
                self.timings_s[timing] = self.timings_s.get(timing, 0.0) + time.perf_counter() - t0
        out: T = self.memo[key]
        return out

    def put(self, key: str, value: Any) -> None:
        """An analysis computed elsewhere (e.g. on a worker thread during the forward pass)."""
        self.memo[key] = value


def served_raw(obs: Observation, component: Component) -> np.ndarray:
    """``component``'s raw score of the batch as served: the one computed elsewhere (the guarded graph's, under
    :data:`GIVEN_RAW`) when there is one, else :meth:`Component.raw` on the observation."""
    given = obs.memo.get(GIVEN_RAW)
    if given is not None and component.name in given:
        return np.asarray(given[component.name], dtype=np.float64)
    return np.asarray(component.raw(obs), dtype=np.float64)


# ------------------------------------------------------------------------------------------------------- building


@dataclass
class BuildContext:
    """What a component's :meth:`Component.build` may use.

    Attributes
    ----------
    model : TappedSequential
    num_classes : int
    seed : int
    sample : callable
        (n=None) -> (x (n, C, H, W) float32, y (n,)): the first ``n`` readable images of the fit split, a benign
        labelled sample read once and shared (``None``: the sample read so far, else a default size).
    built : dict[str, Component]
        The components fitted so far (in build order).
    passes : Any
        The build's passes over images (``pathguard.models.builder.builder._Passes``) for components that stream
        over a split (Effective Path, NIC).
    job : Job
        The worker job with every file fitted so far.
    timings : dict[str, float]
        Seconds per build step (a component may add its own).
    dataset : str or None
        The bundled dataset's name (``mnist``, ``cifar10``: the attacks' budgets); None for a user's images.
    progress : callable, optional
        Where a long build step reports its progress (one line per call).
    run_attack : callable, optional
        Runs a registered attack, ``(classifier, name, dataset, x, y)`` -> its result, for components trained on
        attacks (the supervised detector); given by the builder, which owns the ``eval`` extra.
    """

    model: TappedSequential
    num_classes: int
    seed: int
    sample: Callable[..., tuple[np.ndarray, np.ndarray]]
    built: dict[str, Component] = field(default_factory=dict)
    passes: Any = None
    job: Job | None = None
    timings: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)  # results several components' builds share
    dataset: str | None = None
    progress: Callable[[str], None] | None = None
    run_attack: Callable[..., Any] | None = None


# ------------------------------------------------------------------------------------------------------ utilities


def one_torch_thread(fn: Callable[..., T]) -> Callable[..., T]:
    """Run a build pass that returns scores on one torch thread, whatever the process's setting: float32 matrix
    products sum in an order that depends on the thread count, so a driver with all cores and a cluster worker
    with one would otherwise write bundles that differ in the last bits of their calibration scores."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return run


def npz_blob(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Compressed ``.npz`` bytes of plain arrays (loadable with ``allow_pickle=False``)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    return buf.getvalue()


def read_npz(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def json_blob(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()
