"""Adapters record a base name that carries to another machine, never a path of this one."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.errors import AdapterMismatchError
from lorakit.io import export_to_peft, load_adapter, read_adapter_info, save_adapter
from lorakit.io.peft_lora import portable_base_name
from lorakit.base_models.load import load_base
from tests.train.conftest import save_tiny_llama


@pytest.mark.parametrize("name, portable", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("gpt2", "gpt2"),
    ("/home/u/.cache/huggingface/hub/models--org--my-model/snapshots/0123abc", "org/my-model"),
    ("/home/u/.cache/huggingface/hub/models--gpt2/snapshots/0123abc/", "gpt2"),
    ("/data/models/llama-7b", "llama-7b"),
    ("/data/models/llama-7b/", "llama-7b"),
    ("./runs/base", "base"),
    ("~/models/tiny", "tiny"),
    ("C:\\models\\tiny", "tiny"),
])
def test_portable_base_name(name, portable):
    assert portable_base_name(name) == portable


@pytest.mark.parametrize("config", [lorakit.LoraXSConfig(r=4), lorakit.LoraConfig(r=4)], ids=["lora_xs", "lora"])
def test_local_base_is_recorded_by_its_name_and_still_checked(config, tmp_path):
    base_dir = save_tiny_llama(tmp_path / "my-tiny-llama")
    model, _ = load_base(str(base_dir))
    lorakit.attach(model, config, "a")
    save_adapter(model, "a", tmp_path / "ad")
    export_to_peft(model, "a", tmp_path / "peft")
    for directory in (tmp_path / "ad", tmp_path / "peft"):
        recorded = json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert recorded == "my-tiny-llama"
        assert read_adapter_info(directory)["base_model"] == "my-tiny-llama"
    fresh, _ = load_base(str(base_dir))
    assert load_adapter(fresh, tmp_path / "ad") == "ad"  # loading does not depend on the recorded name
    if isinstance(config, lorakit.LoraXSConfig):  # and the fingerprints still guard against another base
        other, _ = load_base(str(base_dir))
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(1.5)
        with pytest.raises(AdapterMismatchError, match="--no-strict"):
            load_adapter(other, tmp_path / "ad")


def test_embedded_base_is_recorded_by_its_hub_id(tmp_path):
    model, _ = load_base("minilm-l6")
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["query"]), "a")
    save_adapter(model, "a", tmp_path / "ad")
    assert read_adapter_info(tmp_path / "ad")["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
