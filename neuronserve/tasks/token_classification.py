"""token-classification: a label per token (named entities, PII, part of speech), grouped into entities.

Inputs: "text" or a list of texts. The answer per text is a list of entities, each with character offsets into
the text, as the transformers pipeline gives them for `aggregation_strategy`:
- none: one per token: {"entity", "score", "index" (the token's position), "word" (the token), "start", "end"};
- simple: adjacent tokens of the same entity type (B-/I- tags) grouped: {"entity_group", "score" (their mean),
  "word", "start", "end"};
- first, average, max: the tokens of a word first agree on one label (the first token's, the average scores' or
  the most confident token's), then words group as in simple.
Special tokens are left out, and so are entities labelled one of `ignore_labels` (default ["O"]). The default
strategy is simple, as the Hugging Face Inference API answers.
"""
from __future__ import annotations

import numpy as np

from neuronserve.tasks.base import TRUNCATION, Request, Task, choice, first_or_all, listed, softmax, strings, text
from neuronserve.tasks.classification import label_names, logits

STRATEGIES = ("none", "simple", "first", "average", "max")
DEFAULT_STRATEGY = "simple"


class TokenClassification(Task):
    name = "token-classification"
    auto_class = "AutoModelForTokenClassification"
    output_names = ("logits",)
    per_token = True
    offsets = True
    parameters = {"aggregation_strategy": choice(*STRATEGIES), "ignore_labels": strings(empty=True), **TRUNCATION}
    warmup = ("My name is Wolfgang and I live in Berlin.", "Hugging Face is a company based in New York City.")

    def parse(self, inputs, parameters, manifest) -> Request:
        items, many = listed(inputs, text)
        return Request(items, self.options(parameters), first_or_all(many))

    def head(self, input_names, **options):
        return logits

    def decode(self, manifest, outputs, items, options, tokenizer):
        names = label_names(manifest, outputs[0].shape[2])
        answers = []
        for row, (item, o) in enumerate(zip(items, options)):
            scores = softmax(outputs[0][row, :item.length])
            tokens = _tokens(item, scores, tokenizer, word_aware=_word_aware(tokenizer))
            strategy = o["aggregation_strategy"] or DEFAULT_STRATEGY
            entities = _aggregate(tokens, names, strategy, tokenizer)
            ignore = set(["O"] if o["ignore_labels"] is None else o["ignore_labels"])
            answers.append([e for e in entities if e.get("entity", e.get("entity_group")) not in ignore])
        return answers



def _word_aware(tokenizer) -> bool:
    """Whether the tokenizer marks word continuations (WordPiece's ##): then a token is inside a word when its
    text is not what it covers; otherwise (byte-level BPE, Unigram) when no space precedes it."""
    return bool(getattr(tokenizer.backend_tokenizer.model, "continuing_subword_prefix", None))


def _tokens(item, scores: np.ndarray, tokenizer, *, word_aware: bool) -> list[dict]:
    """The item's non-special tokens: word (the token), scores, start, end, index, is_subword."""
    encoding, sentence = item.encoding, item.context
    special = getattr(encoding, "special_tokens_mask", None)
    if special is None:     # wordpiece.py's encodings: special tokens are the ones of no sequence
        special = [s is None for s in encoding.sequence_ids]
    ids = item.ids["input_ids"].tolist()
    words = tokenizer.convert_ids_to_tokens(ids)
    offsets = encoding.offsets
    unk = tokenizer.unk_token_id
    out = []
    for index, (token_id, word, (start, end)) in enumerate(zip(ids, words, offsets)):
        if special[index]:
            continue
        covered = sentence[start:end]
        if word_aware:
            is_subword = len(word) != len(covered)
        else:
            is_subword = start > 0 and " " not in sentence[start - 1:start + 1]
        if token_id == unk:
            word, is_subword = covered, False
        out.append({"word": word, "scores": scores[index], "start": start, "end": end, "index": index,
                    "is_subword": is_subword})
    return out


def _aggregate(tokens: list[dict], names: list[str], strategy: str, tokenizer) -> list[dict]:
    if strategy in ("none", "simple"):
        entities = []
        for t in tokens:
            best = int(t["scores"].argmax())
            entities.append({"entity": names[best], "score": float(t["scores"][best]), "index": t["index"],
                             "word": t["word"], "start": t["start"], "end": t["end"]})
        if strategy == "none":
            return entities
    else:
        entities = [_word(group, names, strategy, tokenizer) for group in _words(tokens)]
    return [_group(group, tokenizer) for group in _runs(entities)]


def _words(tokens: list[dict]) -> list[list[dict]]:
    words: list[list[dict]] = []
    for t in tokens:
        if words and t["is_subword"]:
            words[-1].append(t)
        else:
            words.append([t])
    return words


def _word(tokens: list[dict], names: list[str], strategy: str, tokenizer) -> dict:
    """One word's tokens agreeing on one label."""
    if strategy == "first":
        scores = tokens[0]["scores"]
    elif strategy == "max":
        scores = max(tokens, key=lambda t: t["scores"].max())["scores"]
    else:
        scores = np.nanmean(np.stack([t["scores"] for t in tokens]), axis=0)
    best = int(scores.argmax())
    return {"entity": names[best], "score": float(scores[best]),
            "word": tokenizer.convert_tokens_to_string([t["word"] for t in tokens]),
            "start": tokens[0]["start"], "end": tokens[-1]["end"]}


def _tag(label: str) -> tuple[str, str]:
    """(B or I, type) of an IOB label; a label without a prefix continues (I)."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _runs(entities: list[dict]) -> list[list[dict]]:
    """Adjacent entities of one type, a B- tag starting a new run."""
    runs: list[list[dict]] = []
    for e in entities:
        bi, tag = _tag(e["entity"])
        if runs and bi != "B" and tag == _tag(runs[-1][-1]["entity"])[1]:
            runs[-1].append(e)
        else:
            runs.append([e])
    return runs


def _group(entities: list[dict], tokenizer) -> dict:
    return {"entity_group": entities[0]["entity"].split("-", 1)[-1],
            "score": float(np.nanmean([e["score"] for e in entities])),
            "word": tokenizer.convert_tokens_to_string([e["word"] for e in entities]),
            "start": entities[0]["start"], "end": entities[-1]["end"]}
