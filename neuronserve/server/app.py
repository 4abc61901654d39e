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

KServe v2 inputs are either token tensors (INT64 input_ids [n, s], optional attention_mask and token_type_ids
of the same shape) or text: one BYTES input of n strings (question-answering: n JSON objects
'{"question": ..., "context": ...}', or two BYTES inputs named question and context). Outputs: the model's raw
FP32 tensors named as manifest.output_names and, for text, a BYTES "answer" holding each item's decoded answer
as a JSON string.

Status codes: 400 malformed request, 404 unknown model, 413 more items than the queue holds, 422 input the model
cannot take (empty or over-long text, token ids out of range), 503 not ready or queue full (Retry-After), 504 no
answer within timeout_s.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import time
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.routing import Route

from neuronserve import __version__, tasks
from neuronserve.config import parse_core_list
from neuronserve.errors import ConfigError, NeuronserveError
from neuronserve.server.batcher import ServeError
from neuronserve.server.model import ServedModel
from neuronserve.server.protocol import HEADER_LENGTH, InferRequest, ProtocolError, TaskRequest, encode_response, \
    parse_infer_request
from neuronserve.server.settings import ServerSettings

log = logging.getLogger("neuronserve.server")

BOOT_ERROR = 3      # gunicorn's WORKER_BOOT_ERROR: the master stops (and systemd sees the unit fail) instead of
                    # respawning a worker that cannot start
