"""The text-embeddings-inference routes (neuronserve.server.tei), served by the real app in-process.

Models: small random BERTs compiled for the CPU: a feature-extraction model, a cross-encoder (text-classification
with one label: TEI's reranker), a classifier of three labels, and a token-classification model (a task TEI does not
serve). Answers must have TEI's shapes (router/src/http/
types.rs: EmbedResponse [[float]], Rank {index, score, text?}, Prediction {score, label}, SimpleToken {id, text,
special, start, stop}, DecodeResponse [str], Info) and equal the task JSON route's for the same text; the
cross-encoder's rerank scores equal the transformers eager model's logit through a sigmoid. Bad bodies get TEI's
error {"error", "error_type"} with TEI's status for the kind, never a 500.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from fastapi.testclient import TestClient

from dev import random_models
from neuronserve.server import tei
from neuronserve.server.app import create_app
from neuronserve.server.batcher import ServeError
from server_kit import GatedLoader, compiled, in_process, settings_for, wait_ready

BUCKETS = dict(batch_sizes=(1, 4), sequence_lengths=(64,))
MAX_QUEUE = 512     # settings_for's
TEXTS = ["My name is Wolfgang and I live in Berlin.", "Hugging Face Inc. is a company in New York City!",
         "Unusualwords like tokenizationally split into pieces, don't they?"]
QUERY = "Where does Wolfgang live?"
LONG = "the quick brown fox jumps over the lazy dog " * 20      # over 64 tokens
# (status, error_type) of TEI's refusals
EMPTY, VALIDATION, TOKENIZER, BACKEND = (400, "Empty"), (413, "Validation"), (422, "Tokenizer"), (424, "Backend")
SHAPE, BAD_JSON = (422, "Validation"), (400, "Validation")     # bodies TEI cannot deserialize
UNKNOWN = (404, "Validation")       # a model this server does not serve
INFO = {"model_id": str, "model_sha": type(None), "model_dtype": str, "model_type": dict,
        "max_concurrent_requests": int, "max_input_length": int, "max_batch_tokens": int,
        "max_batch_requests": int, "max_client_batch_size": int, "auto_truncate": bool,
        "tokenization_workers": int, "version": str, "sha": type(None), "docker_label": type(None)}

EMBED, RERANKER, CLASSIFIER = ("feature-extraction", ()), ("text-classification", ("score",)), \
    ("text-classification", ("neg", "neutral", "pos"))
OTHER = ("token-classification", ())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models(kind) -> namespace(client, name, source, artifact) for EMBED, RERANKER, CLASSIFIER or OTHER."""
    made = {}
    root = tmp_path_factory.mktemp("tei")
    with in_process() as start:
        def serve(kind):
            if kind not in made:
                task, labels = kind
                name = f"tei-{len(made)}"
                source = random_models.build_model(root / "src" / name, "bert", task, labels=labels or None)
                artifact = compiled(root / "out", source, task, name=name, **BUCKETS)
                made[kind] = SimpleNamespace(client=start(artifact), name=name, source=source, artifact=artifact)
            return made[kind]

        yield serve


def call(client, path, body, status=200):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    return r.json()


def refused(client, path, body, refusal, message):
    """TEI's error shape, status and kind, and the message naming the problem."""
    r = client.post(path, json=body) if not isinstance(body, bytes) else client.post(path, content=body)
    got = r.json()
    assert (r.status_code, got.get("error_type")) == refusal, r.text
    assert set(got) == {"error", "error_type"}, got
    assert message in got["error"], got


def task(client, name, inputs, **parameters):
    return call(client, f"/models/{name}", {"inputs": inputs, "parameters": parameters})


def close(got, expected):
    assert np.asarray(got, dtype=np.float64) == pytest.approx(np.asarray(expected, dtype=np.float64), rel=1e-5,
                                                                abs=1e-6)


def is_embeddings(value, n):
    """EmbedResponse: [[float]], one row per input."""
    assert isinstance(value, list) and len(value) == n
    assert all(isinstance(row, list) and row and all(isinstance(x, float) for x in row) for row in value)


