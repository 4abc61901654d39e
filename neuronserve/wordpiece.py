"""BERT's tokenizer for plain ASCII text, in Python: the same ids, type ids, sequence ids and character offsets as
the Rust tokenizer it stands in for, in a third of its CPU time on request-sized texts (106 against 322 us for
the bench's 114-token question and context, normalizing included).

Most of the Rust tokenizer's time on a short text goes to its pre-tokenizer and to alignment bookkeeping, general
machinery that plain ASCII text does not need. There BERT's pre-tokenizer splits at whitespace and isolates each
punctuation character, and words repeat: a space-separated chunk's pieces are looked up once and cached, a
request costs one `str.split` and a few C-level passes over its chunks, and character offsets are worked out only
for the tokens asked for (question answering asks for two per item).

`WordPiece.load` returns None for a configuration this does not reproduce exactly: it takes BertNormalizer,
BertPreTokenizer, a WordPiece model and a BERT-style post-processor (TemplateProcessing of special tokens, or
BertProcessing), and refuses any key it does not know, in case it changes what the Rust tokenizer does. The
caller hands it text as BertNormalizer would leave it, with no added token in it (its `prepare` decides which
text qualifies; everything else goes through the Rust tokenizer). Given that Rust tokenizer, `load` also encodes
a built-in corpus through both and returns None, with a warning, unless every encoding is the same.
"""
from __future__ import annotations

import logging
import re
import string
from bisect import bisect_right
from itertools import accumulate, chain
from operator import itemgetter
from typing import Callable

# BertPreTokenizer on ASCII: runs of letters and digits, and every other non-space character on its own (Rust's
# is_ascii_punctuation covers all of them)
_WORD = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")
_IDS = itemgetter(0)
CACHE_ENTRIES = 50_000      # chunks whose pieces are kept; the cache starts afresh when full
CACHE_CHUNK_CHARS = 64      # longer chunks (rare, and rarely repeated) are split every time

log = logging.getLogger("neuronserve.server")

