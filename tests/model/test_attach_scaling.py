"""Attaching one more adapter costs at most linearly more with the adapters already attached, not quadratically.

Counted, not timed: every module a model walk visits is one step (torch's `named_modules` recursion, and
`named_children` for lorakit.walk, which does not enter adapted layers). Cost growing linearly in the adapters
already there, a + b·k, gives steps(4k) ≤ 4·steps(k); a walk per adapter attached (each walk visiting every
adapter) gives ~16×. lorakit's own walks visit the same modules whatever the number of adapters.
"""

from __future__ import annotations

import pytest
from torch import nn

import lorakit
from lorakit import LoraConfig
from tests.conftest import tiny_llama


@pytest.fixture
def walk_steps(monkeypatch) -> dict[str, int]:
    """Module visits by model walks while the test runs, per nn.Module method (reset by the test)."""
    steps = {"named_modules": 0, "named_children": 0}
    for method in steps:
        original = getattr(nn.Module, method)

        def counted(self, *args, _method=method, _original=original, **kwargs):
            steps[_method] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(nn.Module, method, counted)
    return steps


def test_attach_walk_cost_grows_at_most_linearly_with_adapters_attached(walk_steps):
    model = tiny_llama()
    total, lorakit_walks = [], []
    for i in range(32):
        walk_steps.update(named_modules=0, named_children=0)
        lorakit.attach(model, LoraConfig(r=4), f"a{i}")
        total.append(walk_steps["named_modules"] + walk_steps["named_children"])
        lorakit_walks.append(walk_steps["named_children"])
    assert total[31] <= 4 * total[7], total
    assert lorakit_walks[31] == lorakit_walks[7], lorakit_walks  # every layer was adapted by the first attach


def test_attach_after_many_still_trains_only_the_declared_adapter():
    """The one-walk apply_trainable keeps the rule: with set_trainable, only that adapter's parameters train."""
    model = tiny_llama()
    for i in range(6):
        lorakit.attach(model, LoraConfig(r=4), f"a{i}")
    lorakit.set_trainable(model, "a2")
    lorakit.attach(model, LoraConfig(r=4), "late")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.a2." in n for n in trainable)
    lorakit.set_trainable(model, None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if ".adapters." in n}
    assert {id(p) for p in lorakit.adapter_parameters(model, "late")} == {
        id(p) for n, p in model.named_parameters() if ".adapters.late." in n}


def test_adapter_parameters_keep_their_order_layers_then_copies_then_tokens():
    """Optimizers (and their saved states) were built from this order: the one-walk grouping keeps it."""
    model = tiny_llama()
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=("norm",), trainable_token_indices=[1, 2])
    lorakit.attach(model, LoraConfig(r=4, target_modules=["v_proj"]), "other")
    lorakit.attach(model, config, "a")
    named = dict(model.named_parameters())
    layers = [named[f"model.layers.{i}.self_attn.q_proj.adapters.a.{p}"]
              for i in range(2) for p in ("lora_A", "lora_B")]
    expected = layers + [named["model.norm.modules_to_save.a.weight"],
                         named["model.embed_tokens.trainable_tokens_delta.a"]]
    assert [id(p) for p in lorakit.adapter_parameters(model, "a")] == [id(p) for p in expected]
