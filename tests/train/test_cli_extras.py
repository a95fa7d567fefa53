"""`lorakit train --modules-to-save ... --trainable-tokens ...`: the copies and the token rows train and are saved."""

from __future__ import annotations

import json

import torch

import lorakit
from lorakit.cli.main import main
from lorakit.io import load_adapter
from lorakit.base_models.load import load_base
from tests.train.conftest import prompt_rows, write_jsonl


def test_train_with_modules_to_save_and_trainable_tokens(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows(8))
    _, tokenizer = load_base(str(llama_dir))
    tokens = tokenizer.convert_tokens_to_ids(["+", "=", "3"])
    out = tmp_path / "run"
    assert main(["train", "--base", str(llama_dir), "--data", str(data), "--output-dir", str(out), "--steps", "3",
                 "--batch-size", "4", "--lr", "0.05", "--targets", "q_proj", "--modules-to-save", "model.norm",
                 "--trainable-tokens", ",".join(map(str, tokens)), "--no-progress"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.norm"] and config["trainable_token_indices"] == tokens
    base, _ = load_base(str(llama_dir))
    model, _ = load_base(str(llama_dir))
    load_adapter(model, out / "adapter", "t")
    norm_copy = model.model.norm.modules_to_save["t"].weight
    assert not torch.equal(norm_copy, base.model.norm.weight)  # the copy trained
    assert torch.equal(model.model.norm.weight, base.model.norm.weight)  # the original did not
    rows = model.model.embed_tokens.trainable_tokens_delta["t"]
    assert not torch.equal(rows, base.model.embed_tokens.weight[tokens])
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert lorakit.adapter_config(model, "t").trainable_token_indices == tuple(tokens)


def test_classifier_head_as_modules_to_save_trains_as_the_adapters_and_evaluates(tmp_path, bert_dir):
    from safetensors.torch import load_file

    from tests.train.conftest import class_rows

    data = write_jsonl(tmp_path / "d.jsonl", class_rows(12))
    out = tmp_path / "run"
    assert main(["train", "--base", str(bert_dir), "--data", str(data), "--output-dir", str(out), "--steps", "3",
                 "--batch-size", "4", "--lr", "0.05", "--targets", "query", "--modules-to-save", "classifier",
                 "--no-progress"]) == 0
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    head = load_file(out / "adapter" / "head.safetensors")  # the original head: labels and the un-routed path
    assert set(head) == {"classifier.weight", "classifier.bias"}
    assert not torch.equal(adapter["base_model.model.classifier.weight"], head["classifier.weight"])
    assert main(["eval", "--base", str(bert_dir), "--adapter", str(out / "adapter"), "--data", str(data),
                 "--no-generate", "--json"]) == 0
