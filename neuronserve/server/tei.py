"""Hugging Face text-embeddings-inference (TEI) routes: a client written for TEI needs only a new base URL.

    POST /embed /embed_all /similarity /rerank /predict /tokenize /decode
    GET  /info /health
    each also under /models/{name}/ (the model this group serves)

Bodies, answers and errors follow TEI's router (router/src/http/types.rs and server.rs). An error is
{"error": message, "error_type": kind} with TEI's status for its kind: Empty 400 (an empty batch), Validation 413
(TEI's status for every validation error: batch too large, empty or over-long text, prompt_name), Tokenizer 422,
Backend 424 (the model cannot do what the route asks), Overloaded 429 (the queue is full; Retry-After), Unhealthy
503 (not ready). A body TEI cannot deserialize is 400 (not JSON) or 422 (wrong shape), kind Validation: the
statuses TEI's web framework answers, here in TEI's error shape. Unknown keys are ignored, as TEI ignores them.

What each model answers, by the model type /info reports:
- embedding (feature-extraction): /embed, /similarity, and /rerank as the cosine similarity of the query and each
  text (an extension: TEI reranks with cross-encoders only). /embed_all is refused (424): the compiled artifact
  outputs the pooled embedding, not the per-token ones.
- reranker (text-classification with one label, a cross-encoder): /rerank scores each (query, text) pair, the
  sigmoid of its logit unless raw_scores; /predict.
- classifier (text-classification with several labels): /predict, softmax unless raw_scores; /rerank is refused
  (424) as TEI refuses it.
- a model of any other task ({"other": {"task"}}, an extension): /tokenize, /decode, /info and /health; the
  inference routes refuse it (424).
Token ids in /embed's inputs are the whole sequence, special tokens included, as TEI takes them.
Where it differs from TEI: prompt_name is refused (413) as TEI refuses it for a model without sentence-transformers
prompts (the artifact keeps none); /decode refuses ids outside the vocabulary (422), which TEI's tokenizer drops;
text that is only whitespace is refused (413) as the task JSON route refuses it.
"""
from __future__ import annotations

import asyncio
from typing import Literal

import numpy as np
import orjson
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from neuronserve import __version__, tasks
from neuronserve.server.batcher import ServeError
from neuronserve.server.router import APPLICATION_JSON, Answer, Call, Route
from neuronserve.tasks.encoding import rust_tokenizer

EMBEDDING, CLASSIFICATION = "feature-extraction", "text-classification"
EMPTY, VALIDATION, TOKENIZER, BACKEND, OVERLOADED, UNHEALTHY = \
    "Empty", "Validation", "Tokenizer", "Backend", "Overloaded", "Unhealthy"
STATUS = {EMPTY: 400, VALIDATION: 413, TOKENIZER: 422, BACKEND: 424, OVERLOADED: 429, UNHEALTHY: 503}
KIND = {status: kind for kind, status in STATUS.items()}
POOLING = {"lasttoken": "last_token"}     # TEI's name where it differs from the manifest's
DIRECTIONS = ("left", "right")
UNDESERIALIZABLE = "Failed to deserialize the JSON body into the target type"     # TEI's framework says so


# ---------------------------------------------------------------- request bodies (the OpenAPI document's)

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Truncation(_Body):
    truncate: bool | None = Field(None, description="cut text longer than max_input_length, or refuse it "
                                  "(null: as auto_truncate in /info says)")
    truncation_direction: Literal["Left", "Right"] = "Right"


class TeiEmbedAllRequest(_Truncation):
    inputs: str | list[int] | list[str | list[int]] = Field(
        description="a text, token ids (the whole sequence: special tokens included), or a list of those")
    prompt_name: str | None = Field(None, description="refused: the model keeps no sentence-transformers prompts")


class TeiEmbedRequest(TeiEmbedAllRequest):
    normalize: bool = True


class TeiSimilarityInput(_Body):
    source_sentence: str
    sentences: list[str]


class TeiSimilarityParameters(_Truncation):
    prompt_name: str | None = Field(None, description="refused: the model keeps no sentence-transformers prompts")


class TeiSimilarityRequest(_Body):
    inputs: TeiSimilarityInput
    parameters: TeiSimilarityParameters | None = None


class TeiRerankRequest(_Truncation):
    query: str
    texts: list[str]
    raw_scores: bool = Field(False, description="the cross-encoder's logit, not its sigmoid")
    return_text: bool = False


