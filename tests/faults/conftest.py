"""Faults injected into the real stack (gunicorn + uvicorn groups behind nginx on 127.0.0.1), under bounded load.

Fixtures:
- `model_repo`, `stack_factory`: the e2e ones (tests/e2e/conftest.py, loaded by faultkit), so a stack here is
  built exactly like an e2e stack.
- `basetemp`: where fault-figures.json collects the figures of the run; they are printed in the summary.

Every test in this directory is marked `e2e`.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from faultkit import FIGURES, e2e_stack

FAULTS_DIR = Path(__file__).parent

model_repo = e2e_stack.model_repo
stack_builder = e2e_stack.stack_builder
stack_factory = e2e_stack.stack_factory


def pytest_collection_modifyitems(config, items):
    for item in items:
        if FAULTS_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def basetemp(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp()


def pytest_terminal_summary(terminalreporter, config):
    factory = getattr(config, "_tmp_path_factory", None)
    path = factory.getbasetemp() / FIGURES if factory else None
    if path and path.exists():
        terminalreporter.write_sep("-", f"fault figures ({path})")
        terminalreporter.write_line(path.read_text().rstrip())
