"""NIC inside the served ONNX graph: NIC's raw scores as extra outputs of the classifier's own graph.

:func:`with_nic_outputs` appends to the served ONNX model (input ``input``, outputs ``logits`` plus one per tap) the
nodes of a fitted :class:`~pathguard.models.nic.NICDetector`, so that one onnxruntime run returns the logits, the
taps and the numbers :meth:`NICDetector.raw_scores` gives for the same activations. Per member ``m`` (0 = the
unrandomized detector; randomized members only when asked for):

=====================  =======  =========  =================================================================
output                 dtype    shape      meaning
=====================  =======  =========  =================================================================
``nic_value``          float64  (N, L)     VI score of each checked layer (``layers_`` order)
``nic_head_logits``    float32  (N, L, K)  derived heads' logits z_l, D_l(x) = softmax(z_l) (softmax layer:
                                           the network's logits; its D_l is its own reduced features)
``nic_provenance``     float64  (N, L-1)   PI score of each consecutive pair (``pairs_`` order)
``nic_final``          float64  (N,)       final detector score
=====================  =======  =========  =================================================================

Member ``m > 0`` gets the suffix ``_m{m}`` (``nic_value_m1``, ...). ``provenance=False`` stops after the per-layer
outputs (``nic_value``, ``nic_head_logits``). Every score is ``-decision_function`` (higher = more anomalous), as
:meth:`NICDetector.raw_scores`; calibration into violation probabilities stays outside the graph.
:class:`GraphNICScores` reads one member's outputs back.

The per-layer subgraph mirrors the torch scorer step by step and in the same precision: flatten, the optional
randomized quantization ``floor|ceil(a * c) / c`` and the affine reduction ``a @ W + b`` in float32, the derived
head's softmax in float32, and every RBF one-class SVM in float64 (inputs cast to double, then
``-(sum_i alpha_i exp(min(0, 2 gamma x.sv_i - gamma ||sv_i||^2 - gamma ||x||^2)) + intercept)``, the expansion
that :class:`~pathguard.models.nic.svm.ExportedOCSVM` evaluates). Given the same float32 inputs the float64 part
agrees with torch to about 1e-12. The float32 matrix products (onnxruntime's kernels, not torch's) and softmaxes
(onnxruntime's exp, not torch's) round differently in the last bits, so the scores agree with
:meth:`NICDetector.raw_scores` to about 1e-5 of each score's scale, as two float32 evaluations can. Each layer's
nodes depend only on that layer's activation, so onnxruntime's parallel executor can run them beside the rest of
the forward pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from pathguard.models.errors import NotFittedError
from pathguard.models.nic.detector import NICDetector
from pathguard.models.nic.layers import INPUT, SOFTMAX
from pathguard.models.nic.svm import ExportedOCSVM

__all__ = [
    "NIC_FINAL",
    "NIC_HEAD_LOGITS",
    "NIC_PROVENANCE",
    "NIC_VALUE",
    "GraphNICScores",
    "nic_output_names",
    "with_nic_outputs",
]

NIC_VALUE, NIC_HEAD_LOGITS = "nic_value", "nic_head_logits"
NIC_PROVENANCE, NIC_FINAL = "nic_provenance", "nic_final"
_MIN_OPSET = 13  # ReduceSum with axes as an input, Softmax over the last axis only


def nic_output_names(member: int = 0) -> tuple[str, str, str, str]:
    """Names of the value (N, L), head-logit (N, L, K), provenance (N, L-1) and final (N,) outputs of detector
    member ``member``."""
    suffix = "" if member == 0 else f"_m{member}"
    return (NIC_VALUE + suffix, NIC_HEAD_LOGITS + suffix, NIC_PROVENANCE + suffix, NIC_FINAL + suffix)


@dataclass
class GraphNICScores:
    """One member's NIC outputs of a graph run, as torch tensors.

    Attributes
    ----------
    value : torch.Tensor
        (N, L) float64 VI scores.
    head_logits : torch.Tensor
        (N, L, K) float32 derived heads' logits; ``softmax(head_logits, -1)`` are the derived-model outputs.
    provenance : torch.Tensor or None
        (N, L-1) float64 PI scores (None for a graph exported with ``provenance=False``).
    final : torch.Tensor or None
        (N,) float64 final detector scores (likewise).
    """

    value: torch.Tensor
    head_logits: torch.Tensor
    provenance: torch.Tensor | None = None
    final: torch.Tensor | None = None

    @classmethod
    def from_outputs(cls, outputs: Mapping[str, np.ndarray], member: int = 0) -> GraphNICScores:
        """Pick member ``member``'s outputs from ``name -> array`` of a session run."""
        got = [torch.from_numpy(np.asarray(outputs[n])) if n in outputs else None for n in nic_output_names(member)]
        value, head_logits, provenance, final = got
        if value is None or head_logits is None:
            raise KeyError(f"no NIC outputs of member {member} among {sorted(outputs)}")
        return cls(value, head_logits, provenance, final)


