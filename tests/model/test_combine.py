"""lorakit.combine against real PEFT's add_weighted_adapter, and LoRA-XS / VeRA combinations."""

from __future__ import annotations

import functools

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.tuners.lora import model as peft_lora_model

import lorakit as lk
from lorakit import io
from tests.conftest import model_output, randomize_adapters, tiny_llama

WEIGHTS = {"pirate": 0.7, "poet": -0.4}
DARE_SEED = 1234


def peft_pair(rank_b: int = 4):
    """A PEFT model holding two random LoRA adapters, pirate (r=4) and poet, on different module sets."""
    peft_model = get_peft_model(tiny_llama(0), PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
        adapter_name="pirate")
    peft_model.add_adapter("poet", PeftLoraConfig(r=rank_b, lora_alpha=4, target_modules=["q_proj", "up_proj"],
                                               init_lora_weights=False))
    return peft_model.eval()


def ours_from(peft_model, tmp_path) -> torch.nn.Module:
    peft_model.save_pretrained(tmp_path / "peft", selected_adapters=list(WEIGHTS))
    ours = tiny_llama(0)
    for name in WEIGHTS:  # PEFT writes each adapter but "default" in a subdirectory of its name
        io.load_adapter(ours, tmp_path / "peft" / name, name)
    return ours


def peft_combined(peft_model, ids, combination_type: str, **kwargs) -> torch.Tensor:
    peft_model.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "c", combination_type=combination_type,
                                    **kwargs)
    peft_model.set_adapter("c")
    with torch.no_grad():
        return model_output(peft_model, ids)


def reseeded_at_first_draw(monkeypatch) -> None:
    """PEFT initialises the new adapter (drawing from torch's generator) before DARE draws its masks; reseed
    at its first mask draw, so both libraries draw masks from the same generator state."""
    state = {"seeded": False}
    original = torch.bernoulli

    @functools.wraps(original)
    def seeded(*args, **kwargs):
        if not state["seeded"]:
            torch.manual_seed(DARE_SEED)
            state["seeded"] = True
        return original(*args, **kwargs)

    monkeypatch.setattr(peft_lora_model, "dare_linear", _calling_with(peft_lora_model.dare_linear, seeded))
    monkeypatch.setattr(peft_lora_model, "dare_ties", _calling_with(peft_lora_model.dare_ties, seeded))


def _calling_with(fn, bernoulli):
    def wrapper(*args, **kwargs):
        saved = torch.bernoulli
        torch.bernoulli = bernoulli
        try:
            return fn(*args, **kwargs)
        finally:
            torch.bernoulli = saved
    return wrapper


SAME_RANK_TYPES = ["linear", "ties", "magnitude_prune", "dare_linear", "dare_ties"]
ANY_RANK_TYPES = ["cat", "svd", "ties_svd", "magnitude_prune_svd", "dare_linear_svd", "dare_ties_svd"]


@pytest.mark.parametrize("combination_type", SAME_RANK_TYPES + ANY_RANK_TYPES)
def test_lora_combination_equals_peft(combination_type, ids, tmp_path, monkeypatch):
    peft_model = peft_pair(rank_b=4 if combination_type in SAME_RANK_TYPES else 2)
    ours = ours_from(peft_model, tmp_path)
    kwargs = {"density": 0.5} if combination_type not in ("linear", "cat", "svd") else {}
    if combination_type.startswith("dare"):
        reseeded_at_first_draw(monkeypatch)
    expected = peft_combined(peft_model, ids, combination_type, **kwargs)
    generator = torch.Generator().manual_seed(DARE_SEED) if combination_type.startswith("dare") else None
    lk.combine(ours, WEIGHTS, "c", combination_type, generator=generator, **kwargs)
    with lk.use_adapter(ours, "c"), torch.no_grad():
        got = model_output(ours, ids)
    with lk.disable_adapters(ours), torch.no_grad():
        base = model_output(ours, ids)
    assert (expected - base).abs().max() > 1e-3  # the combination changes the output
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def test_dare_masks_follow_the_default_generator(ids, tmp_path):
    """Seeding torch's own generator (as a PEFT user does) gives the same DARE result twice, another seed not."""
    outputs = []
    for seed in (5, 5, 6):
        ours = ours_from(peft_pair(), tmp_path)
        torch.manual_seed(seed)
        lk.combine(ours, WEIGHTS, "c", "dare_linear", density=0.3)
        with lk.use_adapter(ours, "c"), torch.no_grad():
            outputs.append(model_output(ours, ids))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert (outputs[0] - outputs[2]).abs().max() > 1e-4


