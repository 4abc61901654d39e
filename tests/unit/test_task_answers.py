"""Every task's answers, served by the real app in-process, against references outside neuronserve: the transformers
pipelines (token-classification, fill-mask, text-classification, zero-shot-classification) run on the eager model
of the same directory, sentence-transformers for embeddings, and decodes written here from the eager logits where
transformers has no pipeline (question-answering, sentence similarity).

Models: small random ones of three tokenizer families, WordPiece (bert), byte-level BPE (roberta) and Unigram
(xlm-roberta), from dev.random_models.build_model. The same bodies with bad inputs get a 4xx naming the
problem.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import transformers

from neuronserve import tasks
from dev import random_models
from references import qa_answer
from server_kit import compiled, in_process

FAMILIES = ("bert", "roberta", "xlm-roberta")      # WordPiece, byte-level BPE, Unigram
BUCKETS = dict(batch_sizes=(1, 4), sequence_lengths=(64,))
TEXTS = ["My name is Wolfgang and I live in Berlin.", "Hugging Face Inc. is a company in New York City!",
         "Unusualwords like tokenizationally split into pieces, don't they?"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """served(family, task, **build) -> (TestClient of the app, its model's name, eager model, tokenizer)."""
    made = {}
    root = tmp_path_factory.mktemp("task-answers")
    with in_process() as start:
        def serve(family: str, task: str, **build):
            key = (family, task, tuple(sorted(build.items())))
            if key not in made:
                name = f"{family}-{task}-{len(made)}"
                source = random_models.build_model(root / "src" / name, family, task, **build)
                client = start(compiled(root / "out", source, task, name=name, **BUCKETS))
                auto = getattr(transformers, tasks.get(task).auto_class)
                model = auto.from_pretrained(source, local_files_only=True, attn_implementation="eager").eval()
                tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
                made[key] = client, name, model, tokenizer
            return made[key]

        yield serve


def post(client, name, body, status=200):
    r = client.post(f"/models/{name}", json=body)
    assert r.status_code == status, r.text
    return r.json()


def pipeline(task, model, tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.pipeline(task, model=model, tokenizer=tokenizer, device="cpu")


def same(got, expected, rel=1e-4, abs=2e-5):
    """Equal answers: numbers to float32 rounding (traced vs eager), everything else exactly."""
    if isinstance(expected, dict):
        assert set(got) == set(expected), (got, expected)
        for k in expected:
            same(got[k], expected[k], rel, abs)
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), (got, expected)
        for g, e in zip(got, expected):
            same(g, e, rel, abs)
    elif isinstance(expected, (float, np.floating)):
        assert got == pytest.approx(float(expected), rel=rel, abs=abs)
    else:
        assert got == expected


# ---------------------------------------------------------------- token-classification

@pytest.mark.parametrize("family", FAMILIES)
def test_token_classification_every_strategy_equals_the_pipeline(served, family):
    client, name, model, tokenizer = served(family, "token-classification")
    ner = pipeline("token-classification", model, tokenizer)
    for strategy in ("none", "simple", "first", "average", "max"):
        for ignore in (None, ["O", "I-PER"]):
            parameters = {"aggregation_strategy": strategy, **({"ignore_labels": ignore} if ignore else {})}
            got = post(client, name, {"inputs": TEXTS, "parameters": parameters})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")     # "fallback heuristic" for tokenizers without ## pieces
                expected = ner(TEXTS, aggregation_strategy=strategy, ignore_labels=ignore)
            same(got, expected)
            for text, entities in zip(TEXTS, got):
                for e in entities:       # character offsets into the text as sent
                    assert 0 <= e["start"] < e["end"] <= len(text)
    # the default is the Inference API's: simple
    same(post(client, name, {"inputs": TEXTS[0]}), ner(TEXTS[0], aggregation_strategy="simple"))


# ---------------------------------------------------------------- fill-mask

@pytest.mark.parametrize("family", FAMILIES)
def test_fill_mask_equals_the_pipeline(served, family):
    client, name, model, tokenizer = served(family, "fill-mask")
    fill = pipeline("fill-mask", model, tokenizer)
    mask = tokenizer.mask_token
    one = f"The capital of France is {mask}."
    same(post(client, name, {"inputs": one}), fill(one))
    same(post(client, name, {"inputs": one, "parameters": {"top_k": 12}}), fill(one, top_k=12))
    two = f"I {mask} this {mask} a lot."
    same(post(client, name, {"inputs": [one, two]}), fill([one, two]))


@pytest.mark.parametrize("body, status, message", [
    ({"inputs": "no mask here"}, 422, "no mask token"),
    ({"inputs": "x", "parameters": {"top_k": 0}}, 400, "parameters.top_k"),
    ({"inputs": "x", "parameters": {"targets": ["a"]}}, 400, "unknown 'targets'; fill-mask takes top_k"),
])
def test_fill_mask_bad_input(served, body, status, message):
    client, name, *_ = served("bert", "fill-mask")
    assert message in post(client, name, body, status)["error"]


# ---------------------------------------------------------------- text-classification: texts, pairs, heads

@pytest.mark.parametrize("family", FAMILIES)
def test_text_and_pair_classification_equal_the_pipeline(served, family):
    client, name, model, tokenizer = served(family, "text-classification", labels=("neg", "neutral", "pos"))
    classify = pipeline("text-classification", model, tokenizer)
    pair = {"text": "A man is eating food.", "text_pair": "A man eats something."}
    # one input is nested, as the Inference API answers it
    same(post(client, name, {"inputs": TEXTS[0]}), [classify(TEXTS[0], top_k=None)])
    same(post(client, name, {"inputs": pair}), [classify(pair, top_k=None)])
    same(post(client, name, {"inputs": [pair, TEXTS[1]]}),
         [classify(pair, top_k=None), classify(TEXTS[1], top_k=None)])
    for parameters in ({"top_k": 2}, {"function_to_apply": "sigmoid"}, {"function_to_apply": "none", "top_k": 1}):
        same(post(client, name, {"inputs": pair, "parameters": parameters}),
             [classify(pair, **{"top_k": None, **parameters})])


@pytest.mark.parametrize("problem_type, labels", [("multi_label_classification", ("a", "b", "c")),
                                                  ("regression", ("score",)), (None, ("relevance",))])
def test_classification_heads_default_as_the_pipeline(served, problem_type, labels):
    """Multi-label: sigmoids; regression: raw values; one output (a cross-encoder): its sigmoid."""
    client, name, model, tokenizer = served("bert", "text-classification", labels=labels, problem_type=problem_type)
    classify = pipeline("text-classification", model, tokenizer)
    pair = {"text": "what is a cat", "text_pair": "A cat is a small domesticated carnivorous mammal."}
    same(post(client, name, {"inputs": pair}), [classify(pair, top_k=None)])


@pytest.mark.parametrize("body, status, message", [
    ({"inputs": {"text": "only one"}}, 422, "missing 'text_pair'"),
    ({"inputs": {"text_pair": "no text"}}, 422, "missing 'text'"),
    ({"inputs": {"text": "a", "pair": "b"}}, 422, "unknown key(s) 'pair'"),
    ({"inputs": "a", "parameters": {"function_to_apply": "tanh"}}, 400, "softmax, sigmoid, none"),
    ({"inputs": "a", "parameters": {"top_k": "2"}}, 400, "parameters.top_k: expected an integer"),
    ({"inputs": "a", "parameters": {"topk": 2}}, 400, "unknown 'topk'; text-classification takes top_k, "
                                                      "function_to_apply, truncation"),
])
def test_text_classification_bad_input(served, body, status, message):
    client, name, *_ = served("bert", "text-classification", labels=("neg", "neutral", "pos"))
    assert message in post(client, name, body, status)["error"]


# ---------------------------------------------------------------- zero-shot-classification

@pytest.mark.parametrize("family", FAMILIES)
def test_zero_shot_equals_the_pipeline(served, family):
    client, name, model, tokenizer = served(family, "zero-shot-classification")
    zero_shot = pipeline("zero-shot-classification", model, tokenizer)
    labels = ["politics", "sport", "cooking"]

    def expected(text, **kw):
        r = zero_shot(text, candidate_labels=labels, **kw)
        return [{"label": label, "score": score} for label, score in zip(r["labels"], r["scores"])]

    same(post(client, name, {"inputs": TEXTS[0], "parameters": {"candidate_labels": labels}}), expected(TEXTS[0]))
    parameters = {"candidate_labels": ", ".join(labels), "multi_label": True, "hypothesis_template": "It is {}."}
    same(post(client, name, {"inputs": TEXTS[:2], "parameters": parameters}),
         [expected(t, multi_label=True, hypothesis_template="It is {}.") for t in TEXTS[:2]])
    same(post(client, name, {"inputs": TEXTS[1], "parameters": {"candidate_labels": ["sport"]}}),
         [{"label": "sport", "score": zero_shot(TEXTS[1], candidate_labels=["sport"])["scores"][0]}])


@pytest.mark.parametrize("parameters, message", [
    ({}, "parameters.candidate_labels: required"),
    ({"candidate_labels": []}, "expected a non-empty list"),
    ({"candidate_labels": ["a"], "hypothesis_template": "no slot"}, "has no {} for the label"),
])
def test_zero_shot_bad_parameters(served, parameters, message):
    client, name, *_ = served("bert", "zero-shot-classification")
    assert message in post(client, name, {"inputs": "a text", "parameters": parameters}, 400)["error"]


# ---------------------------------------------------------------- question-answering

@pytest.mark.parametrize("family", FAMILIES)
def test_question_answering_equals_the_reference_decode(served, family):
    client, name, model, tokenizer = served(family, "question-answering")
    q, c = "Where does Wolfgang live?", "My name is Wolfgang and I live in Berlin, a city in Germany."
    same(post(client, name, {"inputs": {"question": q, "context": c}}), qa_answer(model, tokenizer, q, c))
    same(post(client, name, {"inputs": {"question": q, "context": c}, "parameters": {"max_answer_len": 2}}),
         qa_answer(model, tokenizer, q, c, 2))
    top = post(client, name, {"inputs": {"question": q, "context": c}, "parameters": {"top_k": 3}})
    assert len(top) == 3 and top[0]["score"] >= top[1]["score"] >= top[2]["score"]


# ---------------------------------------------------------------- feature-extraction and sentence similarity

@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_and_sentence_similarity(served, family):
    client, name, model, tokenizer = served(family, "feature-extraction")
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    mean = ((hidden * mask).sum(1) / mask.sum(1)).numpy()         # mean pooling: no modules.json
    got = np.asarray(post(client, name, {"inputs": TEXTS}))
    np.testing.assert_allclose(got, mean, atol=2e-5)
    normalized = np.asarray(post(client, name, {"inputs": TEXTS[0], "normalize": True}))    # TEI style, top level
    np.testing.assert_allclose(normalized, mean[0] / np.linalg.norm(mean[0]), atol=2e-5)
    similarity = post(client, name, {"inputs": {"source_sentence": TEXTS[0], "sentences": TEXTS}})
    cosine = mean @ mean[0] / (np.linalg.norm(mean, axis=1) * np.linalg.norm(mean[0]))
    np.testing.assert_allclose(similarity, cosine, atol=1e-5)
    assert similarity[0] == pytest.approx(1.0)


def test_sentence_transformers_model_answers_as_sentence_transformers(served, tmp_path):
    """Pooling, Dense and Normalize as the package computes them (its own encode is the reference)."""
    from sentence_transformers import SentenceTransformer, util

    source = random_models.build_sentence_transformer(tmp_path / "st", "mpnet", pooling="cls",
                                                       dense=((24, True, torch.nn.Tanh),),
                                                       normalize=True)
    artifact = compiled(tmp_path / "out", source, "feature-extraction", name="st", **BUCKETS)
    reference = SentenceTransformer(str(source), device="cpu")
    with in_process() as start:
        client = start(artifact)
        got = np.asarray(post(client, "st", {"inputs": TEXTS}))
        np.testing.assert_allclose(got, reference.encode(TEXTS), atol=2e-5)
        similarity = post(client, "st", {"inputs": {"source_sentence": TEXTS[0], "sentences": TEXTS[1:]}})
        expected = util.cos_sim(reference.encode(TEXTS[:1]), reference.encode(TEXTS[1:])).tolist()[0]
        np.testing.assert_allclose(similarity, expected, atol=1e-5)
        refused = post(client, "st", {"inputs": "x", "parameters": {"normalize": False}}, 400)
        assert "Normalize module" in refused["error"]


# ---------------------------------------------------------------- the same tasks over KServe v2

def v2_text(name, data):
    return {"name": name, "datatype": "BYTES", "shape": [len(data)], "data": data}


@pytest.mark.parametrize("task, body, parameters", [
    ("token-classification", {"inputs": TEXTS}, {"aggregation_strategy": "first"}),
    ("zero-shot-classification", {"inputs": TEXTS[:2]}, {"candidate_labels": ["sport", "politics"]}),
])
def test_kserve_v2_text_answers_as_the_task_route(served, task, body, parameters):
    """BYTES text in, the raw per-token (or per-pair) outputs and each input's answer out; the request's
    parameters are the task's."""
    client, name, model, tokenizer = served("roberta", task)
    r = client.post(f"/v2/models/{name}/infer", json={"inputs": [v2_text("text", body["inputs"])],
                                                       "parameters": parameters})
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    answers = [json.loads(a) for a in outputs["answer"]["data"]]
    # the same answers, to float rounding: the two requests may run in batches of different shapes
    same(answers, post(client, name, {**body, "parameters": parameters}), rel=1e-6, abs=1e-6)
    logits = outputs["logits"]
    labels = len(model.config.id2label)
    if task == "token-classification":     # [texts, longest, labels]: the eager logits of each text's tokens
        assert logits["shape"][0] == len(TEXTS) and logits["shape"][2] == labels
        data = np.asarray(logits["data"]).reshape(logits["shape"])
        for row, text in enumerate(TEXTS):
            enc = tokenizer(text, return_tensors="pt")
            with torch.no_grad():
                eager = model(**enc).logits[0].numpy()
            np.testing.assert_allclose(data[row, :len(eager)], eager, atol=1e-4)
    else:                                  # one row per (text, label) pair
        assert logits["shape"] == [2 * 2, labels]
    refused = client.post(f"/v2/models/{name}/infer", json={"inputs": [v2_text("text", ["x"])],
                                                             "parameters": {"nonsense": 1}})
    assert refused.status_code == 400 and "unknown 'nonsense'" in refused.json()["error"]


def test_metadata_names_the_task_parameters_and_output_shapes(served):
    client, name, model, _ = served("bert", "fill-mask")
    meta = client.get(f"/v2/models/{name}").json()
    assert meta["parameters"]["task"] == "fill-mask" and meta["parameters"]["task_parameters"] == ["top_k",
                                                                                                   "truncation"]
    assert meta["parameters"]["architecture"] == "bert"
    shapes = {o["name"]: o["shape"] for o in meta["outputs"]}
    assert shapes["log_probs"] == shapes["token_ids"] == [-1, -1, 50]