def with_nic_outputs(
    model: bytes | onnx.ModelProto,
    nic: NICDetector,
    members: Sequence[int] | None = (0,),
    logits: str = "logits",
    provenance: bool = True,
) -> onnx.ModelProto:
    """The served ONNX model with the NIC scores of ``nic`` appended as graph outputs.

    Parameters
    ----------
    model : bytes or onnx.ModelProto
        The served classifier: one float input (N, C, H, W) in [0, 1], the ``logits`` tensor, and every tap that
        ``nic.layers_`` checks as a tensor named after the tap (as ``classifier.onnx`` of a bundle has them).
        Not modified.
    nic : NICDetector
        A fitted detector over this classifier's taps.
    members : sequence of int, optional
        Detector members to export (default: only the unrandomized member 0); None exports all of them.
    logits : str
        Name of the logits tensor.
    provenance : bool
        Also append the provenance SVMs and the final model (else only the per-layer outputs).

    Returns
    -------
    onnx.ModelProto
        A copy of the model with the outputs listed in the module docstring (names: :func:`nic_output_names`).

    Raises
    ------
    NotFittedError
        ``nic`` is not fitted.
    ValueError
        The model lacks a checked tap or the logits, already has NIC outputs, or its opset is below 13.
    """
    if not hasattr(nic, "members_"):
        raise NotFittedError("NICDetector is not fitted: call fit(model, x, y) or NICDetector.from_arrays()")
    out = onnx.ModelProto()
    if isinstance(model, onnx.ModelProto):
        out.CopyFrom(model)
    else:
        out.ParseFromString(model)
    chosen = range(nic.n_members) if members is None else [int(k) for k in members]
    arrays = nic.to_arrays()
    builder = _GraphBuilder(out, logits, nic.n_classes_)
    for k in chosen:
        if not 0 <= k < nic.n_members:
            raise ValueError(f"member {k} out of range (detector has {nic.n_members})")
        builder.member(arrays, nic.layers_, k, provenance)
    builder.commit()
    onnx.checker.check_model(out)
    return out


