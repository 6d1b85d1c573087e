"""The guarded graph: a bundle's classifier and its verdict as ONE ONNX model.

:func:`guarded_model` appends to the bundle's served classifier graph (``classifier.onnx``) every component that has
an in-graph form (:meth:`~pathguard.models.components.Component.graph`), their calibration into empirical p-values
(the clean calibration scores stored as constants), the verdict's fusion rule and its threshold. One onnxruntime run
then returns what ``/v1/detect`` decides, with no Python between the layers: a Triton or KServe user drops the
model into the repository they already have (``pathguard export --triton``).

The consistency copies of all components (noise, bit depth, median filters) are concatenated with the input batch
and go through the classifier's graph in ONE forward pass, as in the Python pipeline. The noise is drawn in the
graph (``RandomNormalLike``: fresh per run, or from a fixed seed per session) or, with ``noise="input"``, read from
a graph input per noise transform (``noise``, ``noise_1``, ...; (copies, N, C, H, W) standard normal), which is how
the parity tests feed the graph the pipeline's exact noise.

=======================  =======  ======  ==========================================================================
output                   dtype    shape   meaning
=======================  =======  ======  ==========================================================================
``logits``               float32  (N, K)  the classifier's logits of the inputs
``probabilities``        float32  (N, K)  their softmax
``predicted``            int64    (N,)    the predicted class
``raw_<component>``      float64  (N,)    each in-graph component's raw score (higher = more anomalous)
``p_<component>``        float64  (N,)    its empirical p-value against its clean calibration scores
``verdict_score``        float64  (N,)    the fused score (the verdict's rule over its components' p-values)
``verdict_p_value``      float64  (N,)    the fused score's p-value among the clean split-B fused scores
``is_adversarial``       bool     (N,)    ``verdict_score > threshold``
=======================  =======  ======  ==========================================================================

In the graph today: the prediction-consistency family (margin, noise response, squeezing), NIC (its final model,
``nic``, on the served exporter's nodes, and its two-sided value-invariant statistic, ``nic_vi``), the class
Gaussians (``mahalanobis``), Effective Path's exact walk (``effective_path``, up to 8 million synapses: the walk of
:mod:`pathguard.models.effective_path.ingraph`, exported from torch, reading the originals' logits and a tap) and
channel-level Effective Path (``ep_channels``, its dense walk exported from torch, with a forward pass of its own
over the inputs); the originals' taps are sliced out of the one forward pass for NIC, the Gaussians and the walk.
By default the graph holds the verdict's components only; ``components="all"`` adds every
other component of the bundle that has an in-graph form (their raw scores and p-values, reported). The model's
metadata (``pathguard.*`` properties) names the bundle, its sha256, the components, the rule, the threshold and the
noise. A bundle whose verdict fuses a component with no in-graph form (the supervised detector, a walk over the
synapse budget) is refused with :class:`~pathguard.models.components.graph.NotInGraphError` naming it and why; a
component with none that is only reported is left out of the graph. ``beside`` leaves components out on purpose
(the server scores them beside the graph); the graph then has no verdict outputs when the verdict fuses one.

Agreement with the Python pipeline (``tests/test_guarded.py``): the graph's float32 forward pass is onnxruntime's,
not torch's, so logits differ in the last bits (about 1e-6); raw scores agree to that rounding, a p-value moves by
one calibration step only when a raw score lies within that rounding of a calibration score, and a verdict can
differ only when the fused score lies within the same distance of the threshold.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from pathguard.models.bundle import Bundle, load_bundle, read_verified, write_bundle
from pathguard.models.bundle.stored import GUARDED_JSON, GUARDED_ONNX
from pathguard.models.components import Component
from pathguard.models.components.consistency import ConsistencyComponent, Transform
from pathguard.models.components.graph import MIN_OPSET, Columns, GraphContext, NotInGraphError, OnnxGraph, Rows
from pathguard.models.nic.onnx_export import nic_output_names
from pathguard.models.verdict.fusion import parse_rule

__all__ = [
    "NOISE_MODES",
    "graph_components",
    "guarded_model",
    "in_graph",
    "noise_feed",
    "noise_inputs",
    "store_in_bundle",
]

NOISE_MODES = ("random", "input")
INPUT = "input"
_CLASSIFIER = "clf/"  # prefix of the classifier graph's tensors inside the guarded graph


def in_graph(component: Component) -> bool:
    """Whether ``component`` has an in-graph form (:meth:`~pathguard.models.components.Component.graph_unavailable`
    says why not)."""
    return component.graph_unavailable() is None


def _transforms(components: Sequence[Component]) -> list[Transform]:
    todo: dict[str, Transform] = {}
    for c in components:
        if isinstance(c, ConsistencyComponent):
            todo.update({t.key: t for t in c.transforms() if t.key not in todo})
    return [todo[k] for k in sorted(todo)]  # the pipeline's order (the noise is drawn in it)


def noise_inputs(
    bundle: Bundle, components: str = "verdict", beside: Collection[str] = ()
) -> list[tuple[str, str, int]]:
    """(graph input name, transform key, copies) of every noise transform of the guarded graph's components (see
    :func:`guarded_model`), in the order the pipeline draws them (the inputs of a ``noise="input"`` graph)."""
    comps = [bundle.pipeline.components[k] for k in graph_components(bundle, components, beside)]
    noise = [t for t in _transforms(comps) if t.key.startswith("noise/")]
    return [("noise" if i == 0 else f"noise_{i}", t.key, t.copies) for i, t in enumerate(noise)]


def graph_components(bundle: Bundle, components: str = "verdict", beside: Collection[str] = ()) -> list[str]:
    """The components :func:`guarded_model` puts in the graph, in the bundle's order: the verdict's and, with
    ``components="all"``, every other calibrated one with an in-graph form that is not a self-deciding ``reported``
    one; none named in ``beside``."""
    pipe = bundle.pipeline
    fused = list(pipe.verdict.components) if pipe.verdict is not None else []
    extra = components == "all"
    return [
        k
        for k, c in pipe.components.items()
        if k not in beside
        and (k in fused or (extra and k in pipe.calibration and in_graph(c) and c.family != "reported"))
    ]


def noise_feed(
    inputs: Sequence[tuple[str, str, int]], x: torch.Tensor, generators: Sequence[torch.Generator]
) -> dict[str, np.ndarray]:
    """The noise inputs (``inputs``: :func:`noise_inputs` of the graph) of a ``noise="input"`` guarded graph for the
    batch ``x``, drawn from the inputs' generators exactly as the pipeline draws its noise copies (transform by
    transform, each input's from its own generator), so the graph scores the same copies as the Python pipeline
    would."""
    shape = tuple(x.shape[1:])
    return {
        name: torch.stack(
            [torch.randn((copies, *shape), generator=gen, dtype=x.dtype) for gen in generators], 1
        ).numpy()
        for name, _, copies in inputs
    }


def guarded_model(
    bundle: Bundle,
    noise: str = "random",
    seed: int | None = None,
    components: str = "verdict",
    details: bool = False,
    beside: Collection[str] = (),
    fields: bool = False,
) -> onnx.ModelProto:
    """The bundle's classifier and verdict as one ONNX model (see the module docstring).

    Parameters
    ----------
    bundle : Bundle
        A loaded bundle.
    noise : str
        ``random``: drawn in the graph (per run, or from ``seed``); ``input``: read from graph inputs
        (:func:`noise_inputs`).
    seed : int, optional
        Seed of the in-graph random op (``noise="random"`` only): the same noise sequence in every session.
    components : str
        ``verdict``: the verdict's components; ``all``: also every other in-graph component (reported).
    details : bool
        Also output, with NIC in the graph, its per-layer value scores, derived heads' logits, provenance scores and
        final score under :func:`~pathguard.models.nic.onnx_export.nic_output_names` (what the server's answers
        report of NIC beyond its score).
    beside : collection of str
        Components left out of the graph, scored by the caller (the server scores Effective Path's exact walk on a
        worker thread beside the graph: its compiled walk is faster there). When the verdict fuses one of them, the
        graph has no verdict outputs (``verdict_score``, ``verdict_p_value``, ``is_adversarial``): the caller fuses.
    fields : bool
        Also output every in-graph component's response fields
        (:meth:`~pathguard.models.components.Component.graph_fields`, outputs ``field/<component>/<key>``, their
        layout in the ``pathguard.fields`` property) and, in ``pathguard.serving``, what a server reports of the
        bundle besides: the graph a server without torch answers from (:mod:`pathguard.models.bundle.stored`;
        :func:`store_in_bundle` moves both properties into ``guarded.json``).
    """
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {list(NOISE_MODES)}, got {noise!r}")
    if components not in ("verdict", "all"):
        raise ValueError(f"components must be 'verdict' or 'all', got {components!r}")
    pipe = bundle.pipeline
    if pipe.verdict is None:
        raise ValueError(f"bundle {bundle.name!r} has no verdict calibration")
    fused = list(pipe.verdict.components)
    unknown = sorted(set(beside) - set(pipe.components))
    if unknown:
        raise ValueError(f"cannot score {unknown} beside the graph: not components of bundle {bundle.name!r}")
    why = {k: pipe.components[k].graph_unavailable() for k in fused if k not in beside}
    missing = {k: reason for k, reason in why.items() if reason is not None}
    if missing:
        have = sorted(k for k, c in pipe.components.items() if in_graph(c))
        raise NotInGraphError(
            f"bundle {bundle.name!r}: its verdict fuses {', '.join(missing)}, with no in-graph form "
            f"({'; '.join(missing.values())}; components of this bundle with one: {', '.join(have) or 'none'})"
        )
    names = graph_components(bundle, components, beside)
    fusing = all(k in names for k in fused)  # else the caller fuses the verdict
    comps = {k: pipe.components[k] for k in names}

    clf = onnx.load_from_string(bundle.onnx_bytes)
    opset = next((o.version for o in clf.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ValueError(f"the served classifier graph has opset {opset}; the guarded graph needs >= {MIN_OPSET}")
    c, h, w = bundle.input_shape
    k = len(bundle.classes)
    g = GraphContext(opset, (c, h, w))
    g.shapes = {out.name: tuple(d.dim_value for d in out.type.tensor_type.shape.dim[1:]) for out in clf.graph.output}
    g.shapes |= {INPUT: (c, h, w), "logits": (k,)}
    g.x = g.add_input(INPUT, TensorProto.FLOAT, ["batch", c, h, w])
    g.batch = g.op("Slice", g.op("Shape", g.x), g.const([0], np.int64), g.const([1], np.int64))

    # the copies, concatenated with the inputs: one forward pass
    transforms = _transforms(list(comps.values()))
    noise_names = {key: name for name, key, _ in noise_inputs(bundle, components, beside)} if noise == "input" else {}
    g.noise = _noise_source(g, noise, seed, noise_names)
    parts = [g.x]
    for t in transforms:
        assert t.graph is not None
        parts.append(g.op("Reshape", t.graph(g, g.x), g.const([-1, c, h, w], np.int64)))
    batch_all = g.op("Concat", *parts, axis=0) if len(parts) > 1 else g.x
    logits_all = _append_classifier(g, clf, batch_all)

    def rows(start: str, stop: str) -> str:
        return g.op("Slice", logits_all, start, stop, g.const([0], np.int64))

    g.logits32 = g.op("Slice", logits_all, g.const([0], np.int64), g.batch, g.const([0], np.int64), out="logits")

    def tap(name: str) -> str:  # the originals' rows of a tap, under the tap's name (as NIC's exporter reads it)
        if f"tap/{name}" not in g.memo:
            zero = g.const([0], np.int64)
            g.memo[f"tap/{name}"] = g.op("Slice", _CLASSIFIER + name, zero, g.batch, zero, out=name)
        return name

    g.tap = tap
    g.logits = g.double(g.logits32)
    g.predicted = g.op("ArgMax", g.logits32, axis=1, keepdims=0)
    offset = 1
    for t in transforms:
        start = g.op("Mul", g.batch, g.const([offset], np.int64))
        stop = g.op("Mul", g.batch, g.const([offset + t.copies], np.int64))
        g.copies32[t.key] = g.op("Reshape", rows(start, stop), g.const([t.copies, -1, k], np.int64))
        g.copies[t.key] = g.double(g.copies32[t.key])
        offset += t.copies

    # components, p-values, fusion, threshold
    raw = {name: comp.graph(g) for name, comp in comps.items()}
    p = {name: g.p_value(pipe.calibration[name], raw[name]) for name in names}
    g.add_output(g.logits32, "logits", TensorProto.FLOAT, ["batch", k])
    g.add_output(g.op("Softmax", g.logits32, axis=1), "probabilities", TensorProto.FLOAT, ["batch", k])
    g.add_output(g.predicted, "predicted", TensorProto.INT64, ["batch"])
    for name in names:
        g.add_output(raw[name], f"raw_{name}", TensorProto.DOUBLE, ["batch"])
        g.add_output(p[name], f"p_{name}", TensorProto.DOUBLE, ["batch"])
    if fusing:
        score = _fuse(g, [p[name] for name in fused], fused, pipe.verdict.rule, pipe.verdict.families)
        g.add_output(score, "verdict_score", TensorProto.DOUBLE, ["batch"])
        g.add_output(g.p_value(pipe.verdict.fused_calib, score), "verdict_p_value", TensorProto.DOUBLE, ["batch"])
        flagged = g.op("Greater", score, g.scalar(pipe.threshold))
        g.add_output(flagged, "is_adversarial", TensorProto.BOOL, ["batch"])
    if details:
        _add_details(g, k)
    layout: dict[str, Any] = {}
    if fields:
        for name in names:
            violation = g.op("Sub", g.scalar(1.0), p[name])
            layout[name] = _field_outputs(g, f"field/{name}", comps[name].graph_fields(g, violation))

    graph = helper.make_graph(
        g.nodes,
        f"{bundle.name}-guarded",
        g.inputs,
        g.outputs,
        initializer=g.initializers,
    )
    model = helper.make_model(graph, opset_imports=list(clf.opset_import), producer_name="pathguard")
    model.ir_version = clf.ir_version
    meta = {
        "bundle": bundle.name,
        "bundle_version": bundle.version,
        "bundle_sha256": bundle.sha256,
        "classes": json.dumps(bundle.classes),
        "components": json.dumps(names),
        "beside": json.dumps([k for k in pipe.components if k in beside]),
        "verdict": json.dumps(
            {"rule": pipe.verdict.rule, "components": fused, "threshold": pipe.threshold, "target_fpr": pipe.target_fpr}
        ),
        "noise": json.dumps({"mode": noise, "seed": seed, "inputs": list(noise_names.values())}),
    }
    if fields:
        meta["fields"] = json.dumps(layout)
        meta["serving"] = json.dumps(_serving_info(bundle))
    helper.set_model_props(model, {f"pathguard.{key}": value for key, value in meta.items()})
    onnx.checker.check_model(model)
    return model


def _add_details(g: GraphContext, k: int) -> None:
    """NIC's per-layer outputs (``details=True`` of :func:`guarded_model`), where NIC is in the graph."""
    if "nic" in g.memo:
        value, head, prov, final = nic_output_names(0)
        g.add_output(value, value, TensorProto.DOUBLE, ["batch", "layers"])
        g.add_output(head, head, TensorProto.FLOAT, ["batch", "layers", k])
        g.add_output(prov, prov, TensorProto.DOUBLE, ["batch", "pairs"])
        g.add_output(final, final, TensorProto.DOUBLE, ["batch"])


