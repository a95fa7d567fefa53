import pytest
import torch
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import (AdapterConfigError, AdapterExistsError, LoraConfig, LoraXSConfig, TargetNotFoundError,
                     UnsupportedLayerError, VeraConfig)
from tests.conftest import MODEL_FACTORIES, model_output, tiny_gpt2, tiny_llama

METHODS = {"lora": LoraConfig(r=4), "lora_xs": LoraXSConfig(r=4), "vera": VeraConfig(r=8)}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_attach_keeps_base_keys_freezes_base_and_starts_at_base(arch, method, ids):
    model = MODEL_FACTORIES[arch]()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_out = model_output(model, ids)
    lorakit.attach(model, METHODS[method], "a")
    state = model.state_dict()
    assert set(base_state) <= set(state)
    assert all(".adapters.a." in k for k in set(state) - set(base_state))
    assert all(torch.equal(state[k], v) for k, v in base_state.items())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.a." in n for n in trainable)
    # LoRA (B=0) and VeRA (b=0) start exactly at the base; LoRA-XS's R is ~1e-5
    assert torch.allclose(model_output(model, ids), base_out, atol=1e-4)


def test_base_checkpoint_loads_strictly_into_adapted_model():
    model = tiny_llama()
    base_state = tiny_llama(seed=3).state_dict()
    lorakit.attach(model, LoraConfig(r=2), "a")
    missing, unexpected = model.load_state_dict(base_state, strict=False)
    assert unexpected == [] and all(".adapters." in k for k in missing)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, base_state["model.layers.0.self_attn.q_proj.weight"])


def test_trainable_counts_follow_the_methods():
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(r=4), "lora")
    lorakit.attach(model, LoraXSConfig(r=4), "xs")
    lorakit.attach(model, VeraConfig(r=8), "vera")
    shapes = [(layer.in_features, layer.out_features) for layer in lorakit.adapted_layers(model).values()]
    assert len(shapes) == 2 * 7  # q k v o gate up down per layer; lm_head excluded
    assert lorakit.count_trainable(model, "lora") == sum(4 * (i + o) for i, o in shapes)
    assert lorakit.count_trainable(model, "xs") == 4 * 4 * len(shapes)
    assert lorakit.count_trainable(model, "vera") == sum(o + 8 for _, o in shapes)


def test_target_list_regex_and_exclusions():
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "a")
    assert sorted({n.split(".")[-1] for n in lorakit.adapted_layers(model)}) == ["q_proj", "v_proj"]
    lorakit.attach(model, LoraConfig(r=2, target_modules=r".*layers\.1\.mlp\..*_proj"), "b")
    b_layers = [n for n, l in lorakit.adapted_layers(model).items() if "b" in l.adapters]
    assert b_layers == [f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    lorakit.attach(model, LoraConfig(r=2, exclude_modules=("down_proj",)), "c")
    c_layers = [n for n, l in lorakit.adapted_layers(model).items() if "c" in l.adapters]
    assert len(c_layers) == 12 and not any(n.endswith("down_proj") for n in c_layers)
    lorakit.attach(model, LoraConfig(r=2, exclude_modules="down_proj"), "d")  # one name as a string
    d_layers = [n for n, l in lorakit.adapted_layers(model).items() if "d" in l.adapters]
    assert d_layers == c_layers
    with pytest.raises(AdapterConfigError, match="exclude_modules"):
        LoraConfig(r=2, exclude_modules=["q_proj", 3])


def test_gpt2_conv1d_is_adapted_with_transposed_weight(ids):
    model = tiny_gpt2()
    lorakit.attach(model, LoraXSConfig(r=4, init_std=0.1), "xs")
    layer = model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (32, 96)
    x = torch.randn(2, 32)
    dense = layer.delta_weight("xs")  # (out, in)
    with lorakit.use_adapter(model, "xs"):
        assert torch.allclose(layer(x), x @ layer.weight + layer.bias + x @ dense.T, atol=1e-5)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [type(m).__name__ for m in model.modules()], lorakit.adapter_names(model))


def _assert_unchanged(model, snap):
    state, types, names = snap
    assert [type(m).__name__ for m in model.modules()] == types
    assert lorakit.adapter_names(model) == names
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())


@pytest.mark.parametrize("config, error, words", [
    (LoraConfig(r=2, target_modules=["q_proj", "nope_proj"]), TargetNotFoundError, ["nope_proj", "q_proj"]),
    (LoraConfig(r=2, target_modules=r"nothing\.here"), TargetNotFoundError, ["nothing", "gate_proj"]),
    (LoraConfig(r=2, target_modules=["input_layernorm"]), UnsupportedLayerError, ["input_layernorm", "RMSNorm"]),
    (LoraConfig(r=33, target_modules=["q_proj"]), AdapterConfigError, ["r=33", "q_proj", "32"]),
    (LoraXSConfig(r=17, target_modules=["k_proj"]), AdapterConfigError, ["k_proj", "16"]),
])
def test_bad_attach_raises_named_error_and_leaves_model_unchanged(config, error, words):
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(r=2, target_modules=["o_proj"]), "existing")
    snap = _snapshot(model)
    with pytest.raises(error) as info:
        lorakit.attach(model, config, "new")
    assert all(w in str(info.value) for w in words), str(info.value)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"r": -3}, {"r": 2.5}, {"r": 2, "lora_dropout": 1.0},
                                    {"r": 2, "target_modules": []}])
def test_invalid_configs_are_rejected_on_construction(kwargs):
    with pytest.raises(AdapterConfigError):
        LoraConfig(**kwargs)


def test_duplicate_and_invalid_names():
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(r=2), "a")
    with pytest.raises(AdapterExistsError):
        lorakit.attach(model, LoraConfig(r=2), "a")
    for bad in ["", "a.b", "../x", "a b"]:
        with pytest.raises(AdapterConfigError):
            lorakit.attach(model, LoraConfig(r=2), bad)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for reserved in ["train", "eval", "forward", "to", "training"]:  # nn.Module attributes, class or instance
        with pytest.raises(AdapterConfigError, match="reserved"):
            lorakit.attach(model, LoraConfig(r=2), reserved)
    assert model.state_dict().keys() == before.keys() and lorakit.adapter_names(model) == ["a"]


def test_plain_torch_module_and_conv1d_directly():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), Conv1D(4, 16))
    lorakit.attach(model, LoraConfig(r=2, target_modules="all-linear"), "a")
    assert len(lorakit.adapted_layers(model)) == 2
    assert model(torch.randn(3, 8)).shape == (3, 4)
