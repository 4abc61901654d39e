"""tasks.encode's plain-text path (wordpiece.py, no Rust) against the unmodified tokenizer, called through transformers.

Property: for any text (ASCII or not, control characters, whitespace, punctuation, added tokens such as [SEP],
words longer than WordPiece takes, long text cut by truncation) and any batch mixing them, encode gives the same
input ids, type ids and, for question-answering, the same character offsets and sequence ids as the tokenizer
itself. Checked on the real all-MiniLM-L6-v2 tokenizer and on copies that vary what the Python WordPiece path reproduces
(a BertNormalizer that neither lowercases nor cleans, BertProcessing, truncation from the left, a short word
limit) and what it must leave to the Rust tokenizer (another pre-tokenizer, another normalizer).
"""
from __future__ import annotations

import json
import shutil
import string

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from neuronserve import tasks
from neuronserve.tasks import encoding

QA, CLS = "question-answering", "text-classification"

ODD = ["\t", "\n", "\r", "\x00", "\x0b", "\x0c", "\x1f", "\x7f", "\u00a0", "\u200b", "\ufffd", "é", "É", "ß", "İ",
       "中", "Ω", "😀", "\u0301"]
FRAGMENTS = ["[SEP]", "[sep]", "[CLS]", "[MASK]", "[UNK]", "[PAD", "##ing", "doesn't", "Engine", "locomotive",
             "x" * 120, "  ", "..."]
ascii_text = st.text(alphabet=string.printable, min_size=1, max_size=200)
mixed_text = st.lists(st.one_of(st.sampled_from(list(string.printable) + ODD), st.sampled_from(FRAGMENTS)),
                      min_size=1, max_size=80).map("".join)
texts = st.one_of(ascii_text, ascii_text, mixed_text).filter(str.strip)
max_seqs = st.sampled_from([16, 48, 128])
VARIANTS = ["minilm", "cased-unclean", "bert-processing", "left-truncation", "short-words", "space-split",
            "other-normalizer"]


def _load(path):
    return tasks.load_tokenizer(path)


@pytest.fixture(scope="module")
def tokenizers_under_test(minilm_dir, tmp_path_factory):
    """name -> transformers tokenizer: the real MiniLM one, and variants of its configuration."""
    original = json.loads((minilm_dir / "tokenizer.json").read_text())

    def variant(name: str, *, side: str = "right", **changes):
        out = tmp_path_factory.mktemp(name)
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(minilm_dir / f, out / f)
        config = {**original, **changes}
        (out / "tokenizer.json").write_text(json.dumps(config))
        tc = json.loads((out / "tokenizer_config.json").read_text())
        # the generic fast tokenizer: BertTokenizerFast would rebuild the normalizer from its own options
        (out / "tokenizer_config.json").write_text(json.dumps(
            {**tc, "tokenizer_class": "PreTrainedTokenizerFast", "truncation_side": side}))
        tokenizer = _load(out)
        saved = json.loads(tokenizer.backend_tokenizer.to_str())
        assert all(saved[k] == v for k, v in changes.items() if k != "model")
        return tokenizer

    return {
        "minilm": _load(minilm_dir),
        "cased-unclean": variant("cased", normalizer={
            "type": "BertNormalizer", "clean_text": False, "handle_chinese_chars": False, "strip_accents": False,
            "lowercase": False}),
        "bert-processing": variant("bertproc", post_processor={
            "type": "BertProcessing", "sep": ["[SEP]", 102], "cls": ["[CLS]", 101]}),
        "left-truncation": variant("left", side="left"),
        # more words over the limit than real text has: each is one [UNK]
        "short-words": variant("short", model={**original["model"], "max_input_chars_per_word": 6}),
        # splits on spaces only: \t \n \r are word characters unless the normalizer made them spaces
        "space-split": variant("space", pre_tokenizer={
            "type": "Split", "pattern": {"String": " "}, "behavior": "Removed", "invert": False}),
        "other-normalizer": variant("other", normalizer={"type": "Sequence", "normalizers": [
            {"type": "NFD"}, {"type": "Lowercase"}, {"type": "StripAccents"}]}),
    }


PYTHON_PATH = {"minilm", "cased-unclean", "bert-processing", "left-truncation", "short-words"}


def _reference(tokenizer, items: list, max_seq: int, truncation: bool, pair: bool):
    """The tokenizer's own answer through transformers: per item (ids, type ids, offsets, sequence ids); None
    where it refuses."""
    kw = dict(truncation=("only_second" if pair else True) if truncation else False, max_length=max_seq,
              return_offsets_mapping=True, return_token_type_ids=True, add_special_tokens=True)
    try:
        if pair:
            enc = tokenizer([it.first for it in items], [it.second for it in items], **kw)
        else:
            enc = tokenizer(list(items), **kw)
    except Exception:       # only_second with the question alone over max_length
        return None
    return [(enc["input_ids"][i], enc["token_type_ids"][i], [list(o) for o in enc["offset_mapping"][i]],
             [-1 if s is None else s for s in enc.sequence_ids(i)]) for i in range(len(items))]