# ---------------------------------------------------------------- /embed, /similarity

def test_embed_equals_the_task_route_normalized_by_default(models):
    m = models(EMBED)
    for path in ("/embed", f"/models/{m.name}/embed"):
        one = call(m.client, path, {"inputs": TEXTS[0]})
        is_embeddings(one, 1)       # always two-dimensional
        close(one, [task(m.client, m.name, TEXTS[0], normalize=True)])
        assert np.linalg.norm(one[0]) == pytest.approx(1.0, abs=1e-5)
        many = call(m.client, path, {"inputs": TEXTS})
        is_embeddings(many, 3)
        close(many, task(m.client, m.name, TEXTS, normalize=True))
    raw = call(m.client, "/embed", {"inputs": TEXTS, "normalize": False})
    close(raw, task(m.client, m.name, TEXTS))
    assert np.linalg.norm(raw[0]) != pytest.approx(1.0, abs=1e-3)


def test_embed_truncates_as_asked(models):
    m = models(EMBED)
    refused(m.client, "/embed", {"inputs": LONG, "truncate": False}, VALIDATION, "longer than the largest")
    # without `truncate`: the server's auto_truncate (on, as /info says)
    close(call(m.client, "/embed", {"inputs": LONG}), [task(m.client, m.name, LONG, normalize=True)])
    for direction in ("Left", "Right"):
        close(call(m.client, "/embed", {"inputs": [LONG], "truncate": True, "truncation_direction": direction}),
              task(m.client, m.name, [LONG], normalize=True, truncation=True,
                   truncation_direction=direction.lower()))
    left = call(m.client, "/embed", {"inputs": LONG + "zebra", "truncation_direction": "Left"})
    right = call(m.client, "/embed", {"inputs": LONG + "zebra", "truncation_direction": "Right"})
    assert not np.allclose(left, right)


def test_embed_token_ids_are_the_whole_sequence(models):
    m = models(EMBED)
    tokenizer = transformers.AutoTokenizer.from_pretrained(m.source, local_files_only=True)
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]       # special tokens included, as TEI takes ids
    by_text = call(m.client, "/embed", {"inputs": TEXTS})
    close(call(m.client, "/embed", {"inputs": ids[0]}), by_text[:1])
    close(call(m.client, "/embed", {"inputs": ids}), by_text)
    close(call(m.client, "/embed", {"inputs": [TEXTS[0], ids[1], TEXTS[2]]}), by_text)
    long = tokenizer(LONG)["input_ids"]
    refused(m.client, "/embed", {"inputs": long, "truncate": False}, VALIDATION, "must have less than 64 tokens")
    close(call(m.client, "/embed", {"inputs": long, "truncate": True, "truncation_direction": "Left"}),
          call(m.client, "/embed", {"inputs": long[-64:]}))
    refused(m.client, "/embed", {"inputs": [5, len(tokenizer) + 3]}, TOKENIZER, "outside the vocabulary")


def test_similarity_equals_the_task_route(models):
    m = models(EMBED)
    inputs = {"source_sentence": QUERY, "sentences": TEXTS}
    got = call(m.client, "/similarity", {"inputs": inputs, "parameters": {"truncate": True}})
    assert isinstance(got, list) and len(got) == 3 and all(isinstance(s, float) for s in got)
    close(got, task(m.client, m.name, inputs))
    close(call(m.client, f"/models/{m.name}/similarity", {"inputs": inputs}), got)


# ---------------------------------------------------------------- /rerank

def is_ranks(value, n, texts=None):
    """RerankResponse: [{index, score, text?}], best first, every index once."""
    assert isinstance(value, list) and len(value) == n
    for rank in value:
        assert set(rank) == ({"index", "score", "text"} if texts else {"index", "score"}), rank
        assert isinstance(rank["index"], int) and isinstance(rank["score"], float)
        if texts:
            assert rank["text"] == texts[rank["index"]]
    assert sorted(r["index"] for r in value) == list(range(n))
    assert [r["score"] for r in value] == sorted((r["score"] for r in value), reverse=True)


