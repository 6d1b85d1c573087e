"""Classifier engines: the torch module or an onnxruntime session, logits only or logits plus every tap (reported
in forward order, so the layer checks of earlier taps can start while the forward pass goes on).

The onnx engine can also compute NIC's per-layer checks inside the graph (``nic=`` a fitted detector): the served
ONNX model gets NIC's reductions, value invariants and derived heads appended
(:func:`pathguard.models.nic.onnx_export.with_nic_outputs`) and one run returns logits, taps and their results.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
import torch
from torch import nn

from pathguard.models.bundle.result import softmax
from pathguard.models.guarded import guarded_model, noise_feed, noise_inputs
from pathguard.models.networks import TappedSequential, tap_points
from pathguard.models.nic import NICDetector
from pathguard.models.nic.onnx_export import GraphNICScores, nic_output_names, with_nic_outputs
from pathguard.service.runtime.sessions import CPU, resolve_providers, session_options

__all__ = [
    "ClassifierEngine",
    "GraphRun",
    "GuardedEngine",
    "OnnxEngine",
    "TapCallback",
    "TorchEngine",
    "resolve_providers",
    "softmax",
]

log = logging.getLogger("pathguard.service")

TapCallback = Callable[[str, torch.Tensor], None]


class ClassifierEngine(Protocol):
    """A classifier runtime: logits only, or logits plus every tap (reported in forward order); engines with
    ``computes_nic`` also return NIC's scores from the same pass (:meth:`forward_with_nic`)."""

    name: str
    computes_nic: bool
    split_error: str | None  # set when the graph could not be split at the checked taps (onnx)

    def logits(self, x: np.ndarray) -> np.ndarray: ...

    def forward(
        self, x: np.ndarray, on_tap: TapCallback | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def forward_with_nic(self, x: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor], GraphNICScores]: ...