class _GraphBuilder:
    """Appends NIC nodes and constants to a graph; names are ``nic/m{k}/{layer}/...``."""

    def __init__(self, model: onnx.ModelProto, logits: str, n_classes: int) -> None:
        opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
        if opset < _MIN_OPSET:
            raise ValueError(f"the served ONNX model has opset {opset}; NIC outputs need opset >= {_MIN_OPSET}")
        g = model.graph
        self.graph = g
        inits = {i.name for i in g.initializer}
        self.input = next(i.name for i in g.input if i.name not in inits)
        self.logits, self.n_classes = logits, n_classes
        self.tensors = {self.input, *inits, *(t for n in g.node for t in n.output)}
        if logits not in self.tensors:
            raise ValueError(f"the model has no {logits!r} tensor")
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._flat: dict[str, str] = {}  # checked layer -> its flattened float32 activation (N, width)
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    # ------------------------------------------------------------------ primitives
    def op(self, op_type: str, inputs: Sequence[str], name: str, **attrs: Any) -> str:
        """Append one node; returns its (single) output, named ``name``."""
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        """A constant initializer (small scalars and shape vectors are shared by value)."""
        arr = np.ascontiguousarray(value)
        key = (str(arr.dtype), arr.tobytes(), arr.shape)
        if arr.size <= 4 and key in self._consts:
            return self._consts[key]
        self.inits.append(numpy_helper.from_array(arr, name))
        if arr.size <= 4:
            self._consts[key] = name
        return name

    def commit(self) -> None:
        self.graph.node.extend(self.nodes)
        self.graph.initializer.extend(self.inits)
        self.graph.output.extend(self.outputs)

    # ------------------------------------------------------------------ NIC
    def member(self, arrays: dict[str, np.ndarray], layers: Sequence[str], k: int, provenance: bool) -> None:
        """Append member ``k``'s scoring from its exported arrays (keys ``m{k}.*`` of ``NICDetector.to_arrays``):
        per layer the reduction, VI and derived head, then (``provenance``) the PI SVMs and the final model."""
        key = f"m{k}."
        a = {name[len(key) :]: v for name, v in arrays.items() if name.startswith(key)}
        p = f"nic/m{k}"
        names = nic_output_names(k)
        taken = self.tensors.intersection(names)
        if taken:
            raise ValueError(f"the model already has tensors named {sorted(taken)}")
        self.tensors.update(names if provenance else names[:2])
        values: list[str] = []
        head_logits: list[str] = []  # (N, K) each: z_l
        derived: list[str] = []  # (N, K) each: D_l = softmax(z_l), the softmax layer's own features
        for i, name in enumerate(layers):
            transform = float(a["transform_scale"][i]), bool(a["transform_ceil"][i])
            w, b = a[f"{name}.reduce_weight"], a[f"{name}.reduce_bias"]  # (width, d), (d,)
            feats = self.reduce(f"{p}/{name}", self.activation(name), transform, w, b)  # (N, d) float32
            values.append(self.svm_score(f"{p}/{name}/vi", feats, ExportedOCSVM.from_arrays(a, f"{name}.vi.")))
            if name == SOFTMAX:  # no head: D_l is the layer's (possibly quantized) softmax itself
                head_logits.append(self.logits)
                derived.append(feats)
            else:
                z = self.gemm(f"{p}/{name}/head_logits", feats, a[f"{name}.head_weight"], a[f"{name}.head_bias"])
                head_logits.append(z)
                derived.append(self.op("Softmax", [z], f"{p}/{name}/head", axis=-1) if provenance else "")
        n_layers, n_classes = len(layers), self.n_classes
        value = self.op("Concat", values, names[0], axis=1)  # (N, L) float64
        axis1 = self.const("nic/axis1", np.array([1], dtype=np.int64))
        stacked = [
            self.op("Unsqueeze", [z, axis1], f"{p}/{name}/head_logits_1")
            for name, z in zip(layers, head_logits, strict=True)
        ]
        self.op("Concat", stacked, names[1], axis=1)  # (N, L, K)
        self.outputs += [
            helper.make_tensor_value_info(names[0], TensorProto.DOUBLE, ["batch", n_layers]),
            helper.make_tensor_value_info(names[1], TensorProto.FLOAT, ["batch", n_layers, n_classes]),
        ]
        if provenance:
            self.provenance_and_final(a, p, value, derived, names[2:])
            self.outputs += [
                helper.make_tensor_value_info(names[2], TensorProto.DOUBLE, ["batch", n_layers - 1]),
                helper.make_tensor_value_info(names[3], TensorProto.DOUBLE, ["batch"]),
            ]

    def provenance_and_final(
        self, a: dict[str, np.ndarray], p: str, value: str, derived: list[str], names: Sequence[str]
    ) -> None:
        """PI scores ``names[0]`` (N, L-1) on consecutive derived-model outputs (N, K), then the final score
        ``names[1]`` (N,) on the standardized ``[value, provenance]``."""
        provs = []
        for i, (pa, pb) in enumerate(itertools.pairwise(derived)):
            pin = self.op("Concat", [pa, pb], f"{p}/pi{i}/input", axis=1)  # (N, 2K) float32
            provs.append(self.svm_score(f"{p}/pi{i}", pin, ExportedOCSVM.from_arrays(a, f"pi{i}.")))
        prov = self.op("Concat", provs, names[0], axis=1)  # (N, L-1) float64
        mean = self.const(f"{p}/final/mean", a["final_mean"].reshape(1, -1))  # (1, 2L-1) float64
        std = self.const(f"{p}/final/std", a["final_std"].reshape(1, -1))
        z = self.op("Concat", [value, prov], f"{p}/final/input", axis=1)  # (N, 2L-1)
        z = self.op("Div", [self.op("Sub", [z, mean], f"{p}/final/centred"), std], f"{p}/final/z")
        final = self.svm_score(f"{p}/final", z, ExportedOCSVM.from_arrays(a, "final."))  # (N, 1)
        self.op("Reshape", [final, self.const("nic/flat_shape", np.array([-1], dtype=np.int64))], names[1])  # (N,)

    def reduce(self, prefix: str, flat: str, transform: tuple[float, bool], w: np.ndarray, b: np.ndarray) -> str:
        """The reduction of ``_Stage.reduce``: the optional quantization ``floor|ceil(a * c) / c`` (``transform`` =
        ``(c, ceil)``, c = 0: none), then ``a @ w + b`` with w (width, d), b (d,); float32 throughout."""
        c, ceil = transform
        if c > 0:
            scale = self.const(f"{prefix}/scale", np.array(c, dtype=np.float32))
            scaled = self.op("Mul", [flat, scale], f"{prefix}/scaled")
            rounded = self.op("Ceil" if ceil else "Floor", [scaled], f"{prefix}/rounded")
            flat = self.op("Div", [rounded, scale], f"{prefix}/quantized")
        if w.shape[0] == w.shape[1] and not b.any() and np.array_equal(w, np.eye(w.shape[0], dtype=w.dtype)):
            return flat  # the softmax layer's identity reduction: a @ I + 0 is a, exactly
        return self.gemm(f"{prefix}/feats", flat, w, b)

    def activation(self, layer: str) -> str:
        """The checked layer's activation flattened to (N, width) float32, as :func:`layer_activation` gives it."""
        if layer not in self._flat:
            if layer == INPUT:
                src = self.input
            elif layer == SOFTMAX:
                src = self.op("Softmax", [self.logits], "nic/softmax", axis=-1)
            elif layer in self.tensors:
                src = layer
            else:
                raise ValueError(f"the model has no tensor for the checked layer {layer!r}")
            self._flat[layer] = self.op("Flatten", [src], f"nic/{layer}/flat", axis=1)
        return self._flat[layer]

    def gemm(self, name: str, x: str, weight: np.ndarray, bias: np.ndarray) -> str:
        """``x @ weight + bias`` for x (N, D), weight (D, d), bias (d,)."""
        w = self.const(f"{name}/weight", weight)
        b = self.const(f"{name}/bias", bias)
        return self.op("Gemm", [x, w, b], name)

    def svm_score(self, name: str, x: str, svm: ExportedOCSVM) -> str:
        """``-decision_function`` (N, 1) float64 of an RBF one-class SVM on x (N, D) (float32 or float64)."""
        sv, g = svm.support_vectors, svm.gamma  # (S, D) float64
        two_g_sv_t = self.const(f"{name}/two_g_sv_t", np.ascontiguousarray(2.0 * g * sv.T))  # (D, S)
        neg_g_sv_sq = self.const(f"{name}/neg_g_sv_sq", (-g * (sv * sv).sum(-1)).reshape(1, -1))  # (1, S)
        alpha = self.const(f"{name}/alpha", svm.dual_coef.reshape(-1, 1))  # (S, 1)
        gamma = self.const(f"{name}/gamma", np.array(g, dtype=np.float64))
        intercept = self.const(f"{name}/intercept", np.array(svm.intercept, dtype=np.float64))
        axis1 = self.const("nic/axis1", np.array([1], dtype=np.int64))
        zero = self.const("nic/zero", np.array(0.0, dtype=np.float64))
        x64 = self.op("Cast", [x], f"{name}/x", to=TensorProto.DOUBLE)
        x_sq = self.op("ReduceSum", [self.op("Mul", [x64, x64], f"{name}/x2"), axis1], f"{name}/x_sq")  # (N, 1)
        arg = self.op("Add", [self.op("MatMul", [x64, two_g_sv_t], f"{name}/dot"), neg_g_sv_sq], f"{name}/arg0")
        arg = self.op("Sub", [arg, self.op("Mul", [x_sq, gamma], f"{name}/g_x_sq")], f"{name}/arg1")  # (N, S)
        kernel = self.op("Exp", [self.op("Min", [arg, zero], f"{name}/arg")], f"{name}/kernel")  # arg <= 0
        dec = self.op("Add", [self.op("MatMul", [kernel, alpha], f"{name}/sum"), intercept], f"{name}/decision")
        return self.op("Neg", [dec], f"{name}/score")  # (N, 1)
