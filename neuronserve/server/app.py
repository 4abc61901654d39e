"""The ASGI app one group's worker runs:

    gunicorn -k neuronserve.server.worker.Worker 'neuronserve.server.app:create_app()'

Routes (every error body is {"error": "<message>"}):

    GET  /v2/health/live                  200 while the process serves HTTP
    GET  /v2/health/ready                 200 once every copy passed the known-answer warm-up, else 503 + reason
    GET  /v2                              server metadata
    GET  /v2/models/{m}[/versions/1]      model metadata (inputs, outputs, task, buckets)
    GET  /v2/models/{m}[/versions/1]/ready
    POST /v2/models/{m}[/versions/1]/infer  KServe v2 inference (JSON, or Triton's binary tensor extension)
    POST /models/{m}, POST /              Hugging Face task JSON: {"inputs": ...} -> decoded answers
    GET  /metrics                         Prometheus text format

KServe v2's inputs and outputs are kserve_v2.py's; with NEURONSERVE_GRPC_PORT the worker serves them over gRPC
too (grpc_service.py), from the same model and batcher.

Status codes: 400 malformed request, 404 unknown model, 413 more items than the queue holds, 422 input the model
cannot take (empty or over-long text, token ids out of range), 503 not ready or queue full (Retry-After), 504 no
answer within timeout_s.
"""
from __future__ import annotations

import gc
import logging
import os
import sys
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response

from neuronserve import __version__, tasks
from neuronserve.config import parse_core_list
from neuronserve.errors import ConfigError, NeuronserveError
from neuronserve.server import openai, tei
from neuronserve.server.batcher import ServeError
from neuronserve.server.grpc_service import GrpcService
from neuronserve.server.kserve_v2 import VERSION, KServeV2
from neuronserve.server.lifecycle import BOOT_ERROR, Lifecycle
from neuronserve.server.model import ServedModel
from neuronserve.server.protocol import HEADER_LENGTH, InferRequest, ProtocolError, TaskRequest, encode_response, \
    parse_infer_request
from neuronserve.server.router import APPLICATION_JSON, OCTET_STREAM, Answer, Call, Dispatch, Route, \
    starlette_routes
from neuronserve.server.settings import ServerSettings
from neuronserve.server.systemd_notify import Notifier

log = logging.getLogger("neuronserve.server")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(settings: ServerSettings | None = None, *, load=None) -> FastAPI:
    """The app for one group. Without `settings` (the worker's case) they come from NEURONSERVE_* and a start-up
    failure (bad environment, missing/damaged/wrong-backend artifact) is logged as one line and exits the worker
    with gunicorn's boot-error code; with `settings` the NeuronserveError is raised. `load` replaces the backend's
    loader (tests)."""
    from_env = settings is None
    try:
        if from_env:
            settings = ServerSettings.from_env()
        _setup_logging(settings.log_level)
        _pin(settings)
        model = ServedModel(settings, load=load)
        if from_env:
            _settle_gc()
    except NeuronserveError as e:
        if not from_env:
            raise
        _setup_logging(settings.log_level if settings else "info")
        log.error("cannot start%s: %s", f" {settings.group}" if settings else "", e)
        for h in log.handlers:
            h.flush()
        sys.exit(BOOT_ERROR)
    return build_app(model)


def _setup_logging(level: str) -> None:
    if not log.handlers:
        gunicorn = logging.getLogger("gunicorn.error").handlers
        if gunicorn:
            log.handlers = list(gunicorn)
        else:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"))
            log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper() if isinstance(logging.getLevelName(level.upper()), int) else logging.INFO)


def _settle_gc() -> None:
    """Tune the worker's cycle collector for serving (measured on a small model: 5 % of the worker's CPU).

    What start-up loaded lives as long as the worker: frozen, full collections skip it (each took about 100 ms
    over 250,000 objects). Requests free their objects by reference counting (test_app checks that they leave
    no cycles), so the young generation is collected after 10,000 net container allocations rather than 700,
    a count the objects of requests in flight alone reached 60 times a second."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _pin(settings: ServerSettings) -> None:
    """CPU affinity (before any thread starts, so every thread inherits it) and torch's intra-op threads."""
    if settings.cpus:
        try:
            os.sched_setaffinity(0, parse_core_list(settings.cpus))
        except (ValueError, OSError) as e:
            raise ConfigError(f"NEURONSERVE_CPUS={settings.cpus!r}: cannot pin the worker: {e}") from None
    import torch

    torch.set_num_threads(settings.threads)


