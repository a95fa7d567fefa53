"""The engine on the embedded SmolLM2-135M: mixed adapters in one batch ≡ each alone (slow)."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.serve.engine import Engine, SamplingParams

pytestmark = pytest.mark.slow


def test_smollm2_mixed_adapters_match_each_alone():
    from lorakit.base_models.load import load_base

    model, tokenizer = load_base("smollm2-135m")
    names = ["x0", "x1", "x2"]
    gen = torch.Generator().manual_seed(0)
    for name in names:  # LoRA: no SVD of every layer, which costs minutes on a busy CPU
        lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), name)
    with torch.no_grad():
        for layer in lorakit.adapted_layers(model).values():
            for adapter in layer.adapters.values():
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen) * 0.05)
    prompts = ["The capital of France is", "Once upon a time, a robot", "def fibonacci(n):", "Roses are red,"]
    jobs = [(tokenizer(p).input_ids, [None, *names][k % 4]) for k, p in enumerate(prompts)]
    engine = Engine(model, tokenizer, max_batch=8).start()
    try:
        streams = [engine.submit(ids, a, SamplingParams(max_tokens=10)) for ids, a in jobs]
        results = [s.result() for s in streams]
    finally:
        engine.close()
    for (ids, adapter), got in zip(jobs, results):
        route = lorakit.use_adapter(model, adapter) if adapter else lorakit.disable_adapters(model)
        with route, torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        want = out[0, len(ids):].tolist()
        eos = tokenizer.eos_token_id
        want = want[: want.index(eos)] if eos in want else want
        assert got.token_ids == want, (tokenizer.decode(ids), adapter)
    assert len({tuple(r.token_ids) for r in results}) > 2
