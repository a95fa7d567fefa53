"""trainable_token_indices: per-adapter embedding rows (and the tied head's), routed, merged exactly, trained."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lorakit.errors import AdapterConfigError, MergeStateError, RoutingError
from lorakit.layer.trainable_tokens import TokenLayer
from tests.conftest import TOLERANCES

TOKENS = [3, 5, 7]
IDS = torch.tensor([[3, 5, 9, 7, 1], [2, 3, 3, 4, 8], [7, 7, 6, 5, 1]])


def tiny_lm(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def with_tokens(tied: bool, names=("a",), tokens=TOKENS) -> LlamaForCausalLM:
    model = tiny_lm(tied)
    gen = torch.Generator().manual_seed(1)
    for name in names:
        lk.attach(model, lk.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=tokens), name)
        with torch.no_grad():
            delta = model.model.embed_tokens.trainable_tokens_delta[name]
            delta.add_(torch.randn(delta.shape, generator=gen))
    return model


def reference(model: LlamaForCausalLM, name: str, tied: bool) -> LlamaForCausalLM:
    """A plain model with the adapter's rows written into W (and its LoRA merged): what routing must match."""
    plain = tiny_lm(tied)
    with torch.no_grad():
        layer = model.model.embed_tokens
        plain.model.embed_tokens.weight[layer.ids(name)] = layer.trainable_tokens_delta[name]
        for module_name, adapted in lk.adapted_layers(model).items():
            if name in adapted.adapters:
                plain.get_submodule(module_name).weight += adapted.delta_weight(name)
    return plain


