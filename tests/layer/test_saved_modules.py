"""modules_to_save: a trained copy of a module per adapter, routed per call and per row, merged, trained."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForSequenceClassification

import lorakit as lk
from lorakit.errors import AdapterConfigError, MergeStateError, RoutingError, TargetNotFoundError
from lorakit.layer.saved_modules import SavedModule
from tests.conftest import TOLERANCES


def tiny_classifier(seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_labels=3,
                         pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def perturb_copies(model: nn.Module, name: str, seed: int) -> None:
    """Copies start equal to the original: give them their own values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SavedModule) and name in module.modules_to_save:
                for p in module.modules_to_save[name].parameters():
                    p.add_((torch.randn(p.shape, generator=gen) * 0.3).to(p))


def with_copies(name: str, seed: int, targets=("q_proj",), saved=("score", "model.norm")) -> nn.Module:
    model = tiny_classifier()
    lk.attach(model, lk.LoraConfig(r=4, target_modules=list(targets), modules_to_save=list(saved)), name)
    perturb_copies(model, name, seed)
    return model


def reference(model: nn.Module, name: str) -> nn.Module:
    """A plain model whose saved modules are adapter `name`'s copies (and LoRA merged): what routing must match."""
    plain = tiny_classifier()
    for module_name, module in model.named_modules():
        if isinstance(module, SavedModule) and name in module.modules_to_save:
            parent, _, child = module_name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, child,
                    copy.deepcopy(module.modules_to_save[name]))
    for module_name, layer in lk.adapted_layers(model).items():
        if name in layer.adapters:
            with torch.no_grad():
                plain.get_submodule(module_name).weight += layer.delta_weight(name).to(layer.weight.dtype)
    return plain


IDS = torch.tensor([[5, 9, 3, 7, 11, 2], [4, 4, 8, 1, 6, 3], [7, 2, 9, 9, 5, 1]])


def test_base_keys_stay_and_copies_use_peft_layout():
    base_keys = set(tiny_classifier().state_dict())
    model = with_copies("a", 1)
    keys = set(model.state_dict())
    assert base_keys <= keys
    assert {"score.modules_to_save.a.weight", "model.norm.modules_to_save.a.weight"} <= keys
    state = lk.adapter_state_dict(model, "a")
    assert {k for k in state if "modules_to_save" in k} == {"score.modules_to_save.weight",
                                                          "model.norm.modules_to_save.weight"}
    assert lk.count_trainable(model, "a") == sum(t.numel() for t in state.values())


def test_routed_call_runs_the_copy_and_none_the_original():
    model = with_copies("a", 1)
    with torch.no_grad(), lk.use_adapter(model, "a"):
        routed = model(input_ids=IDS).logits
    with torch.no_grad(), lk.disable_adapters(model):
        base = model(input_ids=IDS).logits
    torch.testing.assert_close(routed, reference(model, "a")(input_ids=IDS).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(base, tiny_classifier()(input_ids=IDS).logits, rtol=0, atol=0)
    assert not torch.allclose(routed, base)


def test_per_row_routing_equals_each_adapter_alone(device, dtype):
    model = with_copies("a", 1)
    lk.attach(model, lk.LoraConfig(r=4, target_modules=["v_proj"], modules_to_save=["score", "model.norm"]), "b")
    perturb_copies(model, "b", 2)
    model.to(device, dtype)
    ids = IDS.to(device)
    with torch.no_grad():
        with lk.use_adapter(model, ["a", None, "b"]):
            mixed = model(input_ids=ids).logits
        alone = []
        for row, name in enumerate(["a", None, "b"]):
            with lk.use_adapter(model, name):
                alone.append(model(input_ids=ids[row:row + 1]).logits)
    torch.testing.assert_close(mixed, torch.cat(alone), rtol=0, atol=TOLERANCES[dtype])
    assert mixed.dtype == dtype and mixed.device.type == device.type


def test_per_row_mix_of_a_row_mixing_module_is_refused_naming_it():
    model = tiny_classifier()
    lk.attach(model, lk.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["model.layers.0.mlp"]), "a")
    lk.attach(model, lk.LoraConfig(r=4, target_modules=["q_proj"]), "b")
    with torch.no_grad(), lk.use_adapter(model, ["a", "a", "a"]):  # one copy for every row: fine
        model(input_ids=IDS)
    with pytest.raises(RoutingError, match=r"model\.layers\.0\.mlp \(LlamaMLP\)"), lk.use_adapter(model, ["a", "b", "a"]):
        model(input_ids=IDS)