VERSION = "1"       # a group serves one compiled version of its model
ANSWER = "answer"   # the BYTES output carrying decoded answers for text inputs


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
    spec = tasks.get(model.task)

    @asynccontextmanager
    async def lifespan(app):
        model.start(asyncio.get_running_loop())
        log.info("%s: serving %s (%s, %s) from %s with %d copies x %d threads, buckets %s", settings.group,
                 model.name, model.task, settings.backend, settings.model_dir, settings.copies, settings.threads,
                 " ".join(f"{b.batch}x{b.seq}" for b in manifest.buckets))
        try:
            yield
        finally:
            model.close()

    app = App(title="neuronserve", version=__version__, lifespan=lifespan, default_response_class=JSONResponse,
              docs_url=None, redoc_url=None)
    app.state.model = model

    def lookup(name: str, version: str | None = None) -> ServedModel:
        if name != model.name:
            raise ServeError(404, f"unknown model {name!r}; this server serves {model.name!r}")
        if version not in (None, VERSION):
            raise ServeError(404, f"unknown version {version!r} of {name!r}; it has version {VERSION}")
        return model

    # ---------------------------------------------------------------- health and metadata

    text_inputs = list(spec.pair_names or ())
    metadata = {
        "name": model.name, "versions": [VERSION], "platform": f"neuronserve_{settings.backend}",
        "inputs": [{"name": n, "datatype": "INT64", "shape": [-1, -1]} for n in manifest.input_names]
        + [{"name": n, "datatype": "BYTES", "shape": [-1]} for n in ["text"] + text_inputs],
        "outputs": [{"name": n, "datatype": "FP32", "shape": _output_shape(manifest, n, spec.per_token)}
                    for n in manifest.output_names] + [{"name": ANSWER, "datatype": "BYTES", "shape": [-1]}],
        "parameters": {"task": model.task, "group": settings.group, "copies": settings.copies,
                       "buckets": [[b.batch, b.seq] for b in manifest.buckets], "labels": manifest.labels,
                       "architecture": manifest.architecture, "task_parameters": list(spec.parameters)},
    }


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
    # Raw ASGI routes: the hot path skips FastAPI's dependency solving and Request/Response objects (about half
    # the event loop's CPU per request); `_document` puts them in /openapi.json all the same.

    async def infer_v2(t0: float, scope, body: bytes, name: str, version: str | None, disconnected) -> Answer:
        lookup(name, version)
        req, tensors = parse_infer_request(body, _header(scope, HEADER_LENGTH))
        text = {n: t for n, t in tensors.items() if t.dtype == object}
        if text and len(text) != len(tensors):
            raise ProtocolError("send either text (BYTES) or token tensors (INT64), not both")
        available = list(manifest.output_names) + ([ANSWER] if text else [])
        wanted = [o.name for o in req.outputs] if req.outputs else available
        unknown = [n for n in wanted if n not in available]
        if unknown:
            raise ProtocolError(f"unknown output(s) {', '.join(unknown)}; this request can have "
                                f"{', '.join(available)}")
        request = None
        if text:
            parameters = {k: v for k, v in (req.parameters or {}).items() if k not in V2_PARAMETERS}
            request = tasks.parse(model.task, _texts(text, spec.pair_names), parameters, manifest)
            work = await model.infer(request.items, tokenize=True, options=request.options,
                                     deadline=t0 + settings.timeout_s, disconnected=disconnected)
        else:
            work = await model.infer(model.tensor_items(tensors), tokenize=False, options=None,
                                     deadline=t0 + settings.timeout_s, disconnected=disconnected)
        outputs = model.outputs(work)
        if request is not None:
            finished = request.finish(work.answers)     # one answer per input
            answers = np.empty(len(finished), dtype=object)
            answers[:] = [orjson.dumps(a).decode() for a in finished]
            outputs[ANSWER] = answers
        body, headers = encode_response(model.name, VERSION, req.id, {n: outputs[n] for n in wanted},
                                        req.binary_outputs())
        if headers:
            return 200, body, OCTET_STREAM, [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        return 200, body, APPLICATION_JSON, []

    async def infer_task(t0: float, scope, body: bytes, name: str, version: None, disconnected) -> Answer:
        lookup(name)
        request = tasks.parse(model.task, *_task_inputs(body), manifest)
        work = await model.infer(request.items, tokenize=True, options=request.options,
                                 deadline=t0 + settings.timeout_s, disconnected=disconnected)
        return 200, orjson.dumps(request.finish(work.answers), option=orjson.OPT_SERIALIZE_NUMPY), \
            APPLICATION_JSON, []

    def route(handler):
        """An ASGI app running `handler`: errors become their status + {"error": message}, every answer is
        counted and timed, and the in-flight gauge covers the request from its first byte to its answer."""
        async def asgi(scope, receive, send) -> None:
            t0 = time.monotonic()
            model.metrics.in_flight.inc()
            try:
                params = scope["path_params"]
                body = await _body(receive)
                answer = await handler(t0, scope, body, params.get("name", model.name), params.get("version"),
                                       lambda: _client_gone(receive))
            except ServeError as e:
                answer = _error(e.status, str(e), e.retry_after)
            except (ProtocolError, tasks.BadParameter) as e:
                answer = _error(400, str(e))
            except tasks.BadInput as e:
                answer = _error(422, str(e))
            except Exception as e:  # a bug: answer, log the traceback, keep the worker
                log.exception("unexpected error")
                answer = _error(500, f"internal error: {type(e).__name__}: {e}")
            finally:
                model.metrics.in_flight.dec()
            status, body, content_type, headers = answer
            model.metrics.request(status, time.monotonic() - t0)
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", content_type), (b"content-length", b"%d" % len(body)),
                                    *headers]})
            await send({"type": "http.response.body", "body": body})

        return asgi

    hot = [("/v2/models/{name}/infer", infer_v2), ("/v2/models/{name}/versions/{version}/infer", infer_v2),
           ("/models/{name}", infer_task), ("/", infer_task)]
    app.hot = [RawRoute(path, route(handler)) for path, handler in hot]
    app.router.routes.extend(app.hot)       # also there: a GET on them is a 405, as for any POST route
    app.openapi = lambda: _document(app, [path for path, _ in hot])
    return app


class App(FastAPI):
    """FastAPI, with the inference routes (`hot`) dispatched before its middleware, telemetry check and router:
    on a small model these cost as much event-loop CPU as the rest of the request."""

    hot: list[RawRoute] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            for route in self.hot:
                match = route.path_regex.match(path)
                if match:
                    scope["app"] = self
                    scope["path_params"] = match.groupdict()
                    return await route.app(scope, receive, send)
        await super().__call__(scope, receive, send)


