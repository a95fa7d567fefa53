"""Bytes a transformers Trainer run writes for a lorakit model, without and with prepare_trainer, and what
transformers reads back (docs/ECOSYSTEM.md, "Measured"). SmolLM2-135M (the embedded copy), LoRA r=8 on every
linear layer, 2 steps on the CPU; a few minutes.   python scripts/measure_saves.py"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import lorakit as lk
from lorakit.integrations import prepare_trainer
from lorakit.io import load_adapter
from lorakit.base_models.load import ensure_cache


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(base_dir: Path, out: Path, hooked: bool, data: list) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lk.attach(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), "default")
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, max_steps=2, save_steps=2,
                             learning_rate=1e-3, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    if hooked:
        prepare_trainer(trainer)
    trainer.train()
    trainer.save_model(str(out / "final"))
    model.save_pretrained(out / "save_pretrained")
    for part in ("checkpoint-2", "final", "save_pretrained", "."):
        print(f"{'now' if hooked else 'before':7s} {part:16s} {size(out / part) / 1e6:9.2f} MB")
    return model


def main() -> None:
    base_dir = ensure_cache("smollm2-135m")  # the converted safetensors directory, converted once
    ids = torch.randint(0, 49152, (4, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run(base_dir, tmp / "before", False, data)
        model = run(base_dir, tmp / "now", True, data).eval()
        with torch.no_grad():
            want = model(input_ids=ids).logits
            silent = AutoModelForCausalLM.from_pretrained(tmp / "before" / "save_pretrained")
            diff = (silent(input_ids=ids).logits - want).abs().max().item()
            print("before: from_pretrained vs adapted, max |logit diff|", diff)
            fresh = AutoModelForCausalLM.from_pretrained(base_dir)
            fresh.load_adapter(str(tmp / "now" / "final"))
            print("now: transformers load_adapter vs adapted", (fresh(input_ids=ids).logits - want).abs().max().item())
            ours = AutoModelForCausalLM.from_pretrained(base_dir)
            load_adapter(ours, tmp / "now" / "final", "default")
            print("now: lorakit load_adapter vs adapted", (ours(input_ids=ids).logits - want).abs().max().item())


if __name__ == "__main__":
    main()
