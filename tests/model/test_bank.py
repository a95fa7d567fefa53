"""The packed LoRA-XS bank: same outputs as module adapters, at r² numbers per module."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig, LoraXSConfig
from lorakit.model.bank import add_packed_lora_xs, ensure_lora_xs_bases, get_bank, pack_adapter
from lorakit.errors import AdapterMismatchError, NonFiniteAdapterError
from tests.conftest import randomize_adapters, tiny_llama


def _outputs(model, names, ids):
    out = {}
    for n in names:
        with (lorakit.use_adapter(model, n) if n else lorakit.disable_adapters(model)):
            out[n] = model(input_ids=ids).logits
    return out


def test_packed_adapters_give_the_same_outputs_alone_and_per_row(ids):
    model = tiny_llama()
    for i, r in enumerate([4, 2, 4]):
        lorakit.attach(model, LoraXSConfig(r=r, init_std=0.3, target_modules=(
            "all-linear" if i != 1 else ["q_proj", "down_proj"])), f"x{i}")
    lorakit.attach(model, LoraConfig(r=2), "lora")
    randomize_adapters(model, std=0.2)
    names = ["x0", "x1", "x2", "lora", None]
    expected = _outputs(model, names, ids)
    state_before = {k: v.clone() for k, v in lorakit.adapter_state_dict(model, "x1").items()}
    for n in ["x0", "x1", "x2"]:
        pack_adapter(model, n)
    assert not any(".adapters.x" in k for k in model.state_dict())  # the modules are gone
    assert sorted(lorakit.adapter_names(model)) == sorted(["x0", "x1", "x2", "lora"])
    for n, out in _outputs(model, names, ids).items():
        assert (out - expected[n]).abs().max() < 1e-5, n
    rows = ["x1", None, "lora", "x0"]
    with lorakit.use_adapter(model, rows):
        mixed = model(input_ids=ids).logits
    for i, n in enumerate(rows):
        assert (mixed[i] - expected[n][i]).abs().max() < 1e-5, (i, n)
    state_after = lorakit.adapter_state_dict(model, "x1")
    assert set(state_after) == set(state_before)  # only the modules x1 targeted, r² each
    assert all(torch.allclose(state_after[k], state_before[k], atol=1e-6) for k in state_before)
    assert lorakit.count_trainable(model, "x1") == 2 * 2 * 2 * 2  # 2 layers × 2 modules × r²


def _two_packed(ids):
    """A tiny Llama with LoRA-XS adapters a and b packed into the bank, and the outputs they gave as modules."""
    model = tiny_llama()
    lorakit.attach(model, LoraXSConfig(r=4, init_std=0.3), "a")
    lorakit.attach(model, LoraXSConfig(r=4, init_std=0.3), "b")
    expected = _outputs(model, ["a", "b", None], ids)
    pack_adapter(model, "a")
    pack_adapter(model, "b")
    return model, expected


def test_packed_merge_unmerge_and_delete(ids):
    model, expected = _two_packed(ids)
    lorakit.merge(model, "a")
    assert (model(input_ids=ids).logits - expected["a"]).abs().max() < 1e-5
    with lorakit.use_adapter(model, ["b", None, "a", "b"]):
        mixed = model(input_ids=ids).logits
    for i, n in enumerate(["b", None, "a", "b"]):
        assert (mixed[i] - expected[n][i]).abs().max() < 1e-5
    lorakit.unmerge(model, "a")
    lorakit.delete_adapter(model, "a")
    bank = get_bank(model)
    table = model.lorakit_registry.slot_table
    assert "a" not in bank.slots and table.kind("a") is None and bank.cores[:, 1].abs().sum() == 0
    lorakit.attach(model, LoraXSConfig(r=4, init_std=0.3), "c")
    pack_adapter(model, "c")
    assert bank.slots["c"] == table.slot("c") == 1  # the freed slot is reused
    with lorakit.disable_adapters(model):
        assert (model(input_ids=ids).logits - expected[None]).abs().max() < 1e-5


def test_add_packed_validates_before_storing():
    model = tiny_llama()
    ensure_lora_xs_bases(model, ["model.layers.0.self_attn.q_proj"], 4)
    good = {"model.layers.0.self_attn.q_proj": torch.randn(4, 4)}
    with pytest.raises(AdapterMismatchError, match="model.layers.0.self_attn.k_proj"):
        add_packed_lora_xs(model, "p", LoraXSConfig(r=4), {**good, "model.layers.0.self_attn.k_proj": torch.randn(4, 4)})
    with pytest.raises(AdapterMismatchError, match="core shape"):
        add_packed_lora_xs(model, "p", LoraXSConfig(r=4), {"model.layers.0.self_attn.q_proj": torch.randn(3, 4)})
    with pytest.raises(NonFiniteAdapterError):
        add_packed_lora_xs(model, "p", LoraXSConfig(r=4), {"model.layers.0.self_attn.q_proj": torch.full((4, 4), float("nan"))})
    assert lorakit.adapter_names(model) == [] and get_bank(model) is None
    add_packed_lora_xs(model, "p", LoraXSConfig(r=4), good)
    assert lorakit.adapter_names(model) == ["p"]


def test_a_model_with_only_packed_adapters(ids):
    model, expected = _two_packed(ids)
    assert all(not layer.adapters for layer in lorakit.adapted_layers(model).values())
    got = _outputs(model, ["a", "b", None], ids)
    assert (got["a"] - expected[None]).abs().max() > 1e-3  # the packed adapter really acts
    for n in expected:
        assert (got[n] - expected[n]).abs().max() < 1e-5, n
    with lorakit.use_adapter(model, ["b", "a", None, "a"]):
        mixed = model(input_ids=ids).logits
    for i, n in enumerate(["b", "a", None, "a"]):
        assert (mixed[i] - expected[n][i]).abs().max() < 1e-5


def test_merge_and_unload_a_packed_adapter(ids):
    model = tiny_llama()
    lorakit.attach(model, LoraXSConfig(r=4, init_std=0.3), "a")
    expected = model(input_ids=ids).logits
    pack_adapter(model, "a")
    plain = lorakit.merge_and_unload(model, "a")
    assert get_bank(plain) is None and not lorakit.adapted_layers(plain)
    assert (plain(input_ids=ids).logits - expected).abs().max() < 1e-5


def test_packing_a_wider_adapter_elsewhere_keeps_narrower_layers_working(ids):
    """The bank's rank grows to its widest adapter; a layer whose basis is narrower (only rank-4 adapters
    there) must keep working: single route, per-row, and merge."""
    model = tiny_llama()
    lorakit.attach(model, LoraXSConfig(r=4, init_std=0.3, target_modules=["model.layers.0.self_attn.q_proj"]), "p4")
    lorakit.attach(model, LoraXSConfig(r=8, init_std=0.3, target_modules=["model.layers.1.self_attn.q_proj"]), "p8")
    expected = _outputs(model, ["p4", "p8", None], ids)
    pack_adapter(model, "p4")
    pack_adapter(model, "p8")
    assert get_bank(model).rank == 8
    assert (_outputs(model, ["p4"], ids)["p4"] - expected["p4"]).abs().max() < 1e-5
    rows = ["p4", "p8", None, "p4"]
    with lorakit.use_adapter(model, rows):
        mixed = model(input_ids=ids).logits
    for i, n in enumerate(rows):
        assert (mixed[i] - expected[n][i]).abs().max() < 1e-5, (i, n)
    lorakit.merge(model, "p4")
    assert (model(input_ids=ids).logits - expected["p4"]).abs().max() < 1e-5
