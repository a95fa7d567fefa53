"""DoRA (lorakit.methods.dora): starts at the base, equals a dense reference, trains the magnitude with the
norm detached, merges to diag(g)(W + sBA) and unmerges bit for bit, and mixes with other kinds per row."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.config import config_from_dict, config_to_dict
from lorakit.errors import AdapterConfigError, MergeStateError, UnsupportedLayerError
from tests.conftest import TOLERANCES, randomize_adapters, tiny_gpt2, tiny_llama

Q = "model.layers.0.self_attn.q_proj"


def randomize_dora(model: torch.nn.Module, name: str, seed: int = 3, strength: float = 1.0) -> None:
    """Non-trivial B (std 0.1·strength) and magnitudes ~20%·strength off ‖W‖ (a fresh DoRA adapter is the base)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lk.adapted_layers(model).values():
            if name in layer.adapters:
                a = layer.adapters[name]
                a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=gen) * 0.1 * strength)
                noise = torch.randn(a.lora_magnitude_vector.shape, generator=gen) * 0.2 * strength
                a.lora_magnitude_vector.mul_(noise.exp().to(a.lora_magnitude_vector))


def dora_model(device: torch.device, dtype: torch.dtype = torch.float32, r: int = 4) -> torch.nn.Module:
    model = tiny_llama(0).to(device, dtype)
    lk.attach(model, lk.LoraConfig(r=r, lora_alpha=8, use_dora=True), "d")
    randomize_dora(model, "d")
    return model


def ids_for(device: torch.device, rows: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 101, (rows, 7), generator=torch.Generator().manual_seed(seed)).to(device)


def dense_reference(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """y = g ⊙ (W + sBA) x + b with W + sBA formed densely, in float32."""
    a = layer.adapters[name]
    w = layer.dense_weight().float()
    dense = w + a.scaling * a.lora_B.float() @ a.lora_A.float()  # (out, in)
    g = a.lora_magnitude_vector.float() / dense.norm(dim=1)
    y = g * (x.float() @ dense.T)
    return y + layer.bias.float() if layer.bias is not None else y


def test_config_field_round_trips_and_is_checked():
    config = lk.LoraConfig(r=4, use_dora=True)
    data = config_to_dict(config)
    assert data["use_dora"] is True and config_from_dict(data) == config
    assert config_from_dict({k: v for k, v in data.items() if k != "use_dora"}).use_dora is False
    with pytest.raises(AdapterConfigError, match="use_dora"):
        lk.LoraConfig(use_dora="yes")


def test_fresh_adapter_is_exactly_the_base(device, dtype):
    model = tiny_llama(0).to(device, dtype)
    ids = ids_for(device)
    with torch.no_grad():
        base = model(ids).logits
        lk.attach(model, lk.LoraConfig(r=4, use_dora=True), "d")
        layer = model.get_submodule(Q)
        norm = layer.weight.float().norm(dim=1)
        assert torch.equal(layer.adapters["d"].lora_magnitude_vector, norm)  # float32 on a bf16 base as well
        assert torch.equal(model(ids).logits, base)


def test_routed_forward_equals_dense_reference(device, dtype):
    model = dora_model(device, dtype)
    layer = model.get_submodule(Q)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    with torch.no_grad():
        reference = dense_reference(layer, "d", x)
        got = layer(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), reference, rtol=0, atol=TOLERANCES[dtype])
    torch.testing.assert_close(layer(x).float(), reference, rtol=0, atol=TOLERANCES[dtype])  # gradients on: per call
    adapter = layer.adapters["d"]
    torch.testing.assert_close(  # the adapter's own delta, the reference the slot path is checked against
        (layer.base_forward(x).float() + adapter.delta(x.float(), layer.dense_weight().float())), reference,
        rtol=0, atol=TOLERANCES[dtype])


def test_gpt2_conv1d_layers(device):
    model = tiny_gpt2(0).to(device)
    lk.attach(model, lk.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn"]), "d")
    randomize_dora(model, "d")
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_reference(layer, "d", x), rtol=0, atol=1e-5)


