"""train() on a model the caller built: a pre-attached adapter, other adapters left alone, and the
loss computed on the labelled columns only."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.base_models.load import load_base
from lorakit.train import TrainConfigError, train
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.collate import collate
from lorakit.train.data import load_dataset
from lorakit.train.metrics import loss_sum
from tests.train.conftest import chat_rows, prompt_rows, run_config, write_jsonl


def _full_loss(model, batch):
    """Reference: every position projected to the vocabulary."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, T, V)
    targets = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                            targets.reshape(-1), ignore_index=-100, reduction="sum")
    return nll, int((targets != -100).sum())


def test_loss_sum_projects_only_the_labelled_columns(tmp_path, llama_dir):
    model, tokenizer = load_base(str(llama_dir))
    data = load_dataset(write_jsonl(tmp_path / "d.jsonl", prompt_rows(6)), tokenizer, max_length=64)
    batch = collate(data.samples, tokenizer.pad_token_id)  # right-padded, prompts of different lengths
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    nll, count = loss_sum(model, batch)
    handle.remove()
    ref, ref_count = _full_loss(model, batch)
    labelled = (batch["labels"][:, 1:] != -100).any(0).nonzero().flatten()
    assert seen == [int(labelled[-1] - labelled[0]) + 1] and seen[0] < batch["input_ids"].shape[1] - 1
    assert count == ref_count and torch.allclose(nll, ref, rtol=1e-5, atol=1e-5)


def test_a_pre_attached_adapter_is_trained_and_others_are_left_alone(tmp_path, llama_dir):
    model, tokenizer = load_base(str(llama_dir))
    lorakit.attach(model, lorakit.LoraConfig(r=4), "other")
    other = [p.detach().clone() for p in lorakit.adapter_parameters(model, "other")]
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows())
    config = run_config(llama_dir, data, tmp_path / "run", method="lora_xs", adapter={"r": 4}, steps=4,
                        adapter_name="mine")
    lorakit.attach(model, config.adapter_config(), "mine")
    before = [p.detach().clone() for p in lorakit.adapter_parameters(model, "mine")]
    result = train(config, model=model, tokenizer=tokenizer)
    assert len(result.losses) == 4
    assert any(not torch.equal(a, p) for a, p in zip(before, lorakit.adapter_parameters(model, "mine")))
    assert all(torch.equal(a, p) for a, p in zip(other, lorakit.adapter_parameters(model, "other")))
    checkpoint = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    saved = [k for k in load_file(checkpoint / "state.safetensors") if k.startswith("param/")]
    assert saved and all(".mine." in k for k in saved), saved[:4]


def test_a_pre_attached_adapter_with_other_settings_is_refused(tmp_path, llama_dir):
    model, tokenizer = load_base(str(llama_dir))
    lorakit.attach(model, lorakit.LoraXSConfig(r=8), "default")
    config = run_config(llama_dir, write_jsonl(tmp_path / "d.jsonl", chat_rows()), tmp_path / "run",
                        method="lora_xs", adapter={"r": 4})
    with pytest.raises(TrainConfigError, match="already holds adapter 'default'"):
        train(config, model=model, tokenizer=tokenizer)