def xs_model(dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    model = tiny_llama(0).to(device, dtype)
    lk.attach(model, lk.LoraXSConfig(r=4, lora_alpha=8), "x")
    lk.attach(model, lk.LoraXSConfig(r=2, lora_alpha=3, target_modules=["q_proj", "o_proj"]), "y")
    randomize_adapters(model, std=0.3)
    return model


def weighted_deltas(model, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    return {n: sum(w * layer.delta_weight(a) for a, w in weights.items() if layer.has(a))
            for n, layer in lk.adapted_layers(model).items() if any(layer.has(a) for a in weights)}


@pytest.mark.parametrize("combination_type", ["linear", "cat"])
def test_lora_xs_linear_is_one_exact_core(combination_type, device, dtype):
    model = xs_model(dtype, device)
    mix = {"x": 0.7, "y": 0.3}
    lk.combine(model, mix, "mix", combination_type)
    config = lk.adapter_config(model, "mix")
    assert isinstance(config, lk.LoraXSConfig) and config.r == 4  # no rank growth
    assert lk.count_trainable(model, "mix") == lk.count_trainable(model, "x")  # r² per module, as one adapter
    expected = weighted_deltas(model, mix)
    for name, layer in lk.adapted_layers(model).items():
        if name in expected:
            torch.testing.assert_close(layer.delta_weight("mix"), expected[name], rtol=1e-5, atol=1e-6)
    ids = torch.randint(0, 101, (2, 6), device=device)
    with torch.no_grad():
        with lk.use_adapter(model, "mix"):
            got = model_output(model, ids)
        with lk.use_adapter(model, "x"):
            single = model_output(model, ids)
    assert (got - single).abs().max() > 0  # not simply one of the sources
    assert torch.isfinite(got).all()


def test_lora_xs_packed_sources_combine_exactly(tmp_path):
    model = xs_model()
    expected = weighted_deltas(model, {"x": 0.5, "y": 0.5})
    io.save_adapter(model, "y", tmp_path / "y")
    lk.delete_adapter(model, "y")
    io.load_adapter(model, tmp_path / "y", "y", packed=True)
    lk.combine(model, {"x": 0.5, "y": 0.5}, "mix", "linear")
    for name, layer in lk.adapted_layers(model).items():
        if name in expected:
            torch.testing.assert_close(layer.delta_weight("mix"), expected[name], rtol=1e-5, atol=1e-6)


def test_combined_adapter_is_ordinary(ids, tmp_path):
    """Route, merge, unmerge, save and load the combination like any adapter."""
    model = xs_model()
    lk.combine(model, {"x": 1.0, "y": 2.0}, "mix", "ties", density=0.5)
    with lk.use_adapter(model, "mix"), torch.no_grad():
        routed = model_output(model, ids)
    lk.merge(model, "mix")
    with torch.no_grad():
        merged = model_output(model, ids)
    torch.testing.assert_close(merged, routed, rtol=0, atol=1e-5)
    lk.unmerge(model, "mix")
    io.save_adapter(model, "mix", tmp_path / "mix")
    fresh = tiny_llama(0)
    io.load_adapter(fresh, tmp_path / "mix", "mix")
    with torch.no_grad():
        torch.testing.assert_close(model_output(fresh, ids), routed, rtol=0, atol=1e-5)


def test_vera_and_mixed_kinds_combine_as_lora():
    model = tiny_llama(0)
    lk.attach(model, lk.VeraConfig(r=4), "v")
    lk.attach(model, lk.LoraConfig(r=4, lora_alpha=16), "l")
    lk.attach(model, lk.LoraXSConfig(r=4), "x")
    randomize_adapters(model, std=0.2)
    mix = {"v": 0.5, "l": 0.25, "x": 1.0}
    lk.combine(model, mix, "mix", "cat")
    assert isinstance(lk.adapter_config(model, "mix"), lk.LoraConfig)
    expected = weighted_deltas(model, mix)
    for name, layer in lk.adapted_layers(model).items():
        torch.testing.assert_close(layer.delta_weight("mix"), expected[name], rtol=1e-4, atol=1e-6)
    lk.combine(model, mix, "mix_svd", "svd", svd_rank=12)  # rank 12 holds the sum of three rank-4 updates exactly
    for name, layer in lk.adapted_layers(model).items():
        torch.testing.assert_close(layer.delta_weight("mix_svd"), expected[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weights, kwargs, message", [
    ({"nope": 1.0}, {}, "not attached"),
    ({"x": float("nan")}, {}, "finite"),
    ({"x": 1.0, "y": "1"}, {}, "finite"),
    ({}, {}, "non-empty"),
    ({"x": 1.0, "y": 1.0}, {"combination_type": "ties"}, "density"),
    ({"x": 1.0, "y": 1.0}, {"combination_type": "ties", "density": 1.5}, "density"),
    ({"x": 1.0, "y": 1.0}, {"combination_type": "median"}, "combination_type"),
    ({"x": 1.0, "y": 1.0}, {"combination_type": "svd", "svd_rank": 0}, "svd_rank"),
    ({"x": 1.0, "y": 1.0}, {"combination_type": "svd", "svd_clamp": 1.5}, "svd_clamp"),
    ({"x": 1.0, "y": 1.0}, {"combination_type": "ties", "density": 0.5, "majority_sign_method": "vote"},
     "majority_sign_method"),
])
def test_bad_combinations_are_refused_and_change_nothing(weights, kwargs, message):
    model = xs_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lk.LorakitError, match=message):
        lk.combine(model, weights, "mix", **kwargs)
    assert lk.adapter_names(model) == ["x", "y"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lora_factor_types_need_one_rank():
    model = tiny_llama(0)
    lk.attach(model, lk.LoraConfig(r=4), "a")
    lk.attach(model, lk.LoraConfig(r=2), "b")
    with pytest.raises(lk.AdapterConfigError, match="one rank"):
        lk.combine(model, {"a": 1.0, "b": 1.0}, "c", "linear")
    with pytest.raises(lk.AdapterExistsError):
        lk.combine(model, {"a": 1.0}, "b", "linear")


def test_non_finite_sources_are_refused_before_attaching():
    model = xs_model()
    with torch.no_grad():
        next(iter(lk.adapted_layers(model).values())).adapters["x"].lora_R.fill_(float("inf"))
    with pytest.raises(lk.NonFiniteAdapterError, match="nothing was attached"):
        lk.combine(model, {"x": 1.0, "y": -1.0}, "mix", "linear")
    assert lk.adapter_names(model) == ["x", "y"]
