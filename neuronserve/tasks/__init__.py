"""Every task, defined once for `neuronserve compile` and the server: one module per task, the shared pieces beside
them (base: items, requests and parameters; encoding: the tokenizer; padding; modules: the torch wrapper compile
traces; warmup: the known-answer check). Adding a task is a new module and a line in TASKS.

The request path (no torch on it):

    request = parse(task, inputs, parameters, manifest)   # body -> Request(items, options, finish); BadInput
    encoded = encode(task, tokenizer, request.items, max_seq, truncation)   # one batched tokenizer call
    arrays  = pad(encoded[i:j], batch, seq, manifest.input_names)         # int64 [batch, seq] per input name
    outputs = runner(*arrays)                                              # manifest.output_names order
    answers = decode(task, manifest, outputs, encoded[i:j], options, tokenizer)    # one per item
    body    = request.finish(answers)
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from neuronserve.tasks import encoding, warmup
from neuronserve.tasks.base import TOKEN_INPUTS, BadInput, BadParameter, Encoded, Pair, Request, Task, item_from_json
from neuronserve.tasks.classification import TextClassification
from neuronserve.tasks.embedding import FeatureExtraction
from neuronserve.tasks.fill_mask import FillMask
from neuronserve.tasks.padding import pad
from neuronserve.tasks.question_answering import MAX_ANSWER_TOKENS, QuestionAnswering
from neuronserve.tasks.token_classification import TokenClassification
from neuronserve.tasks.zero_shot import ZeroShotClassification

TASKS: dict[str, Task] = {t.name: t for t in (
    FeatureExtraction(), TextClassification(), QuestionAnswering(), TokenClassification(), FillMask(),
    ZeroShotClassification(),
)}

load_tokenizer = encoding.load_tokenizer
warmup_atol = warmup.warmup_atol
warmup_outputs = warmup.warmup_outputs


def get(task: str) -> Task:
    try:
        return TASKS[task]
    except KeyError:
        raise BadInput(f"unknown task {task!r}; one of {', '.join(TASKS)}") from None


def parse(task: str, inputs: Any, parameters: dict | None = None, manifest=None) -> Request:
    """A request body's `inputs` and `parameters` -> Request; BadInput (422) or BadParameter (400) say what is
    wrong. `manifest` is the served model's (tasks whose parameters depend on the model read it)."""
    return get(task).parse(inputs, parameters, manifest)


def encode(task: str, tokenizer, items: Sequence, max_seq: int, truncation: bool,
           direction: str | None = None) -> list[Encoded]:
    return encoding.encode(get(task), tokenizer, items, max_seq, truncation, direction)


def decode(task: str, manifest, outputs: Sequence[np.ndarray], items: Sequence[Encoded],
           options: Sequence[dict] | None = None, tokenizer=None) -> list:
    """The answers of a batch's `items` from its outputs (in manifest.output_names order, row i of each is item
    i's; rows past the items are padding); options[i] is item i's request options (default: none given)."""
    spec = get(task)
    if options is None:
        options = [spec.defaults] * len(items)
    return spec.decode(manifest, [np.asarray(o, dtype=np.float32) for o in outputs], items, options, tokenizer)


def build_module(task: str, model, input_names: Sequence[str], *, dense: Sequence = (), **options):
    """The module compile traces around a loaded transformers model: the task's head after the model, and the
    `dense` layers it applies (feature-extraction: sentence-transformers Dense; options pooling, normalize)."""
    from neuronserve.tasks.modules import TaskModule

    return TaskModule(model, input_names, get(task).head(input_names, **options), dense).eval()


def warmup_items(task: str, tokenizer) -> list:
    return get(task).warmup_items(tokenizer)


def warmup_batches(task: str, tokenizer, manifest, items: Sequence | None = None) -> list[tuple[list, list]]:
    return warmup.warmup_batches(get(task), tokenizer, manifest, items)


def warmup_mismatch(manifest, got: dict, items: Sequence[Encoded]) -> str | None:
    return warmup.warmup_mismatch(get(manifest.task), manifest, got, items)


__all__ = ["TASKS", "TOKEN_INPUTS", "MAX_ANSWER_TOKENS", "Task", "BadInput", "BadParameter", "Pair", "Encoded",
           "Request", "item_from_json", "get", "parse", "encode", "pad", "decode", "build_module", "load_tokenizer",
           "warmup_items",
           "warmup_batches", "warmup_outputs", "warmup_mismatch", "warmup_atol"]
