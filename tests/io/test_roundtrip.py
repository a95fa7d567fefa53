"""save_adapter -> load_adapter into a fresh copy of the base gives the same outputs, for every method."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from lorakit import io
from lorakit.model.record import adapters_of
from tests.conftest import MODEL_FACTORIES, model_output
from tests.io.util import adapted

METHODS = ["lora", "lora_xs", "vera"]


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_same_outputs(arch, method, ids, tmp_path):
    model = adapted(arch, method)
    expected = model_output(model, ids)
    io.save_adapter(model, "a", tmp_path / "ad")
    fresh = MODEL_FACTORIES[arch](0)
    name = io.load_adapter(fresh, tmp_path / "ad", "b")
    assert name == "b" and lk.adapter_names(fresh) == ["b"]
    assert lk.adapter_config(fresh, "b") == lk.adapter_config(model, "a")
    torch.testing.assert_close(model_output(fresh, ids), expected, rtol=0, atol=1e-6)
    assert lk.count_trainable(fresh, "b") == lk.count_trainable(model, "a")


@pytest.mark.parametrize("method", METHODS)
def test_saved_keys_are_exactly_the_adapters(method, tmp_path):
    model = adapted("llama", method)
    lk.attach(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), "other")  # must not leak into the file
    io.save_adapter(model, "a", tmp_path / "ad")
    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    state = lk.adapter_state_dict(model, "a")
    if method == "lora":
        expected = {f"base_model.model.{k.replace('lora_A', 'lora_A.weight').replace('lora_B', 'lora_B.weight')}"
                    for k in state}
        trained = {k: saved[k] for k in saved}
    else:
        modules = {k.rsplit(".", 1)[0] for k in state}
        expected = set(state) | {f"{m}.basis_fingerprint" for m in modules}
        trained = {k: saved[k] for k in state}
    assert set(saved) == expected
    assert sum(v.numel() for k, v in trained.items() if "fingerprint" not in k) == lk.count_trainable(model, "a")
    for key, value in state.items():  # values and dtype as trained
        file_key = key if method != "lora" else "base_model.model." + key + ".weight"
        assert torch.equal(saved[file_key], value) and saved[file_key].dtype == value.dtype


def test_lora_xs_file_holds_r_squared_numbers(tmp_path):
    model = adapted("llama", "lora_xs")
    io.save_adapter(model, "a", tmp_path / "ad")
    info = io.read_adapter_info(tmp_path / "ad")
    n_modules = len(lk.adapted_layers(model))
    assert info["method"] == "lora_xs" and info["format"] == "lorakit" and info["rank"] == 4
    assert info["num_modules"] == n_modules and info["trainable_numbers"] == n_modules * 16
    assert info["file_bytes"]["total"] == sum(p.stat().st_size for p in (tmp_path / "ad").iterdir())


@pytest.mark.parametrize("autocast, stored", [(True, torch.float32), (False, torch.bfloat16)])
def test_bfloat16_base_adapter_file_stores_what_was_trained(ids, tmp_path, autocast, stored):
    """On a bf16 base adapters train in float32 by default (autocast_adapter_dtype), in bf16 when asked: the
    file holds that dtype, and a load follows the same rule as attach whatever the file's dtype."""
    model = MODEL_FACTORIES["llama"](0).to(torch.bfloat16)
    lk.attach(model, lk.LoraConfig(r=4, autocast_adapter_dtype=autocast), "a")
    io.save_adapter(model, "a", tmp_path / "ad")
    assert load_file(tmp_path / "ad" / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].dtype == stored
    fresh = MODEL_FACTORIES["llama"](0).to(torch.bfloat16)
    io.load_adapter(fresh, tmp_path / "ad")
    assert io.read_adapter_info(tmp_path / "ad")["dtype"] == {torch.float32: "F32", torch.bfloat16: "BF16"}[stored]
    loaded = lk.adapted_layers(fresh)["model.layers.0.self_attn.q_proj"].adapters["ad"].lora_A
    assert loaded.dtype == torch.float32  # a PEFT file carries no lorakit switch: the default rule applies