def test_rerank_by_cross_encoder_is_the_sigmoid_of_its_logit(models):
    m = models(RERANKER)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        m.source, local_files_only=True, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(m.source, local_files_only=True)
    with torch.no_grad():
        logits = [model(**tokenizer(QUERY, t, return_tensors="pt")).logits[0, 0].item() for t in TEXTS]
    for path in ("/rerank", f"/models/{m.name}/rerank"):
        ranks = call(m.client, path, {"query": QUERY, "texts": TEXTS})
        is_ranks(ranks, 3)
        close([r["score"] for r in ranks], [1 / (1 + np.exp(-logits[r["index"]])) for r in ranks])
    ranks = call(m.client, "/rerank", {"query": QUERY, "texts": TEXTS, "raw_scores": True, "return_text": True})
    is_ranks(ranks, 3, TEXTS)
    close([r["score"] for r in ranks], [logits[r["index"]] for r in ranks])


def test_rerank_by_embeddings_is_their_cosine_similarity(models):
    m = models(EMBED)
    ranks = call(m.client, "/rerank", {"query": QUERY, "texts": TEXTS, "return_text": True})
    is_ranks(ranks, 3, TEXTS)
    cosine = task(m.client, m.name, {"source_sentence": QUERY, "sentences": TEXTS})
    close([r["score"] for r in ranks], [cosine[r["index"]] for r in ranks])


# ---------------------------------------------------------------- /predict

def is_predictions(value, labels):
    """One input's [Prediction]: every label once with its score, best first."""
    assert isinstance(value, list) and sorted(p["label"] for p in value) == sorted(labels)
    assert all(set(p) == {"score", "label"} and isinstance(p["score"], float) for p in value)
    assert [p["score"] for p in value] == sorted((p["score"] for p in value), reverse=True)


def same_predictions(got, expected):
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    close([p["score"] for p in got], [p["score"] for p in expected])


def test_predict_equals_the_task_route(models):
    m = models(CLASSIFIER)
    labels = CLASSIFIER[1]
    pair = ["A man is eating food.", "A man eats something."]
    for path in ("/predict", f"/models/{m.name}/predict"):
        # one input (a text, or a pair) answers one list of predictions
        one = call(m.client, path, {"inputs": TEXTS[0]})
        is_predictions(one, labels)
        same_predictions(one, task(m.client, m.name, TEXTS[0], function_to_apply="softmax")[0])
        same_predictions(call(m.client, path, {"inputs": pair}),
                         task(m.client, m.name, [pair], function_to_apply="softmax")[0])
    batch = call(m.client, "/predict", {"inputs": [[TEXTS[1]], pair]})
    expected = task(m.client, m.name, [TEXTS[1], pair], function_to_apply="softmax")
    assert len(batch) == 2
    for got, want in zip(batch, expected):
        is_predictions(got, labels)
        same_predictions(got, want)
    raw = call(m.client, "/predict", {"inputs": [[TEXTS[1]]], "raw_scores": True})
    same_predictions(raw[0], task(m.client, m.name, [TEXTS[1]], function_to_apply="none")[0])


def test_predict_on_a_cross_encoder_is_its_sigmoid(models):
    m = models(RERANKER)
    pair = [QUERY, TEXTS[0]]
    got = call(m.client, "/predict", {"inputs": pair})
    is_predictions(got, ["score"])
    same_predictions(got, task(m.client, m.name, [pair], function_to_apply="sigmoid")[0])


# ---------------------------------------------------------------- /tokenize, /decode

