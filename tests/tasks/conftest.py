"""A tiny Llama with a character tokenizer and a chat template, long enough for a word problem with a system prompt."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.conftest import save_tiny_llama


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_chat_llama"), max_positions=512)
