"""BERT's tokenizer for plain ASCII text, in Python: the same ids, type ids, sequence ids and character offsets as
the Rust tokenizer it stands in for, in a third of its CPU time on request-sized texts (106 against 322 us for
the bench's 114-token question and context, normalizing included).

Most of the Rust tokenizer's time on a short text goes to its pre-tokenizer and to alignment bookkeeping, general
machinery that plain ASCII text does not need. There BERT's pre-tokenizer splits at whitespace and isolates each
punctuation character, and words repeat: a space-separated chunk's pieces are looked up once and cached, a
request costs one `str.split` and a few C-level passes over its chunks, and character offsets are worked out only
for the tokens asked for (question answering asks for two per item).

`WordPiece.load` returns None for a configuration this does not reproduce exactly: it takes BertPreTokenizer,
a WordPiece model and a BERT-style post-processor (TemplateProcessing of single-id special tokens, or
BertProcessing). The caller hands it text as BertNormalizer would leave it, with no added token in it
(`tasks._Backend.plain` decides which text qualifies; everything else goes through the Rust tokenizer).
"""
from __future__ import annotations

import re
from bisect import bisect_right
from itertools import accumulate, chain
from operator import itemgetter

# BertPreTokenizer on ASCII: runs of letters and digits, and every other non-space character on its own (Rust's
# is_ascii_punctuation covers all of them)
_WORD = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")
_IDS = itemgetter(0)
CACHE_ENTRIES = 50_000      # chunks whose pieces are kept; the cache starts afresh when full
CACHE_CHUNK_CHARS = 64      # longer chunks (rare, and rarely repeated) are split every time


class Encoding:
    """What the server reads of a tokenizers.Encoding: ids, type_ids, sequence_ids, offsets, token_to_chars."""

    __slots__ = ("ids", "_layout", "_texts")

    def __init__(self, ids: list[int], layout: list[tuple], texts: list["_Text"]):
        self.ids = ids
        self._layout = layout       # (sequence 0/1 or None for a special token, token count, type id) in order
        self._texts = texts

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def type_ids(self) -> list[int]:
        out = []
        for _, n, type_id in self._layout:
            out += [type_id] * n
        return out

    @property
    def sequence_ids(self) -> list[int | None]:
        out = []
        for sequence, n, _ in self._layout:
            out += [sequence] * n
        return out

    @property
    def offsets(self) -> list[tuple[int, int]]:
        return [self.token_to_chars(i) or (0, 0) for i in range(len(self.ids))]

    def token_to_chars(self, index: int) -> tuple[int, int] | None:
        """(start, end) of token `index` in its own text; None for a special token."""
        for sequence, n, _ in self._layout:
            if index < n:
                return None if sequence is None else self._texts[sequence].chars(index)
            index -= n
        raise IndexError("token index out of range")


class _Text:
    """One text's tokens: ids, and per chunk its cached pieces, so that offsets can be found for any token."""

    __slots__ = ("ids", "chunks", "entries", "_upto", "_at")

    def __init__(self, chunks: list[str], entries: list[tuple]):
        self.chunks, self.entries = chunks, entries
        self.ids = list(chain.from_iterable(map(_IDS, entries)))
        self._upto = self._at = None

    def upto(self) -> list[int]:
        """Per chunk, the tokens up to and including it (worked out once, when first asked)."""
        if self._upto is None:
            self._upto = list(accumulate(map(len, map(_IDS, self.entries))))
        return self._upto

    def chunk_of(self, token: int) -> tuple[int, int]:
        """(the chunk holding `token`, the token's index within that chunk's pieces)."""
        upto = self.upto()
        k = bisect_right(upto, token)
        return k, token - (upto[k - 1] if k else 0)

    def chars(self, token: int) -> tuple[int, int]:
        if self._at is None:        # where each chunk starts, less the spaces before it
            self._at = list(accumulate(map(len, self.chunks), initial=0))
        k, piece = self.chunk_of(token)
        at = self._at[k] + k        # one space after each chunk before it
        _, starts, ends = self.entries[k]
        return at + starts[piece], at + ends[piece]