def _check(tokenizer, task: str, items: list, max_seq: int, truncation: bool) -> None:
    pair = task == QA
    expected = _reference(tokenizer, items, max_seq, truncation, pair)
    if expected is None:
        with pytest.raises(tasks.BadInput):
            tasks.encode(task, tokenizer, items, max_seq, truncation)
        return
    if any(len(ids) > max_seq for ids, *_ in expected):
        with pytest.raises(tasks.BadInput, match="longer than the largest sequence bucket"):
            tasks.encode(task, tokenizer, items, max_seq, truncation)
        return
    got = tasks.encode(task, tokenizer, items, max_seq, truncation)
    assert len(got) == len(items)
    for item, (ids, type_ids, offsets, sequence_ids) in zip(got, expected):
        assert item.ids["input_ids"].tolist() == ids
        assert item.ids["token_type_ids"].tolist() == type_ids
        assert item.length == len(ids)
        if pair:
            assert item.offsets.tolist() == offsets
            assert item.sequence_ids.tolist() == sequence_ids


@pytest.mark.parametrize("name", VARIANTS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(texts, texts), min_size=1, max_size=4), max_seq=max_seqs, truncation=st.booleans())
def test_qa_encoding_equals_the_tokenizers(tokenizers_under_test, name, pairs, max_seq, truncation):
    _check(tokenizers_under_test[name], QA, [tasks.Pair(q, c) for q, c in pairs], max_seq, truncation)


@pytest.mark.parametrize("name", VARIANTS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(texts, min_size=1, max_size=4), max_seq=max_seqs, truncation=st.booleans())
def test_text_encoding_equals_the_tokenizers(tokenizers_under_test, name, items, max_seq, truncation):
    _check(tokenizers_under_test[name], CLS, items, max_seq, truncation)


def test_the_bench_payload_and_a_long_context_with_truncation(tokenizers_under_test):
    question = "What does the little engine say"
    context = ("In the childrens story about the little engine a small locomotive is pulling a large load up a "
               "mountain. In the story the little engine says: 'I think I can' as it is pulling the heavy load.")
    for tokenizer in tokenizers_under_test.values():
        _check(tokenizer, QA, [tasks.Pair(question, context)], 128, True)
        _check(tokenizer, QA, [tasks.Pair(question, context * 20)] * 2, 128, True)     # cut to 128


@pytest.mark.parametrize("text, plain", [
    ("What does the Engine say?\tIt says:\n'I think I can'", "what does the engine say? it says: 'i think i can'"),
    ("crème brûlée", None),             # non-ASCII: the normalizer strips accents
    ("a\x00b", None),                   # a control character the normalizer drops
    ("before [SEP] after", None),       # an added token
    ("before [sep] after", None),       # ... in its normalized form
])
def test_which_text_takes_the_plain_path(tokenizers_under_test, text, plain):
    backend = encoding._backend(tokenizers_under_test["minilm"], 128, False, None)
    assert backend.plain(text) == plain


@pytest.mark.parametrize("name", VARIANTS)
def test_which_configurations_take_the_python_path(tokenizers_under_test, name):
    for max_length, pair in ((None, False), (16, True)):
        backend = encoding._backend(tokenizers_under_test[name], max_length, pair, None)
        assert (backend.python is not None) == (name in PYTHON_PATH)


def test_the_chunk_cache_starting_afresh_changes_nothing(tokenizers_under_test, monkeypatch):
    from neuronserve import wordpiece

    monkeypatch.setattr(wordpiece, "CACHE_ENTRIES", 3)
    monkeypatch.setattr(wordpiece, "CACHE_CHUNK_CHARS", 5)
    tokenizer = tokenizers_under_test["minilm"]
    encoding._BACKENDS.pop(tokenizer, None)     # a backend whose cache the patched limits govern
    try:
        text = "the little engine says: 'I think I can' as it pulls the heavy load, up and up and up"
        for _ in range(2):
            _check(tokenizer, QA, [tasks.Pair("what does it say?", text)] * 3, 24, True)
        assert len(encoding._backend(tokenizer, 24, True, None).python._cache) <= 3
    finally:
        encoding._BACKENDS.pop(tokenizer, None)
    assert encoding._backend(tokenizers_under_test["cased-unclean"], 128, True, None).plain("Tab\tKept") == "Tab\tKept"
