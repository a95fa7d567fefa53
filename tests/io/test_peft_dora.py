"""DoRA against the real PEFT 0.21 (peft.LoraConfig(use_dora=True)): same logits, its files load here and
ours there; export to plain LoRA only where DoRA is a no-op (every g = 1)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit import io
from lorakit.errors import CorruptAdapterError, UnsupportedAdapterError
from lorakit.methods.dora import row_norm
from tests.conftest import MODEL_FACTORIES, TOLERANCES, model_output
from tests.methods.test_dora import randomize_dora

TARGETS = {"llama": "all-linear", "gpt2": ["c_attn", "c_proj", "c_fc"]}


def peft_dora(arch: str, seed: int = 5, randomize: bool = True) -> torch.nn.Module:
    """A PEFT DoRA model whose B and magnitudes are non-trivial (fresh DoRA is the base: a test could not fail)."""
    model = get_peft_model(MODEL_FACTORIES[arch](0), PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[arch], use_dora=True, fan_in_fan_out=arch == "gpt2")).eval()
    if not randomize:
        return model
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=gen))
    return model


def ours_dora(arch: str) -> torch.nn.Module:
    model = MODEL_FACTORIES[arch](0)
    lk.attach(model, lk.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS[arch]), "d")
    randomize_dora(model, "d")
    return model


@pytest.fixture(params=sorted(TARGETS))
def dora_arch(request) -> str:
    return request.param


def test_same_weights_same_logits_as_peft(dora_arch, ids):
    fresh, peft_model = peft_dora(dora_arch, randomize=False), peft_dora(dora_arch)
    ours = MODEL_FACTORIES[dora_arch](0)
    lk.attach(ours, lk.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS[dora_arch]), "d")
    with torch.no_grad():
        for module, layer in lk.adapted_layers(ours).items():
            adapter = layer.adapters["d"]
            initial = fresh.get_submodule(f"base_model.model.{module}").lora_magnitude_vector["default"].weight
            torch.testing.assert_close(adapter.lora_magnitude_vector, initial, rtol=1e-6, atol=0)  # both ‖W‖
            theirs = peft_model.get_submodule(f"base_model.model.{module}")
            adapter.lora_A.copy_(theirs.lora_A["default"].weight)
            adapter.lora_B.copy_(theirs.lora_B["default"].weight)
            adapter.lora_magnitude_vector.copy_(theirs.lora_magnitude_vector["default"].weight)
        expected = model_output(peft_model, ids)
        assert (expected - model_output(MODEL_FACTORIES[dora_arch](0), ids)).abs().max() > 1e-2
        torch.testing.assert_close(model_output(ours, ids), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(model_output(ours, ids), expected, rtol=0, atol=1e-5)  # gradients on: per call


def test_peft_saved_dora_loads_with_same_logits(dora_arch, ids, tmp_path):
    peft_model = peft_dora(dora_arch)
    with torch.no_grad():
        expected = model_output(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = MODEL_FACTORIES[dora_arch](0)
    io.load_adapter(ours, tmp_path / "peft", "p")
    assert lk.adapter_config(ours, "p").use_dora
    with torch.no_grad():
        torch.testing.assert_close(model_output(ours, ids), expected, rtol=0, atol=1e-5)


def test_ours_loads_in_peft_with_same_logits_and_keys(dora_arch, ids, tmp_path):
    ours = ours_dora(dora_arch)
    with torch.no_grad():
        expected = model_output(ours, ids)
    io.save_adapter(ours, "d", tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    peft_model = PeftModel.from_pretrained(MODEL_FACTORIES[dora_arch](0), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(model_output(peft_model, ids), expected, rtol=0, atol=1e-5)
    peft_model.save_pretrained(tmp_path / "again")
    theirs = load_file(tmp_path / "again" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    assert any(k.endswith(".lora_magnitude_vector") for k in mine)
    for key, tensor in theirs.items():
        assert torch.equal(mine[key], tensor), key


def test_bf16_base_matches_peft(ids, tmp_path):
    """On a bf16 base both keep float32 adapter weights; PEFT takes the norm in bf16, lorakit in float32."""
    peft_model = peft_dora("llama")
    peft_model.save_pretrained(tmp_path / "peft")
    theirs = PeftModel.from_pretrained(MODEL_FACTORIES["llama"](0).to(torch.bfloat16), tmp_path / "peft").eval()
    ours = MODEL_FACTORIES["llama"](0).to(torch.bfloat16)
    io.load_adapter(ours, tmp_path / "peft", "p")
    with torch.no_grad():
        torch.testing.assert_close(model_output(ours, ids).float(), model_output(theirs, ids).float(), rtol=0,
                                   atol=2 * TOLERANCES[torch.bfloat16])


def test_export_refuses_a_dora_adapter_that_rescales_rows(device, dtype, tmp_path):
    model = MODEL_FACTORIES["llama"](0).to(device, dtype)
    lk.attach(model, lk.LoraConfig(r=4, lora_alpha=8, use_dora=True), "d")
    randomize_dora(model, "d")
    with pytest.raises(UnsupportedAdapterError, match=r"DoRA and rescales the rows of module model\.layers\.0\."
                                                      r"self_attn\.q_proj \(max \|g - 1\|"):
        io.export_to_peft(model, "d", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_of_a_dora_adapter_at_g_one_is_plain_lora(device, dtype, ids, tmp_path):
    """Magnitudes equal to the direction's row norms (g = 1): the LoRA part alone computes the same, so it exports."""
    model = MODEL_FACTORIES["llama"](0).to(device, dtype)
    lk.attach(model, lk.LoraConfig(r=4, lora_alpha=8, use_dora=True), "d")
    with torch.no_grad():
        for layer in lk.adapted_layers(model).values():
            adapter = layer.adapters["d"]
            adapter.lora_B.normal_(0, 0.1)
            adapter.lora_magnitude_vector.copy_(row_norm(layer.dense_weight(), *adapter.factors()))
    io.export_to_peft(model, "d", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_dora"] is False
    assert not any("magnitude" in k for k in load_file(tmp_path / "out" / "adapter_model.safetensors"))
    plain = MODEL_FACTORIES["llama"](0).to(device, dtype)
    io.load_adapter(plain, tmp_path / "out", "p")
    ids = ids.to(device)
    with torch.no_grad():
        torch.testing.assert_close(model_output(plain, ids).float(), model_output(model, ids).float(), rtol=0,
                                   atol=TOLERANCES[dtype])


def test_dora_file_without_magnitudes_or_with_stray_ones_is_refused(tmp_path):
    ours = ours_dora("llama")
    io.save_adapter(ours, "d", tmp_path / "ours")
    weights = tmp_path / "ours" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    save_file({k: v for k, v in tensors.items() if k != key}, weights)
    model = MODEL_FACTORIES["llama"](0)
    with pytest.raises(CorruptAdapterError, match=f"missing key {key}"):
        io.load_adapter(model, tmp_path / "ours", "x")
    save_file(tensors | {key: torch.ones(31)}, weights)
    with pytest.raises(Exception, match=r"lora_magnitude_vector \(32,\)"):
        io.load_adapter(model, tmp_path / "ours", "x")
    save_file(tensors, weights)
    path = tmp_path / "ours" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"use_dora": False}))
    with pytest.raises(CorruptAdapterError, match="does not say use_dora"):
        io.load_adapter(model, tmp_path / "ours", "x")
    assert not lk.adapted_layers(model)


def test_inspect_names_dora_and_counts_the_magnitudes(tmp_path):
    ours = ours_dora("llama")
    io.save_adapter(ours, "d", tmp_path / "ours")
    info = io.read_adapter_info(tmp_path / "ours")
    assert info["method"] == "dora" and info["trainable_numbers"] == lk.count_trainable(ours, "d")
