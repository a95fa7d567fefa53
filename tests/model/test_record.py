"""Wrapping a layer and undoing it: one routine each (lorakit.model.record), used by attach, the bank and io."""

from __future__ import annotations

import sys

import pytest
import torch

import lorakit
from lorakit import LoraConfig, LoraXSConfig
from lorakit.model.bank import ensure_lora_xs_bases
from lorakit.layer.linear import AdaptedLinear
from lorakit.methods.lora_xs import svd_basis
from lorakit.model.record import ATTR, install_bases, unwrap_on_error, wrap_layer
from tests.conftest import tiny_llama

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


def test_wrap_layer_keeps_the_base_and_is_idempotent(device):
    model = tiny_llama().to(device)
    plain = model.get_submodule(Q)
    keys = set(model.state_dict())
    layer = wrap_layer(model, Q)
    assert isinstance(layer, AdaptedLinear) and layer.weight is plain.weight
    assert wrap_layer(model, Q) is layer and set(model.state_dict()) == keys
    assert Q in getattr(model, ATTR).layer_map(model)  # the record's cached map was told


def test_attach_bank_and_io_wrap_through_the_same_routine(monkeypatch):
    import lorakit.model.record as model_adapters

    attach_module = sys.modules["lorakit.model.attach"]

    wrapped: list[str] = []
    real = model_adapters.wrap_layer

    def counting(model, name):
        wrapped.append(name)
        return real(model, name)

    monkeypatch.setattr(model_adapters, "wrap_layer", counting)  # install_bases (bank, io) looks it up here
    monkeypatch.setattr(attach_module, "wrap_layer", counting)
    model = tiny_llama()
    ensure_lora_xs_bases(model, [Q], 4)
    assert wrapped == [Q]
    lorakit.attach(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "a")
    assert set(wrapped) == {Q, V, "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}


def test_a_failed_add_on_a_plain_model_leaves_it_exactly_as_it_was():
    model = tiny_llama()
    originals = {n: model.get_submodule(n) for n in (Q, V)}
    weight = model.get_submodule(Q).weight
    with pytest.raises(RuntimeError, match="late failure"), unwrap_on_error(model, "a", [Q, V]):
        install_bases(model, "lora_xs", {Q: svd_basis(weight.detach(), 4)})
        lorakit.attach(model, LoraConfig(r=2, target_modules=["q_proj"]), "a")
        raise RuntimeError("late failure")
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert ATTR not in model.__dict__ and "_apply" not in model.__dict__  # neither the record nor its move hook


def test_a_failed_add_on_an_adapted_model_keeps_what_was_there():
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(r=2, target_modules=["q_proj"]), "old")
    layer = model.get_submodule(Q)
    record = getattr(model, ATTR)
    touched = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    with pytest.raises(RuntimeError), unwrap_on_error(model, "new", touched):
        lorakit.attach(model, LoraXSConfig(r=2, target_modules=["q_proj", "v_proj"]), "new")
        assert "lora_xs" in layer.bases and isinstance(model.get_submodule(V), AdaptedLinear)
        raise RuntimeError("late failure")
    assert model.get_submodule(Q) is layer and list(layer.adapters) == ["old"] and "lora_xs" not in layer.bases
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in touched if n.endswith("v_proj"))
    assert getattr(model, ATTR) is record and list(record.configs) == ["old"]
    assert record.slot_table.slot("new") == 0 and set(record.layer_map(model)) == {Q, "model.layers.1.self_attn.q_proj"}
