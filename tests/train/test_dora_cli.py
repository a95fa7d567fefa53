"""`lorakit train --method dora`: a few steps lower the loss, the magnitudes train, the file is PEFT's DoRA."""

from __future__ import annotations

import json

import torch

import lorakit as lk
from lorakit.cli.main import main
from lorakit.io import load_adapter
from lorakit.base_models.load import load_base
from tests.train.conftest import prompt_rows, write_jsonl


def test_train_method_dora_lowers_loss_and_trains_magnitudes(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows(16))
    out = tmp_path / "run"
    assert main(["train", "--base", str(llama_dir), "--data", str(data), "--output-dir", str(out), "--method", "dora",
                 "--rank", "4", "--steps", "12", "--batch-size", "8", "--lr", "0.02", "--schedule", "constant",
                 "--no-progress"]) == 0
    losses = [row["loss"] for row in json.loads((out / "metrics.json").read_text()) if row.get("loss") is not None]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 4
    model, _ = load_base(str(llama_dir))
    load_adapter(model, out / "adapter", "d")
    assert lk.adapter_config(model, "d").use_dora
    moved = [(layer.adapters["d"].lora_magnitude_vector - layer.weight.float().norm(dim=1)).abs().max().item()
             for layer in lk.adapted_layers(model).values()]
    assert max(moved) > 1e-4  # the magnitudes trained: they left ‖W‖
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()
