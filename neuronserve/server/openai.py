"""The OpenAI-compatible embeddings API (what LangChain, LlamaIndex, Haystack and the `openai` SDK call):

    POST /v1/embeddings, /models/{name}/v1/embeddings    {"input", "model", "encoding_format", "dimensions"}
    GET  /v1/models, /models/{name}/v1/models            the served model

`input` is a string, a list of strings, a list of token ids (the model's own tokenizer's, special tokens added
as it adds them) or a list of such lists; `encoding_format` "float" or "base64" (little-endian float32, what the
SDK asks for by default); `dimensions` only as the model's own width (none of these models is trained to be cut
shorter). Usage counts the model's tokens. Errors are OpenAI's object: {"error": {"message", "type", "param",
"code"}}. Only feature-extraction models answer; the others get a 404 naming their task.
"""
from __future__ import annotations

import base64
import time

import numpy as np
import orjson
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from neuronserve import tasks
from neuronserve.server.batcher import ServeError
from neuronserve.server.protocol import ProtocolError, parse_json
from neuronserve.server.router import APPLICATION_JSON, Answer, Call, Route
from neuronserve.tasks.encoding import special_tokens

EMBEDDINGS = "feature-extraction"
CREATED = int(time.time())      # when this group started: the model's `created` in /v1/models
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 504: "server_error"}


class EmbeddingsRequest(BaseModel):
    """OpenAI's CreateEmbeddingRequest."""

    model_config = ConfigDict(extra="forbid")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, texts, token ids of the model's tokenizer, or lists of them")
    model: str = Field(description="the served model's name")
    encoding_format: str = Field("float", description="float, or base64 (little-endian float32)")
    dimensions: int | None = Field(None, ge=1, description="only the model's own embedding width")
    user: str | None = Field(None, description="accepted, not used")


def error(status: int, message: str) -> bytes:
    """OpenAI's error object; a 404 is about the `model` the request named."""
    missing = status == 404
    return orjson.dumps({"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                                   "param": "model" if missing else None,
                                   "code": "model_not_found" if missing else None}})


def register(app, model) -> list[Route]:
    """Add GET /v1/models (and under the model's prefix) to the FastAPI `app`; the POST routes for the router."""
    listing = {"object": "list", "data": [{"id": model.name, "object": "model", "created": CREATED,
                                           "owned_by": "neuronserve"}]}
    specials = special_tokens(model.tokenizer)      # put around token id inputs, as around text

    @app.get("/v1/models")
    @app.get("/models/{name}/v1/models")
    async def models(name: str | None = None):
        if name not in (None, model.name):
            return Response(error(404, _unknown(name, model.name)), 404, media_type="application/json")
        return Response(orjson.dumps(listing), media_type="application/json")

    async def embeddings(call: Call) -> Answer:
        req = parse_json(call.body, EmbeddingsRequest)
        for named in (call.name, req.model):
            if named is not None and named != model.name:
                raise ServeError(404, _unknown(named, model.name))
        if model.task != EMBEDDINGS:
            raise ServeError(404, f"{model.name} is a {model.task} model; /v1/embeddings answers "
                                  f"{EMBEDDINGS} models")
        if req.encoding_format not in ("float", "base64"):
            raise ProtocolError(f"encoding_format: 'float' or 'base64', not {req.encoding_format!r}")
        width = len(model.manifest.warmup.expected["embeddings"][0])
        if req.dimensions is not None and req.dimensions != width:
            raise ProtocolError(f"dimensions: {model.name} gives {width}-dimensional embeddings and is not trained "
                                f"to be cut shorter; leave dimensions out or send {width}")
        deadline = call.t0 + model.settings.timeout_s
        options = tasks.get(EMBEDDINGS).defaults
        if req.input == []:
            raise ProtocolError("input: an empty list")
        if _is_tokens(req.input):
            items = _token_items(model, req.input, specials)
            work = await model.infer(items, tokenize=False, options=options, deadline=deadline,
                                     disconnected=call.disconnected)
        else:
            request = tasks.parse(EMBEDDINGS, req.input, None, model.manifest)
            work = await model.infer(request.items, tokenize=True, options=request.options, deadline=deadline,
                                     disconnected=call.disconnected)
        tokens = sum(item.length for item in work.items)
        if req.encoding_format == "base64":
            vectors = [base64.b64encode(np.asarray(a, dtype="<f4").tobytes()).decode() for a in work.answers]
        else:
            vectors = work.answers
        body = {"object": "list", "model": model.name,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return 200, orjson.dumps(body), APPLICATION_JSON, []

    return [Route(path, embeddings, error=error, summary="OpenAI embeddings", body=EmbeddingsRequest)
            for path in ("/v1/embeddings", "/models/{name}/v1/embeddings")]


def _unknown(name: str, served: str) -> str:
    return f"The model {name!r} does not exist here; this server serves {served!r}"


def _is_tokens(value) -> bool:
    return isinstance(value, list) and bool(value) and not isinstance(value[0], str)


def _token_items(model, value: list, specials: tuple[list[int], list[int]]) -> list[tasks.Encoded]:
    """Token id inputs -> unpadded items, `specials` (the ids before and after a text's tokens) around them."""
    rows = value if isinstance(value[0], list) else [value]
    vocab, max_seq = len(model.tokenizer), model.batcher.max_seq
    before, after = specials
    room = max_seq - len(before) - len(after)
    items = []
    for i, ids in enumerate(rows):
        if not ids:
            raise ProtocolError(f"input[{i}]: no token ids")
        if min(ids) < 0 or max(ids) >= vocab:
            raise tasks.BadInput(f"input[{i}]: token ids must lie in 0..{vocab - 1} (the model's vocabulary)")
        if len(ids) > room and not model.settings.truncation:
            raise tasks.BadInput(f"input[{i}]: {len(ids) + max_seq - room} tokens, longer than the largest "
                                 f"sequence bucket ({max_seq})")
        full = np.asarray(before + ids[:room] + after, dtype=np.int64)
        items.append(tasks.Encoded({"input_ids": full, "attention_mask": np.ones_like(full),
                                    "token_type_ids": np.zeros_like(full)}, len(full)))
    return items