def test_tokenize_as_the_tokenizer(models):
    m = models(EMBED)
    backend = transformers.AutoTokenizer.from_pretrained(m.source, local_files_only=True).backend_tokenizer
    text = "Héllo wörld, tokenizationally!"
    for path, special in (("/tokenize", True), (f"/models/{m.name}/tokenize", False)):
        got = call(m.client, path, {"inputs": [text, TEXTS[0]], "add_special_tokens": special})
        assert len(got) == 2
        for tokens, source in zip(got, (text, TEXTS[0])):
            e = backend.encode(source, add_special_tokens=special)
            assert [t["id"] for t in tokens] == e.ids
            for t, token, is_special, (start, stop) in zip(tokens, e.tokens, e.special_tokens_mask, e.offsets):
                assert set(t) == {"id", "text", "special", "start", "stop"}
                if is_special:
                    assert t == {"id": t["id"], "text": token, "special": True, "start": None, "stop": None}
                else:
                    assert t == {"id": t["id"], "text": source[start:stop], "special": False, "start": start,
                                 "stop": stop}
            assert any(t["special"] for t in tokens) == special
    one = call(m.client, "/tokenize", {"inputs": "a cat"})
    assert [[t["text"] for t in tokens] for tokens in one] == [["[CLS]", "a", "cat", "[SEP]"]]


def test_decode_as_the_tokenizer(models):
    m = models(EMBED)
    backend = transformers.AutoTokenizer.from_pretrained(m.source, local_files_only=True).backend_tokenizer
    ids = [backend.encode(t).ids for t in TEXTS[:2]]
    assert call(m.client, "/decode", {"ids": ids[0]}) == [backend.decode(ids[0], skip_special_tokens=True)]
    assert call(m.client, f"/models/{m.name}/decode", {"ids": ids, "skip_special_tokens": False}) == \
        backend.decode_batch(ids, skip_special_tokens=False)
    assert call(m.client, "/decode", {"ids": ids[0], "skip_special_tokens": False})[0].startswith("[CLS]")


# ---------------------------------------------------------------- /info, /health

def test_info_has_teis_schema(models):
    for kind, model_type in ((EMBED, {"embedding": {"pooling": "mean"}}),
                             (RERANKER, {"reranker": {"id2label": {"0": "score"}, "label2id": {"score": 0}}}),
                             (CLASSIFIER, {"classifier": {"id2label": {"0": "neg", "1": "neutral", "2": "pos"},
                                                          "label2id": {"neg": 0, "neutral": 1, "pos": 2}}})):
        m = models(kind)
        for path in ("/info", f"/models/{m.name}/info"):
            r = m.client.get(path)
            assert r.status_code == 200
            info = r.json()
            assert set(info) == set(INFO) and all(isinstance(info[k], t) for k, t in INFO.items()), info
            assert info["model_type"] == model_type
            assert (info["max_input_length"], info["max_batch_tokens"], info["max_batch_requests"]) == (64, 256, 4)
            assert info["max_client_batch_size"] == MAX_QUEUE and info["auto_truncate"] is True
        r = m.client.get(f"/models/{m.name}/health")
        assert (r.status_code, r.content) == (200, b"")
    for path in ("/models/nope/info", "/models/nope/health"):
        r = m.client.get(path)
        assert r.status_code == 404 and r.json()["error_type"] == "Validation" and "'nope'" in r.json()["error"]


def test_a_model_of_another_task_tokenizes_and_refuses_inference(models):
    m = models(OTHER)
    info = m.client.get("/info").json()
    assert set(info) == set(INFO) and info["model_type"] == {"other": {"task": "token-classification"}}
    assert [t["text"] for t in call(m.client, "/tokenize", {"inputs": "a cat"})[0]] == ["[CLS]", "a", "cat", "[SEP]"]
    for path, body, message in (("/embed", {"inputs": "a"}, "Model is not an embedding model"),
                                ("/predict", {"inputs": "a"}, "Model is not a classifier model"),
                                ("/rerank", {"query": "a", "texts": ["b"]}, "model is not a re-ranker model")):
        refused(m.client, path, body, BACKEND, message)


def test_health_is_503_until_ready(models):
    m = models(EMBED)
    loader = GatedLoader(hold_loading=True)
    with TestClient(create_app(settings_for(m.artifact, copies=1), load=loader)) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["error_type"] == "Unhealthy", r.text
        r = client.post("/embed", json={"inputs": "a"})
        assert r.status_code == 503 and r.json()["error_type"] == "Unhealthy" and r.headers["retry-after"]
        loader.loading.set()
        wait_ready(client)
        assert client.get("/health").status_code == 200
        is_embeddings(call(client, "/embed", {"inputs": "a"}), 1)


