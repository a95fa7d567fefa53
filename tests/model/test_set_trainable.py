"""set_trainable: one adapter of several trains; the others are frozen, and routeless calls run the trained one."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from tests.conftest import randomize_adapters, tiny_llama


@pytest.fixture()
def model():
    model = tiny_llama()
    lk.attach(model, lk.LoraConfig(r=4, lora_alpha=8), "poet")
    lk.attach(model, lk.LoraXSConfig(r=4), "pirate")
    randomize_adapters(model, std=0.1)
    return model


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_only_the_declared_adapter_requires_grad_and_routeless_calls_use_it(model, ids):
    with pytest.raises(lk.RoutingError, match="set_trainable"):
        model(input_ids=ids)
    lk.set_trainable(model, "pirate")
    names = _trainable(model)
    assert names and all(".adapters.pirate." in n for n in names)
    assert len(names) == len(lk.adapter_parameters(model, "pirate"))
    with torch.no_grad(), lk.use_adapter(model, "pirate"):
        routed = model(input_ids=ids).logits
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, routed)
        with lk.use_adapter(model, "poet"):  # a per-call route still wins
            assert not torch.equal(model(input_ids=ids).logits, routed)


def test_an_adapter_attached_later_stays_frozen_and_none_undoes(model):
    lk.set_trainable(model, "poet")
    lk.attach(model, lk.VeraConfig(r=4), "v")
    assert all(".adapters.poet." in n for n in _trainable(model))
    lk.set_trainable(model, None)
    assert {n.split(".adapters.")[1].split(".")[0] for n in _trainable(model)} == {"poet", "pirate", "v"}
    lk.set_trainable(model, "v")
    lk.delete_adapter(model, "v")  # deleting the trained adapter forgets the declaration
    with pytest.raises(lk.RoutingError):
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))


def test_unknown_name_is_refused_and_changes_nothing(model):
    before = _trainable(model)
    with pytest.raises(lk.AdapterNotFoundError):
        lk.set_trainable(model, "nope")
    assert _trainable(model) == before
