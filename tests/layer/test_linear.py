"""Invariants of the adapted layer on whole models: merged ≡ unmerged, disabled ≡ base, per-row ≡ alone."""

import contextlib

import pytest
import torch

import lorakit
from lorakit import LoraConfig, LoraXSConfig, VeraConfig
from tests.conftest import MODEL_FACTORIES, model_output, randomize_adapters

CONFIGS = {"lora": LoraConfig(r=4, lora_alpha=8), "lora_xs": LoraXSConfig(r=4, init_std=0.2),
           "vera": VeraConfig(r=8)}


def _three_adapter_model(arch: str):
    model = MODEL_FACTORIES[arch]()
    for name, config in CONFIGS.items():
        lorakit.attach(model, config, name)
    randomize_adapters(model)
    return model


def test_routed_output_matches_dense_reference(arch, ids):
    """Running an adapter equals a plain model whose weights are W + ΔW computed densely."""
    model = _three_adapter_model(arch)
    for name in CONFIGS:
        with lorakit.use_adapter(model, name):
            routed = model_output(model, ids)
        reference = MODEL_FACTORIES[arch]()
        with torch.no_grad():
            for full_name, layer in lorakit.adapted_layers(model).items():
                target = reference.get_submodule(full_name)
                delta = layer.delta_weight(name)
                target.weight += delta.T if layer.fan_in_fan_out else delta
        assert (routed - model_output(reference, ids)).abs().max() < 1e-5, name


def test_disabled_equals_base_and_adapters_change_output(arch, ids):
    base = model_output(MODEL_FACTORIES[arch](), ids)
    model = _three_adapter_model(arch)
    with lorakit.disable_adapters(model):
        assert torch.equal(model_output(model, ids), base)
    for name in CONFIGS:
        with lorakit.use_adapter(model, name):
            assert (model_output(model, ids) - base).abs().max() > 1e-3, name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_merged_forward_equals_unmerged_and_unmerge_restores_w(arch, ids, name):
    model = _three_adapter_model(arch)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with lorakit.use_adapter(model, name):
        unmerged = model_output(model, ids)
    lorakit.merge(model, name)
    merged_default = model_output(model, ids)  # no route: the weights as they stand
    with lorakit.use_adapter(model, name):
        merged_routed = model_output(model, ids)
    assert (merged_default - unmerged).abs().max() < 1e-5
    assert (merged_routed - unmerged).abs().max() < 1e-5
    # other routes stay right while `name` is merged (its delta is subtracted on the fly)
    other = next(n for n in CONFIGS if n != name)
    merged_w = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.unmerge(model, name)
    with lorakit.use_adapter(model, other):
        expected_other = model_output(model, ids)
    lorakit.merge(model, name)
    with lorakit.use_adapter(model, other):
        assert (model_output(model, ids) - expected_other).abs().max() < 1e-5
    lorakit.unmerge(model, name)
    state = model.state_dict()
    diff = max((state[k] - weights[k]).abs().max().item() for k in weights)
    assert diff < 1e-6, diff  # fp32 rounding only
    assert any(not torch.equal(merged_w[k], weights[k]) for k in weights)  # the merge did change W


def test_per_row_routing_equals_running_each_adapter_alone(arch, ids):
    model = _three_adapter_model(arch)
    rows = ["lora", None, "vera", "lora_xs"]
    with lorakit.use_adapter(model, rows):
        mixed = model_output(model, ids)
    for i, name in enumerate(rows):
        if name is None:
            with lorakit.disable_adapters(model):
                alone = model_output(model, ids)
        else:
            with lorakit.use_adapter(model, name):
                alone = model_output(model, ids)
        assert (mixed[i] - alone[i]).abs().max() < 1e-5, (i, name)


def test_per_row_routing_with_a_merged_adapter(ids):
    model = _three_adapter_model("llama")
    rows = ["vera", "lora", None, "lora"]
    with lorakit.use_adapter(model, rows):
        expected = model_output(model, ids)
    lorakit.merge(model, "lora")
    with lorakit.use_adapter(model, rows):
        assert (model_output(model, ids) - expected).abs().max() < 1e-5


def test_gradients_reach_only_the_routed_adapter(ids):
    model = _three_adapter_model("llama")
    with lorakit.use_adapter(model, "lora_xs"):
        model(input_ids=ids).logits.square().mean().backward()
    grads = {n: p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad}
    assert all(v for n, v in grads.items() if ".adapters.lora_xs." in n)
    assert not any(v for n, v in grads.items() if ".adapters.lora_xs." not in n)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("grad_mode", ["grad", "no_grad", "inference_mode"])
@pytest.mark.parametrize("n_adapters", [2, 9])
def test_many_adapters_mixed_methods_and_ranks_in_one_batch(n_adapters, grad_mode):
    """The shared-basis and gathered paths agree with running each adapter alone (prefill), whether
    gradients are on (per-adapter parameters) or off (the layer's LoRA stack, lorakit.lora_stack)."""
    model = MODEL_FACTORIES["llama"]()
    names = []
    for i in range(n_adapters):
        lorakit.attach(model, LoraXSConfig(r=2 + 2 * (i % 3), init_std=0.2), f"xs{i}")
        lorakit.attach(model, LoraConfig(r=4, lora_alpha=4 + i), f"lora{i}")
        names += [f"xs{i}", f"lora{i}"]
    lorakit.attach(model, VeraConfig(r=8), "vera")
    lorakit.attach(model, LoraConfig(r=2), "lora_small")  # a different rank among many LoRAs
    names += ["vera", None, "lora_small"]
    randomize_adapters(model)
    ids = torch.randint(0, 101, (len(names), 6), generator=torch.Generator().manual_seed(1))
    mode = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    with mode[grad_mode](), lorakit.use_adapter(model, names):
        mixed = model(input_ids=ids).logits
    for i, name in enumerate(names):
        with (lorakit.use_adapter(model, name) if name else lorakit.disable_adapters(model)):
            alone = model(input_ids=ids[i:i + 1]).logits[0]
        assert (mixed[i] - alone).abs().max() < 1e-5, (i, name)


def test_decoding_with_kv_cache_and_per_row_adapters_matches_each_alone():
    model = MODEL_FACTORIES["llama"]()
    for i in range(12):  # 6 LoRA (two ranks: the stacked path) and 6 LoRA-XS adapters
        config = LoraConfig(r=2 + 2 * (i % 4 == 1)) if i % 2 else LoraXSConfig(r=4, init_std=0.3)
        lorakit.attach(model, config, f"a{i}")
    randomize_adapters(model, std=0.2)
    names = [f"a{i}" for i in range(12)] + [None]
    prompt = torch.randint(0, 101, (len(names), 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)
    with lorakit.use_adapter(model, names):
        batched = model.generate(prompt, **kwargs)
    for i, name in enumerate(names):
        with (lorakit.use_adapter(model, name) if name else lorakit.disable_adapters(model)):
            alone = model.generate(prompt[i:i + 1], **kwargs)
        assert torch.equal(batched.sequences[i], alone.sequences[0]), (i, name)
        for step_batched, step_alone in zip(batched.logits, alone.logits):  # every decode step's logits
            assert (step_batched[i] - step_alone[0]).abs().max() < 1e-5, (i, name)
    assert len({tuple(r.tolist()) for r in batched.sequences}) > 1  # the adapters really steer generation
