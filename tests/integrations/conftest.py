"""A tiny random Llama saved as a local directory, with a word-level tokenizer built in the test: what a
transformers / TRL script loads with from_pretrained, with no download."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from tests.conftest import tiny_llama
from lorakit.base_models.load import NO_HUB_KERNELS

VOCAB = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(99)}}  # tiny_llama's 101 tokens


def word_tokenizer() -> PreTrainedTokenizerFast:
    inner = Tokenizer(WordLevel(VOCAB, unk_token="<pad>"))
    inner.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """The tiny Llama and its tokenizer as a model directory (from_pretrained reads it)."""
    path = tmp_path_factory.mktemp("bases") / "tiny-llama"
    tiny_llama().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture()
def base(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS)


@pytest.fixture()
def rows() -> torch.Tensor:
    return torch.randint(2, 101, (8, 6), generator=torch.Generator().manual_seed(0))


def token_rows(rows: torch.Tensor) -> list[dict]:
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in rows]
