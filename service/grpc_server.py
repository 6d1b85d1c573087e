"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), served by the same process.

The protocol's messages are declared here as a protobuf descriptor built in code (field names and numbers as the
protocol defines them), so no generated code and no compiler is needed. The server runs on the service's event
loop (``grpc.aio``) and shares the HTTP routes' state: the micro-batcher, metrics, cache and flagged stream go
through :func:`pathguard.service.detection.detect_tensor`, inputs and outputs through
:mod:`pathguard.service.protocol`. RPCs: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata,
ModelInfer (``raw_input_contents`` or typed ``contents``; outputs as ``raw_output_contents``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from pathguard.service.detection import detect_tensor
from pathguard.service.errors import BadInput, NotFound, ServiceError
from pathguard.service.middleware import safe_request_id
from pathguard.service.protocol import available_outputs, decode_input, output_tensors, requested_outputs
from pathguard.service.served import ServedModel
from pathguard.service.state import ServiceState, check_api_key

__all__ = ["SERVICE", "GrpcServer", "messages"]

log = logging.getLogger("pathguard.service")

SERVICE = "inference.GRPCInferenceService"
_F = descriptor_pb2.FieldDescriptorProto
_T = {"string": _F.TYPE_STRING, "bool": _F.TYPE_BOOL, "int64": _F.TYPE_INT64, "uint32": _F.TYPE_UINT32,
      "uint64": _F.TYPE_UINT64, "int32": _F.TYPE_INT32, "float": _F.TYPE_FLOAT, "double": _F.TYPE_DOUBLE,
      "bytes": _F.TYPE_BYTES}  # fmt: skip

# message -> [(field, number, type or message name, repeated)]; "map:X" is map<string, X>
_MESSAGES: dict[str, list[tuple[str, int, str, bool]]] = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", 1, "bool", False)],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", 1, "bool", False)],
    "ModelReadyRequest": [("name", 1, "string", False), ("version", 2, "string", False)],
    "ModelReadyResponse": [("ready", 1, "bool", False)],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [("name", 1, "string", False), ("version", 2, "string", False),
                               ("extensions", 3, "string", True)],
    "ModelMetadataRequest": [("name", 1, "string", False), ("version", 2, "string", False)],
    "TensorMetadata": [("name", 1, "string", False), ("datatype", 2, "string", False), ("shape", 3, "int64", True)],
    "ModelMetadataResponse": [("name", 1, "string", False), ("versions", 2, "string", True),
                              ("platform", 3, "string", False), ("inputs", 4, "TensorMetadata", True),
                              ("outputs", 5, "TensorMetadata", True)],
    "InferParameter": [("bool_param", 1, "bool", False), ("int64_param", 2, "int64", False),
                       ("string_param", 3, "string", False), ("double_param", 4, "double", False),
                       ("uint64_param", 5, "uint64", False)],
    "InferTensorContents": [("bool_contents", 1, "bool", True), ("int_contents", 2, "int32", True),
                            ("int64_contents", 3, "int64", True), ("uint_contents", 4, "uint32", True),
                            ("uint64_contents", 5, "uint64", True), ("fp32_contents", 6, "float", True),
                            ("fp64_contents", 7, "double", True), ("bytes_contents", 8, "bytes", True)],
    "InferInputTensor": [("name", 1, "string", False), ("datatype", 2, "string", False),
                         ("shape", 3, "int64", True), ("parameters", 4, "map:InferParameter", False),
                         ("contents", 5, "InferTensorContents", False)],
    "InferRequestedOutputTensor": [("name", 1, "string", False), ("parameters", 2, "map:InferParameter", False)],
    "ModelInferRequest": [("model_name", 1, "string", False), ("model_version", 2, "string", False),
                          ("id", 3, "string", False), ("parameters", 4, "map:InferParameter", False),
                          ("inputs", 5, "InferInputTensor", True), ("outputs", 6, "InferRequestedOutputTensor", True),
                          ("raw_input_contents", 7, "bytes", True)],
    "InferOutputTensor": [("name", 1, "string", False), ("datatype", 2, "string", False),
                          ("shape", 3, "int64", True), ("parameters", 4, "map:InferParameter", False),
                          ("contents", 5, "InferTensorContents", False)],
    "ModelInferResponse": [("model_name", 1, "string", False), ("model_version", 2, "string", False),
                           ("id", 3, "string", False), ("parameters", 4, "map:InferParameter", False),
                           ("outputs", 5, "InferOutputTensor", True), ("raw_output_contents", 6, "bytes", True)],
}  # fmt: skip
_RPCS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")
_OPEN_RPCS = frozenset({"ServerLive", "ServerReady"})  # health, never behind the API key (as /v2/health/* over HTTP)
_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
           404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
           415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
           503: grpc.StatusCode.UNAVAILABLE}  # fmt: skip


