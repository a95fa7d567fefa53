"""Fixtures for the serving tests: a tiny random Llama that speaks SmolLM2's tokenizer, with adapters."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import LoraConfig, LoraXSConfig
from tests.conftest import randomize_adapters


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from lorakit.base_models.load import ensure_cache

    return AutoTokenizer.from_pretrained(ensure_cache("smollm2-135m"))


def tiny_chat_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random Llama over the real tokenizer's vocabulary (so text round-trips)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def with_adapters(model: torch.nn.Module, names: list[str], seed: int = 1) -> torch.nn.Module:
    """Attach alternating LoRA-XS / LoRA adapters with random non-trivial weights."""
    for i, name in enumerate(names):
        lorakit.attach(model, LoraXSConfig(r=4, init_std=0.3) if i % 2 == 0 else LoraConfig(r=4), name)
    randomize_adapters(model, std=0.3, seed=seed)
    return model


def saved_adapters(source: torch.nn.Module, names: list[str], root):
    """Each named adapter of `source` saved as root/<name> (an adapter directory the store and server read)."""
    from lorakit.io import save_adapter

    for name in names:
        save_adapter(source, name, root / name)
    return root


def greedy_alone(model: torch.nn.Module, prompt: list[int], adapter: str | None, max_new_tokens: int,
                 eos: int | None = 2) -> list[int]:
    """What `model.generate` (greedy, the adapter alone) produces, cut at the first eos."""
    ids = torch.tensor([prompt])
    route = lorakit.use_adapter(model, adapter) if adapter else lorakit.disable_adapters(model)
    with route, torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=eos)
    new = out[0, len(prompt):].tolist()
    return new[: new.index(eos)] if eos is not None and eos in new else new


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll `condition` until it holds; the timeout is only a failsafe (a hung test fails, never waits on)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(0.01)
    return True


class Gate:
    """A forward pre-hook that lets the first `free` forwards through and holds every later one until
    open(): rows stay running exactly as long as a test needs, however loaded the machine (no sleeps)."""

    def __init__(self, model: torch.nn.Module, free: int) -> None:
        self.free, self.calls = free, 0
        self._open = threading.Event()
        self._handle = model.register_forward_pre_hook(self._hold)

    def _hold(self, module, args) -> None:
        self.calls += 1
        if self.calls > self.free:
            self._open.wait(60)  # failsafe: a test that never opens the gate fails slowly, never hangs

    def open(self) -> None:
        self._open.set()

    def remove(self) -> None:
        self._open.set()
        self._handle.remove()
