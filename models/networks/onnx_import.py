"""ONNX image classifiers as the layer graph both detectors walk.

:func:`import_onnx` reads an ONNX classifier (opset >= 13, one float input (N, C, H, W), one output of logits or
probabilities) and rebuilds it as a :class:`~pathguard.models.networks.TappedSequential` of torch modules with the
file's own weights: a chain of layers in which a tensor that feeds two branches which meet again at an ``Add``
becomes a :class:`~pathguard.models.networks.Residual` block (body and shortcut, the shortcut possibly the
identity). Supported operators, with their attributes:

- ``Conv`` (``pads``, also asymmetric, or ``auto_pad`` SAME_UPPER / SAME_LOWER / VALID; ``strides``, ``dilations``,
  ``group`` including depthwise), followed optionally by ``BatchNormalization`` (folded into the convolution);
- ``Gemm`` (``transA`` = 0, ``transB``, ``alpha``, ``beta``) and ``MatMul`` + ``Add`` with a constant bias;
- ``Relu``, ``Clip`` with min 0 and max 6 (ReLU6);
- ``MaxPool`` (``pads`` or ``auto_pad`` as for ``Conv``, ``ceil_mode``, ``dilations``), ``AveragePool`` (``pads``
  or ``auto_pad``, ``ceil_mode``, ``count_include_pad``), ``GlobalAveragePool``;
- ``Add`` as the residual merge, ``Flatten`` (axis 1) and ``Reshape`` to (N, -1), ``Identity``, ``Dropout``;
- a final ``Softmax`` (stripped: the imported network returns logits);
- ``Sub``, ``Div``, ``Mul``, ``Add`` with a constant before the first Conv/Gemm (input normalization, treated by
  the detectors as part of the input).

Symmetric pads become the ``padding`` of ``nn.Conv2d`` / ``nn.MaxPool2d`` / ``nn.AvgPool2d``; asymmetric pads (and
pool pads above torch's limit of half the kernel) become the modules of :mod:`~pathguard.models.networks.padding`,
which pad explicitly and pool as onnxruntime does. ``auto_pad`` SAME_UPPER / SAME_LOWER becomes explicit pads from
the layer's input size (as the rebuilt torch layers compute it), kernel and stride, an odd total putting the extra
pad at the end (SAME_UPPER) or at the beginning (SAME_LOWER); it is not supported together with ``dilations``.

Anything else raises :class:`~pathguard.models.errors.UnsupportedModelError` naming the operator, the node and the
supported list, before any weight is read.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper, shape_inference
from torch import nn

from pathguard.models.errors import UnsupportedModelError
from pathguard.models.networks.blocks import Residual
from pathguard.models.networks.config import ClassifierConfig
from pathguard.models.networks.padding import PaddedAvgPool2d, PaddedConv2d, PaddedMaxPool2d, Pads4
from pathguard.models.networks.taps import TappedSequential, tap_points

__all__ = ["MIN_OPSET", "SUPPORTED_OPS", "ConstantOp", "import_onnx", "import_onnx_tensors", "served_onnx"]

MIN_OPSET = 13
SUPPORTED_OPS = (
    "Add", "AveragePool", "BatchNormalization", "Clip", "Conv", "Div", "Dropout", "Flatten", "Gemm",
    "GlobalAveragePool", "Identity", "MatMul", "MaxPool", "Mul", "Relu", "Reshape", "Softmax", "Sub",
)  # fmt: skip
_INPUT_AFFINE = ("Add", "Sub", "Mul", "Div")  # with a constant, before the first Conv/Gemm: input normalization


@dataclass
class _Graph:
    nodes: list[onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    consts: dict[str, np.ndarray]
    output: str
    names: set[str] = field(default_factory=set)

    def const(self, name: str, node: onnx.NodeProto) -> np.ndarray:
        if name not in self.consts:
            raise UnsupportedModelError(f"node {node.name!r} ({node.op_type}): input {name!r} must be a constant")
        return self.consts[name]

    def unique(self, node: onnx.NodeProto, kind: str) -> str:
        base = re.sub(r"[^0-9A-Za-z_]+", "_", node.name or kind).strip("_") or kind
        base = base if not base[0].isdigit() else f"{kind}_{base}"
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name


def import_onnx(data: bytes) -> TappedSequential:
    """Rebuild the ONNX classifier in ``data`` as an eval-mode :class:`TappedSequential` returning logits.

    Raises
    ------
    UnsupportedModelError
        Malformed file, opset below 13, not one (N, C, H, W) input, or an unsupported operator or pattern.
    """
    return import_onnx_tensors(data)[0]


def import_onnx_tensors(data: bytes) -> tuple[TappedSequential, dict[str, str]]:
    """:func:`import_onnx`, plus the ONNX tensor behind each tap and behind ``"logits"`` (the pre-softmax output)."""
    try:
        model = onnx.load_from_string(data)
        model = shape_inference.infer_shapes(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, ... for a broken file
        raise UnsupportedModelError(f"not a readable ONNX model: {exc}") from None
    _check_ops(model)
    graph, (c, h, w) = _graph(model)
    converter = _Converter(graph, _input_name(model), (c, h, w))
    layers, _ = converter.chain(_input_name(model), graph.output)
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in layers.values()):
        raise UnsupportedModelError("the model has no Conv or Gemm/MatMul layer")
    probe = nn.Sequential(layers).eval()
    with torch.no_grad():
        k = int(probe(torch.zeros(1, c, h, w)).shape[1])
    config = ClassifierConfig("onnx", c, h, w, num_classes=k)
    tapped = TappedSequential(layers, config).eval()
    children = list(tapped.children())
    tensors = {name: converter.tensor_of(children[i]) for i, name in tap_points(tapped).items()}
    tensors["logits"] = converter.logits or graph.output
    return tapped, tensors


def served_onnx(data: bytes, tensors: dict[str, str] | None = None) -> bytes:
    """The user's ONNX file as the service runs it: the tensor behind each tap renamed to the tap's name and made
    a graph output, the pre-softmax tensor renamed ``logits`` (a final Softmax is dropped), a dynamic batch axis.

    Renaming (instead of adding Identity outputs) keeps each tap on the path of the graph, so the engine can
    split the graph into stages at the checked taps; graph outputs are never fused away by onnxruntime.
    """
    if tensors is None:  # the tensor behind each tap, as import_onnx_tensors finds them
        tensors = import_onnx_tensors(data)[1]
    model = onnx.load_from_string(data)
    g = model.graph
    names = ["logits", *(n for n in tensors if n != "logits")]
    rename: dict[str, str] = {}  # ONNX tensor -> served name (the first name that claims it)
    aliases: list[tuple[str, str]] = []  # (served name, another name of the same tensor, e.g. the last layer's tap)
    for name in names:
        if tensors[name] in rename:
            aliases.append((rename[tensors[name]], name))
        else:
            rename[tensors[name]] = name
    keep = [n for n in g.node if not (n.op_type == "Softmax" and n.input[0] == tensors["logits"])]
    del g.node[:]
    g.node.extend(keep)
    for node in g.node:
        node.input[:] = [rename.get(t, t) for t in node.input]
        node.output[:] = [rename.get(t, t) for t in node.output]
    g.node.extend(onnx.helper.make_node("Identity", [src], [alias], name=f"tap_{alias}") for src, alias in aliases)
    del g.value_info[:]
    del g.output[:]
    g.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    dim = g.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_value")
    dim.dim_param = "batch"
    return bytes(shape_inference.infer_shapes(model).SerializeToString())


def _check_ops(model: onnx.ModelProto) -> None:
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise UnsupportedModelError(f"ONNX opset {opset} is not supported; export with opset >= {MIN_OPSET}")
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in (*SUPPORTED_OPS, "Constant"):
            raise UnsupportedModelError(
                f"unsupported ONNX operator {node.op_type} (node {node.name!r}); supported: {', '.join(SUPPORTED_OPS)}"
            )


def _input_name(model: onnx.ModelProto) -> str:
    inits = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def _graph(model: onnx.ModelProto) -> tuple[_Graph, tuple[int, int, int]]:
    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for node in g.node:  # Constant nodes are folded into the constants
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    inputs = [i for i in g.input if i.name not in consts]
    if len(inputs) != 1 or len(g.output) != 1:
        raise UnsupportedModelError(
            f"need one input and one output, got {len(inputs)} and {len(g.output)}; export the classifier with "
            "its image as the only input and its logits (or probabilities) as the only output, e.g. "
            "pathguard.models.networks.onnx_of_module(module, (C, H, W))"
        )
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or not all(dims[1:]) or inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise UnsupportedModelError(f"the input must be float (N, C, H, W) with fixed C, H, W; got shape {dims}")
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for t in node.input:
            if t and t not in consts:
                consumers.setdefault(t, []).append(node)
    return _Graph(list(g.node), consumers, consts, g.output[0].name), (dims[1], dims[2], dims[3])


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ints2(a: dict[str, Any], name: str) -> tuple[int, int]:
    """A 2-D layer's attribute ``name`` (``kernel_shape``, ``strides``, ``dilations``; the last two default to 1)."""
    v = [int(x) for x in a.get(name, (1, 1))]
    return (v[0], v[1])


