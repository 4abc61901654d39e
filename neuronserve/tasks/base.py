"""What every task shares: its items, the request it parses into, its parameters, and the Task interface.

A task turns a request's `inputs` and `parameters` into a Request: the model items to run (texts, or text pairs),
the decode options, and `finish`, which makes the response body from the items' decoded answers (one answer per
item; zero-shot and sentence similarity combine several). Nothing here imports torch: the request path never
needs it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class BadInput(ValueError):
    """The request's inputs cannot be served as they are; the message is for the client (HTTP 422)."""


class BadParameter(BadInput):
    """A request parameter is unknown or has a value the task does not take (HTTP 400)."""


class Pair(NamedTuple):
    """Two texts the model reads together: (question, context), (text, text_pair), (premise, hypothesis)."""

    first: str
    second: str


@dataclass
class Encoded:
    """One tokenized item, unpadded. `ids` holds one int64 array per token input the tokenizer produced."""

    ids: dict[str, np.ndarray]
    length: int
    text: Any = None        # the item (str or Pair) where decode cuts answers from its characters
    encoding: Any = None    # the tokenizers.Encoding (or wordpiece's), where decode reads offsets

    @property
    def context(self) -> str | None:
        """The text character offsets point into: a pair's second text, or the single text."""
        return self.text.second if isinstance(self.text, Pair) else self.text

    @property
    def offsets(self) -> np.ndarray | None:
        """[length, 2] character offsets into the text each token came from."""
        return None if self.encoding is None else np.array(self.encoding.offsets, dtype=np.int64).reshape(-1, 2)

    @property
    def sequence_ids(self) -> np.ndarray | None:
        """Per token 0 (first text), 1 (second text), -1 (special token)."""
        if self.encoding is None:
            return None
        return np.array([-1 if s is None else s for s in self.encoding.sequence_ids], dtype=np.int64)


class Request(NamedTuple):
    items: list                         # model items: str or Pair
    options: dict                       # validated parameters, defaults filled (shared: never mutate)
    finish: Callable[[list], Any]       # the items' decoded answers -> the response body


# ---------------------------------------------------------------- parameter values

Check = Callable[[Any, str], Any]       # (value, where) -> the value to use; BadParameter if unusable


def integer(low: int = 1, high: int | None = None) -> Check:
    def check(value, where):
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
            raise BadParameter(f"{where}: expected an integer {'>= %d' % low if not high else f'in {low}..{high}'}, "
                               f"got {value!r}")
        return value
    return check


def boolean(value, where):
    if not isinstance(value, bool):
        raise BadParameter(f"{where}: expected true or false, got {value!r}")
    return value


def choice(*values: str) -> Check:
    def check(value, where):
        if not isinstance(value, str) or value.lower() not in values:
            raise BadParameter(f"{where}: expected one of {', '.join(values)}, got {value!r}")
        return value.lower()
    return check


def string(value, where):
    if not isinstance(value, str) or not value:
        raise BadParameter(f"{where}: expected a non-empty string, got {value!r}")
    return value


def strings(*, empty: bool = False) -> Check:
    """A list of strings (may it be empty?), or one string of comma-separated ones (as the Hugging Face pipelines
    take labels)."""
    def check(value, where):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not (value or empty) or \
                not all(isinstance(v, str) and v.strip() for v in value):
            raise BadParameter(f"{where}: expected a {'' if empty else 'non-empty '}list of non-empty strings, "
                               f"got {value!r}")
        return value
    return check


# every task: cut text longer than the largest sequence bucket (None: the model's configured default)
TRUNCATION = {"truncation": boolean}


# ---------------------------------------------------------------- parsing inputs

