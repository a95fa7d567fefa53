"""lorakit.walk: torch's module walk, less what adapted layers hold per adapter."""

from __future__ import annotations

from torch import nn

import lorakit
from lorakit import walk
from lorakit.layer.linear import AdaptedLinear
from tests.conftest import tiny_llama


def test_walk_is_torch_walk_without_adapted_layers_children():
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]), "b")
    layers = [f"{n}." for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    expected = [(n, m) for n, m in model.named_modules() if not n.startswith(tuple(layers))]
    assert [(n, id(m)) for n, m in walk.named_modules(model)] == [(n, id(m)) for n, m in expected]
    assert [id(m) for m in walk.modules(model)] == [id(m) for _, m in expected]


def test_walk_visits_a_shared_module_once_at_its_first_place():
    shared = nn.Linear(2, 2)
    model = nn.Sequential(nn.Sequential(shared), shared, nn.ReLU())
    assert [n for n, _ in walk.named_modules(model)] == [n for n, _ in model.named_modules()] == ["", "0", "0.0", "2"]
