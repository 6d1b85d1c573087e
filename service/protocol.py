"""The Open Inference Protocol's tensors, shared by the HTTP routes and the gRPC server.

Inputs: one tensor (N, C, H, W), FP32 in [0, 1] or UINT8 in [0, 255], as JSON ``data`` (flat or nested,
row-major) or as raw little-endian bytes (HTTP binary tensor data extension, gRPC ``raw_input_contents``).
Every size is checked in O(1) against the declared shape before any element is read: the datatype, the
shape against the bundle's input spec and ``max_request_images``, then the element count (flat JSON data) or the
byte count (raw data). Nested JSON data is flattened only after that.

Outputs: the names of :data:`OUTPUTS` (and :data:`SUPERVISED_OUTPUTS` on bundles with a supervised detector),
each a numpy array per request, encoded as JSON ``data`` or as raw bytes by the transport.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from pathguard.service.errors import BadInput, PayloadTooLarge
from pathguard.service.inputs import InputSpec
from pathguard.service.responses import DetectResponse

__all__ = [
    "OUTPUTS",
    "SUPERVISED_OUTPUTS",
    "InferCall",
    "OutputTensor",
    "decode_input",
    "encode_http",
    "output_tensors",
    "parse_http",
]

# name -> (datatype, whether it needs the verdict)
OUTPUTS = {
    "predicted_class": ("INT64", False),
    "probabilities": ("FP32", False),
    "is_adversarial": ("BOOL", True),
    "instance_score": ("FP32", True),
    "p_value": ("FP32", True),
    "path_similarity": ("FP32", True),
    "value_violation": ("FP32", True),
    "provenance_violation": ("FP32", True),
}
# only for bundles built with supervised attacks (reported beside the verdict)
SUPERVISED_OUTPUTS = {"supervised_is_adversarial": ("BOOL", True), "supervised_score": ("FP32", True)}
_SCALAR = ("predicted_class", "is_adversarial", "instance_score", "p_value", *SUPERVISED_OUTPUTS)
_NUMPY: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "UINT8": np.dtype("u1"),
    "INT64": np.dtype("<i8"),
    "BOOL": np.dtype("?"),
}
_JSON_BYTES_PER_ELEMENT = 24  # generous: "0.123456789012345678," is 21 characters
_JSON_SLACK_BYTES = 64 * 1024  # ids, parameters, output requests
_MAX_NESTING = 16  # depth of any JSON value but the tensor data (whose nesting is checked against the shape)


@dataclass
class InferCall:
    """A decoded inference request, transport-independent."""

    x: np.ndarray  # (N, C, H, W) float32 in [0, 1]
    request_id: str | None
    outputs: list[str] | None  # None: every available output
    binary_outputs: set[str] = field(default_factory=set)  # HTTP: outputs wanted as raw bytes
    parameters: dict[str, Any] = field(default_factory=dict)  # request parameters, echoed back


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray  # flat, of the datatype's numpy dtype


def decode_input(
    shape: Sequence[object],
    datatype: str,
    spec: InputSpec,
    max_images: int,
    data: object = None,
    raw: bytes | None = None,
) -> np.ndarray:
    """Check a tensor's declared size, then decode it to float32 (N, C, H, W) in [0, 1].

    Raises
    ------
    BadInput
        Wrong datatype, shape, element or byte count, non-numeric, non-finite or out-of-range values.
    PayloadTooLarge
        More than ``max_images`` images.
    """
    dtype = datatype.upper() if isinstance(datatype, str) else ""
    if dtype not in ("FP32", "UINT8"):
        raise BadInput(f"input datatype must be FP32 or UINT8, got {datatype!r}")
    dims = _shape(shape, spec)
    if dims[0] > max_images:
        raise PayloadTooLarge(f"at most {max_images} images per request, got {dims[0]}")
    n = math.prod(dims)
    if raw is not None:
        if len(raw) != n * _NUMPY[dtype].itemsize:
            raise BadInput(f"input has {len(raw)} bytes; {dtype} shape {dims} needs {n * _NUMPY[dtype].itemsize}")
        arr = np.frombuffer(raw, dtype=_NUMPY[dtype]).astype(np.float64)
    else:
        arr = _json_values(data, n, dims)
    return _scaled(arr, dtype).reshape(dims)  # (N, C, H, W)


def _shape(shape: Sequence[object], spec: InputSpec) -> list[int]:
    ok = isinstance(shape, list | tuple) and len(shape) == 4
    ok = ok and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
    if not ok or tuple(shape[1:]) != spec.shape or int(shape[0]) < 1:  # type: ignore[call-overload]
        want = ", ".join(map(str, spec.shape))
        raise BadInput(f"input shape must be [N, {want}] with N >= 1, got {list(shape) if ok else shape!r}")
    return [int(d) for d in shape]  # type: ignore[call-overload]


def _json_values(data: object, n: int, dims: list[int]) -> np.ndarray:
    if not isinstance(data, list):
        raise BadInput("input tensor needs 'data' (or binary data)")
    if data and not isinstance(data[0], list) and len(data) != n:  # flat: counted before reading any element
        raise BadInput(f"input data has {len(data)} values; shape {dims} needs {n}")
    flat = _flatten(data, n)
    if len(flat) != n:
        raise BadInput(f"input data has {len(flat)} values; shape {dims} needs {n}")
    try:
        return np.asarray(flat, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise BadInput("input data must be finite numbers") from None


def _flatten(data: list[object], limit: int) -> list[object]:
    """Row-major flattening of nested lists; stops once more than ``limit`` values were seen."""
    out: list[object] = []
    stack: list[object] = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, bool) or not isinstance(item, int | float):
            raise BadInput("input data must be numbers")
        else:
            out.append(item)
            if len(out) > limit:
                break
    return out


def _scaled(arr: np.ndarray, dtype: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise BadInput("input data contains NaN or infinity")
    top = 255.0 if dtype == "UINT8" else 1.0
    if arr.size and (arr.min() < 0.0 or arr.max() > top):
        raise BadInput(f"{dtype} input values must lie in [0, {top:g}]")
    if dtype == "UINT8" and not np.array_equal(arr, np.round(arr)):
        raise BadInput("UINT8 input values must be integers")
    return (arr / top).astype(np.float32)


# ------------------------------------------------------------------------------------------------ HTTP


def max_json_bytes(spec: InputSpec, max_images: int) -> int:
    """Largest JSON header worth parsing: ``max_images`` images of numbers, plus slack."""
    return max_images * math.prod(spec.shape) * _JSON_BYTES_PER_ELEMENT + _JSON_SLACK_BYTES


def parse_http(body: bytes, header_length: str | None, spec: InputSpec, max_images: int) -> InferCall:
    """Decode an OIP HTTP inference body: JSON (any or no Content-Type), or a JSON header of
    ``header_length`` bytes followed by the raw tensor data (binary tensor data extension).

    Runs on a worker thread: JSON parsing of a large body would stall the event loop.
    """
    split = _header_length(header_length, len(body))
    header, tail = (body, b"") if split is None else (body[:split], body[split:])
    if len(header) > max_json_bytes(spec, max_images):
        raise PayloadTooLarge(f"inference request JSON of {len(header)} bytes is larger than any valid request")
    try:
        req = orjson.loads(header)  # nesting deeper than 1024 is a JSONDecodeError, never a RecursionError
    except (orjson.JSONDecodeError, RecursionError) as exc:
        raise BadInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(req, dict):
        raise BadInput("request body must be a JSON object")
    _check_nesting(req)
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        count = len(inputs) if isinstance(inputs, list) else 0
        raise BadInput(f"expected exactly one input tensor, got {count}")
    tensor = inputs[0]
    raw = _binary_part(tensor, tail)
    x = decode_input(tensor.get("shape", []), tensor.get("datatype", ""), spec, max_images, tensor.get("data"), raw)
    params = _mapping(req.get("parameters"), "parameters")
    outputs, binary = _http_outputs(req.get("outputs"), bool(params.pop("binary_data_output", False)))
    rid = req.get("id")
    return InferCall(x, str(rid) if rid is not None else None, outputs, binary, params)


def _check_nesting(req: dict[str, Any]) -> None:
    """400 for any value nested deeper than :data:`_MAX_NESTING` outside the tensor data (parameters and ids are
    echoed back, and no valid request nests them deeply). Walks iteratively, skipping each input's ``data``."""
    stack: list[tuple[object, int]] = [(req, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > _MAX_NESTING:
            raise BadInput(f"request JSON is nested deeper than {_MAX_NESTING} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for k, v in node.items() if not (k == "data" and depth == 3))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _header_length(value: str | None, body_length: int) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise BadInput(f"Inference-Header-Content-Length must be an integer, got {value!r}") from None
    if not 0 < n <= body_length:
        raise BadInput(f"Inference-Header-Content-Length {n} does not fit the {body_length}-byte body")
    return n


def _binary_part(tensor: dict[str, Any], tail: bytes) -> bytes | None:
    size = _mapping(tensor.get("parameters"), "input parameters").get("binary_data_size")
    if size is None:
        if tail:
            raise BadInput("binary data follows the JSON header but the input has no binary_data_size")
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size != len(tail):
        raise BadInput(f"input binary_data_size {size!r} does not match the {len(tail)} bytes after the JSON header")
    return tail


def _mapping(value: object, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadInput(f"{what} must be a JSON object")
    return dict(value)


def _http_outputs(requested: object, all_binary: bool) -> tuple[list[str] | None, set[str]]:
    if requested is None:
        return None, {"*"} if all_binary else set()
    named = isinstance(requested, list) and all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested
    )
    if not named:
        raise BadInput("outputs must be a list of objects with a 'name'")
    assert isinstance(requested, list)
    names = [o["name"] for o in requested]
    binary = {o["name"] for o in requested if _mapping(o.get("parameters"), "output parameters").get("binary_data")}
    return names, binary | ({"*"} if all_binary else set())


def encode_http(
    response: dict[str, Any], tensors: Sequence[OutputTensor], binary: set[str]
) -> tuple[bytes, int | None]:
    """The HTTP response body; with binary outputs, also the JSON header's length (else ``None``)."""
    outputs, blobs = [], []
    for t in tensors:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if t.name in binary or "*" in binary:
            blob = t.values.astype(_NUMPY[t.datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = t.values.tolist()
        outputs.append(entry)
    header = orjson.dumps({**response, "outputs": outputs})
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


# ------------------------------------------------------------------------------------------------ outputs


# the outputs read from a component's part of the answer
_PART_OUTPUTS = {
    "effective_path": ("path_similarity",),
    "nic": ("value_violation", "provenance_violation"),
    "supervised": tuple(SUPERVISED_OUTPUTS),
}


def available_outputs(has_supervised: bool, skipped: Collection[str] = ()) -> dict[str, tuple[str, bool]]:
    """Outputs this server can return: the supervised ones only when the bundle has a supervised detector, none of
    a component the server leaves out of its answers (``skipped``, PATHGUARD_REPORTED_COMPONENTS)."""
    out = OUTPUTS | SUPERVISED_OUTPUTS if has_supervised else dict(OUTPUTS)
    gone = {name for part in skipped for name in _PART_OUTPUTS.get(part, ())}
    return {k: v for k, v in out.items() if k not in gone}


def requested_outputs(names: list[str] | None, available: Mapping[str, tuple[str, bool]]) -> list[str]:
    if names is None:
        return list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise BadInput(f"unknown output {unknown[0]!r}; available: {', '.join(available)}")
    return names


def output_tensors(
    rows: Sequence[DetectResponse], names: list[str], available: Mapping[str, tuple[str, bool]]
) -> list[OutputTensor]:
    """One tensor per requested output over the N detection bodies (verdict outputs only when they carry one)."""
    with_verdict = rows[0].verdict is not None
    out = []
    for name in names:
        datatype, needs_verdict = available[name]
        if needs_verdict and not with_verdict:
            continue
        cols = [_column(name, r) for r in rows]
        shape = [len(rows)] if name in _SCALAR else [len(rows), len(cols[0])]
        values = np.asarray([v for c in cols for v in c], dtype=_NUMPY[datatype])
        out.append(OutputTensor(name, datatype, shape, values))
    return out


def _column(name: str, row: DetectResponse) -> list[Any]:
    pred, verdict, sup, ep, nic = row.prediction, row.verdict, row.supervised, row.effective_path, row.nic
    if name == "predicted_class":
        return [pred.class_index]
    if name == "probabilities":
        return list(pred.probabilities)
    assert verdict is not None
    if name == "is_adversarial":
        return [verdict.adversarial]
    if name == "instance_score":
        return [verdict.score]
    if name == "p_value":
        return [verdict.p_value]
    if name in ("supervised_is_adversarial", "supervised_score"):
        assert sup is not None
        return [sup.adversarial if name == "supervised_is_adversarial" else sup.score]
    if name == "path_similarity":  # offered only when the answers report the part (available_outputs)
        assert ep is not None
        return list(ep.rank1_similarity)
    assert nic is not None
    if name == "value_violation":
        return list(nic.value_violation.values())
    return list(nic.provenance_violation.values())
