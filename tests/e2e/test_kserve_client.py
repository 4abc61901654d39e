"""NVIDIA's tritonclient.http (the PyPI KServe v2 client) against the server, used as its documentation shows:
health, metadata, and infer with INT64 token tensors and BYTES text, in binary (its default) and JSON form."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from server_kit import compiled, settings_for, shared_server

pytestmark = pytest.mark.e2e

QA, CLS = "question-answering", "text-classification"
TEXTS = ["tritonclient speaks KServe v2", "a second, longer sentence to pad the first one out"]


@pytest.fixture(scope="module")
def sources(tiny_model_dir):
    return {QA: tiny_model_dir(QA), CLS: tiny_model_dir(CLS)}


@pytest.fixture(scope="module")
def clients(request, sources, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "server-artifacts"
    logs = tmp_path_factory.mktemp("kserve-logs")
    servers = {task: shared_server(request.config, settings_for(compiled(root, sources[task], task)), logs)
               for task in (QA, CLS)}
    out = {}
    for task, server in servers.items():
        server.wait_ready()
        out[task] = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=60)
    yield out
    for client in out.values():
        client.close()


@pytest.fixture(scope="module")
def eager(sources):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(sources[CLS]))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(sources[CLS])).eval()
    enc = tokenizer(TEXTS, padding=True, return_tensors="np")
    with torch.no_grad():
        logits = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()
    return enc, logits


def test_health_and_metadata(clients):
    client = clients[CLS]
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(CLS)
    assert not client.is_model_ready("missing")
    assert client.get_server_metadata()["name"] == "neuronserve"
    meta = client.get_model_metadata(CLS)
    assert meta["name"] == CLS
    assert [i["name"] for i in meta["inputs"] if i["datatype"] == "INT64"] == \
        ["input_ids", "attention_mask", "token_type_ids"]
    assert client.get_model_metadata(CLS, model_version="1") == meta


@pytest.mark.parametrize("binary", [True, False])
def test_infer_int64_tensors(clients, eager, binary):
    enc, expected = eager
    inputs = []
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        array = enc[name].astype(np.int64)
        tensor = triton.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    result = clients[CLS].infer(CLS, inputs, outputs=[triton.InferRequestedOutput("logits", binary_data=binary)],
                                request_id="abc")
    np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-4)
    assert result.get_response()["id"] == "abc"


def test_infer_text_without_naming_outputs(clients, eager):
    _, expected = eager
    text = triton.InferInput("text", [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
    result = clients[CLS].infer(CLS, [text])     # asks for every output, in binary
    np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-4)
    answers = [json.loads(a) for a in result.as_numpy("answer")]
    labels = ["NEGATIVE", "POSITIVE"]
    assert [a[0]["label"] for a in answers] == [labels[int(i)] for i in expected.argmax(1)]


def test_question_answering_with_question_and_context_tensors(clients):
    contexts = ["Ann lives in Oslo.", "The meeting is on Tuesday at noon."]
    question, context = (triton.InferInput(n, [2], "BYTES") for n in ("question", "context"))
    question.set_data_from_numpy(np.array([b"Where does Ann live?", b"When is the meeting?"], dtype=object))
    context.set_data_from_numpy(np.array([c.encode() for c in contexts], dtype=object), binary_data=False)
    result = clients[QA].infer(QA, [question, context],
                               outputs=[triton.InferRequestedOutput("answer", binary_data=False)])
    answers = [json.loads(a) for a in result.as_numpy("answer")]
    for answer, ctx in zip(answers, contexts):
        assert ctx[answer["start"]:answer["end"]] == answer["answer"] and 0 <= answer["score"] <= 1


def test_errors_reach_the_client_as_messages(clients):
    ids = triton.InferInput("input_ids", [1, 2], "INT64")
    ids.set_data_from_numpy(np.array([[101, 102]], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="unknown model"):
        clients[CLS].infer("missing", [ids])
    bad = triton.InferInput("input_ids", [1, 2], "INT64")
    bad.set_data_from_numpy(np.array([[101, -3]], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="values must lie"):
        clients[CLS].infer(CLS, [bad])