class WordPiece:
    def __init__(self, vocab: dict[str, int], unk: int, prefix: str, max_chars: int, template: dict,
                 max_length: int | None, direction: str):
        self.vocab, self.unk, self.prefix, self.max_chars = vocab, unk, prefix, max_chars
        self.template = template            # pair-ness (False/True) -> [(special ids | sequence 0/1, type id)]
        self.max_length, self.direction = max_length, direction
        self._cache: dict[str, tuple] = {}

    @classmethod
    def load(cls, config: dict, max_length: int | None, direction: str = "right") -> "WordPiece | None":
        """From a tokenizer.json's parsed `config`, truncating to `max_length` tokens (special ones included:
        a single text cut at its end, or a pair's second text, as Rust's longest_first / only_second do;
        `direction` "left" cuts at the start instead); None when the configuration is not one it reproduces."""
        model = config.get("model") or {}
        if (config.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer" or model.get("type") != "WordPiece":
            return None
        vocab = model.get("vocab") or {}
        unk = vocab.get(model.get("unk_token"))
        template = _template(config.get("post_processor") or {})
        if unk is None or template is None or direction not in ("left", "right"):
            return None
        if max_length is not None and max_length <= max(_specials(t) for t in template.values()):
            return None     # nothing left for the text: the Rust tokenizer's business
        return cls(vocab, unk, model.get("continuing_subword_prefix", "##"),
                   model.get("max_input_chars_per_word", 100), template, max_length, direction)

    def encode(self, x) -> Encoding:
        """The Encoding of `x`, a normalized text or a (question, context) pair of them. ValueError when a pair's
        question leaves its context no room, as the Rust tokenizer's only_second refuses."""
        pair = isinstance(x, tuple)
        texts = [self._text(t) for t in x] if pair else [self._text(x)]
        if self.max_length is not None:
            template = self.template[pair]
            cut = sum(len(t.ids) for t in texts) + _specials(template) - self.max_length
            if cut > 0:
                last = texts[-1]
                if pair and len(last.ids) <= cut:
                    raise ValueError(f"the first text leaves the second no room within {self.max_length} tokens")
                texts[-1] = self._cut(last, len(last.ids) - cut)
        ids, layout = [], []
        for part, type_id in self.template[pair]:
            if isinstance(part, int):
                ids += texts[part].ids
                layout.append((part, len(texts[part].ids), type_id))
            else:
                ids += part
                layout.append((None, len(part), type_id))
        return Encoding(ids, layout, texts)

    def _text(self, text: str) -> _Text:
        chunks = text.split(" ")
        entries = list(map(self._cache.get, chunks))
        if None in entries:
            entries = [e or self._entry(c) for c, e in zip(chunks, entries)]
        return _Text(chunks, entries)

    def _cut(self, text: _Text, keep: int) -> _Text:
        """`text` cut to `keep` tokens, whole chunks where it can and the split chunk's pieces as they were."""
        if self.direction == "right":
            k, last = text.chunk_of(keep - 1)       # the chunk holding the last kept token
            entry = tuple(part[:last + 1] for part in text.entries[k])
            return _Text(text.chunks[:k + 1], text.entries[:k] + [entry])
        # left: keep the last `keep` tokens; the first kept chunk loses its leading pieces
        k, first = text.chunk_of(len(text.ids) - keep)     # the chunk holding the first kept token
        entry = tuple(part[first:] for part in text.entries[k])
        # the chunks before k stay (empty) so that character offsets still count from the text's start
        return _Text(text.chunks, [((), (), ())] * k + [entry] + text.entries[k + 1:])

    def _entry(self, chunk: str) -> tuple:
        """(ids, starts, ends) of a space-free chunk's pieces, offsets within the chunk."""
        ids, starts, ends = [], [], []
        for m in _WORD.finditer(chunk):
            self._pieces(m.group(), m.start(), ids, starts, ends)
        entry = (tuple(ids), tuple(starts), tuple(ends))
        if len(chunk) <= CACHE_CHUNK_CHARS:
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[chunk] = entry
        return entry

    def _pieces(self, word: str, at: int, ids: list, starts: list, ends: list) -> None:
        """Greedy longest-match-first WordPiece; a word with an unknown part, or over max_chars, is one unk."""
        vocab, n = self.vocab, len(word)
        if n <= self.max_chars:
            found, i = [], 0
            while i < n:
                for j in range(n, i, -1):
                    t = vocab.get(word[i:j] if i == 0 else self.prefix + word[i:j])
                    if t is not None:
                        found.append((t, i, j))
                        i = j
                        break
                else:
                    break
            else:
                for t, i, j in found:
                    ids.append(t)
                    starts.append(at + i)
                    ends.append(at + j)
                return
        ids.append(self.unk)
        starts.append(at)
        ends.append(at + n)


def _template(processor: dict) -> dict | None:
    """A post-processor -> {False: single template, True: pair template}, each [(ids tuple | sequence, type id)];
    None for a kind this does not reproduce."""
    kind = processor.get("type")
    if kind == "BertProcessing":
        (_, sep), (_, cls) = processor["sep"], processor["cls"]
        return {False: [((cls,), 0), (0, 0), ((sep,), 0)],
                True: [((cls,), 0), (0, 0), ((sep,), 0), (1, 1), ((sep,), 1)]}
    if kind != "TemplateProcessing":
        return None
    specials = processor.get("special_tokens") or {}
    out = {}
    for pair, key in ((False, "single"), (True, "pair")):
        parts = []
        for piece in processor.get(key) or []:
            if "Sequence" in piece:
                sequence = {"A": 0, "B": 1}.get(piece["Sequence"].get("id"))
                if sequence is None or (sequence == 1 and not pair):
                    return None
                parts.append((sequence, piece["Sequence"].get("type_id", 0)))
            elif "SpecialToken" in piece:
                token = specials.get(piece["SpecialToken"].get("id")) or {}
                if not token.get("ids"):
                    return None
                parts.append((tuple(token["ids"]), piece["SpecialToken"].get("type_id", 0)))
            else:
                return None
        if sorted(p for p, _ in parts if isinstance(p, int)) != ([0, 1] if pair else [0]):
            return None
        out[pair] = parts
    return out


def _specials(template: list) -> int:
    return sum(len(part) for part, _ in template if not isinstance(part, int))
