"""`lorakit train --targets` reaching embedding tables: a few steps train A and B, and the file reloads in
lorakit and in PEFT with equal logits."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import lorakit as lk
from lorakit import io
from lorakit.cli.train import main
from lorakit.base_models.load import NO_HUB_KERNELS
from tests.train.conftest import prompt_rows, write_jsonl


def test_train_with_embedding_targets_trains_a_and_b_and_reloads(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    out = tmp_path / "run"
    assert main(["train", "--base", str(llama_dir), "--data", str(data), "--steps", "4", "--batch-size", "8",
                 "--lr", "5e-2", "--rank", "4", "--no-progress", "--targets", "embed_tokens,q_proj",
                 "--output-dir", str(out)]) == 0
    losses = [r["loss"] for r in json.loads((out / "metrics.json").read_text())]
    assert losses[-1] < losses[0], losses
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    a = tensors["base_model.model.model.embed_tokens.lora_embedding_A"]
    assert a.abs().max() > 0  # A starts at zero: any nonzero entry was trained
    assert sorted(json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"]) == [
        "embed_tokens", "q_proj"]
    ids = torch.randint(3, 20, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = LlamaForCausalLM.from_pretrained(llama_dir, **NO_HUB_KERNELS).eval()
    io.load_adapter(ours, out / "adapter", "t")
    assert torch.equal(ours.model.embed_tokens.adapters["t"].lora_A.detach(), a)
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_dir, **NO_HUB_KERNELS), out / "adapter").eval()
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max() < 2e-5
        with lk.use_adapter(ours, None):
            assert not torch.allclose(ours(input_ids=ids).logits, peft_model(input_ids=ids).logits)
