"""The inference routes of every dialect, in one table the app dispatches inside its user middleware.

Every POST that runs the model (KServe v2, Hugging Face task JSON, OpenAI embeddings, text-embeddings-inference)
is a raw ASGI route: the handler gets the whole body and returns (status, body, content type, headers), and the
route turns errors into the dialect's own error body. `Dispatch` finds a route by one dict lookup on the path's
shape (/models/{name}/..., /v2/models/{name}/...): FastAPI's router, dependency solving and Request/Response
objects cost as much event-loop CPU per request as the rest of the request on a small model. Middleware added to
the app (auth, tracing, CORS) wraps `Dispatch`, so it sees inference too; FastAPI's own stack serves the rest
(health, metadata, metrics, the OpenAPI document).
"""
from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable, NamedTuple

import orjson
from starlette.routing import Route as StarletteRoute

from neuronserve import tasks
from neuronserve.server.batcher import ServeError
from neuronserve.server.protocol import ProtocolError

log = logging.getLogger("neuronserve.server")

# (status, body, content type, extra headers) of an answer
Answer = tuple[int, bytes, bytes, list]
APPLICATION_JSON, OCTET_STREAM = b"application/json", b"application/octet-stream"


class Call(NamedTuple):
    """One request, as a handler sees it."""

    t0: float               # time.monotonic() at its first byte
    scope: dict
    body: bytes
    name: str | None        # the model the path names; None at the root
    version: str | None     # KServe v2's /versions/{version}
    receive: Callable

    def header(self, name: str) -> str | None:
        """The request header `name` (lower case)."""
        key = name.encode()
        for k, v in self.scope["headers"]:
            if k == key:
                return v.decode("latin-1")
        return None

    async def disconnected(self) -> None:
        """Returns once the client closed the connection (the body was read already: the next message is that)."""
        try:
            while (await self.receive())["type"] != "http.disconnect":
                pass
        except Exception:   # a receive that fails has lost its connection too
            pass


Handler = Callable[[Call], Awaitable[Answer]]


def plain_error(status: int, message: str) -> bytes:
    """KServe v2's and the task JSON's error body."""
    return orjson.dumps({"error": message})


class Route(NamedTuple):
    path: str                # "/models/{name}/embed", "/v2/models/{name}/infer", "/v1/embeddings", ...
    handler: Handler
    error: Callable[[int, str], bytes] = plain_error     # (status, message) -> the dialect's error body
    summary: str = ""        # the OpenAPI operation's
    body: type | None = None  # the pydantic model the OpenAPI document shows for the body


def shape(path: str) -> tuple[str, str | None, str | None]:
    """(the route path a request path has, the model it names, the version it names)."""
    if path.startswith("/models/"):
        name, sep, tail = path[8:].partition("/")
        if name:
            return ("/models/{name}/" + tail if sep else "/models/{name}"), name, None
    elif path.startswith("/v2/models/"):
        parts = path[11:].split("/")
        if len(parts) == 2 and parts[0]:
            return "/v2/models/{name}/" + parts[1], parts[0], None
        if len(parts) == 4 and parts[0] and parts[1] == "versions":
            return "/v2/models/{name}/versions/{version}/" + parts[3], parts[0], parts[2]
    return path, None, None


class Dispatch:
    """The ASGI app inside the user middleware: POSTs to an inference route run it, the rest go to `inner`."""

    def __init__(self, routes: list[Route], inner, metrics):
        self.metrics = metrics
        self.table = {r.path: self._asgi(r) for r in routes}
        self.inner = inner

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path, name, version = shape(scope["path"])
            app = self.table.get(path)
            if app is not None:
                return await app(scope, receive, send, name, version)
        await self.inner(scope, receive, send)

    def _asgi(self, route: Route):
        """Run `route`: errors become their status and the dialect's error body, every answer is counted and
        timed, and the in-flight gauge covers the request from its first byte to its answer."""
        handler, error, metrics = route.handler, route.error, self.metrics

        async def asgi(scope, receive, send, name, version) -> None:
            t0 = time.monotonic()
            metrics.in_flight.inc()
            headers = []
            try:
                body = await _body(receive)
                status, body, content_type, headers = await handler(Call(t0, scope, body, name, version, receive))
            except Exception as e:
                status, message, retry_after = status_of(e)
                body, content_type = error(status, message), APPLICATION_JSON
                if retry_after:
                    headers = [(b"retry-after", b"%d" % retry_after)]
            finally:
                metrics.in_flight.dec()
            metrics.request(status, time.monotonic() - t0)
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", content_type), (b"content-length", b"%d" % len(body)),
                                    *headers]})
            await send({"type": "http.response.body", "body": body})

        return asgi


def status_of(e: Exception) -> tuple[int, str, int | None]:
    """(HTTP status, message for the client, Retry-After) of a failed request."""
    if isinstance(e, ServeError):
        return e.status, str(e), e.retry_after
    if isinstance(e, (ProtocolError, tasks.BadParameter)):
        return 400, str(e), None
    if isinstance(e, tasks.BadInput):
        return 422, str(e), None
    log.exception("unexpected error")       # a bug: answer, log the traceback, keep the worker
    return 500, f"internal error: {type(e).__name__}: {e}", None


async def _body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ServeError(499, "client disconnected")
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def starlette_routes(routes: list[Route]) -> list[StarletteRoute]:
    """The routes for FastAPI's router too: a GET on them is a 405 there, as for any POST route."""
    async def unreachable(scope, receive, send):    # POSTs never get past Dispatch
        raise AssertionError("dispatched before the router")

    out = []
    for r in routes:
        route = StarletteRoute(r.path, unreachable, methods=["POST"])
        route.app = unreachable
        out.append(route)
    return out
