"""Text -> token ids: the fast tokenizer, loaded offline, and one batched call per group of requests.

Calls the Rust tokenizer under the transformers one directly and builds each token array as a view into one array
per batch: transformers' Python wrapper and per-item list conversions cost more CPU than the tokenizing itself.
Plain ASCII text for a BERT-style WordPiece tokenizer skips even that (wordpiece.py), where a check at load proved
it gives the same tokens.
"""
from __future__ import annotations

import json
import re
import threading
import weakref
from itertools import accumulate, chain
from typing import Sequence

import numpy as np

from neuronserve.tasks.base import BadInput, Encoded, Pair, Task
from neuronserve.wordpiece import WordPiece


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


def encode(spec: Task, tokenizer, items: Sequence, max_seq: int, truncation: bool,
           direction: str | None = None) -> list[Encoded]:
    """Tokenize `items` (str or Pair) in one batched call, without padding; one Encoded per item.

    An item longer than `max_seq` tokens is cut to it when `truncation` (from the `direction` side, default the
    tokenizer's; a pair's first text is kept whole for question-answering), else BadInput names the limit.
    """
    if not items:
        return []
    backend = _backend(tokenizer, max_seq if truncation else None, spec.only_second, direction)
    inputs = [tuple(it) if isinstance(it, Pair) else it for it in items]
    try:
        encodings = backend.encode(inputs, offsets=spec.offsets)
    except Exception as e:  # the tokenizer refuses when the first text alone is over max_length
        raise BadInput(f"inputs: question too long for the largest sequence bucket ({max_seq} tokens): {e}") \
            from None
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
        if spec.offsets:
            item.text, item.encoding = items[i], encodings[i]
        out.append(item)
    spec.check(out, tokenizer)
    return out


def _flat(encodings, field: str, total: int) -> np.ndarray:
    """One int64 array of every encoding's `field` back to back (each item's array is then a view into it)."""
    return np.fromiter(chain.from_iterable(getattr(e, field) for e in encodings), np.int64, total)


# BertNormalizer's clean_text drops these (and maps \t \n \r to a space); in ASCII, the only characters it
# does not map one to one
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = str.maketrans("\t\n\r", "   ")


class _Backend:
    """A transformers tokenizer's Rust tokenizer, configured once for one truncation (a copy: transformers
    re-configures the shared one on each of its own calls), and its Python stand-in for plain text.

    Plain text skips the Rust tokenizer (wordpiece.py: a third of its CPU time): on ASCII text without control
    characters BertNormalizer only lowercases and turns \\t \\n \\r into spaces, one character for one, so
    the text normalized here and tokenized by `wordpiece` yields the very same ids, type ids and character
    offsets. Any other configuration, or text with anything else in it (non-ASCII, control characters, an added
    token such as [SEP]), goes through the Rust tokenizer.
    """

    def __init__(self, tokenizer, max_length: int | None, only_second: bool, direction: str | None):
        import tokenizers

        config = tokenizer.backend_tokenizer.to_str()
        self.only_second = only_second
        direction = direction or getattr(tokenizer, "truncation_side", "right")
        self.full = backend = tokenizers.Tokenizer.from_str(config)
        backend.no_padding()
        if max_length is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(max_length, strategy="only_second" if only_second else "longest_first",
                                      direction=direction)
        config = json.loads(config)
        normalizer = config.get("normalizer") or {}
        self.python = None
        if normalizer.get("type") != "BertNormalizer":
            return
        self.lowercase = normalizer.get("lowercase", True)
        self.clean = normalizer.get("clean_text", True)
        # added tokens are split off before (content as given) or after (normalized) the normalizer: plain
        # text holds neither form, so that neither tokenizer splits any
        contents = {t.content for t in self.full.get_added_tokens_decoder().values()}
        contents |= {self.full.normalizer.normalize_str(c) for c in contents}
        self.added = re.compile("|".join(map(re.escape, sorted(c for c in contents if c)))) if contents else None
        self.python = WordPiece.load(config, max_length, direction, reference=self.full, prepare=self.plain)

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
        """Encodings (tokenizers' or wordpiece's) of `inputs` (texts, or pairs as tuples), in order; the Rust
        ones without character offsets unless `offsets`."""
        out = [None] * len(inputs)
        slow = list(range(len(inputs)))
        if self.python is not None:
            slow = []
            for i, x in enumerate(inputs):
                if isinstance(x, tuple) and not self.only_second:
                    slow.append(i)      # wordpiece.py cuts a pair's second text only, not the longest first
                    continue
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


# per transformers tokenizer, its _Backend per (truncation length, only_second, direction)
_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BACKENDS_LOCK = threading.Lock()


def _backend(tokenizer, max_length: int | None, only_second: bool, direction: str | None) -> _Backend:
    with _BACKENDS_LOCK:
        mine = _BACKENDS.setdefault(tokenizer, {})
        key = (max_length, only_second, direction)
        backend = mine.get(key)
        if backend is None:
            backend = mine[key] = _Backend(tokenizer, max_length, only_second, direction)
        return backend


def rust_tokenizer(tokenizer):
    """The Rust tokenizer of a transformers one, without padding or truncation (a copy: transformers configures
    the shared one on each of its calls, and a tokenizer.json may ask for padding)."""
    return _backend(tokenizer, None, False, None).full


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(the ids the tokenizer puts before one text's tokens, those it puts after): [CLS] and [SEP] for BERT, <s>
    and </s> for RoBERTa; read off an encoding of one word, so every post-processor is read the same way."""
    encoding = rust_tokenizer(tokenizer).encode("a")
    text = [i for i, s in enumerate(encoding.sequence_ids) if s == 0]
    return encoding.ids[:text[0]], encoding.ids[text[-1] + 1:]
