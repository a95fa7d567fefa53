"""Every bad adapter raises its specific error and leaves the model exactly as it was."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit import io
from lorakit.errors import (AdapterExistsError, AdapterMismatchError, AdapterNotFoundError, CorruptAdapterError,
                            NonFiniteAdapterError, UnsupportedAdapterError)
from tests.conftest import MODEL_FACTORIES
from tests.io.util import adapted, assert_unchanged, snapshot

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One good adapter directory per method, saved from tiny Llama (seed 0)."""
    root = tmp_path_factory.mktemp("good")
    for method in ("lora", "lora_xs", "vera"):
        io.save_adapter(adapted("llama", method), "a", root / method)
    return root


@pytest.fixture(params=["plain", "with_adapter"])
def host(request):
    """The model a bad file is loaded into: bare, or already carrying a LoRA-XS adapter and its bases."""
    model = MODEL_FACTORIES["llama"](0)
    if request.param == "with_adapter":
        lk.attach(model, lk.LoraXSConfig(r=2, target_modules=["q_proj", "k_proj"]), "kept")
    return model


def broken(saved, tmp_path, method: str):
    """A copy of a good adapter directory to damage."""
    target = tmp_path / f"bad_{method}"
    shutil.copytree(saved / method, target)
    return target


def edit_tensors(path, change):
    tensors = load_file(path / WEIGHTS)
    change(tensors)
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


def edit_config(path, change):
    config = json.loads((path / CONFIG).read_text())
    change(config)
    (path / CONFIG).write_text(json.dumps(config))


def expect_refused(model, path, error, match, **kwargs):
    before = snapshot(model)
    with pytest.raises(error, match=match):
        io.load_adapter(model, path, "new", **kwargs)
    assert_unchanged(model, before)


METHODS = ["lora", "lora_xs", "vera"]


def test_missing_directory_and_files(host, saved, tmp_path):
    expect_refused(host, tmp_path / "nowhere", AdapterNotFoundError, "does not exist")
    path = broken(saved, tmp_path, "lora")
    (path / WEIGHTS).unlink()
    expect_refused(host, path, CorruptAdapterError, "adapter_model.safetensors is missing")
    (path / "adapter_model.bin").write_bytes(b"pickle")
    expect_refused(host, path, CorruptAdapterError, "pickle")
    (path / CONFIG).unlink()
    expect_refused(host, path, AdapterNotFoundError, "adapter_config.json")


@pytest.mark.parametrize("method", METHODS)
def test_truncated_or_garbage_safetensors(host, saved, tmp_path, method):
    path = broken(saved, tmp_path, method)
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    expect_refused(host, path, CorruptAdapterError, "adapter_model.safetensors")
    (path / WEIGHTS).write_bytes(b"\x00" * 3)
    expect_refused(host, path, CorruptAdapterError, "truncated")
    (path / WEIGHTS).write_bytes(b"\xff" * 64)
    expect_refused(host, path, CorruptAdapterError, "adapter_model.safetensors")


@pytest.mark.parametrize("method", METHODS)
def test_malformed_json(host, saved, tmp_path, method):
    path = broken(saved, tmp_path, method)
    (path / CONFIG).write_text('{"r": 4,')
    expect_refused(host, path, CorruptAdapterError, "not valid JSON")
    (path / CONFIG).write_text("[1, 2]")
    expect_refused(host, path, CorruptAdapterError, "JSON object")


@pytest.mark.parametrize("method", METHODS)
def test_missing_and_unexpected_keys_are_named(host, saved, tmp_path, method):
    path = broken(saved, tmp_path, method)
    victim = sorted(load_file(path / WEIGHTS))[3]
    edit_tensors(path, lambda t: t.pop(victim))
    expect_refused(host, path, CorruptAdapterError, f"missing keys.*{victim.rsplit('.', 2)[0]}")
    path = broken(saved, tmp_path / "x", method)
    edit_tensors(path, lambda t: t.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.extra",
                                               torch.zeros(2)))
    expect_refused(host, path, CorruptAdapterError, "unexpected keys.*extra")


@pytest.mark.parametrize("method", METHODS)
def test_nan_or_inf_weights(host, saved, tmp_path, method):
    path = broken(saved, tmp_path, method)
    victim = sorted(k for k in load_file(path / WEIGHTS) if "fingerprint" not in k)[-1]

    def poison(tensors):
        tensors[victim] = tensors[victim].clone()
        tensors[victim].view(-1)[0] = float("nan")
    edit_tensors(path, poison)
    expect_refused(host, path, NonFiniteAdapterError, victim.replace(".", r"\."))


@pytest.mark.parametrize("method", METHODS)
def test_shape_mismatch_names_module_and_shapes(host, saved, tmp_path, method):
    path = broken(saved, tmp_path, method)
    key = {"lora": "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight",
           "lora_xs": "model.layers.1.mlp.up_proj.lora_R",
           "vera": "model.layers.1.mlp.up_proj.vera_lambda_b"}[method]
    edit_tensors(path, lambda t: t.__setitem__(key, torch.zeros(t[key].shape[0], t[key].shape[-1] + 1).squeeze(0)
                                               if method == "vera" else torch.zeros(t[key].shape[0],
                                                                                    t[key].shape[1] + 1)))
    expect_refused(host, path, AdapterMismatchError, r"model\.layers\.1\.mlp\.up_proj.*expect")


