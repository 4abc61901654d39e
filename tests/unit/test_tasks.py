"""neuronserve.tasks: request parsing, tokenizing, padding, decoding, the traced wrappers and the warm-up helpers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from neuronserve import tasks
from neuronserve.build.artifact import Bucket, Manifest, Warmup

NAMES = ["input_ids", "attention_mask", "token_type_ids"]


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(minilm_dir, local_files_only=True)


def manifest(task, **kw) -> Manifest:
    base = dict(name="m", task=task, backend="cpu", target="cpu", source="/x", created="now", versions={},
                input_names=NAMES, output_names=list(tasks.TASKS[task].output_names),
                buckets=[Bucket(batch=b, seq=s, file=f"b{b}_s{s}.pt", sha256="0") for b in (1, 4) for s in (32, 64)])
    return Manifest(**{**base, **kw})


# ---------------------------------------------------------------- parse_inputs

@pytest.mark.parametrize("task", ["text-classification", "feature-extraction"])
def test_parse_text_forms(task):
    assert tasks.parse(task, "hello").items == ["hello"]
    assert tasks.parse(task, ["a", "b"]).items == ["a", "b"]


def test_parse_qa_forms():
    pair = {"question": "Who?", "context": "Me."}
    expected = [tasks.Pair("Who?", "Me.")]
    assert tasks.parse("question-answering", pair).items == expected
    assert tasks.parse("question-answering", [pair, pair]).items == expected * 2
    assert tasks.parse("question-answering", [["Who?", "Me."]]).items == expected
    # a KServe v2 BYTES tensor: one JSON object string per element
    assert tasks.parse("question-answering", [json.dumps(pair)]).items == expected


@pytest.mark.parametrize("task, inputs, message", [
    ("text-classification", "", "inputs: empty text"),
    ("text-classification", "   ", "inputs: empty text"),
    ("text-classification", [], "inputs: empty list"),
    ("text-classification", None, "inputs: missing"),
    ("text-classification", ["ok", 3], "inputs[1]: expected a string, got int"),
    ("feature-extraction", {"text": "x"}, "sentence similarity takes"),
    ("feature-extraction", {"source_sentence": "x", "sentences": []}, "inputs.sentences: expected a non-empty"),
    ("question-answering", {"question": "q"}, "inputs: missing 'context'"),
    ("question-answering", {}, "inputs: missing 'question' and 'context'"),
    ("question-answering", {"question": "q", "context": "c", "top_k": 2}, "unknown key(s) 'top_k'"),
    ("question-answering", "plain text", "got a plain string"),
    ("question-answering", [{"question": "q", "context": ""}], "inputs[0].context: empty text"),
    ("question-answering", 5, "got int"),
])
def test_parse_rejects_with_readable_message(task, inputs, message):
    with pytest.raises(tasks.BadInput) as e:
        tasks.parse(task, inputs)
    assert message in str(e.value)


def test_unknown_task():
    with pytest.raises(tasks.BadInput, match="unknown task 'translation'"):
        tasks.parse("translation", "x")


# ---------------------------------------------------------------- encode and pad

def test_encode_is_unpadded_and_matches_the_tokenizer(tokenizer):
    texts = ["short", "a somewhat longer sentence with more words"]
    enc = tasks.encode("text-classification", tokenizer, texts, 64, truncation=False)
    for text, item in zip(texts, enc):
        ref = tokenizer(text)["input_ids"]
        assert item.ids["input_ids"].tolist() == ref
        assert item.length == len(ref)
        assert item.ids["input_ids"].dtype == np.int64
        assert set(item.ids) == set(NAMES)
    assert enc[0].length < enc[1].length


def test_encode_truncates_or_names_the_limit(tokenizer):
    long = "word " * 100
    [item] = tasks.encode("text-classification", tokenizer, [long], 16, truncation=True)
    assert item.length == 16
    assert item.ids["input_ids"][-1] == tokenizer.sep_token_id
    with pytest.raises(tasks.BadInput,
                       match=r"inputs\[0\]: 102 tokens, longer than the largest sequence bucket \(16\)"):
        tasks.encode("text-classification", tokenizer, [long], 16, truncation=False)


def test_encode_qa_truncates_only_the_context(tokenizer):
    item = tasks.Pair("Where is it?", "It is here. " * 40)
    [enc] = tasks.encode("question-answering", tokenizer, [item], 32, truncation=True)
    assert enc.length == 32
    question_tokens = (enc.sequence_ids == 0).sum()
    assert question_tokens == len(tokenizer.tokenize("Where is it?"))
    assert enc.offsets.shape == (32, 2) and enc.context == item.second
    # token_type_ids mark the context as the second segment
    assert (enc.ids["token_type_ids"][enc.sequence_ids == 1] == 1).all()
    with pytest.raises(tasks.BadInput, match="32"):
        tasks.encode("question-answering", tokenizer, [item], 32, truncation=False)
    with pytest.raises(tasks.BadInput, match="question too long"):
        tasks.encode("question-answering", tokenizer, [tasks.Pair("why " * 60, "ok")], 32, truncation=True)


def test_pad_packs_rows_and_zero_fills(tokenizer):
    enc = tasks.encode("text-classification", tokenizer, ["one", "two words here"], 16, truncation=True)
    ids, mask, types = tasks.pad(enc, 4, 16, NAMES)
    assert ids.shape == mask.shape == types.shape == (4, 16) and ids.dtype == np.int64
    for row, item in enumerate(enc):
        assert ids[row, :item.length].tolist() == item.ids["input_ids"].tolist()
        assert mask[row].tolist() == [1] * item.length + [0] * (16 - item.length)
    assert not ids[2:].any() and not mask[2:].any()
    # input order follows the names given (the manifest's)
    m2, i2 = tasks.pad(enc, 2, 16, ["attention_mask", "input_ids"])
    assert (m2 == mask[:2]).all() and (i2 == ids[:2]).all()
    with pytest.raises(ValueError):
        tasks.pad(enc, 1, 16, NAMES)
    with pytest.raises(ValueError):
        tasks.pad(enc, 2, 3, NAMES)


# ---------------------------------------------------------------- decode

def _qa_item(tokenizer, question="Where do I live?", context="My name is Wolfgang and I live in Berlin."):
    [enc] = tasks.encode("question-answering", tokenizer, [tasks.Pair(question, context)], 64, truncation=True)
    return enc


def _decode_qa(start, end, enc, tokenizer, **parameters):
    """One item's answer, decoded as a batch of one."""
    options = tasks.parse("question-answering", {"question": "q", "context": "c"}, parameters).options
    [answer] = tasks.decode("question-answering", manifest("question-answering"), [start[None], end[None]], [enc],
                            [options], tokenizer)
    return answer


