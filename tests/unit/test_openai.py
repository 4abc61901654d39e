"""The OpenAI-compatible embeddings API of one group, in-process: the request and response shapes of OpenAI's
CreateEmbeddingRequest / CreateEmbeddingResponse (written here from its API reference), base64, token-id inputs,
usage counted by the model's tokenizer, and OpenAI's error object for bad requests. The `openai` SDK itself
through nginx: tests/e2e/test_openai_client.py."""
from __future__ import annotations

import base64

import numpy as np
import pytest

from server_kit import compiled, in_process

TEXTS = ["The cat sits on the mat.", "A fast tokenizer keeps the request path cheap."]


@pytest.fixture(scope="module")
def clients(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.getbasetemp() / "openai-artifacts"
    with in_process() as start:
        yield {name: start(compiled(root, tiny_model_dir(task), task, name=name, batch_sizes=(1, 4),
                                    sequence_lengths=(32,)))
               for name, task in (("emb", "feature-extraction"), ("cls", "text-classification"))}


def embed(client, body, path="/v1/embeddings", status=200):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    return r.json()


def test_embeddings_response_shape_and_values(clients):
    emb = clients["emb"]
    out = embed(emb, {"input": TEXTS, "model": "emb"})
    assert set(out) == {"object", "data", "model", "usage"} and out["object"] == "list" and out["model"] == "emb"
    assert [set(d) for d in out["data"]] == [{"object", "index", "embedding"}] * 2
    assert [d["index"] for d in out["data"]] == [0, 1] and {d["object"] for d in out["data"]} == {"embedding"}
    # the same vectors as the task JSON route
    task = emb.post("/models/emb", json={"inputs": TEXTS}).json()
    np.testing.assert_allclose([d["embedding"] for d in out["data"]], task, atol=1e-6)
    # usage: the model's tokens, special tokens included
    tokenizer = emb.app.state.model.tokenizer
    tokens = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert out["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    # one string, under the model's own prefix too
    one = embed(emb, {"input": TEXTS[0], "model": "emb"}, "/models/emb/v1/embeddings")
    np.testing.assert_allclose(one["data"][0]["embedding"], task[0], atol=1e-6)


def test_base64_is_little_endian_float32(clients):
    out = embed(clients["emb"], {"input": TEXTS, "model": "emb", "encoding_format": "base64"})
    floats = embed(clients["emb"], {"input": TEXTS, "model": "emb"})
    for b, f in zip(out["data"], floats["data"]):
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4"),
                                      np.asarray(f["embedding"], dtype=np.float32))


def test_token_ids_embed_as_their_text(clients):
    emb = clients["emb"]
    tokenizer = emb.app.state.model.tokenizer
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    by_text = embed(emb, {"input": TEXTS, "model": "emb"})
    by_ids = embed(emb, {"input": ids, "model": "emb"})
    np.testing.assert_allclose([d["embedding"] for d in by_ids["data"]], [d["embedding"] for d in by_text["data"]],
                               atol=1e-5)
    assert by_ids["usage"] == by_text["usage"]
    one = embed(emb, {"input": ids[0], "model": "emb"})
    np.testing.assert_allclose(one["data"][0]["embedding"], by_text["data"][0]["embedding"], atol=1e-5)


def test_dimensions_only_as_the_model_gives_them(clients):
    emb = clients["emb"]
    width = len(embed(emb, {"input": "x", "model": "emb"})["data"][0]["embedding"])
    assert len(embed(emb, {"input": "x", "model": "emb", "dimensions": width})["data"][0]["embedding"]) == width
    err = embed(emb, {"input": "x", "model": "emb", "dimensions": 8}, status=400)["error"]
    assert f"gives {width}-dimensional embeddings" in err["message"] and err["type"] == "invalid_request_error"


def test_models_listing(clients):
    for path in ("/v1/models", "/models/emb/v1/models"):
        listing = clients["emb"].get(path).json()
        assert listing["object"] == "list"
        [m] = listing["data"]
        assert m["id"] == "emb" and m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"]


@pytest.mark.parametrize("body, status, message, code", [
    ({"input": "x", "model": "other"}, 404, "The model 'other' does not exist here; this server serves 'emb'",
     "model_not_found"),
    ({"input": "x"}, 400, "model: Field required", None),
    ({"input": "x", "model": "emb", "encoding_format": "int8"}, 400, "encoding_format", None),
    ({"input": [], "model": "emb"}, 400, "input: an empty list", None),
    ({"input": [""], "model": "emb"}, 422, "empty text", None),
    ({"input": [[10**9]], "model": "emb"}, 422, "token ids must lie in", None),
    ({"input": [["a"], "b"], "model": "emb"}, 400, "input", None),
    ({"input": "x", "model": "emb", "extra": 1}, 400, "extra: Extra inputs are not permitted", None),
])
def test_bad_requests_get_openai_error_objects(clients, body, status, message, code):
    err = embed(clients["emb"], body, status=status)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert message in err["message"] and err["code"] == code


def test_malformed_json_and_other_tasks(clients):
    r = clients["emb"].post("/v1/embeddings", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    err = embed(clients["cls"], {"input": "x", "model": "cls"}, status=404)["error"]
    assert "cls is a text-classification model" in err["message"]
    assert clients["emb"].get("/models/other/v1/models").status_code == 404
