"""question-answering: the span of a context that answers a question (extractive QA).

Inputs: {"question": q, "context": c} or a list of them (or of [q, c] pairs). The answer per input is
{"answer", "score", "start", "end"} (character offsets into the context), or a list of the `top_k` best. Scored as
the transformers pipeline scores: softmax of the start and end logits over the context tokens and the CLS token,
P(start) x P(end) for spans of at most `max_answer_len` tokens (default 15); with `handle_impossible_answer` the
empty answer, scored P(start = CLS) x P(end = CLS), competes with the spans. Only the context is ever truncated.
"""
from __future__ import annotations

import numpy as np

from neuronserve.tasks.base import TRUNCATION, Request, Task, boolean, first_or_all, integer, listed, pair

MAX_ANSWER_TOKENS = 15      # the pipeline's default max_answer_len
NAMES = ("question", "context")


class QuestionAnswering(Task):
    name = "question-answering"
    auto_class = "AutoModelForQuestionAnswering"
    pair_names = NAMES
    output_names = ("start_logits", "end_logits")
    per_token = True
    offsets = True
    only_second = True
    parameters = {"top_k": integer(1), "max_answer_len": integer(1), "handle_impossible_answer": boolean,
                  **TRUNCATION}
    warmup = (["Where does Wolfgang live?", "My name is Wolfgang and I live in Berlin."],
              ["What colour is the sky?", "On a clear day the sky is blue."])

    def parse(self, inputs, parameters, manifest) -> Request:
        items, many = listed(inputs, lambda v, where: pair(v, where, NAMES))
        return Request(items, self.options(parameters), first_or_all(many))

    def head(self, input_names, **options):
        return _logits

    def decode(self, manifest, outputs, items, options, tokenizer):
        """One set of numpy calls for the batch (softmax, span windows), a few lines of Python per item."""
        k = len(items)
        limits = [o["max_answer_len"] or MAX_ANSWER_TOKENS for o in options]
        width = max(limits)
        cls = getattr(tokenizer, "cls_token_id", None)
        spans = [_context_tokens(item.encoding) for item in items]
        # a row without context tokens (text the normalizer empties) gets a stand-in token and an empty answer
        first, stop = zip(*[(f, f + n) if n else (0, 1) for f, n in spans])
        seq = outputs[0].shape[1]
        position = np.arange(seq)
        outside = (position < np.array(first)[:, None]) | (position >= np.array(stop)[:, None])        # [k, seq]
        ids = np.full((k, seq), -1, dtype=np.int64)      # padding is no token id, so never the CLS one
        for row, item in enumerate(items):
            ids[row, :item.length] = item.ids["input_ids"]
        is_cls = ids == cls if cls is not None else np.zeros((k, seq), dtype=bool)
        # softmax of start and end logits (rows 0 and 1) over each item's context tokens and its CLS token
        x = np.asarray(outputs[:2], dtype=np.float64)[:, :k]
        x[:, outside & ~is_cls] = -np.inf
        x -= x.max(axis=2, keepdims=True)
        np.exp(x, out=x)
        x /= x.sum(axis=2, keepdims=True)
        null = (x[0] * x[1] * is_cls).max(axis=1)      # P(start = CLS) x P(end = CLS)
        # span (i, i + d): scores[r, i, d] = ps[r, i] * pe[r, i + d], the ends as overlapping windows (a view) of
        # pe with -1, never a probability, where the end is past the context or the item's max_answer_len
        ends = np.full((k, seq + width - 1), -1.0)
        np.copyto(ends[:, :seq], x[1], where=~outside)
        step = ends.itemsize
        scores = x[0][:, :, None] * np.ndarray((k, seq, width), ends.dtype, ends, strides=(ends.strides[0], step, step))
        scores[outside] = -1.0       # spans starting outside the context
        for row, limit in enumerate(limits):
            scores[row, :, limit:] = -1.0
        scores = scores.reshape(k, -1)
        answers = []
        for row, (item, (_, n), o) in enumerate(zip(items, spans, options)):
            top = o["top_k"] or 1
            found = []
            if n:
                best = [int(scores[row].argmax())] if top == 1 else np.argsort(-scores[row], kind="stable")[:top]
                for flat in best:
                    if scores[row, flat] < 0:
                        break
                    i, d = divmod(int(flat), width)
                    start = item.encoding.token_to_chars(i)[0]
                    end = item.encoding.token_to_chars(i + d)[1]
                    found.append({"answer": item.context[start:end], "score": float(scores[row, flat]),
                                  "start": start, "end": end})
            if o["handle_impossible_answer"] or not found:
                found.append({"answer": "", "score": float(null[row]) if n else 0.0, "start": 0, "end": 0})
                found = sorted(found, key=lambda a: -a["score"])[:top]
            answers.append(found[0] if (o["top_k"] or 1) == 1 else found)
        return answers


def _logits(out, inputs, layers):
    return out.start_logits, out.end_logits


def _context_tokens(encoding) -> tuple[int, int]:
    """(first, count) of a pair encoding's context tokens, which are contiguous; (0, 0) without any."""
    sequence_ids = encoding.sequence_ids
    if 1 not in sequence_ids:
        return 0, 0
    first = sequence_ids.index(1)
    return first, len(sequence_ids) - sequence_ids[::-1].index(1) - first
