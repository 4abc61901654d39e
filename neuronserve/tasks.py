"""Everything task-specific, defined once for `neuronserve compile` and the server.

Per task (see TASKS): the wrapper module compile traces, its output names, and the default warm-up inputs.
The request path is

    items   = parse_inputs(task, payload_inputs)            # JSON `inputs` -> items; BadInput if malformed
    encoded = encode(task, tokenizer, items, max_seq, truncation)   # one batched tokenizer call, no padding
    arrays  = pad(encoded[i:j], batch, seq, manifest.input_names)  # int64 [batch, seq] per input name
    outputs = runner(*arrays)                               # tuple in manifest.output_names order
    answers = decode(task, manifest, outputs, encoded[i:j])        # one per item

Items: a `str` for text-classification and feature-extraction; a `QAItem(question, context)` for
question-answering. The traced module takes positional int64 tensors [B, S] in `input_names` order and
returns a tuple of float32 tensors in the task's `output_names` order.
"""
from __future__ import annotations

import json
import re
import threading
import weakref
from dataclasses import dataclass, field
from itertools import accumulate, chain
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from neuronserve.wordpiece import WordPiece

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_ANSWER_TOKENS = 30


class BadInput(ValueError):
    """The request's inputs cannot be served as they are; the message is for the client (HTTP 400/422)."""


class QAItem(NamedTuple):
    question: str
    context: str


@dataclass
class Encoded:
    """One tokenized item, unpadded. `ids` holds one int64 array per token input the tokenizer produced."""

    ids: dict[str, np.ndarray]
    length: int
    context: str | None = None               # QA: the text the answer is cut from
    encoding: Any = None                     # QA: the tokenizers.Encoding (offsets read only where decode needs)

    @property
    def offsets(self) -> np.ndarray | None:
        """QA: [length, 2] character offsets into the text each token came from."""
        return None if self.encoding is None else np.array(self.encoding.offsets, dtype=np.int64).reshape(-1, 2)

    @property
    def sequence_ids(self) -> np.ndarray | None:
        """QA: per token 0 (question), 1 (context), -1 (special)."""
        if self.encoding is None:
            return None
        return np.array([-1 if s is None else s for s in self.encoding.sequence_ids], dtype=np.int64)


# ---------------------------------------------------------------- parsing request inputs

def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise BadInput(f"{where}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise BadInput(f"{where}: empty text")
    return value


def _qa_item(value: Any, where: str) -> QAItem:
    if isinstance(value, str):
        # a KServe v2 BYTES element carrying the pair as a JSON object
        try:
            value = json.loads(value)
        except ValueError:
            raise BadInput(f'{where}: expected {{"question": ..., "context": ...}}, got a plain string') from None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"question": value[0], "context": value[1]}
    if not isinstance(value, dict):
        raise BadInput(f'{where}: expected {{"question": ..., "context": ...}}, got {type(value).__name__}')
    missing = [k for k in ("question", "context") if k not in value]
    if missing:
        raise BadInput(f"{where}: missing {' and '.join(repr(k) for k in missing)}")
    extra = sorted(set(value) - {"question", "context"})
    if extra:
        raise BadInput(f"{where}: unknown key(s) {', '.join(repr(k) for k in extra)}")
    return QAItem(_text(value["question"], f"{where}.question"), _text(value["context"], f"{where}.context"))


def load_tokenizer(path, *, fix: str = "recompile the model"):
    """The fast tokenizer in `path`, offline. `fix` ends the error message: what the user should do."""
    import transformers

    from neuronserve.errors import ArtifactError

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot load the tokenizer: {e}") from None
    if not getattr(tokenizer, "is_fast", False):
        # the serving path batches with the Rust tokenizer
        raise ArtifactError(f"{path}: not a fast tokenizer (no tokenizer.json); {fix}")
    return tokenizer


