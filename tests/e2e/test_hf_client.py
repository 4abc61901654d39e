"""huggingface_hub.InferenceClient, unchanged, against the nginx front: every encoder task method it has, each
pointed at a model's URL (http://<front>/models/<name>), answers as the transformers pipeline does for the same
model (or, for question answering and sentence similarity, which have no pipeline, as the task JSON route and a
cosine written here do).

Models: small random ones of three tokenizer families (dev.random_models.build_model), two per stack as
the machine has two cores.
"""
from __future__ import annotations

import warnings

import httpx
import numpy as np
import pytest
import torch
import transformers
from huggingface_hub import InferenceClient, constants

from neuronserve import tasks
from dev import random_models
from neuronserve.build.compile import compile_model

MODELS = {  # name: (architecture, task)
    "ner": ("roberta", "token-classification"),
    "mlm": ("bert", "fill-mask"),
    "nli": ("xlm-roberta", "zero-shot-classification"),
    "qa": ("bert", "question-answering"),
    "xenc": ("bert", "text-classification"),
    "sim": ("roberta", "feature-extraction"),
}
TEXT = "My name is Wolfgang and I live in Berlin."


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-client")
    made = {}
    for name, (architecture, task) in MODELS.items():
        src = random_models.build_model(root / "src" / name, architecture, task)
        compile_model(src, root / "repo" / name, name=name, task=task, backend="cpu", target="cpu",
                      batch_sizes=[1, 4], sequence_lengths=[64])
        made[name] = src
    return root / "repo", made


@pytest.fixture(scope="module")
def front(request, sources, stack_builder):
    """The front's base URL for the two models a test names (indirect parametrization: tests naming the same pair
    share one stack)."""
    repo, _ = sources
    stack = stack_builder({name: {"task": MODELS[name][1], "groups": 1} for name in request.param}, repo=repo)
    try:
        yield stack.front_url
    finally:
        stack.stop()


def serving(*names: str):
    return pytest.mark.parametrize("front", [names], indirect=True, ids="+".join)


@pytest.fixture
def client_for(front, monkeypatch):
    """InferenceClient for a served model. The tests run offline (HF_HUB_OFFLINE), which the client applies to
    every URL, the front's included: this test, and only it, lets it reach 127.0.0.1."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return lambda name: InferenceClient(model=f"{front}/models/{name}", timeout=60)


def reference(sources, name: str):
    source = sources[1][name]
    model = getattr(transformers, tasks.get(MODELS[name][1]).auto_class).from_pretrained(
        source, local_files_only=True, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, tokenizer


def pipe(sources, name: str, task: str):
    model, tokenizer = reference(sources, name)
    return transformers.pipeline(task, model=model, tokenizer=tokenizer, device="cpu")


@serving("ner", "mlm")
def test_token_classification(client_for, sources):
    client = client_for("ner")
    expected = pipe(sources, "ner", "token-classification")(TEXT, aggregation_strategy="simple")
    got = client.token_classification(TEXT)
    assert [(e.entity_group, e.word, e.start, e.end) for e in got] == \
        [(e["entity_group"], e["word"], e["start"], e["end"]) for e in expected]
    assert [e.score for e in got] == pytest.approx([float(e["score"]) for e in expected], abs=1e-4)
    tokens = client.token_classification(TEXT, aggregation_strategy="none", ignore_labels=[])
    assert len(tokens) == len(pipe(sources, "ner", "token-classification")(TEXT, ignore_labels=[]))
    assert all(t.entity and t.word for t in tokens)


@serving("ner", "mlm")
def test_fill_mask(client_for, sources):
    client = client_for("mlm")
    model, tokenizer = reference(sources, "mlm")
    text = f"The capital of France is {tokenizer.mask_token}."
    expected = transformers.pipeline("fill-mask", model=model, tokenizer=tokenizer, device="cpu")(text, top_k=3)
    got = client.fill_mask(text, top_k=3)
    assert [(g.token, g.token_str, g.sequence) for g in got] == \
        [(e["token"], e["token_str"], e["sequence"]) for e in expected]
    assert [g.score for g in got] == pytest.approx([e["score"] for e in expected], abs=1e-4)


@serving("nli", "qa")
def test_zero_shot_classification(client_for, sources):
    client = client_for("nli")
    labels = ["politics", "sport", "travel"]
    expected = pipe(sources, "nli", "zero-shot-classification")(TEXT, candidate_labels=labels, multi_label=True)
    got = client.zero_shot_classification(TEXT, labels, multi_label=True)
    assert [g.label for g in got] == expected["labels"]
    assert [g.score for g in got] == pytest.approx(expected["scores"], abs=1e-4)


@serving("nli", "qa")
def test_question_answering(client_for, sources):
    client = client_for("qa")
    context = "My name is Wolfgang and I live in Berlin, a city in Germany."
    got = client.question_answering(question="Where does Wolfgang live?", context=context)
    assert got.answer == context[got.start:got.end] and 0 < got.score <= 1
    top = client.question_answering(question="Where does Wolfgang live?", context=context, top_k=2,
                                    max_answer_len=5)
    assert len(top) == 2 and top[0].score >= top[1].score
    assert all(len(a.answer.split()) <= 5 for a in top)


@serving("xenc", "sim")
def test_text_classification_of_one_text_and_a_pair(client_for, sources, front):
    client = client_for("xenc")
    classify = pipe(sources, "xenc", "text-classification")
    got = client.text_classification(TEXT)
    expected = classify(TEXT, top_k=None)
    assert [g.label for g in got] == [e["label"] for e in expected]       # every label, not only the first
    assert [g.score for g in got] == pytest.approx([e["score"] for e in expected], abs=1e-4)
    assert [g.label for g in client.text_classification(TEXT, top_k=1)] == [expected[0]["label"]]
    # a pair (the client sends only single texts): the Inference API's body, through the same front
    pair = {"text": "what is a cat", "text_pair": "A cat is a small carnivorous mammal."}
    [answer] = httpx.post(f"{front}/models/xenc", json={"inputs": pair}, timeout=60).json()
    expected = classify(pair, top_k=None)
    assert [a["label"] for a in answer] == [e["label"] for e in expected]
    assert [a["score"] for a in answer] == pytest.approx([e["score"] for e in expected], abs=1e-4)


@serving("xenc", "sim")
def test_feature_extraction_and_sentence_similarity(client_for, sources):
    client = client_for("sim")
    model, tokenizer = reference(sources, "sim")
    sentences = ["A cat sits on the mat.", "The weather is lovely today.", TEXT]
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    mean = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    one = client.feature_extraction(sentences[0])
    np.testing.assert_allclose(one, mean[0], atol=2e-5)
    normalized = client.feature_extraction(sentences, normalize=True, truncate=True)
    np.testing.assert_allclose(normalized, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=2e-5)
    similarity = client.sentence_similarity(TEXT, other_sentences=sentences)
    cosine = mean @ mean[2] / (np.linalg.norm(mean, axis=1) * np.linalg.norm(mean[2]))
    np.testing.assert_allclose(similarity, cosine, atol=1e-5)
