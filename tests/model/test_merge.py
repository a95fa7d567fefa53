import pytest
import torch

import lorakit
from lorakit import LoraConfig, LoraXSConfig, MergeStateError, NonFiniteAdapterError, VeraConfig
from tests.conftest import MODEL_FACTORIES, model_output, randomize_adapters, tiny_llama


def test_merge_twice_and_unmerge_unmerged_are_refused():
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(r=2), "a")
    with pytest.raises(MergeStateError):
        lorakit.unmerge(model, "a")
    lorakit.merge(model, "a")
    with pytest.raises(MergeStateError, match="already merged"):
        lorakit.merge(model, "a")
    with pytest.raises(MergeStateError, match="unmerge"):
        lorakit.delete_adapter(model, "a")


def test_merging_a_non_finite_adapter_is_refused_and_changes_nothing():
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(r=2), "a")
    randomize_adapters(model)
    layer = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.adapters["a"].lora_B[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteAdapterError, match="model.layers.1.mlp.down_proj"):
        lorakit.merge(model, "a")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if ".adapters." not in k)
    assert lorakit.merged_names(model) == []


@pytest.mark.parametrize("config", [LoraConfig(r=4), LoraXSConfig(r=4, init_std=0.2), VeraConfig(r=8)],
                         ids=["lora", "lora_xs", "vera"])
def test_merge_and_unload_gives_a_plain_model_with_standard_keys(arch, config, ids):
    plain = MODEL_FACTORIES[arch]()
    keys = set(plain.state_dict())
    model = MODEL_FACTORIES[arch]()
    lorakit.attach(model, config, "a")
    randomize_adapters(model)
    expected = model_output(model, ids)
    merged = lorakit.merge_and_unload(model)
    assert not lorakit.adapted_layers(merged) and lorakit.adapter_names(merged) == []
    assert set(merged.state_dict()) == keys
    plain.load_state_dict(merged.state_dict(), strict=True)
    assert (model_output(plain, ids) - expected).abs().max() < 1e-5
    assert (model_output(merged, ids) - expected).abs().max() < 1e-5


def test_merge_and_unload_needs_a_choice_among_several():
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(r=2), "a")
    lorakit.attach(model, LoraConfig(r=2), "b")
    with pytest.raises(MergeStateError, match="say which"):
        lorakit.merge_and_unload(model)
    lorakit.merge_and_unload(model, "b")


def test_delete_frees_adapter_and_unused_bases():
    model = tiny_llama()
    lorakit.attach(model, LoraXSConfig(r=4), "xs")
    lorakit.attach(model, LoraConfig(r=2), "l")
    layer = model.model.layers[0].self_attn.q_proj
    assert "lora_xs" in layer.bases
    lorakit.delete_adapter(model, "xs")
    assert "xs" not in layer.adapters and "lora_xs" not in layer.bases
    assert lorakit.adapter_names(model) == ["l"]
    assert not any(".adapters.xs." in k for k in model.state_dict())


def test_swap_merged_equals_unmerge_then_merge(ids):
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(r=4), "a")
    lorakit.attach(model, LoraXSConfig(r=4, init_std=0.2, target_modules=["q_proj", "v_proj"]), "b")
    randomize_adapters(model)
    with lorakit.use_adapter(model, "b"):
        expected_b = model_output(model, ids)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.merge(model, "a")
    lorakit.swap_merged(model, "a", "b")
    assert lorakit.merged_names(model) == ["b"]
    assert (model_output(model, ids) - expected_b).abs().max() < 1e-5
    lorakit.unmerge(model, "b")
    state = model.state_dict()
    assert max((state[k] - v).abs().max().item() for k, v in original.items()) < 1e-6
    with pytest.raises(MergeStateError):
        lorakit.swap_merged(model, "a", "b")  # nothing merged any more


def test_unmerge_restores_w_even_if_the_adapter_changed_while_merged(ids):
    """Merging records what it added: an optimizer step or a load into a merged adapter must not make
    unmerge (or the subtraction for rows not routed to it) use the new values."""
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(r=4), "a")
    lorakit.attach(model, LoraConfig(r=4), "b")
    randomize_adapters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    with lorakit.disable_adapters(model):
        base = model(input_ids=ids).logits
    lorakit.merge(model, "a")
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model, "a"):
            p.add_(0.5)
    with lorakit.use_adapter(model, ["b", None, "b", None]):  # rows not routed to "a" subtract its merge
        mixed = model(input_ids=ids).logits
    with lorakit.use_adapter(model, "b"):
        alone_b = model(input_ids=ids).logits
    assert (mixed[1] - base[1]).abs().max() < 1e-5 and (mixed[0] - alone_b[0]).abs().max() < 1e-5
    lorakit.unmerge(model, "a")
    after = {n: p.detach() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    assert max((after[n] - before[n]).abs().max().item() for n in before) < 1e-6


def test_swap_merged_keeps_exact_records(ids):
    model = tiny_llama()
    for name in ("a", "b"):
        lorakit.attach(model, LoraConfig(r=4), name)
    randomize_adapters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    lorakit.merge(model, "a")
    for _ in range(5):
        lorakit.swap_merged(model, "a", "b")
        lorakit.swap_merged(model, "b", "a")
    lorakit.unmerge(model, "a")
    after = {n: p.detach() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    assert max((after[n] - before[n]).abs().max().item() for n in before) < 1e-5
    assert all(not layer.merged_deltas._buffers for layer in lorakit.adapted_layers(model).values())
