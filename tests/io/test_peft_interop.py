"""Interop with the real `peft` both ways, and export of LoRA-XS / VeRA to plain PEFT LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import lorakit as lk
from lorakit import io
from tests.conftest import MODEL_FACTORIES, model_output
from tests.io.util import adapted

PEFT_TARGETS = {"llama": "all-linear", "bert": ["query", "value", "dense"], "gpt2": ["c_attn", "c_proj", "c_fc"]}


def test_ours_loads_in_peft_with_same_outputs(arch, ids, tmp_path):
    model = adapted(arch, "lora")
    expected = model_output(model, ids)
    io.save_adapter(model, "a", tmp_path / "ad")
    peft_model = PeftModel.from_pretrained(MODEL_FACTORIES[arch](0), tmp_path / "ad").eval()
    torch.testing.assert_close(model_output(peft_model, ids), expected, rtol=0, atol=1e-5)


def test_peft_adapter_loads_in_ours_with_same_outputs(arch, ids, tmp_path):
    extra = {"fan_in_fan_out": True} if arch == "gpt2" else {"use_rslora": True} if arch == "llama" else {}
    peft_model = get_peft_model(MODEL_FACTORIES[arch](0), PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=PEFT_TARGETS[arch], init_lora_weights=False, **extra)).eval()
    expected = model_output(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = MODEL_FACTORIES[arch](0)
    io.load_adapter(ours, tmp_path / "peft", "p")
    torch.testing.assert_close(model_output(ours, ids), expected, rtol=0, atol=1e-5)
    peft_layers = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert set(lk.adapted_layers(ours)) == peft_layers


def test_layers_to_transform_loads_only_those_layers(ids, tmp_path):
    peft_model = get_peft_model(MODEL_FACTORIES["llama"](0), PeftLoraConfig(
        r=4, target_modules=["q_proj"], layers_to_transform=[1], init_lora_weights=False)).eval()
    expected = model_output(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = MODEL_FACTORIES["llama"](0)
    io.load_adapter(ours, tmp_path / "peft", "p")
    assert list(lk.adapted_layers(ours)) == ["model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(model_output(ours, ids), expected, rtol=0, atol=1e-5)


def test_config_has_exactly_peft_fields_and_values(arch, tmp_path):
    """Same field names, same values (target_modules compared by the modules it selects), same keys."""
    model = adapted(arch, "lora")
    io.save_adapter(model, "a", tmp_path / "ours")
    targets = sorted({n.rsplit(".", 1)[-1] for n in lk.adapted_layers(model)})
    peft_model = get_peft_model(MODEL_FACTORIES[arch](0), PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=arch == "gpt2",
        task_type="CAUSAL_LM" if arch == "llama" else None))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours) == set(theirs)
    for field in theirs:
        if field == "target_modules":
            assert sorted(ours[field]) == sorted(theirs[field])
        elif field != "peft_version":
            assert ours[field] == theirs[field] and type(ours[field]) is type(theirs[field]), field
    ours_keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_keys.items()} == {k: v.shape for k, v in theirs_keys.items()}


@pytest.mark.parametrize("method", ["lora_xs", "vera"])
def test_export_to_peft_same_outputs(arch, method, ids, tmp_path):
    model = adapted(arch, method)
    expected = model_output(model, ids)
    io.export_to_peft(model, "a", tmp_path / "exported")
    info = io.read_adapter_info(tmp_path / "exported")
    assert info["format"] == "peft" and info["method"] == "lora"
    peft_model = PeftModel.from_pretrained(MODEL_FACTORIES[arch](0), tmp_path / "exported").eval()
    torch.testing.assert_close(model_output(peft_model, ids), expected, rtol=0, atol=1e-5)
    ours = MODEL_FACTORIES[arch](0)  # and it is an ordinary LoRA adapter for lorakit too
    io.load_adapter(ours, tmp_path / "exported", "plain")
    assert isinstance(lk.adapter_config(ours, "plain"), lk.LoraConfig)
    torch.testing.assert_close(model_output(ours, ids), expected, rtol=0, atol=1e-5)
