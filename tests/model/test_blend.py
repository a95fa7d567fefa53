"""Blends per call and per row: `use_adapter(model, {"pirate": 0.7, "poet": 0.3})` runs Σ wᵢ·Δᵢ without an adapter."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import lorakit as lk
from lorakit.model.bank import pack_adapter
from tests.conftest import TOLERANCES, model_output, randomize_adapters, tiny_llama


def adapters_model(device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = tiny_llama(0).to(device, dtype)
    lk.attach(model, lk.LoraConfig(r=4, lora_alpha=8), "pirate")
    lk.attach(model, lk.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "down_proj"]), "poet")
    lk.attach(model, lk.LoraXSConfig(r=4, lora_alpha=8), "robot")
    lk.attach(model, lk.LoraXSConfig(r=2, lora_alpha=3), "ghost")
    lk.attach(model, lk.VeraConfig(r=4), "sailor")
    randomize_adapters(model, std=0.5)  # large updates: a blend moves bf16 logits well past their rounding
    return model


def reference(model: torch.nn.Module, weights: dict[str, float], ids: torch.Tensor) -> torch.Tensor:
    """The blend computed independently: a plain copy of the base with W + Σ wᵢ·ΔWᵢ written into it."""
    param = next(model.parameters())
    plain = tiny_llama(0).to(param.device, param.dtype)
    with torch.no_grad():
        for name, layer in lk.adapted_layers(model).items():
            delta = sum(w * layer.delta_weight(a) for a, w in weights.items() if layer.has(a))
            if isinstance(delta, torch.Tensor):
                weight = plain.get_submodule(name).weight
                weight.copy_((weight.float() + delta).to(weight.dtype))
        return model_output(plain, ids)


BLENDS = [
    {"pirate": 0.7, "poet": 0.3},  # LoRA + LoRA: their deltas summed
    {"robot": 0.6, "ghost": 0.4},  # LoRA-XS: one core per row
    {"pirate": 0.5, "robot": 0.25, "sailor": -0.5},  # every kind at once, a negative weight
    {"sailor": 2.0},
]


@pytest.mark.parametrize("weights", BLENDS, ids=lambda w: "+".join(w))
def test_a_blend_for_the_call_equals_the_weighted_sum_of_updates(weights, device, dtype):
    model = adapters_model(device, dtype)
    ids = torch.randint(0, 101, (3, 7), generator=torch.Generator().manual_seed(0)).to(device)
    with lk.use_adapter(model, weights), torch.no_grad():
        got = model_output(model, ids)
    expected = reference(model, weights, ids)
    with lk.disable_adapters(model), torch.no_grad():
        assert (expected - model_output(model, ids)).abs().max() > 10 * TOLERANCES[dtype]  # the blend matters
    torch.testing.assert_close(got, expected, rtol=0, atol=3 * TOLERANCES[dtype])


def test_per_row_blends_equal_each_row_alone(ids):
    model = adapters_model()
    rows = [{"pirate": 0.5, "poet": 0.5}, "robot", None, {"robot": 0.3, "ghost": 0.9, "sailor": 1.0}]
    with lk.use_adapter(model, rows), torch.no_grad():
        batched = model_output(model, ids)
    for i, row in enumerate(rows):
        with lk.use_adapter(model, row), torch.no_grad():
            alone = model_output(model, ids[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=0, atol=1e-5)


def test_packed_and_merged_parts_blend_exactly(ids):
    model = adapters_model()
    expected = reference(model, {"ghost": 0.5, "pirate": 0.25}, ids)
    pack_adapter(model, "ghost")  # its cores move to the bank
    lk.merge(model, "pirate")  # in W at weight 1: a row wanting 0.25 takes 0.75 back out
    with lk.use_adapter(model, [{"ghost": 0.5, "pirate": 0.25}] * ids.shape[0]), torch.no_grad():
        torch.testing.assert_close(model_output(model, ids), expected, rtol=0, atol=1e-5)


def test_a_blend_trains_every_part_it_holds(ids):
    model = adapters_model().train()
    with lk.use_adapter(model, {"pirate": 0.5, "robot": 2.0}):
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in lk.adapter_parameters(model, name))
             for name in lk.adapter_names(model)}
    assert grads == {"pirate": True, "poet": False, "robot": True, "ghost": False, "sailor": False}


def test_compiled_forward_takes_new_blend_weights_without_recompiling(ids, no_recompile_after_first):
    model = adapters_model().eval()
    step = lk.CompiledForward(model, backend="aot_eager")  # fullgraph: a graph break raises
    routes = [[{"pirate": w, "poet": 1 - w}, {"robot": w, "ghost": 2 * w}, None, {"sailor": -w, "pirate": w}]
              for w in (0.1, 0.5, 0.9)]
    torch._dynamo.utils.counters.clear()
    for k, route in enumerate(routes):
        torch._dynamo.config.error_on_recompile = k > 0
        got = step(route, input_ids=ids).logits
        with lk.use_adapter(model, route), torch.no_grad():
            torch.testing.assert_close(got, model(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.parametrize("blend, error", [
    ({"pirate": 0.5, "nobody": 0.5}, lk.AdapterNotFoundError),
    ({"pirate": float("nan")}, lk.RoutingError),
    ({"pirate": float("inf")}, lk.RoutingError),
    ({}, lk.RoutingError),
    ({"pirate": True}, lk.RoutingError),
])
def test_bad_blends_are_refused_by_name(blend, error):
    model = adapters_model()
    with pytest.raises(error):
        with lk.use_adapter(model, [blend, "robot"]):
            pass


def test_prefix_adapters_do_not_blend():
    model = adapters_model()
    lk.attach(model, lk.PrefixConfig(num_virtual_tokens=2), "hat")
    with pytest.raises(lk.RoutingError, match="prefix"):
        with lk.use_adapter(model, {"hat": 0.5, "pirate": 0.5}):
            pass