class TorchEngine:
    """The bundle's TappedSequential in torch, stepping through its named children to report taps."""

    name = "torch"
    computes_nic = False
    split_error: str | None = None  # stepping through the layers always yields the taps as they come

    def __init__(self, model: TappedSequential) -> None:
        self.model = model.eval()
        self._points = tap_points(model)
        self._children: list[nn.Module] = list(model.children())

    @torch.no_grad()
    def logits(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.model(torch.from_numpy(x)).numpy()
        return out

    @torch.no_grad()
    def forward(self, x: np.ndarray, on_tap: TapCallback | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = torch.from_numpy(x)
        taps: dict[str, torch.Tensor] = {}
        for i, module in enumerate(self._children):
            t = module(t)
            name = self._points.get(i)
            if name is not None:
                taps[name] = t
                if on_tap is not None:
                    on_tap(name, t)
        return t, taps

    def forward_with_nic(self, x: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor], GraphNICScores]:
        raise RuntimeError("the torch engine leaves NIC to the pipeline's layer checks")


@dataclass(frozen=True)
class _Stage:
    input_name: str
    outputs: list[str]
    session: ort.InferenceSession


class OnnxEngine:
    """onnxruntime on the classifier's ONNX export (outputs ``["logits", *taps]``, input ``"input"``).

    For tap-by-tap execution the graph is cut into stages at ``split_at`` (the taps whose checks may start early):
    stage k reads the previous cut tensor and yields the taps up to the next cut. Models that cannot be cut into
    a chain of single-input stages run as one stage (taps then arrive together at the end).

    With ``nic`` (a fitted detector over the model's taps) the engine also holds a session on the graph with NIC's
    per-layer work appended (member 0, the one the pipeline scores with: reductions, value invariants, derived heads'
    logits): :meth:`forward_with_nic` returns logits, taps and those scores from one run. That session uses
    ``inter_op_threads`` threads; above 1, onnxruntime's parallel executor runs independent nodes (each layer's
    checks, the rest of the forward pass) side by side.
    :meth:`logits` keeps using the plain graph (onnxruntime runs every node of a graph whatever outputs are asked
    for).
    """

    name = "onnx"

    def __init__(
        self,
        model_bytes: bytes,
        split_at: Sequence[str],
        threads: int = 1,
        nic: NICDetector | None = None,
        inter_op_threads: int = 1,
        providers: Sequence[str] = (CPU,),
    ) -> None:
        self.providers = resolve_providers(providers)
        model = onnx.load_from_string(model_bytes)
        self.input_name = model.graph.input[0].name
        self.tap_names = [o.name for o in model.graph.output if o.name != "logits"]
        self._options = ort.SessionOptions()
        self._options.intra_op_num_threads = threads
        self._options.inter_op_num_threads = 1
        self._options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._full = self._session(model_bytes)
        self.split_error: str | None = None  # why the graph could not be split at the checked taps, if it could not
        self.stages = self._split(model, [t for t in self.tap_names if t in set(split_at)])
        self.computes_nic = nic is not None
        self._nic_outputs = list(nic_output_names(0)[:2])  # per-layer VI scores and head logits
        self._with_nic: ort.InferenceSession | None = None
        if nic is not None:
            options = self._nic_options(threads, inter_op_threads)
            graph = with_nic_outputs(model, nic, provenance=False).SerializeToString()
            self._with_nic = ort.InferenceSession(graph, options, providers=self.providers)
        self.providers = self._full.get_providers()  # what the sessions run on (a provider may fail to start)

    def _session(self, model_bytes: bytes) -> ort.InferenceSession:
        return ort.InferenceSession(model_bytes, self._options, providers=self.providers)

    @staticmethod
    def _nic_options(threads: int, inter_op_threads: int) -> ort.SessionOptions:
        return session_options(threads, inter_op_threads)

    def _split(self, model: onnx.ModelProto, cuts: list[str]) -> list[_Stage]:
        whole = [_Stage(self.input_name, ["logits", *self.tap_names], self._full)]
        if not cuts:
            return whole
        ancestors = _ancestors(model.graph)
        outputs = ["logits", *self.tap_names]
        groups: list[list[str]] = [[] for _ in range(len(cuts) + 1)]
        for out in outputs:  # stage index = number of cuts strictly upstream of the output
            groups[sum(c in ancestors[out] for c in cuts)].append(out)
        inputs = [self.input_name, *cuts]
        stages = []
        try:
            extractor = onnx.utils.Extractor(model)
            for inp, outs in zip(inputs, groups, strict=True):
                if not outs:
                    continue
                sub = extractor.extract_model([inp], [o for o in outputs if o in outs])
                stages.append(_Stage(inp, [o for o in outputs if o in outs], self._session(sub.SerializeToString())))
        except Exception as exc:  # any graph that is not a chain of single-input stages
            self.split_error = f"{type(exc).__name__}: {exc}"
            log.warning("ONNX graph cannot be split at %s (%s); taps will arrive after the full pass", cuts, exc)
            return whole
        return stages

    def logits(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._full.run(["logits"], {self.input_name: x})[0]
        return out

    def forward(self, x: np.ndarray, on_tap: TapCallback | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values: dict[str, np.ndarray] = {self.input_name: x}
        if on_tap is None:  # serial: one run of the full graph is cheapest
            outs = self._full.run(["logits", *self.tap_names], {self.input_name: x})
            values.update(zip(["logits", *self.tap_names], outs, strict=True))
        else:
            for stage in self.stages:
                outs = stage.session.run(stage.outputs, {stage.input_name: values[stage.input_name]})
                for name, value in zip(stage.outputs, outs, strict=True):
                    values[name] = value
                    if name != "logits":
                        on_tap(name, torch.from_numpy(value))
        taps = {n: torch.from_numpy(values[n]) for n in self.tap_names}
        return torch.from_numpy(values["logits"]), taps

    def forward_with_nic(self, x: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor], GraphNICScores]:
        """One run of the graph with NIC appended: logits (N, K), taps, and NIC's per-layer scores (member 0)."""
        if self._with_nic is None:
            raise RuntimeError("this onnx engine was built without a NIC detector")
        names = ["logits", *self.tap_names, *self._nic_outputs]
        outs = dict(zip(names, self._with_nic.run(names, {self.input_name: x}), strict=True))
        taps = {n: torch.from_numpy(outs[n]) for n in self.tap_names}
        return torch.from_numpy(outs["logits"]), taps, GraphNICScores.from_outputs(outs)


@dataclass
class GraphRun:
    """One batch through the guarded graph: logits (N, K), the raw score of every in-graph component and NIC's
    outputs (where NIC is in the graph)."""

    logits: torch.Tensor
    raw: dict[str, np.ndarray]
    nic: GraphNICScores | None


class GuardedEngine:
    """onnxruntime on the bundle's guarded graph (:func:`pathguard.models.guarded.guarded_model`, built in memory at
    start-up): the classifier, its consistency copies in the same forward pass, and every in-graph component of the
    bundle in ONE run. Its noise is fed from the pipeline's per-input generators (``noise="input"``), so a seeded
    server draws the same noise as the Python pipeline and an unseeded one fresh noise per batch.

    ``components``: ``all`` (every in-graph component) or ``verdict`` (the verdict's). ``beside``: components left
    out of the graph (the runtime scores them on a worker thread while the graph runs, and fuses the verdict).
    """

    name = "graph"

    def __init__(
        self,
        bundle: Any,
        components: str = "all",
        threads: int = 1,
        inter_op_threads: int = 1,
        providers: Sequence[str] = (CPU,),
        beside: Sequence[str] = (),
    ) -> None:
        model = guarded_model(bundle, noise="input", components=components, details=True, beside=beside)
        self._noise = noise_inputs(bundle, components, beside)  # the graph's noise inputs, listed once
        props = {p.key: p.value for p in model.metadata_props}
        self.components: list[str] = json.loads(props["pathguard.components"])
        outputs = [o.name for o in model.graph.output]
        nic = [n for n in nic_output_names(0) if n in outputs]
        self._outputs = ["logits", *(f"raw_{c}" for c in self.components), *nic]
        self._nic = bool(nic)
        options = OnnxEngine._nic_options(threads, inter_op_threads)
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=resolve_providers(providers))
        self.providers = self.session.get_providers()

    def run(self, x: np.ndarray, generators: Sequence[torch.Generator]) -> GraphRun:
        """Score the batch ``x`` (N, C, H, W) with noise drawn from ``generators`` (one per input)."""
        feed = {"input": x, **noise_feed(self._noise, torch.from_numpy(x), generators)}
        outs = dict(zip(self._outputs, self.session.run(self._outputs, feed), strict=True))
        return GraphRun(
            logits=torch.from_numpy(outs["logits"]),
            raw={c: outs[f"raw_{c}"] for c in self.components},
            nic=GraphNICScores.from_outputs(outs) if self._nic else None,
        )


def _ancestors(graph: onnx.GraphProto) -> dict[str, set[str]]:
    """Tensor name -> every tensor it (transitively) depends on; nodes are topologically sorted in ONNX."""
    anc: dict[str, set[str]] = {i.name: set() for i in graph.input}
    for node in graph.node:
        deps: set[str] = set()
        for inp in node.input:
            if inp:
                deps |= {inp} | anc.get(inp, set())
        for out in node.output:
            anc[out] = deps
    return anc
