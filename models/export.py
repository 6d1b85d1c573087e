"""Exports of a bundle's guarded graph (:mod:`pathguard.models.guarded`): the ONNX file alone, or a Triton model
repository entry.

:func:`write_triton` writes ``<dir>/<name>/config.pbtxt`` (the ONNX Runtime backend, the batch dimension, dynamic
batching, every input and output by name, type and shape) and ``<dir>/<name>/1/model.onnx``, so Triton, or KServe
with its Triton runtime, serves the classifier and its verdict in one model. Outputs that are one value per image
((N,) in the graph) are declared ``dims: [ 1 ]`` with ``reshape: { shape: [ ] }``, Triton's form for a tensor that
has the batch dimension only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
from onnx import TensorProto

from pathguard.models.bundle import Bundle
from pathguard.models.guarded import guarded_model

__all__ = ["triton_config", "write_guarded", "write_triton"]

_TRITON_TYPES: dict[int, str] = {
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.BOOL: "TYPE_BOOL",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def write_guarded(
    bundle: Bundle, path: str | Path, seed: int | None = None, components: str = "verdict"
) -> onnx.ModelProto:
    """Write the bundle's guarded graph (in-graph noise) to ``path``; returns the model."""
    model = guarded_model(bundle, noise="random", seed=seed, components=components)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.SerializeToString())
    return model


def triton_config(
    model: onnx.ModelProto, name: str, max_batch_size: int = 64, threads: int = 0, gpu: bool = False
) -> str:
    """``config.pbtxt`` of the guarded ``model`` served by Triton's ONNX Runtime backend as ``name`` (one instance,
    on the CPU or, with ``gpu``, on each GPU)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")

    def entry(value: onnx.ValueInfoProto) -> str:
        tensor = value.type.tensor_type
        if tensor.elem_type not in _TRITON_TYPES:
            raise ValueError(f"{value.name}: no Triton type for ONNX element type {tensor.elem_type}")
        dims = [d.dim_value for d in tensor.shape.dim[1:]]  # without the batch dimension
        if any(d <= 0 for d in dims):
            raise ValueError(f"{value.name}: every dimension but the batch must be fixed, got {tensor.shape}")
        shape = f"dims: [ {', '.join(map(str, dims))} ]" if dims else "dims: [ 1 ]\n    reshape: { shape: [ ] }"
        return f'  {{\n    name: "{value.name}"\n    data_type: {_TRITON_TYPES[tensor.elem_type]}\n    {shape}\n  }}'

    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(entry(v) for v in model.graph.input) + "\n]",
        "output [\n" + ",\n".join(entry(v) for v in model.graph.output) + "\n]",
        "dynamic_batching { }",
        f"instance_group [ {{ count: 1, kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]",
    ]
    if threads > 0:
        lines.append(
            'parameters { key: "intra_op_thread_count" value: { string_value: "%d" } }' % threads  # noqa: UP031
        )
    return "\n".join(lines) + "\n"


def write_triton(
    bundle: Bundle,
    out_dir: str | Path,
    name: str | None = None,
    max_batch_size: int = 64,
    threads: int = 0,
    seed: int | None = None,
    gpu: bool = False,
    components: str = "verdict",
) -> Path:
    """Write the Triton model repository entry ``out_dir/<name>/`` (default name: the bundle's); returns it."""
    name = name or bundle.name
    if not _NAME.match(name):
        raise ValueError(f"model name {name!r}: letters, digits, '_', '.', '-' only (a Triton model folder)")
    model = guarded_model(bundle, noise="random", seed=seed, components=components)
    entry = Path(out_dir) / name
    (entry / "1").mkdir(parents=True, exist_ok=True)
    (entry / "1" / "model.onnx").write_bytes(model.SerializeToString())
    (entry / "config.pbtxt").write_text(triton_config(model, name, max_batch_size, threads, gpu))
    props = {p.key: p.value for p in model.metadata_props}
    (entry / "pathguard.json").write_text(
        json.dumps({k.removeprefix("pathguard."): _maybe_json(v) for k, v in props.items()}, indent=2) + "\n"
    )
    return entry


def _maybe_json(value: str) -> object:
    try:
        return json.loads(value)
    except ValueError:
        return value
