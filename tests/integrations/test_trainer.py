"""transformers' Trainer and TRL's SFTTrainer on a lorakit model, through prepare_trainer: adapter-only
checkpoints and saves, bit-exact resume, one adapter of several trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import lorakit as lk
from lorakit.integrations import prepare_trainer
from lorakit.io import load_adapter
from lorakit.base_models.load import NO_HUB_KERNELS
from tests.conftest import randomize_adapters
from tests.integrations.conftest import token_rows

FULL_FILES = {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}


def _args(out: Path, steps: int = 4, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, max_steps=steps, save_steps=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                             save_only_model=False, **kwargs)


def _files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def _adapter(model, name):
    return {k: v.clone() for k, v in lk.adapter_state_dict(model, name).items()}


def test_checkpoints_and_save_model_hold_the_adapter_and_resume_is_bit_exact(base_dir, rows, tmp_path):
    def run(out, resume=None):
        model = AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS)
        lk.attach(model, lk.LoraConfig(r=4, lora_alpha=8), "default")
        trainer = prepare_trainer(Trainer(model=model, args=_args(out), train_dataset=token_rows(rows)))
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    straight, trainer = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert "adapter_model.safetensors" in _files(checkpoint) and not _files(checkpoint) & FULL_FILES
    trainer.save_model(str(tmp_path / "final"))
    assert not _files(tmp_path / "final") & FULL_FILES

    resumed, trainer2 = run(tmp_path / "b", resume=str(checkpoint))
    before = _adapter(straight, "default")
    assert all(torch.equal(before[k], v) for k, v in _adapter(resumed, "default").items())
    moments = [s["exp_avg"] for s in trainer.optimizer.state_dict()["state"].values()]
    again = [s["exp_avg"] for s in trainer2.optimizer.state_dict()["state"].values()]
    assert len(moments) == len(again) and all(torch.equal(a, b) for a, b in zip(moments, again))

    fresh = AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS)
    load_adapter(fresh, tmp_path / "final", "default")
    with torch.no_grad():
        assert (fresh(input_ids=rows).logits - straight(input_ids=rows).logits).abs().max() < 1e-6


def test_a_checkpoint_without_the_adapter_fails_loudly(base_dir, rows, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS)
    lk.attach(model, lk.LoraConfig(r=4, lora_alpha=8), "default")
    trainer = prepare_trainer(Trainer(model=model, args=_args(tmp_path / "run"), train_dataset=token_rows(rows)))
    empty = tmp_path / "checkpoint-9"
    empty.mkdir()
    (empty / "trainer_state.json").write_text("{}")
    with pytest.raises(lk.LorakitError, match="no lorakit adapter files"):
        trainer.train(resume_from_checkpoint=str(empty))


def test_one_adapter_of_two_trains_alone(base_dir, rows, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS)
    lk.attach(model, lk.LoraConfig(r=4, lora_alpha=8), "poet")
    lk.attach(model, lk.LoraXSConfig(r=4), "pirate")
    randomize_adapters(model, std=0.1)
    frozen = _adapter(model, "poet")
    trainer = Trainer(model=model, args=_args(tmp_path / "run", steps=2), train_dataset=token_rows(rows))
    with pytest.raises(lk.LorakitError, match="name the one to train"):
        prepare_trainer(trainer)
    prepare_trainer(trainer, train="pirate")
    start = _adapter(model, "pirate")
    trainer.train()
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in lk.adapter_parameters(model, "pirate")}
    assert all(torch.equal(frozen[k], v) for k, v in _adapter(model, "poet").items())
    assert any(not torch.equal(start[k], v) for k, v in _adapter(model, "pirate").items())
    assert {"pirate", "poet"} <= _files(tmp_path / "run" / "checkpoint-2")


def test_sft_trainer_saves_and_resumes_the_adapter(base_dir, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    texts = [" ".join(f"w{(i * 7 + j) % 99}" for j in range(6)) for i in range(8)]

    def run(out, resume=None):
        model = AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS)
        lk.attach(model, lk.LoraXSConfig(r=4), "default")
        config = trl.SFTConfig(output_dir=str(out), per_device_train_batch_size=2, max_steps=4, save_steps=2,
                               learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                               max_length=16)
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}),
                                 processing_class=AutoTokenizer.from_pretrained(base_dir))
        prepare_trainer(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert "adapter_model.safetensors" in _files(checkpoint) and not _files(checkpoint) & FULL_FILES
    resumed = run(tmp_path / "b", resume=str(checkpoint))
    before = _adapter(straight, "default")
    assert all(torch.equal(before[k], v) for k, v in _adapter(resumed, "default").items())


def test_qlora_run_saves_an_adapter_that_loads_onto_a_fresh_4bit_base(base_dir, rows, tmp_path):
    pytest.importorskip("bitsandbytes")
    model = lk.quantize(AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS), "nf4")
    lk.attach(model, lk.LoraConfig(r=4, lora_alpha=8), "default")
    trainer = prepare_trainer(Trainer(model=model, args=_args(tmp_path / "run", steps=2),
                                      train_dataset=token_rows(rows)))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    files = _files(tmp_path / "final")
    assert "adapter_model.safetensors" in files and not files & FULL_FILES
    assert (tmp_path / "final" / "adapter_model.safetensors").stat().st_size < 64 * 1024  # no 4-bit weights in it
    fresh = lk.quantize(AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS), "nf4")
    load_adapter(fresh, tmp_path / "final", "default")
    model.eval()
    with torch.no_grad():
        want = model(input_ids=rows).logits
        with lk.disable_adapters(model):
            assert (model(input_ids=rows).logits - want).abs().max() > 1e-4  # it trained
        assert (fresh(input_ids=rows).logits - want).abs().max() < 1e-5


def test_load_best_model_at_end_restores_the_best_checkpoints_adapter(base_dir, rows, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(base_dir, **NO_HUB_KERNELS)
    lk.attach(model, lk.LoraConfig(r=4, lora_alpha=8), "default")
    data = token_rows(rows)
    args = _args(tmp_path / "run", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                 metric_for_best_model="loss", greater_is_better=True)  # the worst loss "best": checkpoint-2
    trainer = prepare_trainer(Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:2]))
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    saved = load_file(Path(trainer.state.best_model_checkpoint) / "adapter_model.safetensors")
    for module, layer in lk.adapted_layers(model).items():
        assert torch.equal(layer.adapters["default"].lora_A, saved[f"base_model.model.{module}.lora_A.weight"])
