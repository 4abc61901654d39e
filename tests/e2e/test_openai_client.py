"""The `openai` SDK, unchanged, against the nginx front: embeddings.create with strings, token arrays, base64 (the
SDK's default) and dimensions, at a model's own base URL (/models/<name>/v1) and at the root, where the front
sends the request to the model its body names (njs) when the host serves several. Answers equal the task JSON
route's for the same text. On the same stack, the front's model listing (KServe's repository index, GET
/v2/models)."""
from __future__ import annotations

import os

import httpx
import numpy as np
import openai
import pytest

TEXTS = ["The cat sits on the mat.", "Embeddings for retrieval.", "A third, longer sentence with more words in it."]


@pytest.fixture(scope="module")
def stack(two_models):
    """Two models behind one front: the root /v1/embeddings must route by the body's model."""
    return two_models


@pytest.fixture
def front(stack):
    return stack.front_url


def task_route(front: str, texts: list[str]) -> np.ndarray:
    return np.asarray(httpx.post(f"{front}/models/emb", json={"inputs": texts}, timeout=60).json())


@pytest.mark.parametrize("base", ["/models/emb/v1", "/v1"])
def test_embeddings_create(front, base):
    client = openai.OpenAI(base_url=front + base, api_key="unused", max_retries=0)
    expected = task_route(front, TEXTS)
    got = client.embeddings.create(model="emb", input=TEXTS)          # the SDK asks for base64 and decodes it
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == "emb"
    np.testing.assert_allclose([d.embedding for d in got.data], expected, atol=1e-5)
    assert got.usage.prompt_tokens == got.usage.total_tokens > len(TEXTS)
    floats = client.embeddings.create(model="emb", input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, expected[0], atol=1e-5)
    width = expected.shape[1]
    assert len(client.embeddings.create(model="emb", input="x", dimensions=width).data[0].embedding) == width
    with pytest.raises(openai.BadRequestError, match="not trained to be cut shorter"):
        client.embeddings.create(model="emb", input="x", dimensions=width // 2)


def test_token_arrays(front, minilm_dir):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    client = openai.OpenAI(base_url=front + "/v1", api_key="unused", max_retries=0)
    got = client.embeddings.create(model="emb", input=ids)
    np.testing.assert_allclose([d.embedding for d in got.data], task_route(front, TEXTS), atol=1e-5)


def test_unknown_model_and_listing(front):
    client = openai.OpenAI(base_url=front + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="gpt-4", input="x")
    assert "served: " in str(e.value) and "emb" in str(e.value) and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError, match="text-classification model"):
        client.embeddings.create(model="cls", input="x")
    assert sorted(m.id for m in client.models.list()) == ["cls", "emb"]
    assert [m.id for m in openai.OpenAI(base_url=front + "/models/emb/v1", api_key="x").models.list()] == ["emb"]


def test_the_front_lists_every_model_with_its_state(stack, front):
    """KServe's model repository extension (tritonclient's get_model_repository_index) and the front's own
    /v2/models, from every group's readiness. Last in this module: it stops a group."""
    import signal

    import tritonclient.http as triton

    client = triton.InferenceServerClient(front.removeprefix("http://"))
    ready = {"version": "1", "state": "READY", "reason": ""}
    assert sorted(client.get_model_repository_index(), key=lambda m: m["name"]) == \
        [{"name": "cls", **ready}, {"name": "emb", **ready}]
    models = httpx.get(f"{front}/v2/models", timeout=60).json()["models"]
    assert sorted((m["name"], m["task"], m["groups"], m["ready_groups"]) for m in models) == \
        [("cls", "text-classification", 1, 1), ("emb", "feature-extraction", 1, 1)]
    [group] = [p for p in stack.procs if p.name == "cls-0"]
    os.killpg(group.popen.pid, signal.SIGTERM)
    group.popen.wait(30)
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["cls"]["state"] == "UNAVAILABLE" and index["emb"]["state"] == "READY"
    only_ready = httpx.post(f"{front}/v2/repository/index", json={"ready": True}, timeout=60).json()
    assert [m["name"] for m in only_ready] == ["emb"]