def text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise BadInput(f"{where}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise BadInput(f"{where}: empty text")
    return value


def pair(value: Any, where: str, names: tuple[str, str]) -> Pair:
    """`{names[0]: a, names[1]: b}` (or [a, b], or such an object as a JSON string: a KServe v2 BYTES element) ->
    Pair(a, b)."""
    first, second = names
    shape = f'{{"{first}": ..., "{second}": ...}}'
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise BadInput(f"{where}: expected {shape}, got a plain string") from None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = {first: value[0], second: value[1]}
    if not isinstance(value, dict):
        raise BadInput(f"{where}: expected {shape}, got {type(value).__name__}")
    extra = sorted(set(value) - {first, second})
    if extra:
        raise BadInput(f"{where}: unknown key(s) {', '.join(repr(k) for k in extra)}; expected {shape}")
    missing = [k for k in names if k not in value]
    if missing:
        raise BadInput(f"{where}: missing {' and '.join(repr(k) for k in missing)}; expected {shape}")
    return Pair(text(value[first], f"{where}.{first}"), text(value[second], f"{where}.{second}"))


def listed(inputs: Any, make: Callable[[Any, str], Any]) -> tuple[list, bool]:
    """(items, many): `inputs` as one item or a list of them, each made by make(value, where)."""
    if inputs is None:
        raise BadInput("inputs: missing")
    if isinstance(inputs, list):
        if not inputs:
            raise BadInput("inputs: empty list")
        return [make(v, f"inputs[{i}]") for i, v in enumerate(inputs)], True
    return [make(inputs, "inputs")], False


def first_or_all(many: bool) -> Callable[[list], Any]:
    """The response of a request with one input (many=False) or a list of them, from the items' answers."""
    return every if many else first


def every(answers: list) -> list:
    return answers


def first(answers: list):
    return answers[0]


# ---------------------------------------------------------------- the interface

class Task:
    """One task: how its requests parse, what compile traces, and how its outputs decode. Subclasses set the
    class attributes and implement `parse`, `head` and `decode`."""

    name: str = ""
    auto_class: str = ""                 # the transformers Auto* class compile loads the model with
    output_names: tuple[str, ...] = ()
    per_token: bool = False              # outputs are [B, S, ...]: compare and cut only real tokens
    offsets: bool = False                # decode reads character offsets (tokenize with them)
    only_second: bool = False            # a pair's first text is never cut (question-answering's question)
    pair_names: tuple[str, str] | None = None          # the two texts' names, where items are pairs
    checked_outputs: tuple[str, ...] | None = None     # the outputs the warm-up compares (None: all)
    parameters: dict[str, Check] = TRUNCATION           # the request parameters it takes
    warmup: tuple = ()                   # model items (str, or [a, b] pairs) the known-answer warm-up runs

    def __init__(self):
        self.defaults = dict.fromkeys(self.parameters)

    def options(self, parameters: dict | None) -> dict:
        """Validated request parameters with the defaults (None) for the rest; BadParameter names the problem."""
        if not parameters:
            return self.defaults
        if not isinstance(parameters, dict):
            raise BadParameter(f"parameters: expected an object, got {type(parameters).__name__}")
        unknown = [k for k in parameters if k not in self.parameters]
        if unknown:
            raise BadParameter(f"parameters: unknown {', '.join(repr(k) for k in unknown)}; {self.name} takes "
                               f"{', '.join(self.parameters)}")
        out = dict(self.defaults)
        for key, value in parameters.items():
            if value is not None:
                out[key] = self.parameters[key](value, f"parameters.{key}")
        return out

    def parse(self, inputs: Any, parameters: dict | None, manifest) -> Request:
        """The Request for a body's `inputs` and `parameters`, for the model `manifest` describes."""
        raise NotImplementedError

    def warmup_items(self, tokenizer) -> list:
        """The model items of the known-answer warm-up, as JSON (strings or [a, b] pairs)."""
        return list(self.warmup)

    def check(self, items: Sequence[Encoded], tokenizer) -> None:
        """Refuse tokenized items the model cannot answer (BadInput); called before they are queued."""

    def head(self, input_names: Sequence[str], **options) -> Callable:
        """What compile traces after the model: (model output, positional inputs in `input_names` order, extra
        layers) -> the tuple of tensors in output_names order (tensor methods only: no torch import here)."""
        raise NotImplementedError

    def decode(self, manifest, outputs: list[np.ndarray], items: Sequence[Encoded], options: Sequence[dict],
               tokenizer) -> list:
        """One JSON-able answer per item from float32 outputs in output_names order (row i is item i's; rows
        past the items are padding); options[i] is item i's request options."""
        raise NotImplementedError


def item_from_json(value) -> str | Pair:
    """A warm-up item as the manifest stores it."""
    return Pair(*value) if isinstance(value, (list, tuple)) else value


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