def parse_inputs(task: str, payload_inputs: Any) -> list:
    """Turn a request's `inputs` into a list of items. Raises BadInput with a message for the client.

    Accepted forms (the Hugging Face inference API's):
      text-classification, feature-extraction: "text" or ["text", ...]
      question-answering: {"question": q, "context": c} or a list of those (or of [q, c] pairs).
    KServe v2: pass the BYTES tensor's data (a list of str). For question-answering each element is a JSON
    object string '{"question": ..., "context": ...}'; a server that receives two BYTES inputs named
    "question" and "context" instead zips them: parse_inputs(task, [{"question": q, "context": c}, ...]).
    """
    spec = get(task)
    if payload_inputs is None:
        raise BadInput("inputs: missing")
    if spec.pair:
        make = _qa_item
    else:
        make = _text
    many = isinstance(payload_inputs, list)
    values = payload_inputs if many else [payload_inputs]
    if not values:
        raise BadInput("inputs: empty list")
    return [make(v, f"inputs[{i}]" if many else "inputs") for i, v in enumerate(values)]


# ---------------------------------------------------------------- tokenizing and padding

def encode(task: str, tokenizer, items: Sequence, max_seq: int, truncation: bool) -> list[Encoded]:
    """Tokenize `items` in one batched call, without padding; one Encoded per item.

    An item longer than `max_seq` tokens is cut to it when `truncation` (for question-answering only the
    context is cut), else BadInput names the limit. Calls the Rust tokenizer under the transformers one
    directly and builds each token array as a view into one array per batch: transformers' Python wrapper and
    per-item list conversions cost more CPU than the tokenizing itself.
    """
    spec = get(task)
    if not items:
        return []
    backend = _backend(tokenizer, max_seq if truncation else None, spec.pair)
    if spec.pair:
        try:
            encodings = backend.encode([(it.question, it.context) for it in items], offsets=True)
        except Exception as e:  # the tokenizer refuses when the question alone is over max_length
            raise BadInput(f"inputs: question too long for the largest sequence bucket ({max_seq} tokens): {e}") \
                from None
    else:
        encodings = backend.encode(items, offsets=False)      # no character offsets: nothing decodes them
    lengths = [len(e) for e in encodings]
    for i, length in enumerate(lengths):
        if length > max_seq:
            raise BadInput(f"inputs[{i}]: {length} tokens, longer than the largest sequence bucket ({max_seq}); "
                           "shorten the text or enable truncation for this model")
    total = sum(lengths)
    ids = {"input_ids": _flat(encodings, "ids", total),
           "attention_mask": np.ones(total, dtype=np.int64),        # unpadded: every token is real
           "token_type_ids": _flat(encodings, "type_ids", total)}
    out = []
    for i, (length, end) in enumerate(zip(lengths, accumulate(lengths))):
        item = Encoded({n: a[end - length:end] for n, a in ids.items()}, length)
        if spec.pair:
            item.context, item.encoding = items[i].context, encodings[i]
        out.append(item)
    return out


def _flat(encodings, field: str, total: int) -> np.ndarray:
    """One int64 array of every encoding's `field` back to back (each item's array is then a view into it)."""
    return np.fromiter(chain.from_iterable(getattr(e, field) for e in encodings), np.int64, total)


# BertNormalizer's clean_text drops these (and maps \t \n \r to a space); in ASCII, the only characters it
# does not map one to one
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = str.maketrans("\t\n\r", "   ")


