"""Fixtures shared by every test folder: the tiny model (built once per session, no download)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama with its tokenizer, as a transformers model directory."""
    from tiny_model import build_tiny_model  # tests/ is on sys.path (rootdir conftest)

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
