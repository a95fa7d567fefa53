"""Tiny random models (built in the test, no downloads) shared by the unit tests."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    return BertModel(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


MODEL_FACTORIES = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}

# Every device there is: the CPU always, CUDA where a GPU is present (scripts/gpu_check.sh runs those).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Tolerance for comparing two computations of the same output in one dtype: float32 rounds at 2^-24
# relative, bf16 at 2^-8 and fp16 at 2^-11; a tiny model's logits are O(1) after a few accumulations,
# so a few units of the last place of each format: 1e-5, 5e-2 and 1e-2.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each device the tests can run on: cpu, and cuda when available."""
    return torch.device(request.param)


@pytest.fixture(params=sorted(DTYPES))
def dtype(request) -> torch.dtype:
    """Each floating dtype a base model may be loaded in."""
    return DTYPES[request.param]


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Every test runs torch on one intra-op thread: the models are tiny, and on a shared 2-core machine two
    OpenMP threads made forward passes 25-100× slower (3.6 s vs 0.15 s for SmolLM2) than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def model_output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def randomize_adapters(model: torch.nn.Module, std: float = 0.05, seed: int = 1) -> None:
    """Give every adapter tensor non-trivial values (fresh LoRA B / VeRA b are zero, so Δ would be 0)."""
    import lorakit

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lorakit.adapted_layers(model).values():
            for adapter in layer.adapters.values():
                for p in adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 101, (4, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def arch(request) -> str:
    return request.param


@pytest.fixture()
def no_recompile_after_first():
    """A fresh dynamo cache for the test; the test sets `error_on_recompile` once its first graph is made."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()
