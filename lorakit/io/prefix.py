"""Prefix adapters in Hugging Face PEFT's prefix-tuning file format, both ways (it is also lorakit's own).

    adapter_config.json         peft_type "PREFIX_TUNING", num_virtual_tokens, num_layers,
                                num_attention_heads (key/value heads), token_dim (kv heads × head size), ...
    adapter_model.safetensors   prompt_embeddings  (num_virtual_tokens, num_layers·2·token_dim)

The file holds the prefix itself: a reparameterisation MLP used in training is folded into it when
saving (so the config says prefix_projection: false, and PEFT loads it for inference or further
training alike). Loading checks the architecture first (layers, key/value heads, head size): a prefix
made for another model is refused with PrefixMismatchError before the model is touched.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lorakit.model.manage import adapter_config
from lorakit.config import PrefixConfig
from lorakit.errors import AdapterConfigError, CorruptAdapterError, UnsupportedAdapterError
from lorakit.io.atomic import json_bytes, tensors_bytes, write_directory
from lorakit.io.files import CONFIG_NAME, WEIGHTS_NAME, AdapterFiles, check_finite, expect_keys
from lorakit.io.guard import check_free_name
from lorakit.io.peft_lora import PEFT_FORMAT_VERSION, base_model_name
from lorakit.methods.prefix import PrefixShape, check_fits, check_same_shape, prefix_shape
from lorakit.model.prefix_hook import attach_prefix, prefix_adapter, remove_prefix

PEFT_TYPE = "PREFIX_TUNING"
KEY = "prompt_embeddings"


def _task_type(model: nn.Module) -> str:
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return "FEATURE_EXTRACTION"


def save_prefix(model: nn.Module, name: str, path: str | os.PathLike) -> Path:
    """Write prefix adapter `name` as PEFT's save_pretrained would (MLP folded into the prefix)."""
    config = adapter_config(model, name)
    if not isinstance(config, PrefixConfig):
        raise AdapterConfigError(f"adapter {name!r} is {config.method}, not a prefix adapter")
    adapter = prefix_adapter(model, name)
    shape = adapter.shape
    with torch.no_grad():
        flat = adapter.flat().detach().float().contiguous().cpu()  # (T, L·2·H·D)
    data = {
        "auto_mapping": None, "base_model_name_or_path": base_model_name(model),
        "encoder_hidden_size": shape.token_dim, "inference_mode": True, "init_weights": None,
        "modules_to_save": None, "num_attention_heads": shape.num_kv_heads, "num_layers": shape.num_layers,
        "num_transformer_submodules": 1, "num_virtual_tokens": config.num_virtual_tokens,
        "peft_type": PEFT_TYPE, "peft_version": PEFT_FORMAT_VERSION, "prefix_projection": False,
        "revision": None, "task_type": _task_type(model), "token_dim": shape.token_dim,
    }
    return write_directory(path, {CONFIG_NAME: json_bytes(data),
                                  WEIGHTS_NAME: tensors_bytes({KEY: flat}, {"format": "pt"})})


def _int_field(config: dict, field: str, where: Path) -> int:
    value = config.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CorruptAdapterError(f"{where}: '{field}' must be a positive integer, got {value!r}")
    return value


def load_prefix(model: nn.Module, files: AdapterFiles, name: str) -> str:
    """Attach the prefix adapter in `files` as `name`; everything is checked before the model changes."""
    cfg, where = files.config, files.path / CONFIG_NAME
    check_free_name(model, name)
    if (cfg.get("num_transformer_submodules") or 1) != 1:
        raise UnsupportedAdapterError(f"{where}: num_transformer_submodules={cfg['num_transformer_submodules']} "
                                      "(an encoder-decoder prefix); lorakit supports decoder or encoder models")
    tokens = _int_field(cfg, "num_virtual_tokens", where)
    layers = _int_field(cfg, "num_layers", where)
    heads = _int_field(cfg, "num_attention_heads", where)
    token_dim = _int_field(cfg, "token_dim", where)
    if token_dim % heads:
        raise CorruptAdapterError(f"{where}: token_dim {token_dim} is not a multiple of num_attention_heads {heads}")
    expected = prefix_shape(model)
    found = PrefixShape(layers, heads, token_dim // heads, expected.max_positions)
    check_same_shape(expected, found, str(where))
    config = PrefixConfig(num_virtual_tokens=tokens)
    check_fits(config, expected, str(where))
    expect_keys(set(files.tensors), {KEY}, files.path / WEIGHTS_NAME)
    flat = files.tensors[KEY]
    if tuple(flat.shape) != (tokens, expected.flat_dim):
        raise CorruptAdapterError(f"{files.path / WEIGHTS_NAME}: {KEY} has shape {tuple(flat.shape)}, expected "
                                  f"({tokens}, {expected.flat_dim}) for {tokens} virtual tokens over "
                                  f"{expected.describe()}")
    check_finite(files.tensors, files.path / WEIGHTS_NAME)
    attach_prefix(model, config, name)
    try:
        with torch.no_grad():
            weight = prefix_adapter(model, name).embedding.weight
            weight.copy_(flat.to(weight.dtype))
    except BaseException:
        remove_prefix(model, name)
        model.lorakit_registry.configs.pop(name, None)
        raise
    return name


__all__ = ["load_prefix", "save_prefix"]