def _field(msg: descriptor_pb2.DescriptorProto, name: str, number: int, kind: str, repeated: bool) -> None:
    f = msg.field.add(name=name, number=number)
    f.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    if kind.startswith("map:"):  # map<string, V>: a repeated nested *Entry message with key = 1, value = 2
        entry = msg.nested_type.add(name=f"{name.title().replace('_', '')}Entry")
        entry.options.map_entry = True
        _field(entry, "key", 1, "string", False)
        _field(entry, "value", 2, kind[4:], False)
        f.label, f.type, f.type_name = _F.LABEL_REPEATED, _F.TYPE_MESSAGE, f".inference.{msg.name}.{entry.name}"
    elif kind in _T:
        f.type = _T[kind]
    else:
        f.type, f.type_name = _F.TYPE_MESSAGE, f".inference.{kind}"


def _build() -> dict[str, Any]:
    fd = descriptor_pb2.FileDescriptorProto(name="pathguard/oip.proto", package="inference", syntax="proto3")
    for name, fields in _MESSAGES.items():
        msg = fd.message_type.add(name=name)
        for field in fields:
            _field(msg, *field)
    pool = descriptor_pool.DescriptorPool()  # private: no clash with other copies of the protocol in the process
    pool.Add(fd)
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{n}")) for n in _MESSAGES}


_CLASSES: dict[str, Any] = _build()