def test_default_name_is_the_directory_and_resave_replaces(ids, tmp_path):
    model = adapted("gpt2", "vera")
    io.save_adapter(model, "a", tmp_path / "my adapter")
    io.save_adapter(model, "a", tmp_path / "my adapter")  # replacing an adapter directory is fine
    fresh = MODEL_FACTORIES["gpt2"](0)
    assert io.load_adapter(fresh, tmp_path / "my adapter") == "my_adapter"


def test_loads_beside_other_adapters_and_reuses_bases(ids, tmp_path):
    model = adapted("llama", "lora_xs")
    io.save_adapter(model, "a", tmp_path / "ad")
    host = adapted("llama", "lora_xs", name="x")  # same base, its own LoRA-XS adapter already attached
    layer = host.get_submodule("model.layers.0.self_attn.q_proj")
    basis_before = layer.bases["lora_xs"]
    io.load_adapter(host, tmp_path / "ad", "a")
    assert layer.bases["lora_xs"] is basis_before  # the shared basis is reused, not recomputed
    with lk.use_adapter(host, "a"):
        torch.testing.assert_close(model_output(host, ids), model_output(model, ids), rtol=0, atol=1e-6)


def test_rank_and_alpha_patterns_round_trip(ids, tmp_path):
    """Per-module ranks (PEFT's rank_pattern / alpha_pattern) survive save and load."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    peft_model = get_peft_model(MODEL_FACTORIES["llama"](0), PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
        rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3})).eval()
    expected = model_output(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = MODEL_FACTORIES["llama"](0)
    io.load_adapter(ours, tmp_path / "peft", "p")
    io.save_adapter(ours, "p", tmp_path / "again")
    info = io.read_adapter_info(tmp_path / "again")
    assert info["config"]["rank_pattern"] == {f"model.layers.{i}.self_attn.q_proj": 2 for i in range(2)}
    assert info["config"]["alpha_pattern"] == {f"model.layers.{i}.mlp.down_proj": 3 for i in range(2)}
    fresh = MODEL_FACTORIES["llama"](0)
    io.load_adapter(fresh, tmp_path / "again", "p")
    torch.testing.assert_close(model_output(fresh, ids), expected, rtol=0, atol=1e-5)


def test_packed_lora_xs_load_save_and_export(ids, tmp_path):
    """LoRA-XS files load straight into the packed bank, and packed adapters save and export like others."""
    from peft import PeftModel

    model = adapted("llama", "lora_xs")
    expected = model_output(model, ids)
    io.save_adapter(model, "a", tmp_path / "ad")
    host = MODEL_FACTORIES["llama"](0)
    io.load_adapter(host, tmp_path / "ad", "p", packed=True)
    assert "p" in adapters_of(host).packed and not any("p" in l.adapters for l in lk.adapted_layers(host).values())
    with lk.use_adapter(host, "p"):
        torch.testing.assert_close(model_output(host, ids), expected, rtol=0, atol=1e-5)
    io.save_adapter(host, "p", tmp_path / "again")
    saved, again = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ad", "again"))
    assert saved.keys() == again.keys()
    for key in saved:
        torch.testing.assert_close(again[key], saved[key], rtol=1e-6, atol=1e-7)
    io.export_to_peft(host, "p", tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(MODEL_FACTORIES["llama"](0), tmp_path / "peft").eval()
    torch.testing.assert_close(model_output(peft_model, ids), expected, rtol=0, atol=1e-5)
    io.save_adapter(adapted("llama", "vera"), "a", tmp_path / "vera")
    with pytest.raises(lk.UnsupportedAdapterError, match="packed"):
        io.load_adapter(MODEL_FACTORIES["llama"](0), tmp_path / "vera", packed=True)
