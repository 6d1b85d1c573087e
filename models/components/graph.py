"""Components inside an ONNX graph: the vocabulary a component's :meth:`~pathguard.models.components.Component.graph`
form is written in.

:class:`OnnxGraph` appends nodes and constants with fresh tensor names at a fixed opset (the forms of ``Reduce*``
that the opset expects are chosen here, so a component never spells them). :class:`GraphContext` is what the guarded
graph (:mod:`pathguard.models.guarded`) hands a component: the input batch, the logits of the originals, the logits
of every consistency copy it asked for (all from ONE forward pass of the classifier's own graph) and a memo, so that
components sharing an analysis (the three noise statistics) compute it once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["MIN_OPSET", "Columns", "GraphContext", "NotInGraphError", "OnnxGraph", "Rows"]

T = TypeVar("T")

MIN_OPSET = 13  # Softmax over one axis, ReduceSum's axes as an input, GreaterOrEqual


@dataclass(frozen=True)
class Columns:
    """A response field of :meth:`~pathguard.models.components.Component.graph_fields` that is an (N, L) tensor
    reported as one (N,) column per label (``{label: value}`` per image, as NIC's per-layer violations)."""

    tensor: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Rows:
    """A response field of :meth:`~pathguard.models.components.Component.graph_fields` that is an (N, ``width``)
    tensor reported as a list per image (as Effective Path's per-layer similarities)."""

    tensor: str
    width: int


class NotInGraphError(NotImplementedError):
    """A component has no in-graph form (:meth:`Component.graph`), e.g. the supervised detector."""


class OnnxGraph:
    """Nodes, constants, inputs and outputs of a graph being written, at opset ``opset``."""

    def __init__(self, opset: int) -> None:
        if opset < MIN_OPSET:
            raise ValueError(f"the guarded graph needs opset >= {MIN_OPSET}, got {opset}")
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"pg/{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        """Append one node with one output (named ``out`` or fresh); returns the output's name."""
        name = out or self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=self.fresh(op_type), **attrs))
        return name

    def ops(self, op_type: str, inputs: Sequence[str], n_out: int, **attrs: Any) -> list[str]:
        """Append one node with ``n_out`` outputs."""
        names = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.fresh(op_type), **attrs))
        return names

    def const(self, value: Any, dtype: type | np.dtype | None = None, hint: str = "const") -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    # -------------------------------------------------------------------- forms that change with the opset
    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: bool = False) -> str:
        """``ReduceSum``, ``ReduceMean``, ``ReduceMax``, ``ReduceMin`` over ``axes``."""
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes_as_input:
            return self.op(op_type, x, self.const(list(axes), np.int64, "axes"), keepdims=int(keepdims))
        return self.op(op_type, x, axes=list(axes), keepdims=int(keepdims))

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", x, self.const(list(axes), np.int64, "axes"))

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Squeeze", x, self.const(list(axes), np.int64, "axes"))

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", x, to=to)

    def double(self, x: str) -> str:
        return self.cast(x, TensorProto.DOUBLE)

    def scalar(self, value: float, dtype: type = np.float64) -> str:
        return self.const(np.asarray(value, dtype=dtype), hint="scalar")

    def p_value(self, calib: np.ndarray, score: str) -> str:
        """Empirical p-values ``(1 + #{calib >= s}) / (n + 1)`` (as
        :func:`~pathguard.models.verdict.calibration.empirical_p_values`): ``calib`` (n,) against (N,) scores, or
        (n, L) column by column against (N, L) scores; float64."""
        cal = np.sort(np.asarray(calib, dtype=np.float64), axis=0)
        s = self.unsqueeze(score, [1])  # (N, 1) or (N, 1, L)
        ge = self.op("GreaterOrEqual", self.const(cal[None], hint="calibration"), s)  # (N, n) or (N, n, L)
        count = self.reduce("ReduceSum", self.double(ge), [1])
        return self.op("Div", self.op("Add", count, self.scalar(1.0)), self.scalar(cal.shape[0] + 1.0))

    def add_input(self, name: str, elem_type: int, shape: Sequence[int | str | None]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def add_output(self, tensor: str, name: str, elem_type: int, shape: Sequence[int | str | None]) -> None:
        """Expose ``tensor`` as the graph output ``name`` (through an Identity when the names differ)."""
        if tensor != name:
            self.op("Identity", tensor, out=name)
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))


