"""The embedded SmolLM2-135M through TRL's SFTTrainer: adapter-only checkpoint, the adapter read back by
transformers' load_adapter with the adapted model's logits (slow: a real 135M model on the CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit as lk
from lorakit.integrations import prepare_trainer
from lorakit.base_models.load import NO_HUB_KERNELS

pytestmark = pytest.mark.slow


def test_sft_trainer_on_smollm2_saves_a_peft_adapter(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from lorakit.base_models.load import ensure_cache

    base_dir = ensure_cache("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS)
    lk.attach(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), "default")
    data = Dataset.from_dict({"text": [f"{a} + {b} = {a + b}" for a in range(4) for b in range(2)]})
    config = trl.SFTConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2,
                           save_steps=2, learning_rate=1e-3, report_to=[], use_cpu=True, disable_tqdm=True,
                           max_length=16, bf16=False)  # its default, bf16, would round the logits compared
    trainer = prepare_trainer(trl.SFTTrainer(model=model, args=config, train_dataset=data,
                                             processing_class=AutoTokenizer.from_pretrained(base_dir)))
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    assert (checkpoint / "adapter_model.safetensors").stat().st_size < 12e6  # 9.8 MB, not 548 MB
    ids = torch.arange(10, 26)[None]
    fresh = AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS)
    fresh.load_adapter(str(checkpoint))
    model.eval()
    with torch.no_grad():
        assert (fresh(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 1e-4