@pytest.mark.parametrize("method", METHODS)
def test_unknown_modules_adapter_for_another_architecture(host, tmp_path, method):
    io.save_adapter(adapted("gpt2", method), "a", tmp_path / "gpt2")
    expect_refused(host, tmp_path / "gpt2", AdapterMismatchError, "transformer.h.0.*do not exist")


@pytest.mark.parametrize("method", ["lora_xs", "vera"])
def test_adapter_for_another_base_is_refused_by_fingerprint(host, tmp_path, method):
    other = adapted("llama", method, seed=5)  # same architecture, different weights
    if method == "vera":  # VeRA's bases do not depend on W: a different seed gives different projections
        other = MODEL_FACTORIES["llama"](0)
        lk.attach(other, lk.VeraConfig(r=8, projection_seed=3), "a")
        io.save_adapter(other, "a", tmp_path / "ad")
        edit_tensors(tmp_path / "ad", lambda t: [t.__setitem__(k, t[k] + 1.0) for k in list(t)
                                                 if k.endswith("q_proj.basis_fingerprint")])
    else:
        io.save_adapter(other, "a", tmp_path / "ad")
    expect_refused(host, tmp_path / "ad", AdapterMismatchError, r"bases.*differ.*model\.layers\.\d\.\w+\.\w+: expected")
    with pytest.warns(UserWarning, match="differ"):  # strict=False: a deliberate override
        io.load_adapter(host, tmp_path / "ad", "forced", strict=False)
    assert "forced" in lk.adapter_names(host)


def test_vera_for_other_model_sizes_is_refused(host, tmp_path):
    """Same module names and shapes, but a bigger vocabulary: VeRA's shared projections differ."""
    from transformers import LlamaForCausalLM

    config = MODEL_FACTORIES["llama"](0).config
    config.vocab_size = 120
    model = LlamaForCausalLM(config).eval()
    lk.attach(model, lk.VeraConfig(r=8, projection_seed=3), "a")
    io.save_adapter(model, "a", tmp_path / "ad")
    expect_refused(host, tmp_path / "ad", AdapterMismatchError, r"generated at \(max_in, max_out\)=\(64, 120\)")


@pytest.mark.parametrize("field, value, feature", [
    ("bias", "all", "bias='all'"), ("use_qalora", True, "QA-LoRA"),
    ("lora_bias", True, "lora_bias"), ("peft_type", "ADALORA", "ADALORA"), ("layer_replication", [[0, 1]],
                                                                             "layer_replication")])
def test_unsupported_peft_features_are_named(host, saved, tmp_path, field, value, feature):
    path = broken(saved, tmp_path, "lora")
    edit_config(path, lambda c: c.__setitem__(field, value))
    expect_refused(host, path, UnsupportedAdapterError, feature)


@pytest.mark.parametrize("suffix, feature", [("lora_B.bias", "LoRA bias terms")])
def test_unsupported_peft_tensors_are_named(host, saved, tmp_path, suffix, feature):
    path = broken(saved, tmp_path, "lora")
    edit_tensors(path, lambda t: t.__setitem__(f"base_model.model.model.embed_tokens.{suffix}", torch.zeros(4, 8)))
    expect_refused(host, path, UnsupportedAdapterError, feature)


def test_native_config_problems(host, saved, tmp_path):
    path = broken(saved, tmp_path, "lora_xs")
    edit_config(path, lambda c: c.__setitem__("lorakit_format", 99))
    expect_refused(host, path, UnsupportedAdapterError, "lorakit_format")
    path = broken(saved, tmp_path / "b", "lora_xs")
    edit_config(path, lambda c: c["config"].__setitem__("r", -1))
    expect_refused(host, path, CorruptAdapterError, "rank")
    path = broken(saved, tmp_path / "c", "vera")
    edit_config(path, lambda c: c["modules"].pop())
    expect_refused(host, path, CorruptAdapterError, "unexpected keys")


def test_existing_name_is_refused(saved):
    model = MODEL_FACTORIES["llama"](0)
    lk.attach(model, lk.LoraConfig(r=2), "new")
    expect_refused(model, saved / "lora", AdapterExistsError, "already attached")


@pytest.mark.parametrize("method", METHODS)
def test_failure_inside_attach_is_rolled_back(host, saved, method, monkeypatch):
    """Even a failure after the model was touched (bases installed, layers wrapped) is undone."""
    import lorakit.io.native as native
    import lorakit.io.peft_lora as peft_lora

    module = peft_lora if method == "lora" else native
    real_attach = module.attach

    def attach_then_fail(model, config, name):
        real_attach(model, config, name)
        raise RuntimeError("simulated failure after attach")
    monkeypatch.setattr(module, "attach", attach_then_fail)
    expect_refused(host, saved / method, RuntimeError, "simulated")


def test_strict_false_skips_modules_the_model_lacks(host, saved, tmp_path):
    path = broken(saved, tmp_path, "lora")
    prefix = "base_model.model.model.layers.1.mlp.up_proj."
    edit_tensors(path, lambda t: [t.__setitem__(k.replace("layers.1.", "layers.7."), t.pop(k))
                                  for k in list(t) if k.startswith(prefix)])
    expect_refused(host, path, AdapterMismatchError, r"model\.layers\.7\.mlp\.up_proj.*do not exist")
    io.load_adapter(host, path, "partial", strict=False)
    layers = [n for n, l in lk.adapted_layers(host).items() if "partial" in l.adapters]
    assert "model.layers.1.mlp.up_proj" not in layers and len(layers) == 13
