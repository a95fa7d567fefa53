"""The method table and the contract: every row builds an adapter that keeps the contract it declares."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, LoraXSConfig, PrefixConfig, VeraConfig
from lorakit.config import CONFIG_CLASSES
from lorakit.errors import AdapterConfigError
from lorakit.methods.lora_xs import svd_basis
from lorakit.methods.table import METHODS, method_for, method_of_kind
from lorakit.methods.vera import vera_basis, vera_projections

IN, OUT, R = 12, 10, 4
CONFIGS = {"lora": LoraConfig(r=R), "dora": LoraConfig(r=R, use_dora=True), "lora_xs": LoraXSConfig(r=R),
           "vera": VeraConfig(r=R), "prefix": PrefixConfig(num_virtual_tokens=2)}
WEIGHT = torch.Generator().manual_seed(3)


def _basis(method, config, device, weight):
    if method.reads_weight:  # DoRA: its "basis" is the layer's own weight
        return weight
    if method.basis == "svd":
        return svd_basis(torch.randn(OUT, IN, device=device), R)
    if method.basis == "projections":
        shared = vera_projections(config.projection_seed, R, IN, OUT)
        return vera_basis((shared[0].to(device), shared[1].to(device)), IN, OUT, torch.float32)
    return None


def test_every_config_has_one_row():
    assert set(METHODS) == set(CONFIGS) and set(CONFIG_CLASSES) <= set(METHODS)
    for name, method in METHODS.items():
        assert method.name == name and method_for(CONFIGS[name]) is method
        assert method.config is CONFIG_CLASSES[CONFIGS[name].method]  # a variant (DoRA) shares its config's class


@pytest.mark.parametrize("name", [n for n in sorted(METHODS) if METHODS[n].build is not None])
def test_a_built_adapter_keeps_the_contract(name, device):
    method, config = METHODS[name], CONFIGS[name]
    weight = torch.randn(OUT, IN, generator=WEIGHT).to(device)
    adapter = method.build(IN, OUT, config, torch.float32, device, lambda: weight)
    assert method_of_kind(adapter.slot_kind) is method
    assert {n for n, _ in adapter.named_parameters()} == set(method.trained)
    assert adapter.num_trainable() == sum(p.numel() for p in adapter.parameters())
    shapes = type(adapter).slot_shapes(IN, OUT, R)
    slot = {f: torch.zeros(s, device=device) for f, s in shapes.items()}
    views = adapter.slot_views(slot)
    assert set(views) == set(method.trained)
    for param, view in views.items():  # each parameter fits its slot view exactly
        assert view.shape == getattr(adapter, param).shape, (name, param)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    basis = _basis(method, config, device, weight)
    up, down = adapter.factors(basis)
    assert up.shape[0] == OUT and down.shape[-1] == IN and up.shape[1] == down.shape[0]
    x = torch.randn(3, IN, device=device)
    # what merging adds to W: up @ down, or for a method that rescales the output (DoRA) its merged weight − W
    dense = adapter.merged_weight(weight) - weight if method.rescales_output else up.float() @ down.float()
    torch.testing.assert_close(adapter.delta(x, basis), x @ dense.T, rtol=1e-4, atol=1e-4)


def test_an_unknown_config_or_kind_is_refused():
    class Other:
        method = "lora"
    with pytest.raises(AdapterConfigError, match="unsupported config type Other"):
        method_for(Other())
    with pytest.raises(KeyError, match="'qlora9'"):
        method_of_kind("qlora9")
    with pytest.raises(KeyError, match="'prefix'"):  # no per-layer state, so no slot kind
        method_of_kind("prefix")
