"""wordpiece.WordPiece.load: which configurations it takes, and its load-time check against the Rust tokenizer.

On the real all-MiniLM-L6-v2 tokenizer and copies of its configuration: the check passes wherever the Python
WordPiece reproduces the Rust tokenizer (whatever the truncation), a key or value the loader does not know
falls back to Rust, and the check itself, not the key filter, refuses a Python tokenizer, a caller's `prepare`
or a reference that does not agree, naming the first text that differs.
"""
from __future__ import annotations

import json
import logging
import re
import string

import pytest
import tokenizers

from neuronserve import wordpiece
from neuronserve.wordpiece import WordPiece

# the caller's test for text the normalizer would not map one character for one (control characters it drops)
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# (max_length, pair, direction) as the caller configures its references
TRUNCATIONS = [(None, False, "right"), (None, True, "right"), (128, False, "right"), (384, True, "right"),
               (16, True, "left"), (512, False, "left"), (6, True, "right")]


@pytest.fixture(scope="module")
def minilm_config(minilm_dir) -> dict:
    from transformers import AutoTokenizer

    return json.loads(AutoTokenizer.from_pretrained(minilm_dir).backend_tokenizer.to_str())


@pytest.fixture
def warnings(caplog, monkeypatch):
    """The "neuronserve.server" log's warnings (the server's log setup may stop it propagating to caplog)."""
    monkeypatch.setattr(logging.getLogger("neuronserve.server"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="neuronserve.server")
    return caplog


def reference(config: dict, max_length: int | None, pair: bool, direction: str = "right") -> tokenizers.Tokenizer:
    """The Rust tokenizer of `config` as the caller sets it up: no padding, truncating only_second for pairs and
    longest_first for single texts."""
    rust = tokenizers.Tokenizer.from_str(json.dumps(config))
    rust.no_padding()
    if max_length is None:
        rust.no_truncation()
    else:
        rust.enable_truncation(max_length, strategy="only_second" if pair else "longest_first", direction=direction)
    return rust


def plain(rust: tokenizers.Tokenizer, *, added: bool = True, control: bool = True):
    """The caller's `prepare`: the normalizer's output for ASCII text it maps one character for one and that
    holds no added token, as given or normalized; None for any other text. `added`/`control` False: a faulty
    one, letting added tokens / control characters through."""
    normalize = rust.normalizer.normalize_str
    tokens = [t.content for t in rust.get_added_tokens_decoder().values()] if added else []
    tokens += [normalize(t) for t in tokens]

    def prepare(text: str) -> str | None:
        if not text.isascii() or (control and CONTROL.search(text)):
            return None
        out = normalize(text)
        return None if any(t in text or t in out for t in tokens) else out

    return prepare


def changed(config: dict, section: str | None, key: str, value=None, *, drop: bool = False) -> dict:
    """A copy of `config` with `section`'s (None: the top level's) `key` set to `value`, or dropped."""
    part = dict(config if section is None else config[section])
    if drop:
        del part[key]
    else:
        part[key] = value
    return part if section is None else {**config, section: part}


@pytest.mark.parametrize("max_length, pair, direction", TRUNCATIONS)
def test_minilm_passes_the_check(minilm_config, warnings, max_length, pair, direction):
    rust = reference(minilm_config, max_length, pair, direction)
    loaded = WordPiece.load(minilm_config, max_length, direction, reference=rust, prepare=plain(rust))
    assert isinstance(loaded, WordPiece)
    assert not warnings.records


def test_the_corpus_covers_what_it_says(minilm_config):
    """Every ASCII punctuation character; texts cut inside a word's pieces, and pairs refused, at the length."""
    assert set(string.punctuation) <= set(wordpiece.CORPUS_TEXTS[0])
    rust = reference(minilm_config, 128, True)
    singles, pairs = wordpiece._corpus(WordPiece.load(minilm_config, 128), 128)
    untruncated = reference(minilm_config, None, True)
    inside = refused = 0
    for question, context in pairs:
        try:
            kept = rust.encode(question, context).sequence_ids.count(1)
        except Exception:
            refused += 1
            continue
        whole = untruncated.encode(question, context)
        context_tokens = [t for t, s in zip(whole.tokens, whole.sequence_ids) if s == 1]
        inside += kept < len(context_tokens) and context_tokens[kept].startswith("##")
    assert inside and refused


@pytest.mark.parametrize("name, change", [
    ("BertProcessing", lambda c: changed(c, None, "post_processor",
                                         {"type": "BertProcessing", "sep": ["[SEP]", 102], "cls": ["[CLS]", 101]})),
    ("cased, unclean", lambda c: changed(c, None, "normalizer", {
        "type": "BertNormalizer", "clean_text": False, "handle_chinese_chars": False, "strip_accents": True,
        "lowercase": False})),
    ("short word limit", lambda c: changed(c, "model", "max_input_chars_per_word", 6)),
    ("no subword prefix", lambda c: changed(c, "model", "continuing_subword_prefix", "")),
    ("two-id special token, B before A", lambda c: changed(c, None, "post_processor", {
        **c["post_processor"],
        "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                 {"SpecialToken": {"id": "[SEP]", "type_id": 1}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "special_tokens": {**c["post_processor"]["special_tokens"],
                           "[CLS]": {"id": "[CLS]", "ids": [101, 1996], "tokens": ["[CLS]", "the"]}}})),
])
@pytest.mark.parametrize("max_length, pair, direction", [(None, True, "right"), (24, True, "left"),
                                                          (64, False, "right")])