def _token_of(enc, word):
    """Index of the context token whose text is `word`."""
    for t in np.flatnonzero(enc.sequence_ids == 1):
        s, e = enc.offsets[t]
        if enc.context[s:e] == word:
            return int(t)
    raise AssertionError(word)


def test_decode_qa_answers_from_offsets(tokenizer):
    enc = _qa_item(tokenizer)
    start, end = np.zeros(64), np.zeros(64)
    start[_token_of(enc, "Wolfgang")] = 8
    end[_token_of(enc, "Wolfgang")] = 8
    # a higher logit on a question token and on padding must be ignored: answers come from the context
    start[_token_of(enc, "Wolfgang") - 6] = start[60] = end[60] = 50
    ans = _decode_qa(start, end, enc, tokenizer)
    assert ans["answer"] == "Wolfgang" == enc.context[ans["start"]:ans["end"]]
    assert 0.5 < ans["score"] <= 1.0


def test_decode_qa_end_not_before_start_and_at_most_max_answer_len_tokens(tokenizer):
    context = " ".join(f"w{i}" for i in range(60))
    enc = _qa_item(tokenizer, "Which?", context)
    start, end = np.zeros(64), np.zeros(64)
    ctx = np.flatnonzero(enc.sequence_ids == 1)
    start[ctx[20]] = 10
    start[:ctx[20]] = -30    # no plausible start before token 20 ...
    end[ctx[5]] = 20         # ... so this end, before the best start, pairs with nothing valid
    end[ctx[21]] = 5
    ans = _decode_qa(start, end, enc, tokenizer)
    assert ans["start"] == enc.offsets[ctx[20], 0] and ans["end"] == enc.offsets[ctx[21], 1]
    start[:], end[:] = 0, 0
    start[ctx[0]], end[ctx[45]] = 10, 10    # 46 tokens: too long
    ans = _decode_qa(start, end, enc, tokenizer)
    span_tokens = [t for t in ctx if enc.offsets[t, 0] >= ans["start"] and enc.offsets[t, 1] <= ans["end"]]
    assert 1 <= len(span_tokens) <= tasks.MAX_ANSWER_TOKENS


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), words=st.lists(st.sampled_from(["alpha", "beta", "gamma", "x", "42", "über",
                                                                          "co-op", "it's"]), min_size=1, max_size=40))