class TeiPredictRequest(_Truncation):
    inputs: str | list[str] | list[list[str]] = Field(
        description="a text, a pair [text, text_pair], or a batch of those, each as a list: [[text], [a, b]]")
    raw_scores: bool = Field(False, description="the logits, not their softmax (sigmoid for one label)")


class TeiTokenizeRequest(_Body):
    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = Field(None, description="refused: the model keeps no sentence-transformers prompts")


class TeiDecodeRequest(_Body):
    ids: list[int] | list[list[int]]
    skip_special_tokens: bool = True


# ---------------------------------------------------------------- errors

class TeiError(Exception):
    """A refusal of TEI's `kind`; `status` defaults to TEI's for the kind."""

    def __init__(self, kind: str, message: str, status: int | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.kind, self.status, self.retry_after = kind, status or STATUS[kind], retry_after


def error_body(kind: str, message: str) -> bytes:
    return orjson.dumps({"error": message, "error_type": kind})


def _kind(status: int) -> str:
    return KIND.get(status, BACKEND if status >= 500 else VALIDATION)


def error(status: int, message: str) -> bytes:
    """The route's error body for what escaped its handler (a client gone mid-body, a bug): TEI's kind for the
    status."""
    return error_body(_kind(status), message)


def _translated(e: Exception, model) -> TeiError:
    """The serving path's refusals as TEI's."""
    if isinstance(e, TeiError):
        return e
    if isinstance(e, tasks.BadInput):       # text or parameters the task refuses: TEI validates those
        return TeiError(VALIDATION, str(e))
    if e.status == 503:      # not ready, or the queue is full (TEI's limit on concurrent requests)
        return TeiError(OVERLOADED if model.ready else UNHEALTHY, str(e), retry_after=e.retry_after)
    if e.status in (413, 422):      # more items than the queue holds; text longer than every bucket
        return TeiError(VALIDATION, str(e))
    if e.status == 500:     # the inference failed
        return TeiError(BACKEND, str(e))
    return TeiError(_kind(e.status), str(e), e.status, e.retry_after)


def _undeserializable(field: str, expected: str, value) -> TeiError:
    got = "nothing" if value is None else orjson.dumps(value).decode()
    return TeiError(VALIDATION, f"{UNDESERIALIZABLE}: `{field}`: expected {expected}, got "
                                f"{got if len(got) <= 80 else got[:77] + '...'}", 422)


# ---------------------------------------------------------------- reading bodies

def _object(body: bytes) -> dict:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise TeiError(VALIDATION, f"Failed to parse the request body as JSON: {e}", 400) from None
    if not isinstance(data, dict):
        raise _undeserializable("body", "a JSON object", data)
    return data


def _flag(data: dict, key: str, default: bool | None) -> bool | None:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _undeserializable(key, "true or false", value)
    return value


def _direction(data: dict) -> str:
    value = data.get("truncation_direction")
    if value is None:
        return "right"      # TEI's default, whatever the tokenizer's own side
    if not isinstance(value, str) or value.lower() not in DIRECTIONS:
        raise _undeserializable("truncation_direction", '"Left" or "Right"', value)
    return value.lower()


def _strings(data: dict, key: str) -> list[str]:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _undeserializable(key, "a list of strings", value)
    return value


def _string(data: dict, key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise _undeserializable(key, "a string", value)
    return value


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)


def _no_prompt(data: dict) -> None:
    name = data.get("prompt_name")
    if name is not None:
        raise TeiError(VALIDATION, f"`prompt_name` is set to {orjson.dumps(name).decode()} but no prompts were "
                                   "found in the Sentence Transformers configuration: this model's artifact "
                                   "keeps none")


def _filled(values: list, what: str = "inputs") -> None:
    if any(len(v) == 0 for v in values):
        raise TeiError(VALIDATION, f"`{what}` cannot be empty")


def _predict_inputs(value) -> tuple[list, bool]:
    """(task items, one input?) of TEI's PredictInput: a text, a pair [a, b], or a batch [[a], [a, b], ...]."""
    def item(texts: list):
        return texts[0] if len(texts) == 1 else {"text": texts[0], "text_pair": texts[1]}

    if isinstance(value, str):
        return [value], True
    if isinstance(value, list) and value:
        if len(value) <= 2 and all(isinstance(v, str) for v in value):
            return [item(value)], True
        if all(isinstance(v, list) and 1 <= len(v) <= 2 and all(isinstance(s, str) for s in v) for v in value):
            return [item(v) for v in value], False
    raise _undeserializable("inputs", "a string, a pair of strings [string, string] or a batch of mixed strings "
                                      "and pairs [[string], [string, string], ...]", value)


def _ranked(entries: list[dict]) -> list[dict]:
    """Best score first, ties as TEI orders them (a stable sort ascending, reversed)."""
    entries.sort(key=lambda e: e["score"])
    entries.reverse()
    return entries


def _json(body) -> Answer:
    return 200, orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), APPLICATION_JSON, []