def _field_outputs(g: GraphContext, prefix: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Expose a component's :meth:`~pathguard.models.components.Component.graph_fields` as float64 outputs named
    ``prefix/<key>``; returns their layout: ``{"output": name}``, ``{"columns": labels, "output": name}``,
    ``{"const": value}`` or ``{"fields": nested layout}`` per key (an output of :class:`Rows` is (N, L))."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        name = f"{prefix}/{key}"
        if isinstance(value, Columns):
            g.add_output(g.double(value.tensor), name, TensorProto.DOUBLE, ["batch", len(value.labels)])
            out[key] = {"columns": list(value.labels), "output": name}
        elif isinstance(value, Rows):
            g.add_output(g.double(value.tensor), name, TensorProto.DOUBLE, ["batch", value.width])
            out[key] = {"output": name}
        elif isinstance(value, str):
            g.add_output(g.double(value), name, TensorProto.DOUBLE, ["batch"])
            out[key] = {"output": name}
        elif isinstance(value, Mapping):
            out[key] = {"fields": _field_outputs(g, name, value)}
        else:
            out[key] = {"const": list(value)}
    return out


def _serving_info(bundle: Bundle) -> dict[str, Any]:
    """What the server reports of a bundle beyond the graph's outputs (``GET /v1/model``, OIP metadata): the
    layers, Effective Path's benign score and per-class ranges, and the sorted clean split-B fused scores (the
    threshold at any target FPR)."""
    pipe = bundle.pipeline
    ep, ranges = pipe.ep_score, bundle.benign_ranges

    def floats(a: Any) -> Any:
        return np.asarray(a, dtype=np.float64).tolist()

    assert pipe.verdict is not None
    return {
        "ep_layers": list(pipe.ep_layers),
        "nic_value_layers": list(pipe.nic_value_layers),
        "nic_provenance_pairs": list(pipe.nic_provenance_pairs),
        "ep_score": {
            "median": floats(ep.median_),
            "scale": floats(ep.scale_),
            "orientation": floats(ep.orientation_),
            "tail": float(ep.tail),
        },
        "benign_ranges": None
        if ranges is None
        else {
            "tail": float(ranges.tail),
            "count": [int(c) for c in ranges.count_],
            "median": floats(ranges.median_),
            "bound": floats(ranges.bound_),
        },
        "fused_calibration": floats(np.sort(pipe.verdict.fused_calib)),
    }


def _noise_source(g: GraphContext, mode: str, seed: int | None, names: Mapping[str, str]) -> Any:
    c, h, w = g.input_shape

    def draw(key: str, shape_like: str) -> str:
        if mode == "input":
            copies = int(key.rsplit("/", 1)[1])
            return g.add_input(names[key], TensorProto.FLOAT, [copies, "batch", c, h, w])
        attrs: dict[str, Any] = {"dtype": TensorProto.FLOAT}
        if seed is not None:
            attrs["seed"] = float(seed)
        return g.op("RandomNormalLike", shape_like, **attrs)

    return draw


def _append_classifier(g: GraphContext, clf: onnx.ModelProto, batch: str) -> str:
    """Append the classifier graph (its tensors prefixed) reading ``batch``; returns its logits tensor's name."""
    return g.embed(clf, _CLASSIFIER, [batch]) + "logits"


def _combine(g: OnnxGraph, p: str, k: int, rule: str) -> str:
    """(N,) combined p-value of (N, k) p-values (as :func:`~pathguard.models.verdict.fusion.combine_p_values`)."""
    p = g.op("Clip", p, g.scalar(1e-300), g.scalar(1.0))
    if rule == "fisher":
        return g.op("Clip", _fisher_tail(g, p, k), g.scalar(0.0), g.scalar(1.0))
    if rule == "tippett":
        low = g.op("Min", g.reduce("ReduceMin", p, [1]), g.scalar(1.0 - 1e-16))
        keep = g.op("Exp", g.op("Mul", g.scalar(float(k)), g.op("Log", g.op("Sub", g.scalar(1.0), low))))
        return g.op("Sub", g.scalar(1.0), keep)  # 1 - (1 - min p)^k
    if rule == "harmonic":
        return g.op("Div", g.scalar(float(k)), g.reduce("ReduceSum", g.op("Reciprocal", p), [1]))
    raise ValueError(f"unknown combination rule {rule!r}")


def _fisher_tail(g: OnnxGraph, p: str, k: int) -> str:
    """``exp(-x/2) sum_{i<k} (x/2)^i / i!`` with ``x/2 = -sum log p``: the chi-square tail with 2k degrees."""
    half = g.op("Neg", g.reduce("ReduceSum", g.op("Log", p), [1]))
    term = tail = g.op("Expand", g.scalar(1.0), g.op("Shape", half))  # ones
    for i in range(1, k):
        term = g.op("Div", g.op("Mul", term, half), g.scalar(float(i)))
        tail = g.op("Add", tail, term)
    return g.op("Mul", g.op("Exp", g.op("Neg", half)), tail)


def _fuse(g: OnnxGraph, p_values: list[str], names: list[str], rule: str, families: Mapping[str, str]) -> str:
    """(N,) fused score of the components' (N,) p-values by the verdict's rule (as ``FusedVerdict.combine``)."""
    outer, inner = parse_rule(rule)

    def stack(cols: list[str]) -> str:
        return g.op("Concat", *(g.unsqueeze(c, [1]) for c in cols), axis=1)

    if inner is None:
        pv = stack(p_values)
        if outer == "fisher":
            clipped = g.op("Clip", pv, g.scalar(1e-300), g.scalar(1.0))
            tail = _fisher_tail(g, clipped, len(p_values))
            return g.op("Clip", g.op("Sub", g.scalar(1.0), tail), g.scalar(0.0), g.scalar(1.0))
        return g.op("Sub", g.scalar(1.0), _combine(g, pv, len(p_values), outer))
    groups: dict[str, list[str]] = {}
    for name, p in zip(names, p_values, strict=True):
        groups.setdefault(families.get(name, name), []).append(p)
    per_family = [_combine(g, stack(cols), len(cols), inner) for cols in groups.values()]
    return g.op("Sub", g.scalar(1.0), _combine(g, stack(per_family), len(per_family), outer))


def store_in_bundle(path: str | Path, out: str | Path | None = None) -> str:
    """Store the bundle's guarded graph in it (``guarded.onnx`` and ``guarded.json``, see
    :mod:`pathguard.models.bundle.stored`): every calibrated component with an in-graph form, noise read from inputs,
    the response fields as outputs. Written to ``out`` (default: the bundle itself, replaced by two renames);
    returns the new bundle's sha256. Refused (:class:`NotInGraphError`) when the verdict fuses a component with no
    in-graph form."""
    files = read_verified(path)
    bundle = load_bundle(path)
    model = guarded_model(bundle, noise="input", components="all", fields=True)
    props = {p.key.removeprefix("pathguard."): p.value for p in model.metadata_props}
    spec = {
        "components": json.loads(props["components"]),
        "all_components": list(bundle.pipeline.components),
        "verdict": json.loads(props["verdict"]),
        "fields": json.loads(props["fields"]),
        "serving": json.loads(props["serving"]),
    }
    moved = [p for p in model.metadata_props if p.key in ("pathguard.fields", "pathguard.serving")]
    for prop in moved:  # kept once, in guarded.json (the fused calibration alone is tens of kB)
        model.metadata_props.remove(prop)
    blobs = {k: v for k, v in files.blobs.items() if k not in (GUARDED_ONNX, GUARDED_JSON)}
    blobs[GUARDED_ONNX] = model.SerializeToString()
    blobs[GUARDED_JSON] = (json.dumps(spec, indent=1) + "\n").encode()
    manifest = {k: v for k, v in files.manifest.items() if k not in ("files", "schema_version", "created_at")}
    return write_bundle(out if out is not None else path, blobs, manifest)