def test_decode_qa_always_returns_a_span_of_the_context(tokenizer, seed, words):
    enc = _qa_item(tokenizer, "What?", " ".join(words))
    rng = np.random.default_rng(seed)
    start, end = rng.normal(size=64) * 5, rng.normal(size=64) * 5
    ans = _decode_qa(start, end, enc, tokenizer)
    assert 0 <= ans["start"] <= ans["end"] <= len(enc.context)
    assert ans["answer"] == enc.context[ans["start"]:ans["end"]] and ans["answer"]
    assert 0.0 <= ans["score"] <= 1.0


def _brute_force_qa(start_logits, end_logits, enc, tokenizer, max_answer_len=tasks.MAX_ANSWER_TOKENS):
    """The answer by the transformers pipeline's definition: softmax over the context tokens and CLS, every span of
    at most max_answer_len context tokens, the first best in (start, end) order."""
    ctx = np.flatnonzero(enc.sequence_ids == 1)
    first, n = int(ctx[0]), len(ctx)
    kept = [0] + list(ctx)      # CLS is token 0
    s, e = (np.asarray(o, dtype=np.float32).astype(np.float64)[kept] for o in (start_logits, end_logits))
    ps, pe = np.exp(s - s.max()), np.exp(e - e.max())
    ps, pe = ps[1:] / ps.sum(), pe[1:] / pe.sum()
    best = None
    for i in range(n):
        for j in range(i, min(n, i + max_answer_len)):
            if best is None or ps[i] * pe[j] > best[0]:
                best = (ps[i] * pe[j], i, j)
    score, i, j = best
    start, end = int(enc.offsets[first + i, 0]), int(enc.offsets[first + j, 1])
    return {"answer": enc.context[start:end], "score": float(score), "start": start, "end": end}


logit = st.one_of(st.integers(-3, 3).map(float), st.floats(-40, 40, width=32))     # small integers: exact ties


@settings(max_examples=60, deadline=None)
@given(words=st.integers(1, 140), logits=st.lists(logit, min_size=256, max_size=256))
def test_decode_qa_equals_the_brute_force_answer(tokenizer, words, logits):
    """The same span exactly (ties included); the score to rounding, as the batch sums each softmax over its
    padded row, in another order."""
    enc = _qa_item(tokenizer, "Which word?", " ".join(f"w{i}" for i in range(words)))     # long ones are cut
    start, end = np.asarray(logits[:128], dtype=np.float32), np.asarray(logits[128:], dtype=np.float32)
    got, expected = _decode_qa(start, end, enc, tokenizer), _brute_force_qa(start, end, enc, tokenizer)
    assert got == {**expected, "score": pytest.approx(expected["score"], rel=1e-12)}


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_decode_qa_of_a_batch_equals_each_item_decoded_alone(tokenizer, data):
    """Items of different lengths in one padded batch (rows past them are padding) answer as they do alone."""
    n = data.draw(st.integers(1, 5))
    items = [_qa_item(tokenizer, data.draw(st.sampled_from(["Which?", "Which word is it?"])),
                      " ".join(f"w{i}" for i in range(data.draw(st.integers(1, 70))))) for _ in range(n)]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    start, end = (rng.normal(size=(n + 2, 64)).astype(np.float32) * 4 for _ in range(2))
    batch = tasks.decode("question-answering", manifest("question-answering"), [start, end], items,
                         tokenizer=tokenizer)
    assert batch == [_decode_qa(start[r], end[r], item, tokenizer) for r, item in enumerate(items)]


def test_decode_qa_answers_empty_for_a_context_the_normalizer_empties(tokenizer):
    items = tasks.encode("question-answering", tokenizer, [tasks.Pair("What?", "\x00\x01"),
                                                           tasks.Pair("What?", "only this")], 16, True)
    assert 1 not in items[0].encoding.sequence_ids
    logits = np.zeros((2, 16), dtype=np.float32)
    empty, other = tasks.decode("question-answering", manifest("question-answering"), [logits, logits], items,
                                tokenizer=tokenizer)
    assert empty == {"answer": "", "score": 0.0, "start": 0, "end": 0}
    # equal logits: CLS and the two context tokens share the probability, each span 1/3 x 1/3, the first wins
    assert other == {"answer": "only", "score": pytest.approx(1 / 9), "start": 0, "end": 4}