# The differential check's texts, besides those `_corpus` builds for the configured lengths: every ASCII
# punctuation character alone, in runs and against letters and digits; numbers; mixed case; whitespace the
# normalizer turns into spaces; multi-piece and rare words; the continuing-subword prefix typed as text; and
# text the caller's `prepare` must keep from the Python path (added tokens as given and lowercased, non-ASCII,
# control characters), where a `prepare` that let it through would show up as a difference.
CORPUS_TEXTS = (
    string.punctuation,
    " ".join(string.punctuation),
    "Hello, World! It's 9:30 a.m. -- isn't it?",
    'He said "yes"; she said (quietly) [no] {maybe} <ok>... right?!',
    "mail me@example.com or see https://example.org/a_b?q=1&r=2#top ~ 100% ^_^ `code` a|b \\ x*y+z=w $5.00",
    "0123456789 3.14159 1,000,000 2024-01-31 007 42nd 1st 3rd 10x 0x1F 1e-9 -273.15",
    "iPhone McDonald HTTP HTTPServer camelCase snake_case UPPER lower MiXeD ALLCAPS",
    "xyzzy qzxj blorptastic hyperparameterization antidisestablishmentarianism tokenizers",
    "don't won't y'all rock'n'roll ##ing ## #hashtag @mention",
    "a b c x y z I A",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand  double  spaces\t",
    "[SEP]", "question [SEP] answer", "[CLS] [MASK] [PAD] [UNK]", "[sep] [mask]", "[SEP", "SEP]", "[ SEP ]",
    "caf\u00e9 na\u00efve", "a\x00b", "del\x7f", "\u4e2d\u6587", "non\u00a0breaking", "emoji \U0001f600",
)
CORPUS_PAIRS = (
    ("What does the little engine say?",
     "In the children's story, the little engine says: 'I think I can!' (again and again)."),
    ("Who knows?", "Nobody [SEP] knows."),
    ("WHERE is it?", "It is in the\tbox,\nnot\r\nthe bag."),
)
# a paragraph of multi-piece words and punctuation, repeated until it truncates; in BERT's vocabulary no five
# tokens in a row of it lack a word's continuing piece, so that one of five shifts cuts inside a word
_LONG = ("Unbelievably, the hyperparameterized locomotive's tokenization (v2.0) outperformed embeddings; "
         "irreproducibility remained questionable!")


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
    def load(cls, config: dict, max_length: int | None, direction: str = "right", reference=None,
             prepare: Callable[[str], str | None] | None = None) -> "WordPiece | None":
        """From a tokenizer.json's parsed `config`, truncating to `max_length` tokens (special ones included:
        a single text cut at its end, or a pair's second text, as Rust's longest_first / only_second do;
        `direction` "left" cuts at the start instead); None when the configuration is not one it reproduces.

        `reference`: the Rust tokenizers.Tokenizer of that `config`, truncating as the caller has it (longest_first
        for single texts, only_second for pairs) and without padding. When given, the corpus goes through it as
        is and through the WordPiece as `prepare` (the caller's own step before `encode`; None: none) leaves
        it, skipping what `prepare` refuses (None) as the caller does; any difference in ids, type ids,
        sequence ids or character offsets, or in which item is refused, makes this None."""
        if not _known(config) or direction not in ("left", "right"):
            return None
        model = config["model"]
        unk = model["vocab"].get(model["unk_token"])
        template = _template(config["post_processor"])
        if unk is None or template is None:
            return None
        if max_length is not None and max_length <= max(_specials(t) for t in template.values()):
            return None     # nothing left for the text: the Rust tokenizer's business
        out = cls(model["vocab"], unk, model["continuing_subword_prefix"], model["max_input_chars_per_word"],
                  template, max_length, direction)
        if reference is not None:
            why = out._differs(reference, prepare or (lambda text: text))
            if why is not None:
                log.warning("the Python WordPiece tokenizer is not used, the Rust one is: %s", why)
                return None
        return out

    def _differs(self, reference, prepare: Callable[[str], str | None]) -> str | None:
        """How this differs from `reference` on the corpus, or None where it does not."""
        truncation = reference.truncation or {}
        # sized for the reference's length, so that one this does not truncate to shows up too
        singles, pairs = _corpus(self, truncation.get("max_length", self.max_length))
        strategy = truncation.get("strategy")
        # the caller sends a reference that cuts only_second pairs alone (it refuses to cut a single text so),
        # and one that cuts longest_first single texts alone (this cuts a pair's second text only)
        items = (singles if strategy != "only_second" else []) + (pairs if strategy != "longest_first" else [])
        compared = 0
        for x in items:
            pair = isinstance(x, tuple)
            texts = x if pair else (x,)
            prepared = tuple(map(prepare, texts))
            if None in prepared:
                continue        # the caller sends it to Rust
            if _outcome(self.encode, prepared if pair else prepared[0]) != _outcome(reference.encode, *texts):
                return f"they differ on {x!r:.200}"
            compared += 1
        return None if compared else "no text of the check's corpus reaches it"

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
    None for a kind, key or value this does not reproduce."""
    if _fits(processor, type=_equal("BertProcessing"), sep=_named_id, cls=_named_id):
        sep, cls = processor["sep"][1], processor["cls"][1]
        return {False: [((cls,), 0), (0, 0), ((sep,), 0)],
                True: [((cls,), 0), (0, 0), ((sep,), 0), (1, 1), ((sep,), 1)]}
    if not _fits(processor, type=_equal("TemplateProcessing"), single=_list, pair=_list,
                 special_tokens=_special_tokens):
        return None
    specials = processor["special_tokens"]
    out = {}
    for pair, key in ((False, "single"), (True, "pair")):
        parts = []
        for piece in processor[key]:
            if _fits(piece, Sequence=lambda v: _fits(v, id=_equal("A", "B"), type_id=_count)):
                spec = piece["Sequence"]
                parts.append(("AB".index(spec["id"]), spec["type_id"]))
            elif _fits(piece, SpecialToken=lambda v: _fits(v, id=lambda i: _string(i) and i in specials,
                                                               type_id=_count)):
                spec = piece["SpecialToken"]
                parts.append((tuple(specials[spec["id"]]["ids"]), spec["type_id"]))
            else:
                return None
        if sorted(p for p, _ in parts if isinstance(p, int)) != ([0, 1] if pair else [0]):
            return None
        out[pair] = parts
    return out


def _specials(template: list) -> int:
    return sum(len(part) for part, _ in template if not isinstance(part, int))


def _known(config: dict) -> bool:
    """Whether `config` holds only sections and keys this knows, each with a value it reproduces (the
    post-processor's are `_template`'s business)."""
    return _fits(
        config,
        version=_equal("1.0"),
        truncation=_anything,       # `load`'s max_length and direction stand for it
        padding=_anything,          # encodings come unpadded
        decoder=_anything,          # only decoding reads it
        # the caller keeps text holding any added token from the Python path, whatever the token's options
        added_tokens=lambda v: v is None or (isinstance(v, list) and all(_fits(
            t, id=_count, content=_string, single_word=_flag, lstrip=_flag, rstrip=_flag, normalized=_flag,
            special=_flag) for t in v)),
        # the caller's `prepare` lowercases and cleans; ASCII text has no accents or Chinese characters to treat
        normalizer=lambda v: _fits(v, type=_equal("BertNormalizer"), clean_text=_flag, lowercase=_flag,
                                   strip_accents=lambda a: a is None or _flag(a), handle_chinese_chars=_flag),
        pre_tokenizer=lambda v: _fits(v, type=_equal("BertPreTokenizer")),
        model=lambda v: _fits(v, type=_equal("WordPiece"), unk_token=_string, continuing_subword_prefix=_string,
                              max_input_chars_per_word=_count, vocab=lambda d: isinstance(d, dict)),
        post_processor=_anything)


def _fits(section, **checks: Callable) -> bool:
    """Whether `section` is a dict with no key outside `checks`, each check true of its key's value (of None
    where the key is missing)."""
    return (isinstance(section, dict) and section.keys() <= checks.keys()
            and all(check(section.get(key)) for key, check in checks.items()))


def _equal(*values: str) -> Callable:
    return lambda v: isinstance(v, str) and v in values


def _anything(value) -> bool:
    return True


def _flag(value) -> bool:
    return isinstance(value, bool)


def _count(value) -> bool:
    return type(value) is int and value >= 0       # bool is an int too, but not a count


def _string(value) -> bool:
    return isinstance(value, str)


def _list(value) -> bool:
    return isinstance(value, list)


def _named_id(value) -> bool:
    """BertProcessing's [token, id]."""
    return isinstance(value, list) and len(value) == 2 and _string(value[0]) and _count(value[1])


