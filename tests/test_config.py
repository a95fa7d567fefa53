"""The configs: a field that several methods share is checked one way in every config that has it; the
constructors' positional order and config_to_dict's keys are the public contract."""

from __future__ import annotations

import dataclasses

import pytest

from lorakit.config import LoraConfig, LoraXSConfig, PrefixConfig, VeraConfig, config_from_dict, config_to_dict
from lorakit.errors import AdapterConfigError

CONFIGS = (LoraConfig, LoraXSConfig, VeraConfig, PrefixConfig)

# field -> (a bad value, what the error must say)
BAD = {
    "r": (0, "rank r must be a positive integer, got 0"),
    "lora_alpha": (float("nan"), "lora_alpha must be a finite number"),
    "lora_dropout": (1.0, r"lora_dropout must be in \[0, 1\), got 1.0"),
    "vera_dropout": (-0.1, r"vera_dropout must be in \[0, 1\), got -0.1"),
    "target_modules": ("", "target_modules is empty"),
    "exclude_modules": ([1], "exclude_modules must be a module name or a list of names"),
    "autocast_adapter_dtype": (1, "autocast_adapter_dtype must be True or False, got 1"),
    "modules_to_save": ([""], "modules_to_save must be a module name or a list of names"),
    "trainable_token_indices": ([1, 1], "trainable_token_indices must be a non-empty list of distinct token ids"),
    "init_std": (-1.0, "init_std must be >= 0"),
    "num_virtual_tokens": (True, "num_virtual_tokens must be a positive integer"),
    "prefix_projection": ("yes", "prefix_projection must be True or False"),
    "encoder_hidden_size": (0, "encoder_hidden_size must be a positive integer or None"),
}
CASES = [(cls, f) for cls in CONFIGS for f in (x.name for x in dataclasses.fields(cls)) if f in BAD]


def test_every_shared_field_has_a_case():
    shared = {f.name for cls in CONFIGS for f in dataclasses.fields(cls) if f.metadata.get("check")}
    assert shared == set(BAD)
    assert {"target_modules", "exclude_modules", "lora_alpha", "r", "autocast_adapter_dtype"} <= {
        f for cls, f in CASES if cls is LoraXSConfig} & {f for cls, f in CASES if cls is LoraConfig}


@pytest.mark.parametrize("cls, field", CASES, ids=[f"{c.__name__}.{f}" for c, f in CASES])
def test_a_bad_shared_field_is_refused_alike_everywhere(cls, field):
    value, message = BAD[field]
    with pytest.raises(AdapterConfigError, match=message):
        cls(**{field: value})


@pytest.mark.parametrize("cls", [LoraConfig, LoraXSConfig, VeraConfig])
def test_shared_fields_are_normalised_alike(cls):
    config = cls(target_modules=["q_proj", "v_proj"], exclude_modules="layers.0.q_proj")
    assert config.target_modules == ("q_proj", "v_proj") and config.exclude_modules == ("layers.0.q_proj",)
    assert config_from_dict(config_to_dict(config)) == config
    assert dataclasses.replace(config, r=4).target_modules == ("q_proj", "v_proj")  # checks are idempotent


def test_positional_order_and_saved_keys_are_unchanged():
    assert [f.name for f in dataclasses.fields(LoraConfig)] == [
        "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "exclude_modules",
        "autocast_adapter_dtype", "modules_to_save", "trainable_token_indices"]
    assert [f.name for f in dataclasses.fields(LoraXSConfig)] == [
        "r", "lora_alpha", "init_std", "lora_dropout", "target_modules", "exclude_modules", "autocast_adapter_dtype"]
    assert [f.name for f in dataclasses.fields(VeraConfig)] == [
        "r", "d_initial", "projection_seed", "vera_dropout", "target_modules", "exclude_modules",
        "autocast_adapter_dtype"]
    assert LoraConfig(4, 8.0).scaling == 2.0 and LoraXSConfig(4, 8.0).scaling == 2.0 and VeraConfig(4).scaling == 1.0
    assert LoraXSConfig(4, 8.0).init_std == 1e-5
    lora = LoraConfig(modules_to_save="score", trainable_token_indices={"embed_tokens": [3, 1]})
    assert config_to_dict(lora) == {
        "method": "lora", "r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "use_rslora": False,
        "target_modules": "all-linear", "exclude_modules": [], "autocast_adapter_dtype": True,
        "modules_to_save": ["score"], "trainable_token_indices": {"embed_tokens": [3, 1]}}