def test_decode_qa_parameters(tokenizer):
    """top_k answers best first, max_answer_len bounds the span, handle_impossible_answer lets CLS win."""
    enc = _qa_item(tokenizer, "Which?", " ".join(f"w{i}" for i in range(30)))
    rng = np.random.default_rng(7)
    start, end = rng.normal(size=64).astype(np.float32), rng.normal(size=64).astype(np.float32)
    three = _decode_qa(start, end, enc, tokenizer, top_k=3)
    assert len(three) == 3 and three[0] == _decode_qa(start, end, enc, tokenizer)
    assert [a["score"] for a in three] == sorted((a["score"] for a in three), reverse=True)
    short = _decode_qa(start, end, enc, tokenizer, max_answer_len=4)
    assert short == {**_brute_force_qa(start, end, enc, tokenizer, 4), "score": pytest.approx(short["score"])}
    start[0] = end[0] = 20.0     # CLS: the model says there is no answer
    assert _decode_qa(start, end, enc, tokenizer)["answer"]
    nothing = _decode_qa(start, end, enc, tokenizer, handle_impossible_answer=True)
    assert nothing == {"answer": "", "score": pytest.approx(nothing["score"]), "start": 0, "end": 0}
    assert nothing["score"] > 0.9


def test_decode_classification_softmax_sorted():
    m = manifest("text-classification", labels={"0": "NEGATIVE", "1": "POSITIVE", "2": "NEUTRAL"})
    [out] = tasks.decode("text-classification", m, [np.array([[0.5, 2.0, -1.0]], dtype=np.float32)], [None])
    assert [r["label"] for r in out] == ["POSITIVE", "NEGATIVE", "NEUTRAL"]
    e = np.exp([0.5, 2.0, -1.0])
    assert out[0]["score"] == pytest.approx(e[1] / e.sum())
    assert sum(r["score"] for r in out) == pytest.approx(1.0)


def test_decode_classification_multi_label_sigmoid():
    m = manifest("text-classification", labels={"0": "a", "1": "b"}, problem_type="multi_label_classification")
    [out] = tasks.decode("text-classification", m, [np.array([[3.0, 1.0]])], [None])
    assert out[0] == {"label": "a", "score": pytest.approx(1 / (1 + np.exp(-3.0)))}
    assert out[1]["score"] == pytest.approx(1 / (1 + np.exp(-1.0)))


def test_decode_embedding_is_a_list_of_floats():
    [out] = tasks.decode("feature-extraction", manifest("feature-extraction"), [np.arange(4, dtype=np.float32)[None]],
                         [None])
    assert out == [0.0, 1.0, 2.0, 3.0] and all(isinstance(x, float) for x in out)


# ---------------------------------------------------------------- wrapper modules

@pytest.fixture(scope="module")
def minilm(minilm_dir):
    import transformers

    return transformers.AutoModel.from_pretrained(minilm_dir, local_files_only=True).eval()


def test_embedding_mean_pooling_ignores_padding_and_normalizes(tokenizer, minilm):
    texts = ["The cat sits on the mat.", "Embeddings do not depend on the padding."]
    enc = tasks.encode("feature-extraction", tokenizer, texts, 64, truncation=True)
    module = tasks.build_module("feature-extraction", minilm, NAMES, pooling="mean", normalize=True)
    with torch.no_grad():
        short = module(*map(torch.from_numpy, tasks.pad(enc, 2, 16, NAMES)))[0]
        long = module(*map(torch.from_numpy, tasks.pad(enc, 4, 64, NAMES)))[0]
        # reference: per-item mean of the unpadded hidden states, normalized
        for row, item in enumerate(enc):
            hidden = minilm(**{k: torch.from_numpy(v)[None] for k, v in item.ids.items()}).last_hidden_state[0]
            ref = torch.nn.functional.normalize(hidden.mean(0), dim=0)
            assert torch.allclose(short[row], ref, atol=1e-5)
    assert torch.allclose(short, long[:2], atol=1e-5)
    assert torch.allclose(short.norm(dim=1), torch.ones(2), atol=1e-6)
    assert (long[2:] == 0).all()    # padding rows: no tokens, zero vector, no NaN