def test_magnitude_gets_gradients_through_a_detached_norm(device):
    model = dora_model(device)
    layer = model.get_submodule(Q)
    adapter = layer.adapters["d"]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4)).to(device)
    target = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(5)).to(device)
    ((layer(x) - target) ** 2).sum().backward()
    got = {n: p.grad.clone() for n, p in adapter.named_parameters()}
    assert got["lora_magnitude_vector"].abs().max() > 0

    def reference(detach: bool) -> dict[str, torch.Tensor]:
        a, b, m = (adapter.lora_A.detach().clone().requires_grad_(), adapter.lora_B.detach().clone().requires_grad_(),
                   adapter.lora_magnitude_vector.detach().clone().requires_grad_())
        w = layer.weight.detach()
        norm = (w + adapter.scaling * b @ a).norm(dim=1)
        g = m / (norm.detach() if detach else norm)
        y = g * (x @ w.T + adapter.scaling * (x @ a.T) @ b.T)  # Llama's q_proj has no bias
        ((y - target) ** 2).sum().backward()
        return {"lora_A": a.grad, "lora_B": b.grad, "lora_magnitude_vector": m.grad}

    detached = reference(True)
    for name, grad in detached.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-5)
    attached = reference(False)  # the norm's own gradient changes B's: so the test tells the two apart
    assert (attached["lora_B"] - detached["lora_B"]).abs().max() > 1e-3


def test_merge_then_unmerge_restores_w_bit_for_bit(device, dtype):
    model = dora_model(device, dtype)
    ids = ids_for(device)
    weights = {n: l.weight.detach().clone() for n, l in lk.adapted_layers(model).items()}
    with torch.no_grad():
        unmerged = model(ids).logits
        lk.merge(model, "d")
        merged = model(ids).logits
    layer = model.get_submodule(Q)
    expected = layer.adapters["d"].merged_weight(weights[Q].float())  # diag(g)(W + sBA), not W + sBA
    torch.testing.assert_close(layer.weight.float(), expected.to(dtype).float(), rtol=0, atol=0)
    torch.testing.assert_close(merged.float(), unmerged.float(), rtol=0, atol=4 * TOLERANCES[dtype])
    with pytest.raises(MergeStateError, match="already merged"):
        lk.merge(model, "d")
    lk.unmerge(model, "d")
    for n, layer in lk.adapted_layers(model).items():
        assert torch.equal(layer.weight, weights[n]), n
    with torch.no_grad():
        assert torch.equal(model(ids).logits, unmerged)


def test_dora_merges_only_alone_in_a_layer(device):
    model = dora_model(device)
    lk.attach(model, lk.LoraConfig(r=2), "l")
    randomize_adapters(model)  # gives the magnitudes random values too: fine, only merge rules are checked
    lk.merge(model, "l")
    before = {n: l.weight.detach().clone() for n, l in lk.adapted_layers(model).items()}
    with pytest.raises(MergeStateError, match="merges only alone"):
        lk.merge(model, "d")
    assert all(torch.equal(l.weight, before[n]) for n, l in lk.adapted_layers(model).items())
    lk.unmerge(model, "l")
    lk.merge(model, "d")
    with pytest.raises(MergeStateError, match="merges only alone"):
        lk.merge(model, "l")


def test_merged_dora_is_taken_out_of_rows_that_do_not_use_it(device):
    model = dora_model(device)
    lk.attach(model, lk.LoraConfig(r=2), "l")
    lk.attach(model, lk.LoraConfig(r=3, lora_alpha=4, use_dora=True), "e")
    randomize_dora(model, "e", seed=7)
    with torch.no_grad():
        for layer in lk.adapted_layers(model).values():
            layer.adapters["l"].lora_B.normal_(0, 0.1)
    ids, route = ids_for(device, rows=4), ["d", "l", None, "e"]
    with torch.no_grad(), lk.use_adapter(model, route):
        expected = model(ids).logits
    lk.merge(model, "d")
    with torch.no_grad(), lk.use_adapter(model, route):
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-5)
    with lk.use_adapter(model, route):  # the per-call (training) path too
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-5)


def test_per_row_mixed_batch_equals_each_row_alone(device, dtype):
    model = tiny_llama(0).to(device, dtype)
    lk.attach(model, lk.LoraConfig(r=4, lora_alpha=8), "l")
    lk.attach(model, lk.LoraXSConfig(r=4), "x")
    randomize_adapters(model, std=0.1)
    lk.attach(model, lk.LoraConfig(r=4, lora_alpha=8, use_dora=True), "d")
    lk.attach(model, lk.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "down_proj"]), "e")
    randomize_dora(model, "d")
    randomize_dora(model, "e", seed=9)
    route = ["d", "l", "x", None, "e", "d"]
    ids = ids_for(device, rows=len(route), seed=2)
    with torch.no_grad():
        with lk.use_adapter(model, route):
            batch = model(ids).logits
        for i, name in enumerate(route):
            with lk.use_adapter(model, name):
                alone = model(ids[i:i + 1]).logits
            torch.testing.assert_close(batch[i:i + 1].float(), alone.float(), rtol=0, atol=TOLERANCES[dtype])
    with lk.use_adapter(model, route):  # gradients on: the per-call path agrees
        torch.testing.assert_close(model(ids).logits.float(), batch.float(), rtol=0, atol=TOLERANCES[dtype])


