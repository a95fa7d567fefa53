"""A hand-written accelerate loop: unwrap_model(model).save_pretrained writes the adapter; restore_adapters
puts it back into a fresh script's adapters before prepare()."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit as lk
from lorakit.integrations import enable_adapter_saving, restore_adapters
from lorakit.base_models.load import NO_HUB_KERNELS


def test_accelerate_loop_saves_and_restores_the_adapter(base_dir, rows, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS)
    lk.attach(model, lk.LoraXSConfig(r=4), "default")
    enable_adapter_saving(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    for batch in rows.split(2):
        accelerator.backward(model(input_ids=batch, labels=batch).loss)
        optimizer.step()
        optimizer.zero_grad()
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).save_pretrained(tmp_path / "out", is_main_process=accelerator.is_main_process)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    fresh = AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS)
    lk.attach(fresh, lk.LoraXSConfig(r=4), "default")
    assert restore_adapters(fresh, tmp_path / "out") == ["default"]
    trained = accelerator.unwrap_model(model)
    assert all(torch.equal(a, b) for a, b in zip(lk.adapter_state_dict(fresh, "default").values(),
                                                 lk.adapter_state_dict(trained, "default").values()))
    with torch.no_grad():
        assert (fresh(input_ids=rows).logits - trained(input_ids=rows).logits).abs().max() < 1e-6
