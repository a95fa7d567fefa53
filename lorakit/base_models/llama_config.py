"""Llama-shaped base models with random weights, built from a config (no download).

The GPU benchmark needs a model of a real size (TinyLlama-1.1B's shape) on a machine without network:
the shape decides the cost, the weights do not. `--model` takes a JSON file of LlamaConfig fields, or
one of PRESETS; anything else is handed to `lorakit.base_models.load.load_base` (an embedded name or a directory).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from lorakit.errors import LorakitError

# TinyLlama-1.1B: 22 layers × 7 projections = 154 adapted modules.
TINYLLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
                "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}
# A few-second stand-in for CPU dry runs and tests: same structure (GQA, 7 projections per layer).
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 1024}
PRESETS = {"tinyllama-1.1b-random": TINYLLAMA_1B, "tiny-llama-random": TINY}


class ModelConfigError(LorakitError, ValueError):
    """A model config file is missing, not JSON, or not a valid Llama config; the message names the file."""


def is_config_spec(spec: str) -> bool:
    """True when `spec` names a random-weight model (a preset or a .json config file), not a checkpoint."""
    return spec in PRESETS or spec.endswith(".json")


def read_config(spec: str) -> LlamaConfig:
    """The LlamaConfig of a preset name or a JSON file of LlamaConfig fields."""
    if spec in PRESETS:
        return LlamaConfig(**PRESETS[spec])
    path = Path(spec)
    try:
        fields = json.loads(path.read_text())
    except OSError as err:
        raise ModelConfigError(f"model config {path}: cannot read it ({err.strerror}); presets: "
                               f"{', '.join(PRESETS)}") from err
    except json.JSONDecodeError as err:
        raise ModelConfigError(f"model config {path} is not JSON: {err}") from err
    if not isinstance(fields, dict):
        raise ModelConfigError(f"model config {path} must be a JSON object of LlamaConfig fields, "
                               f"got {type(fields).__name__}")
    kind = fields.pop("model_type", "llama")
    fields.pop("architectures", None)
    if kind != "llama":
        raise ModelConfigError(f"model config {path}: model_type {kind!r}, only 'llama' configs are supported")
    try:
        config = LlamaConfig(**fields)
    except Exception as err:  # noqa: BLE001 - transformers validates with its own error classes (not ValueError)
        raise ModelConfigError(f"model config {path}: {err}") from err
    return config


def build_llama(config: LlamaConfig, device: torch.device | str, dtype: torch.dtype,
                seed: int = 0) -> PreTrainedModel:
    """A LlamaForCausalLM with random weights drawn on `device` (fast for 1B+ on a GPU), in `dtype`, eval mode.

    The same seed, device and config give the same weights, so copies for lorakit and PEFT are equal.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None  # random weights: never stop early, every row decodes alike
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()