class _Backend:
    """A transformers tokenizer's Rust tokenizer, configured once for one truncation length and pair-ness (a
    copy: transformers re-configures the shared one on each of its own calls), and its Python stand-in for
    plain text.

    Plain text skips the Rust tokenizer (wordpiece.py: a third of its CPU time): on ASCII text without control
    characters BertNormalizer only lowercases and turns \\t \\n \\r into spaces, one character for one, so
    the text normalized here and tokenized by `wordpiece` yields the very same ids, type ids and character
    offsets. Any other configuration, or text with anything else in it (non-ASCII, control characters, an added
    token such as [SEP]), goes through the Rust tokenizer.
    """

    def __init__(self, tokenizer, max_length: int | None, pair: bool):
        import tokenizers

        config = tokenizer.backend_tokenizer.to_str()
        direction = getattr(tokenizer, "truncation_side", "right")
        self.full = backend = tokenizers.Tokenizer.from_str(config)
        backend.no_padding()
        if max_length is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(max_length, strategy="only_second" if pair else "longest_first",
                                      direction=direction)
        config = json.loads(config)
        normalizer = config.get("normalizer") or {}
        self.python = None
        if normalizer.get("type") == "BertNormalizer":
            self.python = WordPiece.load(config, max_length, direction)
        if self.python is None:
            return
        self.lowercase = normalizer.get("lowercase", True)
        self.clean = normalizer.get("clean_text", True)
        # added tokens are split off before (content as given) or after (normalized) the normalizer: plain
        # text holds neither form, so that neither tokenizer splits any
        contents = {t.content for t in self.full.get_added_tokens_decoder().values()}
        contents |= {self.full.normalizer.normalize_str(c) for c in contents}
        self.added = re.compile("|".join(map(re.escape, sorted(c for c in contents if c)))) if contents else None

    def plain(self, text: str) -> str | None:
        """`text` as the BertNormalizer leaves it when that maps it one character for one, else None."""
        if not text.isascii():
            return None
        printable = text.isprintable()      # neither a control character nor \t \n \r: one quick scan
        if not printable and _CONTROL.search(text):
            return None
        out = text.lower() if self.lowercase else text
        if self.clean and not printable:
            out = out.translate(_SPACES)
        if self.added is not None and (self.added.search(text) or self.added.search(out)):
            return None
        return out

    def encode(self, inputs: list, *, offsets: bool) -> list:
        """Encodings (tokenizers' or wordpiece's) of `inputs` (texts, or (question, context) pairs), in order;
        the Rust ones without character offsets unless `offsets`."""
        out = [None] * len(inputs)
        slow = list(range(len(inputs)))
        if self.python is not None:
            slow = []
            for i, x in enumerate(inputs):
                p = tuple(map(self.plain, x)) if isinstance(x, tuple) else self.plain(x)
                if p is None or (isinstance(p, tuple) and None in p):
                    slow.append(i)
                else:
                    out[i] = self.python.encode(p)
        if slow:
            batch = [inputs[i] for i in slow]
            encodings = self.full.encode_batch(batch) if offsets else self.full.encode_batch_fast(batch)
            for i, e in zip(slow, encodings):
                out[i] = e
        return out


# per transformers tokenizer, its _Backend per (truncation length, pair)
_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BACKENDS_LOCK = threading.Lock()


def _backend(tokenizer, max_length: int | None, pair: bool) -> _Backend:
    with _BACKENDS_LOCK:
        mine = _BACKENDS.setdefault(tokenizer, {})
        backend = mine.get((max_length, pair))
        if backend is None:
            backend = mine[(max_length, pair)] = _Backend(tokenizer, max_length, pair)
        return backend