def test_serving_refusals_become_teis():
    ready, loading = SimpleNamespace(ready=True), SimpleNamespace(ready=False)
    cases = [(ServeError(503, "busy", retry_after=1), ready, 429, "Overloaded", 1),
             (ServeError(503, "not ready", retry_after=5), loading, 503, "Unhealthy", 5),
             (ServeError(413, "too many"), ready, 413, "Validation", None),
             (ServeError(422, "too long"), ready, 413, "Validation", None),
             (ServeError(500, "inference failed"), ready, 424, "Backend", None),
             (ServeError(504, "no answer"), ready, 504, "Backend", None)]
    for e, model, status, kind, retry_after in cases:
        got = tei._translated(e, model)
        assert (got.status, got.kind, str(got), got.retry_after) == (status, kind, str(e), retry_after)


# ---------------------------------------------------------------- routes that do not fit the model, bad bodies

@pytest.mark.parametrize("kind, path, body, message", [
    (EMBED, "/predict", {"inputs": "a"}, "Model is not a classifier model"),
    (EMBED, "/embed_all", {"inputs": "a"}, "outputs the pooled embedding only"),
    (RERANKER, "/embed", {"inputs": "a"}, "Model is not an embedding model"),
    (RERANKER, "/embed_all", {"inputs": ["a"]}, "Model is not an embedding model"),
    (CLASSIFIER, "/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}},
     "Model is not an embedding model"),
    (CLASSIFIER, "/rerank", {"query": "a", "texts": ["b"]}, "model is not a re-ranker model"),
])
def test_routes_that_do_not_fit_the_model_get_teis_424(models, kind, path, body, message):
    m = models(kind)
    refused(m.client, path, body, BACKEND, message)
    refused(m.client, f"/models/{m.name}{path}", body, BACKEND, message)