def _pads(
    node: onnx.NodeProto,
    a: dict[str, Any],
    in_hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> Pads4:
    """(top, left, bottom, right) pads of a Conv or pool: its ``pads``, or those ``auto_pad`` implies for an input
    of ``in_hw``."""
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto == "VALID":
        return (0, 0, 0, 0)
    if auto == "NOTSET":
        pads = [int(p) for p in a.get("pads", (0, 0, 0, 0))]
        if len(pads) != 4 or min(pads) < 0:
            raise UnsupportedModelError(f"node {node.name!r} ({node.op_type}): pads {pads} are not 4 pads >= 0")
        return (pads[0], pads[1], pads[2], pads[3])
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise UnsupportedModelError(f"node {node.name!r} ({node.op_type}): auto_pad {auto!r} is not supported")
    if dilation != (1, 1):
        raise UnsupportedModelError(
            f"node {node.name!r} ({node.op_type}): auto_pad {auto} with dilations is not supported"
        )
    begin, end = [], []
    for size, k, s in zip(in_hw, kernel, stride, strict=True):
        total = max(0, (-(-size // s) - 1) * s + k - size)  # output ceil(size / stride)
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return (begin[0], begin[1], end[0], end[1])


def _symmetric(pads: Pads4, span: tuple[int, int] | None = None) -> bool:
    """Whether ``pads`` pad both sides of each axis equally (and, for a pool of extent ``span``, by at most half of
    it, torch's limit)."""
    top, left, bottom, right = pads
    return (top, left) == (bottom, right) and (span is None or (2 * top <= span[0] and 2 * left <= span[1]))


class ConstantOp(nn.Module):
    """``x op c`` for a constant ``c`` (an input normalization step of an imported model)."""

    def __init__(self, op: str, constant: np.ndarray, constant_first: bool) -> None:
        super().__init__()
        self.op, self.constant_first = op, constant_first
        self.register_buffer("c", torch.from_numpy(np.array(constant, dtype=np.float32)))

    c: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = (self.c, x) if self.constant_first else (x, self.c)
        if self.op == "Add":
            return a + b
        if self.op == "Sub":
            return a - b
        return a * b if self.op == "Mul" else a / b


class _Converter:
    """Walks the ONNX graph from a tensor, turning nodes into named torch modules."""

    def __init__(self, graph: _Graph, source: str, shape: tuple[int, int, int]) -> None:
        self.g = graph
        self._ends: dict[int, str] = {}  # id(module) -> the ONNX tensor it produces
        self._shapes: dict[str, tuple[int, ...]] = {source: shape}  # ONNX tensor -> per-image shape, as torch runs
        self._weighted = False  # a Conv/Gemm/MatMul was converted: no more input normalization
        self.logits: str | None = None  # the input of a final Softmax

    def tensor_of(self, module: nn.Module) -> str:
        return self._ends[id(module)]

    def _track(self, mod: nn.Module | None, source: str, result: str) -> None:
        """Record the shape of ``result``: ``mod`` applied to ``source`` (``None``: the shape of ``source``)."""
        if source not in self._shapes:
            return
        shape = self._shapes[source]
        if mod is not None:
            with torch.no_grad():
                shape = tuple(mod(torch.zeros(1, *shape)).shape[1:])
        self._shapes[result] = shape

    def _spatial(self, node: onnx.NodeProto) -> tuple[int, int]:
        """(H, W) of the input of ``node``."""
        shape = self._shapes.get(node.input[0])
        if shape is None or len(shape) != 3:
            raise UnsupportedModelError(f"node {node.name!r} ({node.op_type}): its input is not (N, C, H, W)")
        return (shape[1], shape[2])

    def chain(self, tensor: str, stop: str | None) -> tuple[OrderedDict[str, nn.Module], str]:
        """Modules from ``tensor`` up to ``stop`` (or up to a residual merge when ``stop`` is None), and the tensor
        where they end."""
        out: OrderedDict[str, nn.Module] = OrderedDict()
        while tensor != stop:
            users = self.g.consumers.get(tensor, [])
            if not users:
                if stop is not None:
                    raise UnsupportedModelError(f"tensor {tensor!r} ends before the model output")
                break
            if len(users) == 2:
                name, block, tensor = self._residual(tensor, users)
                out[name] = block
                self._ends[id(block)] = tensor
                continue
            if len(users) > 2:
                raise UnsupportedModelError(
                    f"tensor {tensor!r} feeds {len(users)} nodes; only residual pairs are supported"
                )
            node = users[0]
            if node.op_type in _INPUT_AFFINE and not self._weighted and any(i in self.g.consts for i in node.input):
                tensor = self._affine(node, out)
                continue
            if node.op_type == "Add" and not any(i in self.g.consts for i in node.input):
                if stop is None:
                    break  # a residual merge: the caller joins the branches
                raise UnsupportedModelError(f"node {node.name!r}: Add of two tensors outside a residual block")
            tensor = self._node(node, out)
        return out, tensor

    def _affine(self, node: onnx.NodeProto, out: OrderedDict[str, nn.Module]) -> str:
        constant_first = node.input[0] in self.g.consts
        const = self.g.consts[node.input[0 if constant_first else 1]]
        mod = ConstantOp(node.op_type, const, constant_first)
        out[self.g.unique(node, node.op_type.lower())] = mod
        self._ends[id(mod)] = node.output[0]
        self._track(mod, node.input[1 if constant_first else 0], node.output[0])
        return node.output[0]

    def _residual(self, fork: str, users: list[onnx.NodeProto]) -> tuple[str, nn.Module, str]:
        branches: list[tuple[OrderedDict[str, nn.Module], onnx.NodeProto]] = []
        for user in users:
            if user.op_type == "Add" and fork in user.input:
                branches.append((OrderedDict(), user))
                continue
            mods = OrderedDict[str, nn.Module]()
            rest, last = self.chain(self._node(user, mods), None)
            mods.update(rest)
            after = self.g.consumers.get(last, [])
            if len(after) != 1 or after[0].op_type != "Add":
                raise UnsupportedModelError(f"the branches from {fork!r} do not meet at an Add")
            branches.append((mods, after[0]))
        (body, add_a), (short, add_b) = sorted(branches, key=lambda b: -len(b[0]))
        if add_a is not add_b or not body:
            raise UnsupportedModelError(f"the branches from {fork!r} do not meet at one Add")
        block = Residual(nn.Sequential(body), nn.Sequential(short) if short else None)
        self._track(None, next((t for t in add_a.input if t in self._shapes), fork), add_a.output[0])
        return self.g.unique(add_a, "block"), block, add_a.output[0]

    def _node(self, node: onnx.NodeProto, out: OrderedDict[str, nn.Module]) -> str:
        """Append the module(s) for ``node`` (and a BatchNormalization it absorbs); returns the tensor produced."""
        op, a = node.op_type, _attrs(node)
        mod: nn.Module | None
        result = node.output[0]
        if op == "Conv":
            mod, result = self._conv(node, a)
        elif op == "Gemm":
            mod = self._gemm(node, a)
        elif op == "MatMul":
            mod, result = self._matmul(node)
        elif op == "Relu":
            mod = nn.ReLU()
        elif op == "Clip":
            mod = self._clip(node)
        elif op == "MaxPool":
            mod = self._maxpool(node, a)
        elif op == "AveragePool":
            mod = self._avgpool(node, a)
        elif op == "GlobalAveragePool":
            mod = nn.AdaptiveAvgPool2d(1)
        elif op in ("Flatten", "Reshape"):
            mod = self._flatten(node, a)
        elif op in ("Identity", "Dropout"):
            self._track(None, node.input[0], result)
            return result
        elif op == "Softmax":
            if result != self.g.output:
                raise UnsupportedModelError(f"node {node.name!r}: Softmax is supported only as the last node")
            self.logits = node.input[0]
            self._track(None, node.input[0], result)
            return result
        elif op == "BatchNormalization":
            raise UnsupportedModelError(f"node {node.name!r}: BatchNormalization must follow a Conv")
        else:  # Add with a constant, Constant
            raise UnsupportedModelError(f"node {node.name!r} ({op}) is not supported in this position")
        out[self.g.unique(node, op.lower())] = mod
        self._ends[id(mod)] = result
        self._weighted |= isinstance(mod, (nn.Conv2d, nn.Linear))
        self._track(mod, node.input[0], result)
        return result

    def _conv(self, node: onnx.NodeProto, a: dict[str, Any]) -> tuple[nn.Conv2d, str]:
        w = self.g.const(node.input[1], node).astype(np.float64)  # (O, C/g, KH, KW)
        has_bias = len(node.input) > 2 and bool(node.input[2])
        b = self.g.const(node.input[2], node).astype(np.float64) if has_bias else np.zeros(w.shape[0])
        o, cg, kh, kw = w.shape
        groups = int(a.get("group", 1))
        stride, dilation = _ints2(a, "strides"), _ints2(a, "dilations")
        pads = _pads(node, a, self._spatial(node), (kh, kw), stride, dilation)
        conv: nn.Conv2d
        if _symmetric(pads):
            conv = nn.Conv2d(cg * groups, o, (kh, kw), stride=stride, padding=pads[:2], dilation=dilation,
                             groups=groups, bias=True)  # fmt: skip
        else:
            conv = PaddedConv2d(cg * groups, o, (kh, kw), pads, stride, dilation, groups)
        result = node.output[0]
        users = self.g.consumers.get(result, [])
        if len(users) == 1 and users[0].op_type == "BatchNormalization":  # fold it
            bn = users[0]
            gamma, beta, mean, var = (self.g.const(t, bn).astype(np.float64) for t in bn.input[1:5])
            scale = gamma / np.sqrt(var + float(_attrs(bn).get("epsilon", 1e-5)))  # (O,)
            b = (b - mean) * scale + beta
            w = w * scale.reshape(-1, 1, 1, 1)
            result = bn.output[0]
        conv.weight = nn.Parameter(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
        conv.bias = nn.Parameter(torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)))
        return conv, result

    def _linear(self, weight: np.ndarray, bias: np.ndarray | None) -> nn.Linear:
        out_f, in_f = weight.shape
        lin = nn.Linear(in_f, out_f)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)))
            lin.bias.copy_(torch.from_numpy(np.asarray(bias if bias is not None else np.zeros(out_f), np.float32)))
        return lin

    def _gemm(self, node: onnx.NodeProto, a: dict[str, Any]) -> nn.Linear:
        if int(a.get("transA", 0)):
            raise UnsupportedModelError(f"node {node.name!r}: Gemm with transA=1 is not supported")
        w = self.g.const(node.input[1], node).astype(np.float64)
        w = w if int(a.get("transB", 0)) else w.T  # (out, in)
        b = self.g.const(node.input[2], node).astype(np.float64) if len(node.input) > 2 and node.input[2] else None
        bias = None if b is None else float(a.get("beta", 1.0)) * np.broadcast_to(b.reshape(-1), (w.shape[0],))
        return self._linear(float(a.get("alpha", 1.0)) * w, bias)

    def _matmul(self, node: onnx.NodeProto) -> tuple[nn.Linear, str]:
        w = self.g.const(node.input[1], node).astype(np.float64).T  # (in, out) -> (out, in)
        result, bias = node.output[0], None
        users = self.g.consumers.get(result, [])
        if len(users) == 1 and users[0].op_type == "Add":
            add = users[0]
            other = [t for t in add.input if t != result]
            if other and other[0] in self.g.consts:
                bias = np.broadcast_to(self.g.consts[other[0]].reshape(-1), (w.shape[0],))
                result = add.output[0]
        return self._linear(w, bias), result

    def _clip(self, node: onnx.NodeProto) -> nn.Module:
        bounds = [float(self.g.const(t, node).reshape(())) if t else None for t in list(node.input[1:3])]
        lo, hi = [*bounds, None, None][:2]
        if lo == 0.0 and hi == 6.0:
            return nn.ReLU6()
        raise UnsupportedModelError(f"node {node.name!r}: Clip is supported only as ReLU6 (min 0, max 6)")

    def _maxpool(self, node: onnx.NodeProto, a: dict[str, Any]) -> nn.MaxPool2d:
        k, stride, dilation = _ints2(a, "kernel_shape"), _ints2(a, "strides"), _ints2(a, "dilations")
        pads, ceil = _pads(node, a, self._spatial(node), k, stride, dilation), bool(a.get("ceil_mode", 0))
        span = (dilation[0] * (k[0] - 1) + 1, dilation[1] * (k[1] - 1) + 1)
        if _symmetric(pads, span):
            return nn.MaxPool2d(k, stride=stride, padding=pads[:2], dilation=dilation, ceil_mode=ceil)
        return PaddedMaxPool2d(k, pads, stride, dilation, ceil)

    def _avgpool(self, node: onnx.NodeProto, a: dict[str, Any]) -> nn.AvgPool2d:
        k, stride = _ints2(a, "kernel_shape"), _ints2(a, "strides")
        if _ints2(a, "dilations") != (1, 1):
            raise UnsupportedModelError(f"node {node.name!r} (AveragePool): dilations are not supported")
        pads = _pads(node, a, self._spatial(node), k, stride, (1, 1))
        ceil, count_pad = bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0))
        if _symmetric(pads, k):
            return nn.AvgPool2d(k, stride=stride, padding=pads[:2], ceil_mode=ceil, count_include_pad=count_pad)
        return PaddedAvgPool2d(k, pads, stride, ceil, count_pad)

    def _flatten(self, node: onnx.NodeProto, a: dict[str, Any]) -> nn.Flatten:
        if node.op_type == "Flatten":
            if int(a.get("axis", 1)) != 1:
                raise UnsupportedModelError(f"node {node.name!r}: Flatten must use axis 1")
            return nn.Flatten()
        shape = [int(v) for v in self.g.const(node.input[1], node).reshape(-1)]
        if len(shape) != 2 or -1 not in shape:
            raise UnsupportedModelError(f"node {node.name!r}: Reshape is supported only as a flatten to (N, -1)")
        return nn.Flatten()
