"""Shared helpers of the io tests: adapted tiny models and a check that a model did not change."""

from __future__ import annotations

import torch
from torch import nn

import lorakit as lk
from tests.conftest import MODEL_FACTORIES, randomize_adapters

METHOD_CONFIGS = {
    "lora": lambda: lk.LoraConfig(r=4, lora_alpha=8),
    "lora_xs": lambda: lk.LoraXSConfig(r=4, lora_alpha=8),
    "vera": lambda: lk.VeraConfig(r=8, projection_seed=3),
}


def adapted(arch: str, method: str, name: str = "a", seed: int = 0) -> nn.Module:
    """A tiny `arch` model with a `method` adapter holding non-trivial values."""
    model = MODEL_FACTORIES[arch](seed)
    lk.attach(model, METHOD_CONFIGS[method](), name)
    randomize_adapters(model, seed=seed + 11)
    return model


def snapshot(model: nn.Module) -> dict:
    """Everything a failed load must leave alone."""
    registry = model.__dict__.get("lorakit_registry")
    return {
        "modules": {n: (type(m), id(m)) for n, m in model.named_modules()},
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "adapters": lk.adapter_names(model),
        "registry": None if registry is None else (id(registry), sorted(registry.vera_projections)),
        "bases": {n: {k: id(b) for k, b in m.bases.items()} for n, m in lk.adapted_layers(model).items()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["adapters"] == before["adapters"]
    assert after["registry"] == before["registry"]
    assert after["bases"] == before["bases"]
    assert after["grad"] == before["grad"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
