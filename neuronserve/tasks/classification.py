"""text-classification: a label and score per class for a text, or for a text pair (cross-encoder rerankers, NLI).

Inputs: "text", {"text": ..., "text_pair": ...}, or a list of those. The answer per input is every class with
its score, best first ([[...]] for one input, as the Hugging Face Inference API nests it). Parameters, as the
transformers pipeline defines them: `top_k` (how many classes; all by default) and `function_to_apply`
(softmax, sigmoid or none; by default the raw values of regression heads, sigmoid for multi-label heads and
heads of one output, softmax otherwise).
"""
from __future__ import annotations

import numpy as np

from neuronserve.tasks.base import TRUNCATION, Pair, Request, Task, choice, every, integer, listed, pair, \
    sigmoid, softmax, text

PAIR = ("text", "text_pair")
FUNCTIONS = ("softmax", "sigmoid", "none")


def text_or_pair(value, where: str) -> str | Pair:
    return pair(value, where, PAIR) if isinstance(value, (dict, list)) else text(value, where)


def default_function(manifest, classes: int) -> str:
    """The pipeline's default, in its order of checks."""
    if manifest.problem_type == "regression":
        return "none"
    if manifest.problem_type == "multi_label_classification" or classes == 1:
        return "sigmoid"
    return "softmax"


def scores(manifest, logits: np.ndarray, function: str | None) -> np.ndarray:
    """[n, classes] float64 scores of [n, classes] logits under `function` (None: the head's default)."""
    function = function or default_function(manifest, logits.shape[1])
    logits = logits.astype(np.float64)
    if function == "softmax":
        return softmax(logits)
    if function == "sigmoid":
        return sigmoid(logits)
    return logits


def label_names(manifest, classes: int) -> list[str]:
    return [manifest.labels.get(str(i), f"LABEL_{i}") for i in range(classes)]


class TextClassification(Task):
    name = "text-classification"
    auto_class = "AutoModelForSequenceClassification"
    pair_names = PAIR
    output_names = ("logits",)
    parameters = {"top_k": integer(1), "function_to_apply": choice(*FUNCTIONS), **TRUNCATION}
    warmup = ("I love this movie, it was wonderful.", "This was a terrible waste of time.",
              ["A man is eating food.", "A man is eating a piece of bread."])

    def parse(self, inputs, parameters, manifest) -> Request:
        items, _ = listed(inputs, text_or_pair)
        # one list of classes per input, for one input too: the Inference API nests it so
        return Request(items, self.options(parameters), every)

    def head(self, input_names, **options):
        return logits

    def decode(self, manifest, outputs, items, options, tokenizer):
        logits = outputs[0][:len(items)]
        names = label_names(manifest, logits.shape[1])
        answers = []
        # rows sharing options (every row, without parameters) are scored in one call
        for function in {o["function_to_apply"] for o in options}:
            rows = [r for r, o in enumerate(options) if o["function_to_apply"] == function]
            s = scores(manifest, logits[rows], function)
            order = np.argsort(-s, axis=1, kind="stable")
            for r, classes, values in zip(rows, order.tolist(), np.take_along_axis(s, order, axis=1).tolist()):
                top = options[r]["top_k"] or len(classes)
                answers.append((r, [{"label": names[c], "score": v} for c, v in zip(classes[:top], values[:top])]))
        return [a for _, a in sorted(answers, key=lambda ra: ra[0])]


def logits(out, inputs, layers):
    """The traced head of every classification task: the logits as they are."""
    return (out.logits,)