def test_embedding_cls_pooling_without_normalize(tokenizer, minilm):
    enc = tasks.encode("feature-extraction", tokenizer, ["hello there"], 16, truncation=True)
    arrays = [torch.from_numpy(a) for a in tasks.pad(enc, 1, 16, NAMES)]
    module = tasks.build_module("feature-extraction", minilm, NAMES, pooling="cls", normalize=False)
    with torch.no_grad():
        got = module(*arrays)[0]
        ref = minilm(**dict(zip(NAMES, arrays))).last_hidden_state[:, 0]
    assert torch.equal(got, ref)


def test_embedding_module_rejects_bad_options(minilm):
    with pytest.raises(ValueError, match="pooling 'weightedmean'"):
        tasks.build_module("feature-extraction", minilm, NAMES, pooling="weightedmean")
    with pytest.raises(ValueError, match="attention_mask"):
        tasks.build_module("feature-extraction", minilm, ["input_ids"], pooling="mean")


@pytest.mark.parametrize("task", ["question-answering", "text-classification"])
def test_task_modules_return_the_declared_outputs(task, tiny_model_dir, tokenizer):
    import transformers

    model = getattr(transformers, tasks.TASKS[task].auto_class).from_pretrained(tiny_model_dir(task)).eval()
    module = tasks.build_module(task, model, NAMES)
    items = [tasks.item_from_json(it) for it in tasks.warmup_items(task, tokenizer)]
    arrays = [torch.from_numpy(a) for a in tasks.pad(tasks.encode(task, tokenizer, items, 32, True), 4, 32, NAMES)]
    with torch.no_grad():
        out = module(*arrays)
        ref = model(**dict(zip(NAMES, arrays)))
    assert isinstance(out, tuple) and len(out) == len(tasks.TASKS[task].output_names)
    for name, tensor in zip(tasks.TASKS[task].output_names, out):
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, getattr(ref, name))


# ---------------------------------------------------------------- warm-up helpers

def test_warmup_batches_use_smallest_bucket_or_chunks(tokenizer):
    m = manifest("text-classification")
    batches = tasks.warmup_batches("text-classification", tokenizer, m, ["a", "b"])
    assert len(batches) == 1 and batches[0][0][0].shape == (4, 32) and len(batches[0][1]) == 2
    batches = tasks.warmup_batches("text-classification", tokenizer, m, ["a"] * 9)
    assert [b[0][0].shape for b in batches] == [(4, 32)] * 3 and [len(b[1]) for b in batches] == [4, 4, 1]
    one = tasks.warmup_batches("text-classification", tokenizer, m, ["a"])
    assert one[0][0][0].shape == (1, 32)


def test_warmup_mismatch_compares_real_rows_and_tokens(tokenizer):
    task = "question-answering"
    texts = tasks.warmup_items(task, tokenizer)
    m = manifest(task)
    batches = tasks.warmup_batches(task, tokenizer, m, texts)
    rng = np.random.default_rng(0)
    outputs = [((rng.normal(size=(4, 32)).astype(np.float32), rng.normal(size=(4, 32)).astype(np.float32)), items)
               for _, items in batches]
    expected = tasks.warmup_outputs(outputs, m.output_names)
    assert np.asarray(expected["start_logits"]).shape == (len(texts), 32)
    m.warmup = Warmup(texts=texts, expected=expected, atol=1e-3)
    items = [it for _, its in batches for it in its]
    assert tasks.warmup_mismatch(m, expected, items) is None
    # garbage past an item's length (padding positions) does not matter
    noisy = {k: np.asarray(v).copy() for k, v in expected.items()}
    noisy["start_logits"][0, items[0].length:] += 100
    assert tasks.warmup_mismatch(m, noisy, items) is None
    # a real token off by more than atol does
    noisy["end_logits"][1, 0] += 0.01
    assert "end_logits[1]" in tasks.warmup_mismatch(m, noisy, items)
    assert "shape" in tasks.warmup_mismatch(m, {**expected, "start_logits": [[0.0]]}, items)


def test_warmup_atol():
    assert tasks.warmup_atol("cpu", "float32") == tasks.warmup_atol("cuda", "float32") == 1e-3
    assert tasks.warmup_atol("neuron", "bfloat16") == tasks.warmup_atol("cuda", "float16") == 5e-2


def test_the_config_takes_every_task_of_the_registry():
    from neuronserve import config

    assert list(config.Task.__args__) == list(tasks.TASKS)


def test_the_request_path_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from neuronserve import tasks; tasks.parse('text-classification', 'x'); "
            "from neuronserve.tasks import encoding; print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