def _special_tokens(value) -> bool:
    """TemplateProcessing's special tokens: name -> {id, ids, tokens}."""
    return isinstance(value, dict) and all(
        _fits(t, id=_string, ids=lambda ids: _list(ids) and ids != [] and all(map(_count, ids)),
              tokens=lambda tokens: _list(tokens) and all(map(_string, tokens)))
        for t in value.values())


def _corpus(wordpiece: WordPiece, n: int | None) -> tuple[list, list]:
    """(single texts, (question, context) pairs) to check `wordpiece` on: the fixed corpus, words at and just
    over its word limit, and text around and far over truncation length `n` (None: the long paragraph twice)."""
    # a word at the limit, and one over it; past BERT's 100 characters, splitting such a word costs more than
    # the rest of the check together, so a higher limit is tested as if 100
    limit = "y" * min(wordpiece.max_chars, 100)
    singles = [*CORPUS_TEXTS, f"{limit} Z{limit}!"]
    # each text as a question (never cut) and as a context (cut where long), so that a short truncation length
    # still lets all of it through one side or the other
    pairs = [*CORPUS_PAIRS, *chain.from_iterable(((text, "Why?"), ("Why?", text)) for text in singles)]
    copies = 2 if n is None else n // len(_WORD.findall(_LONG)) + 2     # a word is a token at least
    long = " ".join([_LONG] * copies)
    # shifted a token at a time at either end, so that a cut falls inside a word's pieces and between a word
    # and its punctuation whichever the direction
    shifted = ["a " * k + long + " a" * k for k in range(5)]
    singles += shifted
    pairs += [("What was questionable?", text) for text in shifted]
    if n is not None:
        # one-character words are one token each (the character, or the unknown token): texts just within and
        # over the length, and questions that leave a three-token context all of it, part of it, none of it
        room = n - _specials(wordpiece.template[False])
        singles += [" ".join("a" * (room + k)) for k in (0, 1)]
        room = n - _specials(wordpiece.template[True])
        pairs += [(" ".join("q" * max(room + k, 1)), "b c d") for k in range(-3, 1)]
    return singles, pairs


def _outcome(encode: Callable, *args) -> tuple | None:
    """What the caller reads of `encode(*args)`; None where it refuses (the caller answers any refusal alike).
    token_to_chars is left out: in both tokenizers it is the offsets, None where the sequence id is None."""
    try:
        e = encode(*args)
    except Exception:
        return None
    return e.ids, e.type_ids, e.sequence_ids, e.offsets
