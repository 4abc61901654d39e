"""feature-extraction: a sentence embedding per text, and sentence similarity on the same model.

The traced head pools the last hidden state as the model's sentence-transformers modules.json says (mean, cls,
max or last token; mean without one), applies its Dense layers, and L2-normalizes when it has a Normalize module.

Inputs: "text" or a list of texts -> an embedding per text (one list of floats for one text);
{"source_sentence": s, "sentences": [...]} -> the cosine similarity of s to each sentence, as the Hugging Face
Inference API answers sentence-similarity for the same model. Parameters: `normalize` (L2-normalize the
answer), `truncate` (or `truncation`) and `truncation_direction` (left or right).
"""
from __future__ import annotations

import numpy as np

from neuronserve.tasks.base import BadInput, BadParameter, Request, Task, boolean, choice, first_or_all, listed, \
    text

POOLING = ("mean", "cls", "max", "lasttoken")
SIMILARITY = ("source_sentence", "sentences")


class FeatureExtraction(Task):
    name = "feature-extraction"
    auto_class = "AutoModel"
    output_names = ("embeddings",)
    parameters = {"normalize": boolean, "truncate": boolean, "truncation": boolean,
                  "truncation_direction": choice("left", "right")}
    warmup = ("The cat sits on the mat.", "A fast tokenizer keeps the request path cheap.")

    def parse(self, inputs, parameters, manifest) -> Request:
        options = self.options(parameters)
        if options["normalize"] is False and manifest.normalize:
            raise BadParameter("parameters.normalize: false is not available: this model's sentence-transformers "
                               "Normalize module normalizes its embeddings")
        if options["truncate"] is not None:
            options = {**options, "truncation": options["truncate"]}
        if isinstance(inputs, dict):
            return self._similarity(inputs, options)
        items, many = listed(inputs, text)
        return Request(items, options, first_or_all(many))

    def _similarity(self, inputs: dict, options: dict) -> Request:
        unknown = sorted(set(inputs) - set(SIMILARITY))
        missing = [k for k in SIMILARITY if k not in inputs]
        if unknown or missing:
            raise BadInput(f"inputs: sentence similarity takes {{\"source_sentence\": ..., \"sentences\": [...]}}"
                           f"{'; unknown ' + ', '.join(map(repr, unknown)) if unknown else ''}"
                           f"{'; missing ' + ', '.join(map(repr, missing)) if missing else ''}")
        sentences = inputs["sentences"]
        if not isinstance(sentences, list) or not sentences:
            raise BadInput("inputs.sentences: expected a non-empty list of strings")
        items = [text(inputs["source_sentence"], "inputs.source_sentence")]
        items += [text(s, f"inputs.sentences[{i}]") for i, s in enumerate(sentences)]
        return Request(items, options, _cosine)

    def head(self, input_names, *, pooling: str = "mean", normalize: bool = False):
        if pooling not in POOLING:
            raise ValueError(f"pooling {pooling!r}: one of {', '.join(POOLING)}")
        if pooling != "cls" and "attention_mask" not in input_names:
            raise ValueError(f"{pooling} pooling needs the attention_mask input")
        return Pooling(pooling, normalize, list(input_names).index("attention_mask") if pooling != "cls" else None)

    def decode(self, manifest, outputs, items, options, tokenizer):
        rows = outputs[0][:len(items)]
        if options[0]["normalize"] is None and all(o is options[0] for o in options):
            return rows.tolist()       # the common case: no parameters, the model's own embedding
        out = []
        for row, o in zip(rows, options):
            if o["normalize"]:
                row = row / max(float(np.linalg.norm(row)), 1e-12)
            out.append(row.tolist())
        return out


class Pooling:
    """The traced head: (model output, inputs, Dense layers) -> (embeddings,), as sentence-transformers pools."""

    def __init__(self, pooling: str, normalize: bool, mask_index: int | None):
        self.pooling, self.normalize, self.mask_index = pooling, normalize, mask_index

    def __call__(self, out, inputs, layers):
        hidden = out.last_hidden_state.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = inputs[self.mask_index]
            if self.pooling == "mean":
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            elif self.pooling == "max":
                pooled = hidden.masked_fill(mask.unsqueeze(-1) == 0, -1e9).max(1).values
            else:   # lasttoken: the last real token of each (right-padded) row
                last = (mask.sum(1) - 1).clamp(min=0)
                pooled = hidden.gather(1, last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)
        for layer in layers:
            pooled = layer(pooled)
        if self.normalize:
            pooled = pooled / pooled.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)
        return (pooled,)


def _cosine(answers: list) -> list[float]:
    source, others = np.asarray(answers[0], dtype=np.float64), np.asarray(answers[1:], dtype=np.float64)
    norms = np.maximum(np.linalg.norm(others, axis=1) * np.linalg.norm(source), 1e-12)
    return (others @ source / norms).tolist()