@pytest.mark.parametrize("kind, path, body, refusal, message", [
    (EMBED, "/embed", b"{not json", BAD_JSON, "Failed to parse the request body as JSON"),
    (EMBED, "/embed", ["a"], SHAPE, "`body`: expected a JSON object"),
    (EMBED, "/embed", {"input": "a"}, SHAPE, "`inputs`: expected a string, a list of token ids"),
    (EMBED, "/embed", {"inputs": 3}, SHAPE, "`inputs`: expected"),
    (EMBED, "/embed", {"inputs": [-1, 2]}, SHAPE, "`inputs`: expected"),
    (EMBED, "/embed", {"inputs": []}, VALIDATION, "`inputs` cannot be empty"),
    (EMBED, "/embed", {"inputs": ["a", ""]}, VALIDATION, "`inputs` cannot be empty"),
    (EMBED, "/embed", {"inputs": "   "}, VALIDATION, "empty text"),
    (EMBED, "/embed", {"inputs": ["a"] * (MAX_QUEUE + 1)}, VALIDATION,
     f"batch size {MAX_QUEUE + 1} > maximum allowed batch size {MAX_QUEUE}"),
    (EMBED, "/embed", {"inputs": "a", "normalize": "yes"}, SHAPE, "`normalize`: expected true or false"),
    (EMBED, "/embed", {"inputs": "a", "truncate": 1}, SHAPE, "`truncate`: expected true or false"),
    (EMBED, "/embed", {"inputs": "a", "truncation_direction": "up"}, SHAPE, '`truncation_direction`: expected "Left"'),
    (EMBED, "/embed", {"inputs": "a", "prompt_name": "query"}, VALIDATION, '`prompt_name` is set to "query"'),
    (EMBED, "/models/other/embed", {"inputs": "a"}, UNKNOWN, "unknown model 'other'"),
    (EMBED, "/embed_all", {"inputs": {"a": 1}}, SHAPE, "`inputs`: expected"),
    (EMBED, "/similarity", {"inputs": "a"}, SHAPE, '`inputs`: expected {"source_sentence"'),
    (EMBED, "/similarity", {"inputs": {"source_sentence": "a"}}, SHAPE, "`sentences`: expected a list of strings"),
    (EMBED, "/similarity", {"inputs": {"source_sentence": "a", "sentences": []}}, EMPTY,
     "`inputs.sentences` cannot be empty"),
    (EMBED, "/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}, "parameters": 3}, SHAPE,
     "`parameters`: expected an object"),
    (EMBED, "/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]},
                            "parameters": {"prompt_name": "q"}}, VALIDATION, '`prompt_name` is set to "q"'),
    (EMBED, "/rerank", {"texts": ["a"]}, SHAPE, "`query`: expected a string, got nothing"),
    (RERANKER, "/rerank", {"query": "a"}, SHAPE, "`texts`: expected a list of strings"),
    (RERANKER, "/rerank", {"query": "a", "texts": "b"}, SHAPE, "`texts`: expected a list of strings"),
    (RERANKER, "/rerank", {"query": "a", "texts": []}, EMPTY, "`texts` cannot be empty"),
    (RERANKER, "/rerank", {"query": "", "texts": ["b"]}, VALIDATION, "`inputs` cannot be empty"),
    (RERANKER, "/rerank", {"query": "a", "texts": ["b"], "raw_scores": "no"}, SHAPE, "`raw_scores`: expected true"),
    (RERANKER, "/rerank", {"query": "a", "texts": ["b"] * (MAX_QUEUE + 1)}, VALIDATION, "maximum allowed batch"),
    (CLASSIFIER, "/predict", {"inputs": []}, SHAPE, "a string, a pair of strings [string, string] or a batch"),
    (CLASSIFIER, "/predict", {"inputs": ["a", "b", "c"]}, SHAPE, "a pair of strings"),
    (CLASSIFIER, "/predict", {"inputs": [["a", "b", "c"]]}, SHAPE, "a pair of strings"),
    (CLASSIFIER, "/predict", {"inputs": [["a"], "b"]}, SHAPE, "a pair of strings"),
    (CLASSIFIER, "/predict", {"inputs": [""]}, VALIDATION, "empty text"),
    (CLASSIFIER, "/predict", {"inputs": [LONG, LONG], "truncate": False}, VALIDATION, "longer than the largest"),
    (CLASSIFIER, "/tokenize", {"inputs": []}, EMPTY, "`inputs` cannot be empty"),
    (CLASSIFIER, "/tokenize", {"inputs": ""}, VALIDATION, "`inputs` cannot be empty"),
    (CLASSIFIER, "/tokenize", {"inputs": [1, 2]}, SHAPE, "`inputs`: expected a string or a list of strings"),
    (CLASSIFIER, "/tokenize", {"inputs": "a", "add_special_tokens": "no"}, SHAPE, "`add_special_tokens`: expected"),
    (CLASSIFIER, "/tokenize", {"inputs": "a", "prompt_name": "q"}, VALIDATION, "`prompt_name` is set"),
    (CLASSIFIER, "/decode", {"ids": []}, VALIDATION, "`input_ids` cannot be empty"),
    (CLASSIFIER, "/decode", {"ids": [[1], []]}, VALIDATION, "`input_ids` cannot be empty"),
    (CLASSIFIER, "/decode", {"ids": [1, 10 ** 9]}, TOKENIZER, "token id 1000000000 is outside the vocabulary"),
    (CLASSIFIER, "/decode", {"ids": [1, -2]}, SHAPE, "`ids`: expected a list of token ids"),
    (CLASSIFIER, "/decode", {"ids": "abc"}, SHAPE, "`ids`: expected a list of token ids"),
])
def test_bad_bodies_get_teis_error(models, kind, path, body, refusal, message):
    refused(models(kind).client, path, body, refusal, message)


def test_null_is_the_default_and_unknown_keys_are_ignored(models):
    """As TEI's deserializer takes them."""
    m = models(CLASSIFIER)
    assert call(m.client, "/decode", {"ids": [1037], "skip_special_tokens": None, "extra": 1}) == \
        call(m.client, "/decode", {"ids": [1037]})