class RawRoute(Route):
    """POST `path` served by `asgi`, an ASGI function (Starlette would wrap a function as request -> response)."""

    def __init__(self, path: str, asgi):
        super().__init__(path, asgi, methods=["POST"])
        self.app = asgi


# (status, body, content-type, extra headers) of a hot route's answer
Answer = tuple[int, bytes, bytes, list]
APPLICATION_JSON, OCTET_STREAM = b"application/json", b"application/octet-stream"


def _error(status: int, message: str, retry_after: int | None = None) -> Answer:
    headers = [(b"retry-after", str(retry_after).encode())] if retry_after else []
    return status, orjson.dumps({"error": message}), APPLICATION_JSON, headers


async def _body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ServeError(499, "client disconnected")
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _client_gone(receive) -> None:
    """Returns once the client closed the connection (the body was read already: the next message is that)."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:   # a receive that fails has lost its connection too
        pass


def _header(scope, name: str) -> str | None:
    key = name.encode()
    for k, v in scope["headers"]:
        if k == key:
            return v.decode("latin-1")
    return None


TASK_KEYS = ("inputs", "parameters", "options")
# KServe v2 / Triton request parameters that are the protocol's, not the task's
V2_PARAMETERS = frozenset({"binary_data_output", "sequence_id", "sequence_start", "sequence_end", "priority",
                           "timeout", "headers"})


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


def _document(app: FastAPI, hot: list[str]) -> dict:
    """FastAPI's OpenAPI schema plus the raw inference routes: path parameters and the JSON body each parses
    (binary KServe bodies are the same JSON followed by raw tensors)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    ref = "#/components/schemas/{model}"
    for body in (InferRequest, TaskRequest):
        doc = body.model_json_schema(ref_template=ref)
        components.update(doc.pop("$defs", {}))
        components[body.__name__] = doc
    for path in hot:
        v2 = path.endswith("/infer")
        names = [p for p in ("name", "version") if "{%s}" % p in path]
        body = InferRequest if v2 else TaskRequest
        schema["paths"].setdefault(path, {})["post"] = {
            "summary": "KServe v2 inference" if v2 else "Hugging Face task inference",
            "operationId": "infer_" + "_".join(["v2" if v2 else "task"] + names),
            "parameters": [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in names]
            + ([{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                 "schema": {"type": "string"}}] if v2 else []),
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "$ref": ref.format(model=body.__name__)}}}},
            "responses": {code: {"description": what} for code, what in RESPONSES.items()},
        }
    app.openapi_schema = schema
    return schema


RESPONSES = {"200": "the answers", "400": "malformed request", "404": "unknown model or version",
             "413": "more items than the queue holds", "422": "input the model cannot take",
             "499": "the client disconnected", "503": "not ready or queue full (Retry-After)",
             "504": "no answer within timeout_s"}


def _texts(text: dict[str, np.ndarray], pair_names: tuple[str, str] | None) -> list:
    """BYTES inputs -> the `inputs` tasks.parse takes: one input's strings, or two inputs named as the task's pair
    (question and context, text and text_pair) zipped into pairs."""
    if pair_names and set(text) == set(pair_names):
        a, b = (text[n].ravel() for n in pair_names)
        if a.size != b.size:
            raise ProtocolError(f"{pair_names[0]} has {a.size} elements, {pair_names[1]} {b.size}: they pair up "
                                "one to one")
        return [dict(zip(pair_names, p)) for p in zip(a.tolist(), b.tolist())]
    if len(text) != 1:
        also = f" (or two named {' and '.join(pair_names)})" if pair_names else ""
        raise ProtocolError(f"text goes in one BYTES input{also}; got {', '.join(sorted(text))}")
    return next(iter(text.values())).ravel().tolist()


def _output_shape(manifest, name: str, per_token: bool) -> list[int]:
    """[-1 (items), -1 (tokens) if per token, then the fixed sizes], from the warm-up's expected rows."""
    rows = manifest.warmup.expected.get(name) if manifest.warmup else None
    if not rows:
        return [-1, -1]
    shape = list(np.asarray(rows[0]).shape)
    return [-1, -1, *shape[1:]] if per_token else [-1, *shape]