def test_the_values_it_takes_pass_the_check(minilm_config, warnings, name, change, max_length, pair, direction):
    config = change(minilm_config)
    rust = reference(config, max_length, pair, direction)
    assert isinstance(WordPiece.load(config, max_length, direction, reference=rust, prepare=plain(rust)), WordPiece)
    assert not warnings.records


@pytest.mark.parametrize("change", [
    lambda c: changed(c, None, "version", "2.0"),
    lambda c: changed(c, None, "pre_normalizer", {}),
    lambda c: changed(c, None, "added_tokens", [{**c["added_tokens"][0], "weight": 1}]),
    lambda c: changed(c, "normalizer", "type", "Lowercase"),
    lambda c: changed(c, "normalizer", "strip_accents", "yes"),
    lambda c: changed(c, "normalizer", "nfc", True),
    lambda c: changed(c, "normalizer", "lowercase", drop=True),
    lambda c: changed(c, "pre_tokenizer", "type", "Whitespace"),
    lambda c: changed(c, "pre_tokenizer", "split_digits", True),
    lambda c: changed(c, "model", "type", "BPE"),
    lambda c: changed(c, "model", "dropout", 0.1),
    lambda c: changed(c, "model", "unk_token", "[NOPE]"),
    lambda c: changed(c, "model", "continuing_subword_prefix", drop=True),
    lambda c: changed(c, "model", "max_input_chars_per_word", "100"),
    lambda c: changed(c, "model", "max_input_chars_per_word", True),
    lambda c: changed(c, "post_processor", "type", "RobertaProcessing"),
    lambda c: changed(c, "post_processor", "trim_offsets", True),
    lambda c: changed(c, "post_processor", "single", [{"Sequence": {"id": "A", "type_id": 0}, "Extra": {}}]),
    lambda c: changed(c, "post_processor", "single", [{"Sequence": {"id": "B", "type_id": 0}}]),
    lambda c: changed(c, "post_processor", "single", [{"Sequence": {"id": "A", "type_id": -1}}]),
    lambda c: changed(c, "post_processor", "single", [{"SpecialToken": {"id": "[BOS]", "type_id": 0}},
                                                      {"Sequence": {"id": "A", "type_id": 0}}]),
    lambda c: changed(c, "post_processor", "special_tokens", {"[CLS]": {"id": "[CLS]", "ids": [], "tokens": []},
                                                              "[SEP]": c["post_processor"]["special_tokens"]["[SEP]"]}),
])
def test_a_key_or_value_it_does_not_know_falls_back_to_rust(minilm_config, change):
    assert WordPiece.load(minilm_config, 128) is not None
    assert WordPiece.load(change(minilm_config), 128) is None


def test_a_truncation_direction_it_does_not_know_falls_back_to_rust(minilm_config):
    assert WordPiece.load(minilm_config, 128, "middle") is None


def test_the_check_refuses_a_python_tokenizer_that_differs(minilm_config, warnings, monkeypatch):
    """A pre-tokenizer bug (the apostrophe kept inside words) that the key filter cannot see."""
    monkeypatch.setattr(wordpiece, "_WORD", re.compile(r"[A-Za-z0-9']+|[^\sA-Za-z0-9']"))
    rust = reference(minilm_config, 128, False)
    assert WordPiece.load(minilm_config, 128) is not None
    assert WordPiece.load(minilm_config, 128, reference=rust, prepare=plain(rust)) is None
    [record] = warnings.records
    assert re.search(r"differ on .*[a-z]'[a-z]", record.getMessage(), re.IGNORECASE)


@pytest.mark.parametrize("faulty, named", [
    (lambda rust: None, "Hello, World!"),                                        # no prepare: nothing lowercases
    (lambda rust: plain(rust, added=False), "[SEP]"),                           # lets added tokens through
    (lambda rust: plain(rust, control=False), "'a\\x00b'"),                     # lets dropped characters through
])
def test_the_check_refuses_a_prepare_that_differs(minilm_config, warnings, faulty, named):
    rust = reference(minilm_config, 128, False)
    assert WordPiece.load(minilm_config, 128, reference=rust, prepare=faulty(rust)) is None
    [record] = warnings.records
    assert named in record.getMessage()


@pytest.mark.parametrize("max_length, direction, rust_length, rust_direction, pair", [
    (128, "left", 128, "right", False),         # long texts are cut at the other end
    (128, "right", 128, "left", True),
    (64, "right", 128, "right", False),         # ... and at another length
    (None, "right", 128, "right", True),
])
def test_the_check_refuses_a_reference_that_truncates_otherwise(minilm_config, warnings, max_length, direction,
                                                               rust_length, rust_direction, pair):
    rust = reference(minilm_config, rust_length, pair, rust_direction)
    assert WordPiece.load(minilm_config, max_length, direction, reference=rust, prepare=plain(rust)) is None
    assert "differ on" in warnings.records[0].getMessage()


def test_the_check_refuses_when_nothing_reaches_the_python_path(minilm_config, warnings):
    rust = reference(minilm_config, 128, False)
    assert WordPiece.load(minilm_config, 128, reference=rust, prepare=lambda text: None) is None
    assert "no text" in warnings.records[0].getMessage()
