"""torch.autocast over a float32 model (what HF Trainer's bf16=True does): every adapter path runs."""

from __future__ import annotations

import torch

import lorakit as lk
from tests.conftest import TOLERANCES, randomize_adapters, tiny_llama


def _model() -> torch.nn.Module:
    model = tiny_llama()
    lk.attach(model, lk.VeraConfig(r=8), "vera")
    lk.attach(model, lk.LoraXSConfig(r=4), "xs")
    for k in range(5):  # more LoRA adapters than the group loop takes: the stacked path
        lk.attach(model, lk.LoraConfig(r=4), f"l{k}")
    randomize_adapters(model)
    return model


def test_autocast_bf16_runs_every_path_close_to_float32(ids):
    model = _model()
    rows = ["vera", None, "xs", "l0"]
    wide = ids[:, :6]
    for names in ["vera", "xs", "l1", rows, ["l0", "l1", "l2", "l3"], ["l4", "vera", "xs", "l2"]]:
        with lk.use_adapter(model, names), torch.no_grad():
            reference = model(input_ids=wide).logits
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = model(input_ids=wide).logits
        scale = reference.abs().max().item()
        assert (low.float() - reference).abs().max().item() <= 4 * TOLERANCES[torch.bfloat16] * max(scale, 1.0), names


def test_autocast_training_step_reaches_the_adapter(ids):
    model = _model()
    model.train()
    with lk.use_adapter(model, ["vera", "xs", "l0", "l4"]), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for name in ["vera", "xs", "l0", "l4"]:
        grads = [p.grad for p in lk.adapter_parameters(model, name)]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