def pad(items: Sequence[Encoded], batch: int, seq: int, input_names: Sequence[str],
        out: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Pack items into zero-padded int64 arrays [batch, seq], one per input name (rows past the items are 0).

    `out`: arrays of that shape to fill instead of allocating (a copy reuses one set per bucket)."""
    if len(items) > batch:
        raise ValueError(f"{len(items)} items do not fit a batch of {batch}")
    if out is None:
        arrays = [np.zeros((batch, seq), dtype=np.int64) for _ in input_names]
    else:
        arrays = out
        for arr in arrays:
            arr.fill(0)
    for row, item in enumerate(items):
        length = item.length
        if length > seq:
            raise ValueError(f"item of {length} tokens does not fit sequence length {seq}")
        ids = item.ids
        for arr, name in zip(arrays, input_names):
            if name in ids:
                arr[row, :length] = ids[name]
            elif name == "attention_mask":
                arr[row, :length] = 1
            # a name the tokenizer did not produce (token_type_ids for some models) stays 0
    return arrays


# ---------------------------------------------------------------- decoding outputs

def decode(task: str, manifest, outputs: Sequence[np.ndarray], items: Sequence[Encoded]) -> list:
    """The answers of a batch's `items` from its outputs (a sequence in manifest.output_names order, row i of
    each is item i's; rows past the items are padding)."""
    return get(task).decode(manifest, [np.asarray(o, dtype=np.float32) for o in outputs], items)


def _decode_classification(manifest, outputs, items):
    logits = outputs[0][:len(items)].astype(np.float64)
    if manifest.problem_type == "multi_label_classification":
        scores = 1.0 / (1.0 + np.exp(-logits))
    else:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = e / e.sum(axis=1, keepdims=True)
    labels = manifest.labels
    names = [labels.get(str(i), f"LABEL_{i}") for i in range(scores.shape[1])]
    order = np.argsort(-scores, axis=1, kind="stable")
    return [[{"label": names[i], "score": p} for i, p in zip(row, ps)]
            for row, ps in zip(order.tolist(), np.take_along_axis(scores, order, axis=1).tolist())]


def _decode_embedding(manifest, outputs, items):
    return outputs[0][:len(items)].tolist()


def _decode_qa(manifest, outputs, items):
    """Per item the likeliest span of at most MAX_ANSWER_TOKENS context tokens, scored P(start) x P(end) with
    probabilities over the context tokens alone, like the HF pipeline's (which masks the question out); one set
    of numpy calls for the whole batch, a few lines of Python per item."""
    k, width = len(items), MAX_ANSWER_TOKENS
    spans = [_context_tokens(item.encoding) for item in items]
    # a row without context tokens (text the normalizer empties) gets a stand-in token and an empty answer
    first, stop = zip(*[(f, f + n) if n else (0, 1) for f, n in spans])
    seq = outputs[0].shape[1]
    position = np.arange(seq)
    outside = (position < np.array(first)[:, None]) | (position >= np.array(stop)[:, None])        # [k, seq]
    # softmax of start and end logits (rows 0 and 1) over each item's context tokens
    x = np.asarray(outputs[:2], dtype=np.float64)[:, :k]
    x[:, outside] = -np.inf
    x -= x.max(axis=2, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=2, keepdims=True)
    # span (i, i + d): scores[r, i, d] = ps[r, i] * pe[r, i + d], the ends as overlapping windows (a view) of pe
    # with -1, never a probability, where the end is past the context; starts outside it have probability 0
    ends = np.full((k, seq + width - 1), -1.0)
    np.copyto(ends[:, :seq], x[1], where=~outside)
    step = ends.itemsize
    scores = (x[0][:, :, None] * np.ndarray((k, seq, width), ends.dtype, ends, strides=(ends.strides[0], step, step))
              ).reshape(k, -1)
    answers = []
    for row, (item, (_, n), best) in enumerate(zip(items, spans, scores.argmax(axis=1).tolist())):
        if not n:
            answers.append({"answer": "", "score": 0.0, "start": 0, "end": 0})
            continue
        i, d = divmod(best, width)
        start = item.encoding.token_to_chars(i)[0]
        end = item.encoding.token_to_chars(i + d)[1]
        answers.append({"answer": item.context[start:end], "score": float(scores[row, best]), "start": start,
                        "end": end})
    return answers


def _context_tokens(encoding) -> tuple[int, int]:
    """(first, count) of a pair encoding's context tokens, which are contiguous; (0, 0) without any."""
    sequence_ids = encoding.sequence_ids
    if 1 not in sequence_ids:
        return 0, 0
    first = sequence_ids.index(1)
    return first, len(sequence_ids) - sequence_ids[::-1].index(1) - first


# ---------------------------------------------------------------- the modules compile traces

class _TaskModule(torch.nn.Module):
    """Positional int64 inputs in `input_names` order -> tuple of float32 outputs (traceable)."""

    def __init__(self, model, input_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)

    def run(self, inputs):
        return self.model(**dict(zip(self.input_names, inputs)), return_dict=True)


class QuestionAnswering(_TaskModule):
    def forward(self, *inputs):
        out = self.run(inputs)
        return out.start_logits.float(), out.end_logits.float()


class TextClassification(_TaskModule):
    def forward(self, *inputs):
        return (self.run(inputs).logits.float(),)


class FeatureExtraction(_TaskModule):
    """Sentence embedding: pooled (mean over the attention mask, or the CLS token), optionally L2-normalized."""

    def __init__(self, model, input_names: Sequence[str], *, pooling: str = "mean", normalize: bool = False):
        super().__init__(model, input_names)
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling {pooling!r}: mean or cls")
        if pooling == "mean" and "attention_mask" not in self.input_names:
            raise ValueError("mean pooling needs the attention_mask input")
        self.pooling, self.normalize = pooling, normalize

    def forward(self, *inputs):
        hidden = self.run(inputs).last_hidden_state.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = inputs[self.input_names.index("attention_mask")].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
        return (pooled,)


def build_module(task: str, model, input_names: Sequence[str], **options):
    """The wrapper compile traces around a loaded HF model (feature-extraction options: pooling, normalize)."""
    return get(task).module(model, input_names, **options).eval()


# ---------------------------------------------------------------- warm-up (known answer)

def warmup_batches(task: str, tokenizer, manifest, texts: Sequence | None = None) -> list[tuple[list, list]]:
    """The padded batches a warm-up runs: [(arrays, encoded_items), ...] for `texts` (default the manifest's).

    Items go into the smallest sequence bucket, batched by the smallest batch size that holds them all, or in
    chunks of the largest batch size. Compile (eager model, expected values) and the server (every copy) both
    use this, so they run exactly the same inputs.
    """
    texts = manifest.warmup.texts if texts is None else texts
    seq = min(manifest.sequence_lengths)
    items = encode(task, tokenizer, parse_inputs(task, list(texts)), seq, truncation=True)
    sizes = manifest.batch_sizes
    batch = next((b for b in sizes if b >= len(items)), sizes[-1])
    return [(pad(items[i:i + batch], batch, seq, manifest.input_names), items[i:i + batch])
            for i in range(0, len(items), batch)]


def warmup_outputs(batches_outputs: Sequence[tuple[Sequence, Sequence]], output_names: Sequence[str]) -> dict:
    """Stack per-batch outputs [(outputs tuple, items)] into {output name: nested list}, real rows only."""
    rows: dict[str, list] = {n: [] for n in output_names}
    for outputs, items in batches_outputs:
        for name, out in zip(output_names, outputs):
            rows[name].extend(np.asarray(out, dtype=np.float32)[:len(items)].tolist())
    return rows


def warmup_mismatch(manifest, got: dict, items: Sequence[Encoded]) -> str | None:
    """None when `got` (as warmup_outputs returns it) matches manifest.warmup.expected, else what differs.

    Per-token outputs (question-answering logits) are compared only over each item's real tokens.
    """
    atol = manifest.warmup.atol
    for name, expected in manifest.warmup.expected.items():
        exp, act = np.asarray(expected, dtype=np.float32), np.asarray(got.get(name, []), dtype=np.float32)
        if exp.shape != act.shape:
            return f"{name}: shape {act.shape}, expected {exp.shape}"
        for row, item in enumerate(items):
            e, a = (exp[row], act[row])
            if get(manifest.task).per_token:
                e, a = e[:item.length], a[:item.length]
            if not np.allclose(a, e, atol=atol, rtol=0):
                worst = float(np.max(np.abs(a - e)))
                return f"{name}[{row}]: differs from the expected warm-up output by {worst:.3g} (atol {atol})"
    return None


def warmup_atol(backend: str, dtype: str | None) -> float:
    """float32 anywhere agrees with the eager CPU answer to 1e-3; bf16 (Neuron auto-cast) and fp16 (CUDA half)
    to 5e-2."""
    return 1e-3 if dtype in (None, "float32") else 5e-2


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Task:
    name: str
    output_names: tuple[str, ...]
    auto_class: str                       # transformers Auto* class compile loads the model with
    module: type = field(repr=False)      # (model, input_names, **options) -> nn.Module to trace
    decode: Callable = field(repr=False)  # (manifest, outputs, items) -> a JSON-able answer per item
    warmup: tuple = ()                    # default warm-up inputs, as a request's `inputs` would carry them
    pair: bool = False                    # inputs are (question, context) pairs
    per_token: bool = False               # outputs are [B, S] (compare only real tokens)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("question-answering", ("start_logits", "end_logits"), "AutoModelForQuestionAnswering",
         QuestionAnswering, _decode_qa, pair=True, per_token=True,
         warmup=({"question": "Where does Wolfgang live?", "context": "My name is Wolfgang and I live in Berlin."},
                 {"question": "What colour is the sky?", "context": "On a clear day the sky is blue."})),
    Task("text-classification", ("logits",), "AutoModelForSequenceClassification",
         TextClassification, _decode_classification,
         warmup=("I love this movie, it was wonderful.", "This was a terrible waste of time.")),
    Task("feature-extraction", ("embeddings",), "AutoModel", FeatureExtraction, _decode_embedding,
         warmup=("The cat sits on the mat.", "A fast tokenizer keeps the request path cheap.")),
)}


def get(task: str) -> Task:
    try:
        return TASKS[task]
    except KeyError:
        raise BadInput(f"unknown task {task!r}; one of {', '.join(TASKS)}") from None


__all__ = ["TASKS", "Task", "BadInput", "QAItem", "Encoded", "parse_inputs", "encode", "pad", "decode",
           "build_module", "warmup_batches", "warmup_outputs", "warmup_mismatch", "warmup_atol", "get"]