@pytest.mark.parametrize("tied", [False, True])
def test_routed_call_equals_the_rows_written_into_w(tied):
    model = with_tokens(tied)
    assert isinstance(model.lm_head, TokenLayer) == tied
    with torch.no_grad():
        with lk.use_adapter(model, "a"):
            routed = model(input_ids=IDS).logits
        with lk.disable_adapters(model):
            base = model(input_ids=IDS).logits
        torch.testing.assert_close(routed, reference(model, "a", tied)(input_ids=IDS).logits, rtol=0, atol=2e-5)
        torch.testing.assert_close(base, tiny_lm(tied)(input_ids=IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_per_row_routing_equals_each_adapter_alone(tied, device, dtype):
    model = with_tokens(tied, names=("a", "b"))
    model.to(device, dtype)
    ids, names = IDS.to(device), ["b", None, "a"]
    with torch.no_grad():
        with lk.use_adapter(model, names):
            mixed = model(input_ids=ids).logits
        alone = []
        for row, name in enumerate(names):
            with lk.use_adapter(model, name):
                alone.append(model(input_ids=ids[row:row + 1]).logits)
    torch.testing.assert_close(mixed, torch.cat(alone), rtol=0, atol=TOLERANCES[dtype] * 4)
    assert mixed.dtype == dtype


@pytest.mark.parametrize("tied", [False, True])
def test_merge_equals_routed_and_unmerge_restores_w_exactly(tied):
    model = with_tokens(tied, names=("a", "b"))
    weight = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        expected = {}
        for name in ("a", "b", None):
            with lk.use_adapter(model, name):
                expected[name] = model(input_ids=IDS).logits
        lk.merge(model, "a")
        torch.testing.assert_close(model(input_ids=IDS).logits, expected["a"], rtol=0, atol=2e-5)
        for name in ("b", None):  # the merged rows are put back for calls routed elsewhere
            with lk.use_adapter(model, name):
                torch.testing.assert_close(model(input_ids=IDS).logits, expected[name], rtol=0, atol=2e-5)
        with lk.use_adapter(model, ["b", None, "a"]):
            mixed = model(input_ids=IDS).logits
        torch.testing.assert_close(mixed, torch.stack([expected["b"][0], expected[None][1], expected["a"][2]]),
                                   rtol=0, atol=2e-5)
        with pytest.raises(MergeStateError, match="both train tokens"):
            lk.merge(model, "b")
        lk.unmerge(model, "a")
    assert torch.equal(model.model.embed_tokens.weight, weight)


@pytest.mark.parametrize("tied", [False, True])
def test_training_moves_only_the_token_rows(tied):
    model = with_tokens(tied)
    weight = model.model.embed_tokens.weight
    delta = model.model.embed_tokens.trainable_tokens_delta["a"]
    assert delta.requires_grad and not weight.requires_grad
    assert any(p is delta for p in lk.adapter_parameters(model, "a"))
    with lk.use_adapter(model, "a"):
        model(input_ids=IDS).logits.square().mean().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0 and weight.grad is None
    if tied:  # the head's use of the rows reaches them too: a row not in the batch's ids still gets gradient
        model.zero_grad()
        with lk.use_adapter(model, "a"):
            model(input_ids=torch.tensor([[1, 2, 4]])).logits.square().mean().backward()
        assert delta.grad.abs().sum() > 0


def test_dict_form_names_the_module_and_state_keys():
    model = tiny_lm(False)
    lk.attach(model, lk.LoraConfig(r=4, target_modules=["q_proj"],
                                   trainable_token_indices={"embed_tokens": [4, 2]}), "a")
    assert model.model.embed_tokens.ids("a").tolist() == [4, 2]
    state = lk.adapter_state_dict(model, "a")
    assert state["model.embed_tokens.trainable_tokens_delta"].shape == (2, 32)
    assert torch.equal(state["model.embed_tokens.trainable_tokens_delta"], model.model.embed_tokens.weight[[4, 2]])
    lk.delete_adapter(model, "a")
    assert type(model.model.embed_tokens) is nn.Embedding
    assert set(model.state_dict()) == set(tiny_lm(False).state_dict())


@pytest.mark.parametrize("tokens, match", [
    ([3, 500], "out of range"), ({"lm_head": [3]}, "not a plain nn.Embedding"), ({"nowhere": [3]}, "names 0 modules"),
])
def test_bad_token_settings_leave_the_model_as_it_was(tokens, match):
    model = tiny_lm(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lk.LorakitError, match=match):
        lk.attach(model, lk.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=tokens), "a")
    assert not any(isinstance(m, TokenLayer) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_config_refuses_bad_ids_and_blends_are_refused():
    with pytest.raises(AdapterConfigError, match="distinct"):
        lk.LoraConfig(trainable_token_indices=[3, 3])
    model = with_tokens(True)
    lk.attach(model, lk.LoraConfig(r=4, target_modules=["q_proj"]), "b")
    with pytest.raises(RoutingError, match="embed_tokens.*trainable tokens"), lk.use_adapter(model, {"a": 1.0, "b": 1.0}):
        model(input_ids=IDS)


def test_compiled_forward_refuses_rather_than_run_without_the_route():
    model = with_tokens(False, names=("a", "b"))
    with pytest.raises(RoutingError, match="embed_tokens.*compiled forward"):
        lk.CompiledForward(model, backend="eager")(["a", None, "b"], input_ids=IDS)


def test_swap_merged_swaps_rows_and_a_refused_swap_keeps_the_old_merge():
    model = with_tokens(False, names=("a", "b"))
    lk.attach(model, lk.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[40]), "c")
    with torch.no_grad():
        model.model.embed_tokens.trainable_tokens_delta["c"].fill_(float("nan"))
        with lk.use_adapter(model, "b"):
            expected = model(input_ids=IDS).logits
        lk.merge(model, "a")
        lk.swap_merged(model, "a", "b")
        assert lk.merged_names(model) == ["b"]
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=2e-5)
        with pytest.raises(lk.NonFiniteAdapterError, match="'c'"):
            lk.swap_merged(model, "b", "c")
        assert lk.merged_names(model) == ["b"]
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=2e-5)


def test_lora_on_an_embedding_with_trainable_tokens_is_refused():
    """Embedding LoRA and trainable tokens on one module do not compose yet: either order is refused."""
    model = with_tokens(False)
    with pytest.raises(lk.LorakitError, match="embed_tokens"):
        lk.attach(model, lk.LoraConfig(r=4, target_modules=["embed_tokens"]), "e")
    assert lk.adapter_names(model) == ["a"] and isinstance(model.model.embed_tokens, TokenLayer)
    with pytest.raises(lk.LorakitError, match="embed_tokens"):  # today: no embedding LoRA; then: both at once
        lk.attach(tiny_lm(False), lk.LoraConfig(r=4, target_modules=["embed_tokens"],
                                                trainable_token_indices=[3]), "e")
