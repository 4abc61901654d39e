"""fill-mask: the likeliest tokens for each mask token in a text (masked language models).

Inputs: "text" (holding the tokenizer's mask token, e.g. [MASK] or <mask>) or a list of texts. The answer per text
is, for its mask, the `top_k` best tokens (default 5), each {"score", "token", "token_str", "sequence"} as the
transformers pipeline gives them; a text with several masks gets one such list per mask.

The traced head keeps the CANDIDATES most probable tokens at every position (their log-probabilities over the
whole vocabulary, and their ids): the full [batch, sequence, vocabulary] distribution would be most of a batch's
memory and time to copy. The warm-up checks the log-probabilities only (probabilities near 1/vocabulary would
pass any absolute tolerance; two near-equal tokens may swap places on another backend without the model being
wrong).
"""
from __future__ import annotations

import numpy as np

from neuronserve.tasks.base import TRUNCATION, BadInput, Request, Task, first_or_all, integer, listed, text

CANDIDATES = 50
TOP_K = 5


class FillMask(Task):
    name = "fill-mask"
    auto_class = "AutoModelForMaskedLM"
    output_names = ("log_probs", "token_ids")
    checked_outputs = ("log_probs",)
    per_token = True
    parameters = {"top_k": integer(1, CANDIDATES), **TRUNCATION}

    def parse(self, inputs, parameters, manifest) -> Request:
        items, many = listed(inputs, text)
        return Request(items, self.options(parameters), first_or_all(many))

    def warmup_items(self, tokenizer) -> list:
        mask = tokenizer.mask_token
        return [f"The capital of France is {mask}.", f"I {mask} this movie, it was wonderful."]

    def check(self, items, tokenizer) -> None:
        mask = tokenizer.mask_token_id
        for i, item in enumerate(items):
            if mask not in item.ids["input_ids"]:
                raise BadInput(f"inputs[{i}]: no mask token {tokenizer.mask_token!r} in the text (or it was cut "
                               "off by truncation)")

    def head(self, input_names, **options):
        return _top_tokens

    def decode(self, manifest, outputs, items, options, tokenizer):
        log_probs, token_ids = outputs
        mask = tokenizer.mask_token_id
        answers = []
        for row, (item, o) in enumerate(zip(items, options)):
            ids = item.ids["input_ids"]
            positions = np.flatnonzero(ids == mask)
            top = o["top_k"] or TOP_K
            single = len(positions) == 1
            per_mask = []
            for p in positions:
                candidates = []
                scores = np.exp(log_probs[row, p, :top].astype(np.float64)).tolist()
                for score, token in zip(scores, token_ids[row, p, :top].astype(np.int64)):
                    filled = ids.copy()
                    filled[p] = token
                    candidates.append({"score": score, "token": int(token), "token_str": tokenizer.decode([token]),
                                       "sequence": tokenizer.decode(filled, skip_special_tokens=single)})
                per_mask.append(candidates)
            answers.append(per_mask[0] if single else per_mask)
        return answers


def _top_tokens(out, inputs, layers):
    log_probs = out.logits.float().log_softmax(-1)
    return log_probs.topk(min(CANDIDATES, log_probs.shape[-1]), dim=-1)
