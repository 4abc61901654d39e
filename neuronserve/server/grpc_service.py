"""KServe v2 over gRPC: `inference.GRPCInferenceService` (ServerLive, ServerReady, ModelReady, ServerMetadata,
ModelMetadata, ModelInfer), served by the group's own worker on its loopback gRPC port, on the same event loop,
model and batcher as its HTTP routes (kserve_v2.py has what both share).

The port listens only once every copy passed the warm-up: until then nginx's connection is refused and it
tries another group, as HTTP's 503 makes it do. Errors carry REST's messages under gRPC's codes (STATUS_CODES).

Several models on one host share the front's one gRPC address, and nginx cannot read the model a protobuf body
names. The front sends a call to the groups of the model named by the `x-neuronserve-model` metadata (clients may
set it to save a hop) or, without it, to any group, and tells every group which models the host serves
(`x-neuronserve-models`); a group asked for another served model passes the call back through the front with
the header set (`grpc_front`), so it reaches that model's groups.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from neuronserve import __version__
from neuronserve.server import grpc_messages as pb
from neuronserve.server.batcher import ServeError
from neuronserve.server.kserve_v2 import VERSION, KServeV2
from neuronserve.server.protocol import InferInput, ProtocolError, datatype_of, from_binary, from_values, raw_bytes
from neuronserve.server.router import status_of

log = logging.getLogger("neuronserve.server")

MODEL_HEADER = "x-neuronserve-model"      # routes a call at the front to this model's groups
SERVED_HEADER = "x-neuronserve-models"    # set by the front: the models this host serves, comma-separated
# REST status -> gRPC code, as the Open Inference Protocol and Triton map them
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED, 422: grpc.StatusCode.INVALID_ARGUMENT,
                499: grpc.StatusCode.CANCELLED, 503: grpc.StatusCode.UNAVAILABLE,
                504: grpc.StatusCode.DEADLINE_EXCEEDED}
# gRPC's typed contents field of each datatype (FP16 has none: it goes in raw_input_contents)
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents", "BYTES": "bytes_contents"}

_Request = {method: pb.message(request) for method, (request, _) in pb.METHODS.items()}
_Response = {method: pb.message(response) for method, (_, response) in pb.METHODS.items()}
TensorMetadata = pb.message("ModelMetadataResponse.TensorMetadata")


class GrpcService:
    """The gRPC side of one group: `start` listens once the model is ready, `stop` drains."""

    def __init__(self, v2: KServeV2, port: int, front: str = ""):
        self.v2, self.model, self.port, self.front = v2, v2.model, port, front
        self.server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._waiting: asyncio.Task | None = None

    async def start(self) -> None:
        """Listen on listen_host:port once every copy is warm (a task, so the caller's lifespan goes on)."""
        self._waiting = asyncio.ensure_future(self._listen_when_ready())

    async def _listen_when_ready(self) -> None:
        await self.model.wait_ready()
        # no SO_REUSEPORT: a port another process holds is an error here, not a silent half of its traffic
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(pb.SERVICE, {
            method: grpc.unary_unary_rpc_method_handler(
                self._parsing(method), response_serializer=_Response[method].SerializeToString)
            for method in pb.METHODS}),))
        address = f"{self.model.settings.listen_host}:{self.port}"
        try:
            server.add_insecure_port(address)
        except RuntimeError as e:
            log.error("%s: cannot serve gRPC on %s (%s): HTTP only", self.model.settings.group, address, e)
            return
        await server.start()
        self.server = server
        log.info("%s: gRPC (KServe v2) on %s", self.model.settings.group, address)

    def _parsing(self, method: str):
        """The handler of `method` on the request's bytes: a body that is not its message gets INVALID_ARGUMENT
        (grpc's own deserializer would answer INTERNAL, a server fault)."""
        parse, answer = _Request[method].FromString, getattr(self, method)

        async def handle(body: bytes, context):
            try:
                request = parse(body)
            except DecodeError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"malformed {parse.__self__.DESCRIPTOR.name}: {e}")
            return await answer(request, context)

        return handle

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, let those in flight finish within `grace_s`, then cancel the rest."""
        if self._waiting is not None:
            self._waiting.cancel()
        if self.server is not None:
            await self.server.stop(grace_s)
        if self._channel is not None:
            await self._channel.close()

    # ---------------------------------------------------------------- the service's methods

    async def ServerLive(self, request, context):
        return _Response["ServerLive"](live=True)

    async def ServerReady(self, request, context):
        return _Response["ServerReady"](ready=self.model.ready)

    async def ServerMetadata(self, request, context):
        return _Response["ServerMetadata"](name="neuronserve", version=__version__)

    async def ModelReady(self, request, context):
        try:
            forwarded = await self._route("ModelReady", request, request.name, request.version, context)
        except Exception as e:
            await _abort(context, e)
        return forwarded if forwarded is not None else _Response["ModelReady"](ready=self.model.ready)

    async def ModelMetadata(self, request, context):
        try:
            forwarded = await self._route("ModelMetadata", request, request.name, request.version, context)
        except Exception as e:
            await _abort(context, e)
        if forwarded is not None:
            return forwarded
        meta = self.v2.metadata
        return _Response["ModelMetadata"](
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[TensorMetadata(**t) for t in meta["outputs"]])

    async def ModelInfer(self, request, context):
        t0 = time.monotonic()
        metrics, settings = self.model.metrics, self.model.settings
        metrics.in_flight.inc()
        try:
            forwarded = await self._route("ModelInfer", request, request.model_name, request.model_version,
                                          context)
            if forwarded is not None:
                return forwarded
            remaining = context.time_remaining()
            timeout = settings.timeout_s if remaining is None else min(remaining, settings.timeout_s)
            outputs = await self.v2.infer(_tensors(request), [o.name for o in request.outputs] or None,
                                          _parameters(request.parameters), t0 + timeout)
            response = _Response["ModelInfer"](model_name=self.model.name, model_version=VERSION, id=request.id)
            for name, array in outputs.items():
                response.outputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
                response.raw_output_contents.append(raw_bytes(array))
            metrics.request(200, time.monotonic() - t0)
            return response
        except Exception as e:
            if not isinstance(e, Forwarded):    # counted by the group that answered
                metrics.request(status_of(e)[0], time.monotonic() - t0)
            await _abort(context, e)
        finally:
            metrics.in_flight.dec()

    # ---------------------------------------------------------------- which group answers

    async def _route(self, method: str, request, name: str, version: str, context):
        """None when this group serves the model (and version) the call names; otherwise that model's answer,
        from its groups through the front, or a ServeError 404."""
        if name == self.model.name:
            self.v2.lookup(name, version)
            return None
        metadata = dict(context.invocation_metadata() or ())
        served = [m for m in metadata.get(SERVED_HEADER, "").split(",") if m]
        if name in served and metadata.get(MODEL_HEADER) != name and self.front:
            return await self._forward(method, request, name, metadata, context)
        raise ServeError(404, f"unknown model {name!r}; this host serves {', '.join(served or [self.model.name])}")

    async def _forward(self, method: str, request, name: str, metadata: dict, context):
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.front)
        call = self._channel.unary_unary(f"/{pb.SERVICE}/{method}",
                                         request_serializer=_Request[method].SerializeToString,
                                         response_deserializer=_Response[method].FromString)
        passed = [(MODEL_HEADER, name)]
        if "authorization" in metadata:      # the front checks the client's token again
            passed.append(("authorization", metadata["authorization"]))
        try:
            return await call(request, metadata=passed, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as e:
            raise Forwarded(e.code(), e.details() or "") from None


class Forwarded(Exception):
    """The error another model's group answered a forwarded call with, passed on as it is."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code