def test_blends_with_a_copy_are_refused():
    model = with_copies("a", 1)
    lk.attach(model, lk.LoraConfig(r=4, target_modules=["q_proj"]), "b")
    with pytest.raises(RoutingError, match=r"model\.norm.*blend"), lk.use_adapter(model, {"a": 0.5, "b": 0.5}):
        model(input_ids=IDS)


def test_training_moves_the_copy_and_leaves_the_original():
    model = with_copies("a", 1)
    original = model.score.weight.detach().clone()
    copied = model.score.modules_to_save["a"].weight
    assert copied.requires_grad and not model.score.weight.requires_grad
    assert not model.model.norm.weight.requires_grad
    params = lk.adapter_parameters(model, "a")
    assert any(p is copied for p in params)
    optimizer = torch.optim.SGD(params, lr=0.1)
    before = copied.detach().clone()
    with lk.use_adapter(model, "a"):
        model(input_ids=IDS).logits.square().sum().backward()
    optimizer.step()
    assert not torch.equal(copied, before)
    assert torch.equal(model.score.weight, original) and model.score.weight.grad is None


def test_merge_runs_the_copy_as_stored_and_unload_keeps_it():
    model = with_copies("a", 1)
    with torch.no_grad(), lk.use_adapter(model, "a"):
        expected = model(input_ids=IDS).logits
    lk.merge(model, "a")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=1e-5)
        with lk.disable_adapters(model):
            torch.testing.assert_close(model(input_ids=IDS).logits, tiny_classifier()(input_ids=IDS).logits,
                                       rtol=0, atol=1e-5)
    lk.unmerge(model, "a")
    lk.merge(model, "a")
    plain = lk.merge_and_unload(model)
    assert type(plain.score) is nn.Linear and set(plain.state_dict()) == set(tiny_classifier().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, expected, rtol=0, atol=1e-5)


def test_two_merged_copies_of_one_module_are_refused():
    model = with_copies("a", 1)
    lk.attach(model, lk.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["score"]), "b")
    lk.merge(model, "a")
    with pytest.raises(MergeStateError, match="score"):
        lk.merge(model, "b")
    assert lk.merged_names(model) == ["a"]


def test_delete_puts_the_original_back():
    model = with_copies("a", 1)
    lk.delete_adapter(model, "a")
    assert type(model.score) is nn.Linear and type(model.model.norm).__name__ == "LlamaRMSNorm"
    assert set(model.state_dict()) == set(tiny_classifier().state_dict())


@pytest.mark.parametrize("config, error, match", [
    (dict(target_modules=["o_proj"], modules_to_save=["model.layers.0.self_attn"]), AdapterConfigError,
     "both a LoRA target"),
    (dict(target_modules=["q_proj"], modules_to_save=["nothing_here"]), TargetNotFoundError, "nothing_here"),
    (dict(target_modules=["q_proj"], modules_to_save=["model.layers.0", "model.layers.0.mlp"]), AdapterConfigError,
     "lies inside"),
])
def test_bad_modules_to_save_leave_the_model_as_it_was(config, error, match):
    model = tiny_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        lk.attach(model, lk.LoraConfig(r=4, **config), "a")
    assert not any(isinstance(m, SavedModule) for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_all_linear_never_adapts_inside_a_copy():
    model = tiny_classifier()
    lk.attach(model, lk.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["model.layers.1.mlp"]), "a")
    lk.attach(model, lk.LoraConfig(r=4), "b")  # all-linear
    assert not [n for n in lk.adapted_layers(model) if "mlp" in n and n.startswith("model.layers.1.")]


def test_combining_an_adapter_with_copies_is_refused():
    model = with_copies("a", 1)
    lk.attach(model, lk.LoraConfig(r=4, target_modules=["q_proj"]), "b")
    with pytest.raises(AdapterConfigError, match="'a' holds modules_to_save"):
        lk.combine(model, {"a": 0.5, "b": 0.5}, "ab", combination_type="cat")
    assert lk.adapter_names(model) == ["a", "b"]


def test_train_and_eval_reach_the_original_and_the_copies():
    """A copied module whose forward reads its own `training` flag (dropout) behaves as the model's mode says."""
    model = tiny_classifier()
    model.extra = nn.Dropout(0.5)  # a module of the model, only to be wrapped
    lk.attach(model, lk.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["extra"]), "a")
    model.train()
    assert model.extra.original_module.training and model.extra.modules_to_save["a"].training
    model.eval()
    assert not model.extra.original_module.training and not model.extra.modules_to_save["a"].training
    x = torch.ones(2, 8)
    with lk.disable_adapters(model):
        assert torch.equal(model.extra(x), x)  # eval: dropout is the identity