def build_app(model: ServedModel) -> FastAPI:
    settings, manifest = model.settings, model.manifest

    v2 = KServeV2(model)
    lookup, metadata = v2.lookup, v2.metadata
    life = Lifecycle(model, GrpcService(v2, settings.grpc_port, settings.grpc_front) if settings.grpc_port else None,
                     Notifier.from_env())

    @asynccontextmanager
    async def lifespan(app):
        await life.startup()
        try:
            yield
        finally:
            await life.shutdown()

    app = App(title="neuronserve", version=__version__, lifespan=lifespan, default_response_class=JSONResponse,
              docs_url=None, redoc_url=None)
    app.state.model = model

    @app.get("/v2/health/live")
    async def live():
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def ready():
        if model.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "reason": model.reason}, status_code=503)

    @app.get("/v2")
    async def server_metadata():
        return JSONResponse({"name": "neuronserve", "version": __version__, "extensions": ["binary_tensor_data"]})

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None):
        try:
            lookup(name, version)
        except ServeError as e:
            return error(e.status, str(e))
        return JSONResponse(metadata)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None):
        try:
            lookup(name, version)
        except ServeError as e:
            return error(e.status, str(e))
        if model.ready:
            return JSONResponse({"name": name, "ready": True})
        return JSONResponse({"name": name, "ready": False, "reason": model.reason}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(model.metrics.render(), media_type=model.metrics.content_type)

    # ---------------------------------------------------------------- inference
    # Raw routes (router.py): the hot path skips FastAPI's dependency solving and Request/Response objects (about
    # half the event loop's CPU per request); `_document` puts them in /openapi.json all the same.

    async def infer_v2(call: Call) -> Answer:
        lookup(call.name, call.version)
        req, tensors = parse_infer_request(call.body, call.header(HEADER_LENGTH))
        outputs = await v2.infer(tensors, [o.name for o in req.outputs] if req.outputs else None, req.parameters,
                                 call.t0 + settings.timeout_s, call.disconnected)
        body, headers = encode_response(model.name, VERSION, req.id, outputs, req.binary_outputs())
        if headers:
            return 200, body, OCTET_STREAM, [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        return 200, body, APPLICATION_JSON, []

    async def infer_task(call: Call) -> Answer:
        if call.name is not None:
            lookup(call.name)
        request = tasks.parse(model.task, *_task_inputs(call.body), manifest)
        work = await model.infer(request.items, tokenize=True, options=request.options,
                                 deadline=call.t0 + settings.timeout_s, disconnected=call.disconnected)
        return 200, orjson.dumps(request.finish(work.answers), option=orjson.OPT_SERIALIZE_NUMPY), \
            APPLICATION_JSON, []

    routes = [Route("/v2/models/{name}/infer", infer_v2, summary="KServe v2 inference", body=InferRequest),
              Route("/v2/models/{name}/versions/{version}/infer", infer_v2, summary="KServe v2 inference",
                    body=InferRequest),
              Route("/models/{name}", infer_task, summary="Hugging Face task inference", body=TaskRequest),
              Route("/", infer_task, summary="Hugging Face task inference", body=TaskRequest)]
    routes += openai.register(app, model) + tei.register(app, model)
    app.routes_raw = routes
    app.router.routes.extend(starlette_routes(routes))
    app.openapi = lambda: _document(app, routes)
    return app


class App(FastAPI):
    """FastAPI whose inference routes (`routes_raw`, router.py) are dispatched inside the user middleware and
    outside FastAPI's own stack: on a small model FastAPI's routing costs as much event-loop CPU as the rest of a
    request, and middleware must see every request all the same."""

    routes_raw: list[Route] = []

    def build_middleware_stack(self):
        user, self.user_middleware = self.user_middleware, []
        try:
            app = Dispatch(self.routes_raw, super().build_middleware_stack(), self.state.model.metrics)
        finally:
            self.user_middleware = user
        for cls, args, kwargs in reversed(user):
            app = cls(app, *args, **kwargs)
        return app


TASK_KEYS = ("inputs", "parameters", "options")


def _task_inputs(body: bytes) -> tuple:
    """(inputs, parameters) of a task JSON body (TaskRequest), checked by hand: a pydantic model per request
    costs more than the rest of the route. Other keys at the top level are parameters too: InferenceClient's
    feature_extraction sends `normalize` and `truncate` there, as text-embeddings-inference takes them."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"invalid request: body: expected a JSON object, got {_json_type(data)}")
    problems = [] if "inputs" in data else ["inputs: field required"]
    problems += [f"{k}: expected an object, got {_json_type(data[k])}" for k in TASK_KEYS[1:]
                 if data.get(k) is not None and not isinstance(data[k], dict)]
    if problems:
        raise ProtocolError(f"invalid request: {'; '.join(problems)}")
    parameters = data.get("parameters")
    if len(data) > 1 + ("parameters" in data) + ("options" in data):
        parameters = {**(parameters or {}), **{k: v for k, v in data.items() if k not in TASK_KEYS}}
    return data["inputs"], parameters


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _document(app: FastAPI, routes: list[Route]) -> dict:
    """FastAPI's OpenAPI schema plus the raw inference routes: path parameters and the JSON body each parses
    (binary KServe bodies are the same JSON followed by raw tensors)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    ref = "#/components/schemas/{model}"
    for body in dict.fromkeys(r.body for r in routes):     # in route order: the same document every time
        doc = body.model_json_schema(ref_template=ref)
        components.update(doc.pop("$defs", {}))
        components[body.__name__] = doc
    for route in routes:
        names = [p for p in ("name", "version") if "{%s}" % p in route.path]
        v2 = route.body is InferRequest
        operation = route.path.strip("/").replace("{", "").replace("}", "").replace("/", "_") or "root"
        schema["paths"].setdefault(route.path, {})["post"] = {
            "summary": route.summary,
            "operationId": "infer_" + operation,
            "parameters": [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in names]
            + ([{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                 "schema": {"type": "string"}}] if v2 else []),
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "$ref": ref.format(model=route.body.__name__)}}}},
            "responses": {code: {"description": what} for code, what in RESPONSES.items()},
        }
    app.openapi_schema = schema
    return schema


RESPONSES = {"200": "the answers", "400": "malformed request", "404": "unknown model or version",
             "413": "more items than the queue holds", "422": "input the model cannot take",
             "499": "the client disconnected", "503": "not ready or queue full (Retry-After)",
             "504": "no answer within timeout_s"}