def messages() -> dict[str, Any]:
    """The protocol's message classes by name (``messages()["ModelInferRequest"]()``)."""
    return dict(_CLASSES)


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class GrpcServer:
    """``inference.GRPCInferenceService`` on ``host:port`` over the service ``state``."""

    def __init__(self, state: ServiceState, host: str, port: int) -> None:
        self.state, self.address = state, f"{host}:{port}"
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        limit = self.state.settings.max_body_bytes
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", 64 * 1024 * 1024)]
        # at most this many RPCs (and so request messages) at once; beyond it grpc answers RESOURCE_EXHAUSTED
        concurrent = self.state.settings.max_concurrent_requests
        self._server = grpc.aio.server(options=options, maximum_concurrent_rpcs=concurrent)
        handlers = {rpc: self._unary(rpc, getattr(self, f"_{rpc}")) for rpc in _RPCS}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        if self._server.add_insecure_port(self.address) == 0:
            raise RuntimeError(f"gRPC: cannot listen on {self.address}")
        await self._server.start()
        log.info("gRPC (Open Inference Protocol) on %s", self.address)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None

    def _unary(self, rpc: str, fn: Handler) -> grpc.RpcMethodHandler:
        request_cls, response_cls = _CLASSES[f"{rpc}Request"], _CLASSES[f"{rpc}Response"]
        route = f"/{SERVICE}/{rpc}"

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0, code = time.perf_counter(), 500
            try:
                if rpc not in _OPEN_RPCS:
                    self._authorize(context)
                response = await fn(request, context)
                code = 200
                return response
            except ServiceError as exc:
                code = exc.status_code
                await context.abort(_STATUS.get(code, grpc.StatusCode.INVALID_ARGUMENT), str(exc))
            except Exception:  # a defect: counted as 500, logged with its traceback, no details to the client
                log.exception("gRPC %s failed", rpc)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            finally:
                m = self.state.metrics
                m.requests.labels(route=route, status=str(code)).inc()
                m.request_duration.labels(route=route).observe(time.perf_counter() - t0)

        return grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=request_cls.FromString, response_serializer=response_cls.SerializeToString
        )

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        meta = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        check_api_key(self.state.settings, meta.get("x-api-key"), meta.get("authorization"))

    def _model(self, name: str, version: str) -> ServedModel:
        """The served model ``name`` (NOT_FOUND when unknown, UNAVAILABLE while it loads), at ``version`` if set."""
        served = self.state.model(name)
        if version and version != served.version:
            raise NotFound(f"model {name!r} has no version {version!r}; served: {served.version}")
        return served

    # ---- RPCs -----------------------------------------------------------------------------------

    async def _ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return _CLASSES["ServerLiveResponse"](live=True)

    async def _ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return _CLASSES["ServerReadyResponse"](ready=self.state.ready)

    async def _ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._model(request.name, request.version)
        return _CLASSES["ModelReadyResponse"](ready=True)

    async def _ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return _CLASSES["ServerMetadataResponse"](name="pathguard", version=metadata.version("pathguard"))

    async def _ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        served = self._model(request.name, request.version)
        b, p, tensor = served.bundle, served.runtime.pipeline, _CLASSES["TensorMetadata"]
        widths = {
            "probabilities": len(b.classes),
            "path_similarity": len(p.ep_layers),
            "value_violation": len(p.nic_value_layers),
            "provenance_violation": len(p.nic_provenance_pairs),
        }
        outputs = [
            tensor(name=n, datatype=d, shape=[-1, widths[n]] if n in widths else [-1])
            for n, (d, _) in available_outputs(p.supervised is not None, served.runtime.skip).items()
        ]
        return _CLASSES["ModelMetadataResponse"](
            name=served.name,
            versions=[served.version],
            platform=f"pathguard-{served.settings.engine}",
            inputs=[tensor(name="input", datatype="FP32", shape=[-1, *b.input_shape])],
            outputs=outputs,
        )

    async def _ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with self._model(request.model_name, request.model_version).use() as served:
            return await self._infer(served, request)

    async def _infer(self, served: ServedModel, request: Any) -> Any:
        x = await asyncio.to_thread(_decode, request, served)
        available = available_outputs(served.runtime.pipeline.supervised is not None, served.runtime.skip)
        wanted = requested_outputs([o.name for o in request.outputs] or None, available)
        rid = safe_request_id(request.id or None) or uuid.uuid4().hex
        rows = await detect_tensor(served, rid, x)
        response = _CLASSES["ModelInferResponse"](model_name=served.name, model_version=served.version, id=rid)
        params: dict[str, object] = {"mode": served.settings.mode, "bundle_sha256": served.sha256}
        v = rows[0].verdict
        if v is not None:
            params |= {"threshold": float(v.threshold), "target_fpr": float(v.target_fpr)}
        for k, value in params.items():
            _set_parameter(response.parameters[k], value)
        for t in output_tensors(rows, wanted, available):
            response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            response.raw_output_contents.append(t.values.tobytes())
        return response


def _decode(request: Any, state: ServedModel) -> Any:
    """The request's one input tensor as float32 (N, C, H, W), size-checked before its data is read."""
    if len(request.inputs) != 1:
        raise BadInput(f"expected exactly one input tensor, got {len(request.inputs)}")
    tensor = request.inputs[0]
    raws = list(request.raw_input_contents)
    if len(raws) > 1:
        raise BadInput(f"expected at most one raw_input_contents entry, got {len(raws)}")
    data = None
    if not raws:
        c = tensor.contents
        data = list(c.fp32_contents) if tensor.datatype.upper() == "FP32" else list(c.uint_contents)
    assert state.spec is not None
    max_images = state.settings.max_request_images
    return decode_input(list(tensor.shape), tensor.datatype, state.spec, max_images, data, raws[0] if raws else None)


def _set_parameter(param: Any, value: object) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)