async def _abort(context, e: Exception):
    """End the call with `e`'s gRPC code and REST's message."""
    if isinstance(e, Forwarded):
        await context.abort(e.code, str(e))
    status, message, _ = status_of(e)
    await context.abort(STATUS_CODES.get(status, grpc.StatusCode.INTERNAL), message)


def _tensors(request) -> dict[str, np.ndarray]:
    """The request's input tensors by name, from raw_input_contents (one entry per input) or typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: one per "
                            "input, in order")
    tensors: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in tensors:
            raise ProtocolError(f"input {tensor.name!r} given twice")
        inp = InferInput.model_construct(name=tensor.name, shape=list(tensor.shape), datatype=tensor.datatype)
        if raw:
            tensors[tensor.name] = from_binary(inp, raw[i])
            continue
        field = CONTENTS.get(tensor.datatype)
        if field is None:
            hint = " (FP16 goes in raw_input_contents)" if tensor.datatype == "FP16" else ""
            raise ProtocolError(f"input {tensor.name!r}: no typed contents for datatype {tensor.datatype!r}{hint}")
        values = getattr(tensor.contents, field)
        if tensor.datatype == "BYTES":
            try:
                values = [v.decode("utf-8") for v in values]
            except UnicodeDecodeError:
                raise ProtocolError(f"input {tensor.name!r}: BYTES element is not UTF-8 text") from None
        tensors[tensor.name] = from_values(inp, values)
    return tensors


def _parameters(parameters) -> dict:
    """InferParameter map -> plain values (the task's parameters ride here as on REST)."""
    out = {}
    for key, value in parameters.items():
        which = value.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(value, which)
    return out