# ---------------------------------------------------------------- the routes

def register(app, model) -> list[Route]:
    """Add GET /info and /health (and their /models/{name}/ twins) to the FastAPI `app`; the POST routes for the
    router."""
    manifest, settings = model.manifest, model.settings
    max_seq, vocab, max_items = model.batcher.max_seq, model.vocab_size, settings.max_queue
    classes = len(manifest.warmup.expected["logits"][0]) if model.task == CLASSIFICATION else 0
    # the tokenizer /tokenize and /decode use, as TEI configures its own: no padding, no truncation
    rust = rust_tokenizer(model.tokenizer)
    info = {
        "model_id": manifest.source, "model_sha": None, "model_dtype": manifest.dtype,
        "model_type": _model_type(model.task, manifest, classes),
        # a request's items wait in the queue: max_queue bounds both the items in flight and one request's
        "max_concurrent_requests": max_items, "max_input_length": max_seq,
        "max_batch_tokens": max(b.batch * b.seq for b in manifest.buckets),
        "max_batch_requests": model.batcher.max_batch, "max_client_batch_size": max_items,
        "auto_truncate": settings.truncation, "tokenization_workers": 1, "version": __version__, "sha": None,
        "docker_label": None,
    }

    def unknown(name: str) -> TeiError:
        return TeiError(VALIDATION, f"unknown model {name!r}; this server serves {model.name!r}", 404)

    def refused(e: TeiError) -> Response:
        return Response(error_body(e.kind, str(e)), e.status, media_type="application/json")

    @app.get("/info")
    @app.get("/models/{name}/info")
    async def get_info(name: str | None = None):
        if name not in (None, model.name):
            return refused(unknown(name))
        return Response(orjson.dumps(info), media_type="application/json")

    @app.get("/health")
    @app.get("/models/{name}/health")
    async def health(name: str | None = None):
        if name not in (None, model.name):
            return refused(unknown(name))
        if not model.ready:
            return refused(TeiError(UNHEALTHY, f"unhealthy: {model.reason}"))
        return Response(status_code=200)

    def answering(handler):
        """The handler, its refusals in TEI's error shape and status."""
        async def answer(call: Call) -> Answer:
            try:
                if call.name not in (None, model.name):
                    raise unknown(call.name)
                return await handler(call)
            except (TeiError, ServeError, tasks.BadInput) as e:
                e = _translated(e, model)
                headers = [(b"retry-after", b"%d" % e.retry_after)] if e.retry_after else []
                return e.status, error_body(e.kind, str(e)), APPLICATION_JSON, headers
        return answer

    def at_most(n: int) -> None:
        if n > max_items:
            raise TeiError(VALIDATION, f"batch size {n} > maximum allowed batch size {max_items}")

    def embedding_model() -> None:
        if model.task != EMBEDDING:
            raise TeiError(BACKEND, "Model is not an embedding model")

    def parameters(truncate: bool | None, **more) -> dict:
        """Task parameters; truncation only when asked (else the server's own: auto_truncate)."""
        return more if truncate is None else {**more, "truncation": truncate}

    async def infer(call: Call, request: tasks.Request, direction: str, items: list | None = None):
        """The request's answer body: its items tokenized on the way to the queue, or `items` already encoded."""
        options = {**request.options, "truncation_direction": direction}
        work = await model.infer(request.items if items is None else items, tokenize=items is None,
                                 options=options, deadline=call.t0 + settings.timeout_s,
                                 disconnected=call.disconnected)
        return request.finish(work.answers)

    def embed_inputs(data: dict) -> list:
        """TEI's Input as a list of texts and token id lists; a list of ids alone is one input."""
        value = data.get("inputs")
        if isinstance(value, str) or _is_ids(value):
            value = [value]
        elif not isinstance(value, list) or not all(isinstance(v, str) or _is_ids(v) for v in value):
            raise _undeserializable("inputs", "a string, a list of token ids, or a list of those", value)
        at_most(len(value))
        return value

    def encoded(inputs: list, request: tasks.Request, direction: str) -> list[tasks.Encoded]:
        """The items of a request holding token ids, encoded here: the ids as the whole sequence (as TEI takes
        them), the texts among them tokenized on the event loop (model.infer takes a request's items all as text
        or all encoded, and a request mixing both is rare)."""
        truncation = request.options["truncation"]
        truncation = settings.truncation if truncation is None else truncation
        texts = [item for value, item in zip(inputs, request.items) if isinstance(value, str)]
        tokenized = iter(tasks.encode(model.task, model.tokenizer, texts, max_seq, truncation, direction))
        out = []
        for value in inputs:
            if isinstance(value, str):
                out.append(next(tokenized))
                continue
            if max(value) >= vocab:
                raise TeiError(TOKENIZER, f"token id {max(value)} is outside the vocabulary (0..{vocab - 1})")
            if len(value) > max_seq:
                if not truncation:
                    raise TeiError(VALIDATION, f"`inputs` must have less than {max_seq} tokens. "
                                               f"Given: {len(value)}")
                value = value[-max_seq:] if direction == "left" else value[:max_seq]
            out.append(tasks.Encoded({"input_ids": np.asarray(value, dtype=np.int64)}, len(value)))
        return out

    async def embed(call: Call) -> Answer:
        data = _object(call.body)
        inputs = embed_inputs(data)
        normalize, truncate = _flag(data, "normalize", True), _flag(data, "truncate", None)
        direction = _direction(data)
        embedding_model()
        _no_prompt(data)
        _filled(inputs)
        # token ids parse as a stand-in text (for the options and the answer's shape); `encoded` replaces them
        request = tasks.parse(EMBEDDING, [v if isinstance(v, str) else "ids" for v in inputs],
                              parameters(truncate, normalize=normalize), manifest)
        if all(isinstance(v, str) for v in inputs):
            return _json(await infer(call, request, direction))
        return _json(await infer(call, request, direction, encoded(inputs, request, direction)))

    async def embed_all(call: Call) -> Answer:
        data = _object(call.body)
        embed_inputs(data)
        _flag(data, "truncate", None)
        _direction(data)
        embedding_model()
        raise TeiError(BACKEND, "`embed_all` is not available for this model: its compiled artifact outputs the "
                                "pooled embedding only, not per-token embeddings (POST /embed gives the pooled one)")

    async def similarity(call: Call) -> Answer:
        data = _object(call.body)
        inputs = data.get("inputs")
        if not isinstance(inputs, dict):
            raise _undeserializable("inputs", '{"source_sentence": string, "sentences": [string]}', inputs)
        source, sentences = _string(inputs, "source_sentence"), _strings(inputs, "sentences")
        options = {} if data.get("parameters") is None else data["parameters"]
        if not isinstance(options, dict):
            raise _undeserializable("parameters", "an object", options)
        truncate, direction = _flag(options, "truncate", None), _direction(options)
        if not sentences:
            raise TeiError(EMPTY, "`inputs.sentences` cannot be empty")
        at_most(len(sentences) + 1)
        embedding_model()
        _no_prompt(options)
        _filled([source, *sentences])
        request = tasks.parse(EMBEDDING, {"source_sentence": source, "sentences": sentences},
                              parameters(truncate), manifest)
        return _json(await infer(call, request, direction))

    async def rerank(call: Call) -> Answer:
        data = _object(call.body)
        query, texts = _string(data, "query"), _strings(data, "texts")
        raw_scores, return_text = _flag(data, "raw_scores", False), _flag(data, "return_text", False)
        truncate, direction = _flag(data, "truncate", None), _direction(data)
        if not texts:
            raise TeiError(EMPTY, "`texts` cannot be empty")
        if model.task == EMBEDDING:     # the extension: cosine similarity of the embeddings
            at_most(len(texts) + 1)
            _filled([query, *texts])
            request = tasks.parse(EMBEDDING, {"source_sentence": query, "sentences": texts}, parameters(truncate),
                                  manifest)
            scores = await infer(call, request, direction)
        elif model.task == CLASSIFICATION and classes == 1:
            at_most(len(texts))
            _filled([query, *texts])
            request = tasks.parse(CLASSIFICATION, [{"text": query, "text_pair": t} for t in texts],
                                  parameters(truncate, function_to_apply="none" if raw_scores else "sigmoid"),
                                  manifest)
            scores = [labels[0]["score"] for labels in await infer(call, request, direction)]
        else:
            raise TeiError(BACKEND, "model is not a re-ranker model")
        return _json(_ranked([{"index": i, "score": s, **({"text": texts[i]} if return_text else {})}
                              for i, s in enumerate(scores)]))

    async def predict(call: Call) -> Answer:
        data = _object(call.body)
        items, single = _predict_inputs(data.get("inputs"))
        raw_scores, truncate = _flag(data, "raw_scores", False), _flag(data, "truncate", None)
        direction = _direction(data)
        at_most(len(items))
        if model.task != CLASSIFICATION:
            raise TeiError(BACKEND, "Model is not a classifier model")
        # TEI's scores: the logits, or their softmax (sigmoid for one label) whatever the head's problem type
        function = "none" if raw_scores else "sigmoid" if classes == 1 else "softmax"
        request = tasks.parse(CLASSIFICATION, items, parameters(truncate, function_to_apply=function), manifest)
        answers = await infer(call, request, direction)
        return _json(answers[0] if single else answers)

    async def tokenize(call: Call) -> Answer:
        data = _object(call.body)
        value = data.get("inputs")
        if isinstance(value, str):
            value = [value]
        elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _undeserializable("inputs", "a string or a list of strings", value)
        elif not value:
            raise TeiError(EMPTY, "`inputs` cannot be empty")
        special = _flag(data, "add_special_tokens", True)
        at_most(len(value))
        _no_prompt(data)
        _filled(value)
        encodings = await asyncio.to_thread(rust.encode_batch, value, add_special_tokens=special)
        return _json([[{"id": i, "text": token, "special": True, "start": None, "stop": None} if is_special
                       else {"id": i, "text": text[start:stop], "special": False, "start": start, "stop": stop}
                       for i, token, is_special, (start, stop)
                       in zip(e.ids, e.tokens, e.special_tokens_mask, e.offsets)]
                      for text, e in zip(value, encodings)])

    async def decode(call: Call) -> Answer:
        data = _object(call.body)
        value = data.get("ids")
        if _is_ids(value):
            value = [value]
        elif not isinstance(value, list) or not all(_is_ids(v) for v in value):
            raise _undeserializable("ids", "a list of token ids (integers >= 0) or a list of those", value)
        skip = _flag(data, "skip_special_tokens", True)
        at_most(len(value))
        _filled(value, "input_ids")
        outside = max(max(ids) for ids in value)
        if outside >= vocab:
            raise TeiError(TOKENIZER, f"token id {outside} is outside the vocabulary (0..{vocab - 1})")
        return _json(await asyncio.to_thread(rust.decode_batch, value, skip_special_tokens=skip))

    routes = {"embed": (embed, "TEI: embeddings", TeiEmbedRequest),
              "embed_all": (embed_all, "TEI: per-token embeddings (refused: pooled artifacts)", TeiEmbedAllRequest),
              "similarity": (similarity, "TEI: sentence similarity", TeiSimilarityRequest),
              "rerank": (rerank, "TEI: rerank texts for a query", TeiRerankRequest),
              "predict": (predict, "TEI: classify texts or text pairs", TeiPredictRequest),
              "tokenize": (tokenize, "TEI: tokenize", TeiTokenizeRequest),
              "decode": (decode, "TEI: decode token ids", TeiDecodeRequest)}
    return [Route(prefix + path, answering(handler), error=error, summary=summary, body=body)
            for path, (handler, summary, body) in routes.items() for prefix in ("/", "/models/{name}/")]


def _model_type(task: str, manifest, classes: int) -> dict:
    """TEI's ModelType; a task TEI does not serve is named as {"other": {"task"}} (an extension)."""
    if task == EMBEDDING:
        return {"embedding": {"pooling": POOLING.get(manifest.pooling, manifest.pooling)}}
    if task == CLASSIFICATION:
        labels = {"id2label": dict(manifest.labels),
                  "label2id": {label: int(i) for i, label in manifest.labels.items()}}
        return {"reranker" if classes == 1 else "classifier": labels}
    return {"other": {"task": task}}