class GraphContext(OnnxGraph):
    """What a component's in-graph form reads and writes (see the module docstring).

    Attributes
    ----------
    x : str
        The input batch (N, C, H, W) float32.
    batch : str
        (1,) int64 tensor holding N.
    logits : str
        (N, K) float64 logits of the originals (the classifier's float32 logits, cast).
    logits32 : str
        The same, float32 (an argmax of either gives the same class).
    predicted : str
        (N,) int64 predicted class.
    input_shape : tuple of int
        (C, H, W) of one input.
    shapes : dict[str, tuple of int]
        Per-input shape of every named activation: the input, the logits and each tap.
    copies : dict[str, str]
        Transform key -> (copies, N, K) float64 logits of its copies.
    copies32 : dict[str, str]
        The same, float32.
    memo : dict
        Analyses already written (tensor names, or dicts of them), by key.
    noise : callable
        ``noise(key, shape_like)`` -> a standard normal tensor shaped like ``shape_like`` (copies, N, C, H, W),
        drawn in the graph (a random op) or read from a graph input; set by the guarded graph's builder.
    tap : callable
        ``tap(name)`` -> the originals' activation of a tapped layer, as a tensor named after the tap (the names
        the served classifier graph gives its taps); set by the guarded graph's builder.
    """

    def __init__(self, opset: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__(opset)
        self.input_shape = input_shape
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.x = self.batch = self.logits = self.logits32 = self.predicted = ""
        self.copies: dict[str, str] = {}
        self.copies32: dict[str, str] = {}
        self.memo: dict[str, Any] = {}
        self.noise: Callable[[str, str], str] = _no_noise
        self.tap: Callable[[str], str] = _no_tap

    def model(self) -> onnx.ModelProto:
        """What is written so far as a model (no outputs), e.g. for an exporter that appends to a model."""
        graph = helper.make_graph(self.nodes, "partial", self.inputs, [], initializer=self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])

    def adopt(self, model: onnx.ModelProto) -> None:
        """Take the nodes and constants of ``model``, a copy of :meth:`model` with nodes appended."""
        nodes, inits = list(model.graph.node), list(model.graph.initializer)
        if [n.name for n in nodes[: len(self.nodes)]] != [n.name for n in self.nodes]:
            raise ValueError("the model does not extend this graph")
        self.nodes, self.initializers = nodes, inits

    def embed(self, model: onnx.ModelProto, prefix: str, inputs: Sequence[str]) -> str:
        """Append another model's graph (its tensors prefixed with ``prefix``) reading ``inputs`` (this graph's
        tensors, in the order of its graph inputs); returns the prefix (its outputs are ``prefix + name``)."""
        inner = onnx.compose.add_prefix(model, prefix).graph
        inits = {i.name for i in inner.initializer}
        graph_inputs = [i.name for i in inner.input if i.name not in inits]
        if len(graph_inputs) != len(inputs):
            raise ValueError(f"the embedded graph reads {len(graph_inputs)} inputs; {len(inputs)} given")
        for src, dst in zip(inputs, graph_inputs, strict=True):
            self.op("Identity", src, out=dst)
        self.nodes.extend(inner.node)
        self.initializers.extend(inner.initializer)
        return prefix

    def get(self, key: str, write: Callable[[], T]) -> T:
        """The tensor(s) of analysis ``key``, written by ``write`` on first use."""
        if key not in self.memo:
            self.memo[key] = write()
        out: T = self.memo[key]
        return out


def _no_noise(key: str, shape_like: str) -> str:
    raise RuntimeError("this graph context draws no noise")


def _no_tap(name: str) -> str:
    raise RuntimeError("this graph context has no taps")
