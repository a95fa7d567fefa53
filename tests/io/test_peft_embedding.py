"""PEFT LoRA files with embedding and output-head targets, both ways with the real PEFT, their refusals, and
export's warning / explicit dropping of modules vLLM may refuse (lorakit.io.peft_embedding, lorakit.io.export)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit as lk
from lorakit import io
from lorakit.errors import AdapterConfigError, AdapterMismatchError, CorruptAdapterError
from lorakit.io.export import ServingCompatibilityWarning
from lorakit.base_models.load import NO_HUB_KERNELS
from tests.conftest import randomize_adapters, tiny_llama
from tests.layer.test_embedding import tied_llama

TARGETS = ["embed_tokens", "lm_head", "q_proj"]
FACTORIES = {"untied": tiny_llama, "tied": tied_llama}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft_file(make, path):
    peft_model = get_peft_model(make(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own notes on saving embeddings and tied weights
        peft_model.save_pretrained(path)
    return peft_model.eval()


@pytest.mark.parametrize("tie", sorted(FACTORIES))
def test_peft_file_loads_with_peft_logits_and_ours_loads_in_peft(tie, ids, tmp_path):
    make = FACTORIES[tie]
    peft_model = _peft_file(make, tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved  # PEFT's copy of the table
    expected = _logits(peft_model, ids)
    ours = make()
    io.load_adapter(ours, tmp_path / "peft", "p")
    assert isinstance(ours.model.embed_tokens, lk.AdaptedEmbedding)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == (tie == "tied")
    assert (_logits(ours, ids) - expected).abs().max() < 2e-5

    io.save_adapter(ours, "p", tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert {"base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.model.embed_tokens.lora_embedding_B",
            "base_model.model.lm_head.lora_A.weight"} <= keys
    assert not any("base_layer" in k for k in keys)  # no copies of base tables
    assert sorted(json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["target_modules"]) == sorted(TARGETS)
    back = PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    assert (_logits(back, ids) - expected).abs().max() < 2e-5


def test_trained_in_lorakit_loads_in_peft_with_equal_logits(ids, tmp_path):
    model = lk.attach(tiny_llama(), lk.LoraConfig(r=3, lora_alpha=5, target_modules=("embed_tokens", "v_proj")), "a")
    randomize_adapters(model, std=0.3)
    io.save_adapter(model, "a", tmp_path / "a")
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    assert (_logits(peft_model, ids) - _logits(model, ids)).abs().max() < 2e-5


def _edited(src, dst, edit):
    dst.mkdir()
    tensors = load_file(src / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "adapter_model.safetensors", {"format": "pt"})
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    return dst


def _refused(path, error, match):
    model = tiny_llama()
    with pytest.raises(error, match=match):
        io.load_adapter(model, path, "p")
    assert type(model.model.embed_tokens) is nn.Embedding and not lk.adapted_layers(model)  # left as it was


def test_bad_embedding_files_are_refused_by_name(tmp_path):
    _peft_file(tiny_llama, tmp_path / "peft")
    prefix = "base_model.model.model.embed_tokens."

    def resized(t):  # a retrained / resized table PEFT saved beside the adapter
        t[prefix + "base_layer.weight"] = t[prefix + "base_layer.weight"] + 1.0
    _refused(_edited(tmp_path / "peft", tmp_path / "resized", resized), AdapterMismatchError,
             "embed_tokens.base_layer.weight .* differs from the model's")

    def linear_keys(t):  # a linear layout on an embedding table
        t[prefix + "lora_A.weight"] = t.pop(prefix + "lora_embedding_A")
        t[prefix + "lora_B.weight"] = t.pop(prefix + "lora_embedding_B")
    _refused(_edited(tmp_path / "peft", tmp_path / "layout", linear_keys), AdapterMismatchError,
             "embed_tokens is an embedding layer .* stores linear LoRA keys")

    _refused(_edited(tmp_path / "peft", tmp_path / "lone", lambda t: t.pop(prefix + "lora_embedding_B")),
             CorruptAdapterError, "missing keys .*embed_tokens.lora_embedding_B")


def test_export_warns_about_vocabulary_modules_and_drops_only_when_asked(ids, tmp_path):
    model = lk.attach(tiny_llama(), lk.LoraConfig(r=4, target_modules=tuple(TARGETS)), "a")
    randomize_adapters(model, std=0.3)
    with pytest.warns(ServingCompatibilityWarning, match=r"\['model.embed_tokens', 'lm_head'\].*vLLM"):
        io.export_to_peft(model, "a", tmp_path / "all")
    assert any("lora_embedding_A" in k for k in load_file(tmp_path / "all" / "adapter_model.safetensors"))

    with pytest.warns(ServingCompatibilityWarning, match=r"leaving out \['model.embed_tokens', 'lm_head'\]"):
        io.export_to_peft(model, "a", tmp_path / "dropped", drop_modules=("embed_tokens", "lm_head"))
    keys = set(load_file(tmp_path / "dropped" / "adapter_model.safetensors"))
    assert keys and all("self_attn.q_proj" in k for k in keys)
    assert json.loads((tmp_path / "dropped" / "adapter_config.json").read_text())["target_modules"] == ["q_proj"]
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "dropped").eval()
    with torch.no_grad(), lk.use_adapter(model, None):
        assert not torch.allclose(_logits(peft_model, ids), model(input_ids=ids).logits)  # q_proj's part remains

    with pytest.raises(AdapterConfigError, match="name no module"):
        io.export_to_peft(model, "a", tmp_path / "x", drop_modules=("wte",))
    assert not (tmp_path / "x").exists()


def test_export_command_names_what_it_warns_about_and_drops(tmp_path, capsys):
    from lorakit.cli.main import main
    from tests.train.conftest import save_tiny_llama

    from transformers import LlamaForCausalLM

    base = save_tiny_llama(tmp_path / "base")
    model = lk.attach(LlamaForCausalLM.from_pretrained(base, **NO_HUB_KERNELS), lk.LoraConfig(r=4, target_modules=("embed_tokens", "q_proj")),
                      "a")
    io.save_adapter(model, "a", tmp_path / "a")
    with pytest.warns(ServingCompatibilityWarning, match="vLLM"):
        assert main(["export", str(tmp_path / "a"), "--base", str(base), "--out", str(tmp_path / "e1")]) == 0
    with pytest.warns(ServingCompatibilityWarning, match="leaving out"):
        assert main(["export", str(tmp_path / "a"), "--base", str(base), "--out", str(tmp_path / "e2"),
                     "--drop-modules", "embed_tokens"]) == 0
    assert not any("embed" in k for k in load_file(tmp_path / "e2" / "adapter_model.safetensors"))


def test_inspect_counts_embedding_modules_and_not_the_base_copies(tmp_path):
    _peft_file(tiny_llama, tmp_path / "peft")
    info = io.read_adapter_info(tmp_path / "peft")
    assert "model.embed_tokens" in info["modules"] and "lm_head" in info["modules"]
    assert info["num_modules"] == 4  # embed_tokens, lm_head, two q_proj
    r, vocab, hidden = 4, 101, 32
    assert info["trainable_numbers"] == r * (vocab + hidden) * 2 + 2 * r * (hidden + hidden)
