"""model.save_pretrained writes the adapters (lorakit.integrations.saving): what transformers and PEFT read back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lorakit as lk
from lorakit.integrations import enable_adapter_saving
from lorakit.io import load_adapter
from lorakit.base_models.load import NO_HUB_KERNELS
from tests.conftest import randomize_adapters


def _logits(model, ids, name=None):
    with torch.no_grad(), (lk.use_adapter(model, name) if name else torch.no_grad()):
        return model(input_ids=ids).logits


def test_lora_saves_peft_files_that_from_pretrained_and_load_adapter_restore(base, base_dir, rows, tmp_path,
                                                                              monkeypatch):
    lk.attach(base, lk.LoraConfig(r=4, lora_alpha=8), "default")
    randomize_adapters(base, std=0.1)
    want = _logits(base, rows)
    enable_adapter_saving(base).save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert keys and all(k.startswith("base_model.model.") and ".lora_" in k for k in keys)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    monkeypatch.chdir(base_dir.parent)  # the file names its base by the directory's own name
    restored = AutoModelForCausalLM.from_pretrained(tmp_path / "out", **NO_HUB_KERNELS)
    assert (_logits(restored, rows) - want).abs().max() < 1e-6
    fresh = AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS)
    assert (_logits(fresh, rows) - want).abs().max() > 1e-3  # the adapter matters
    fresh.load_adapter(str(tmp_path / "out"))  # transformers' PEFT integration
    assert (_logits(fresh, rows) - want).abs().max() < 1e-6


def test_several_adapters_one_subdirectory_each_and_from_pretrained_of_the_top_fails(base, base_dir, rows,
                                                                                      tmp_path, monkeypatch):
    lk.attach(base, lk.LoraConfig(r=4, lora_alpha=8), "poet")
    lk.attach(base, lk.LoraXSConfig(r=4), "pirate")
    randomize_adapters(base, std=0.1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")  # other files of the directory are kept
    enable_adapter_saving(base).save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["pirate", "poet", "tokenizer.json"]
    monkeypatch.chdir(base_dir.parent)
    with pytest.raises((OSError, ValueError)):  # never the base in silence
        AutoModelForCausalLM.from_pretrained(out, **NO_HUB_KERNELS)
    fresh = AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS)
    for name in ("poet", "pirate"):
        load_adapter(fresh, out / name, name)
        assert (_logits(fresh, rows, name) - _logits(base, rows, name)).abs().max() < 1e-6


def test_lora_xs_saves_native_files_that_transformers_refuses_loudly(base, base_dir, rows, tmp_path, monkeypatch):
    lk.attach(base, lk.LoraXSConfig(r=4), "default")
    randomize_adapters(base, std=0.1)
    enable_adapter_saving(base).save_pretrained(tmp_path / "xs")
    assert "lorakit_method" in json.loads((tmp_path / "xs" / "adapter_config.json").read_text())
    monkeypatch.chdir(base_dir.parent)
    with pytest.raises(TypeError, match="peft_type"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "xs", **NO_HUB_KERNELS)
    fresh = AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS)
    with pytest.raises(TypeError, match="peft_type"):
        fresh.load_adapter(str(tmp_path / "xs"))
    load_adapter(fresh, tmp_path / "xs", "default")
    assert (_logits(fresh, rows) - _logits(base, rows)).abs().max() < 1e-6


def test_after_merge_and_unload_the_full_model_is_saved(base, rows, tmp_path):
    lk.attach(base, lk.LoraConfig(r=4, lora_alpha=8), "default")
    randomize_adapters(base, std=0.1)
    want = _logits(base, rows)
    enable_adapter_saving(base)
    plain = lk.merge_and_unload(base)
    plain.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert (_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged", **NO_HUB_KERNELS), rows) - want).abs().max() < 1e-5


def test_other_ranks_write_nothing_and_push_to_hub_is_refused(base, tmp_path):
    lk.attach(base, lk.LoraConfig(r=2), "default")
    enable_adapter_saving(base).save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(lk.LorakitError, match="push_to_hub"):
        base.save_pretrained(tmp_path / "hub", push_to_hub=True)