def test_a_blend_weights_the_whole_dora_delta(device):
    """{"d": 0.5} adds half of DoRA's delta (rescale and LoRA part alike): base + 0.5·(dora(x) − base)."""
    model = dora_model(device)
    layer = model.get_submodule(Q)
    x = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(8)).to(device)
    with torch.no_grad():
        with lk.use_adapter(model, {"d": 0.5}):
            half = layer(x)
        base, full = layer.base_forward(x), layer(x)
    torch.testing.assert_close(half, base + 0.5 * (full - base), rtol=0, atol=1e-5)
    assert (full - base).abs().max() > 1e-2


def test_kept_gains_follow_changed_weights(device):
    """Inference keeps each slot's g; an optimizer step, load_state_dict or a base change must be seen."""
    model = dora_model(device)
    layer = model.get_submodule(Q)
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(6)).to(device)
    adapter = layer.adapters["d"]
    with torch.no_grad():
        layer(x)  # gains kept
        adapter.lora_magnitude_vector.mul_(1.3)
        torch.testing.assert_close(layer(x), dense_reference(layer, "d", x), rtol=0, atol=1e-5)
        state = {k: v * 0.5 if k.endswith("lora_B") else v for k, v in adapter.state_dict().items()}
        adapter.load_state_dict(state)
        torch.testing.assert_close(layer(x), dense_reference(layer, "d", x), rtol=0, atol=1e-5)
        layer.weight.mul_(0.9)  # the base itself (fine-tuned or reloaded)
        torch.testing.assert_close(layer(x), dense_reference(layer, "d", x), rtol=0, atol=1e-5)


def test_embedding_targets_are_refused_and_the_model_left_alone():
    model = tiny_llama(0)
    with pytest.raises(UnsupportedLayerError, match="DoRA adapter on embedding model.embed_tokens"):
        lk.attach(model, lk.LoraConfig(r=2, use_dora=True, target_modules=["embed_tokens", "q_proj"]), "d")
    assert not lk.adapted_layers(model)


def test_combine_refuses_dora(device):
    model = dora_model(device)
    lk.attach(model, lk.LoraConfig(r=4, lora_alpha=8, use_dora=True), "e")
    with pytest.raises(AdapterConfigError, match="DoRA"):
        lk.combine(model, {"d": 0.5, "e": 0.5}, "both")


def test_parameter_count_and_state_keys(device):
    model = dora_model(device)
    state = lk.adapter_state_dict(model, "d")
    assert f"{Q}.lora_magnitude_vector" in state and state[f"{Q}.lora_magnitude_vector"].shape == (32,)
    layer = model.get_submodule(Q)
    assert layer.adapters["d"].num_trainable() == 4 * 32 + 32 * 4 + 32


def test_layer_delta_is_what_the_adapter_adds(device):
    model = dora_model(device)
    layer = model.get_submodule(Q)
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(9)).to(device)
    with torch.no_grad():
        torch.testing.assert_close(layer.delta("d", x), layer(x) - layer.base_forward(x), rtol=0, atol=1e-6)


def test_swap_merged_and_merge_and_unload(device):
    model = dora_model(device)
    lk.attach(model, lk.LoraConfig(r=2, lora_alpha=4, use_dora=True), "e")
    randomize_dora(model, "e", seed=11)
    ids = ids_for(device)
    weights = {n: l.weight.detach().clone() for n, l in lk.adapted_layers(model).items()}
    with torch.no_grad():
        with lk.use_adapter(model, "e"):
            want_e = model(ids).logits
        with lk.use_adapter(model, "d"):
            want_d = model(ids).logits
        lk.merge(model, "d")
        lk.swap_merged(model, "d", "e")  # one after the other: DoRA's merge is not additive
        torch.testing.assert_close(model(ids).logits, want_e, rtol=0, atol=1e-5)
        lk.unmerge(model, "e")
        assert all(torch.equal(l.weight, weights[n]) for n, l in lk.adapted_layers(model).items())
        plain = lk.merge_and_unload(model, "d")
        assert not lk.adapted_layers(plain)
        torch.testing.assert_close(plain(ids).logits, want_d, rtol=0, atol=1e-5)
