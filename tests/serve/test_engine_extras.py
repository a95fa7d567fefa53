"""The serving engine with adapters holding trainable tokens or module copies: each request's output is its
adapter's alone."""

from __future__ import annotations

import torch

import lorakit
from lorakit.serve.engine import Engine, SamplingParams
from tests.serve.conftest import greedy_alone
from tests.layer.test_trainable_tokens import tiny_lm


def test_rows_with_token_and_copy_adapters_match_each_alone():
    model = tiny_lm(tied=True)  # the head reads the new rows too
    gen = torch.Generator().manual_seed(4)
    for name, tokens in (("t0", [5, 9, 11]), ("t1", [5, 20])):
        lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=tokens), name)
        with torch.no_grad():
            for p in lorakit.adapter_parameters(model, name):
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules=["v_proj"], modules_to_save=["model.norm"]), "s0")
    with torch.no_grad():
        model.model.norm.modules_to_save["s0"].weight.mul_(torch.rand(32, generator=gen) * 2)
    requests = [([5, 9, 3, 11], "t0"), ([5, 20, 7], "t1"), ([9, 5, 4], None), ([11, 11, 5, 20, 3], "t1"), ([7, 5, 9], "s0")]
    expected = [greedy_alone(model, p, a, 8) for p, a in requests]
    engine = Engine(model, max_batch=5)
    streams = [engine.submit(p, a, SamplingParams(max_tokens=8)) for p, a in requests]
    engine.start()
    try:
        results = [s.result() for s in streams]
    finally:
        engine.close()
    assert [r.token_ids for r in results] == expected
    assert len({tuple(e) for e in expected}) > 1 and engine.stats.max_running > 1  # rows shared steps
