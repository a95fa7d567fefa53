"""Prefix adapters on disk: our files ↔ ours, ours → PEFT, PEFT → ours, all with the same outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import PrefixConfig, io
from lorakit.errors import AdapterExistsError, CorruptAdapterError, PrefixLengthError, PrefixMismatchError
from lorakit.model.prefix_hook import prefix_adapter, prefix_store
from tests.conftest import MODEL_FACTORIES, model_output

peft = pytest.importorskip("peft")
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION"}


def _with_prefix(arch: str, projection: bool = True, seed: int = 0):
    model = MODEL_FACTORIES[arch](seed)
    torch.manual_seed(seed + 7)
    lorakit.attach(model, PrefixConfig(num_virtual_tokens=4, prefix_projection=projection, encoder_hidden_size=12),
                   "pre")
    return model


def _routed(model, ids, name):
    with lorakit.use_adapter(model, name), torch.no_grad():
        return model_output(model, ids)


def test_roundtrip_through_our_files_folds_the_mlp(arch, ids, tmp_path):
    model = _with_prefix(arch)
    expected = _routed(model, ids, "pre")
    io.save_adapter(model, "pre", tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["prefix_projection"] is False
    assert set(load_file(tmp_path / "ad" / "adapter_model.safetensors")) == {"prompt_embeddings"}
    fresh = MODEL_FACTORIES[arch](0)
    assert io.load_adapter(fresh, tmp_path / "ad") == "ad"
    assert prefix_adapter(fresh, "ad").transform is None  # folded: the file holds the prefix itself
    torch.testing.assert_close(_routed(fresh, ids, "ad"), expected, rtol=0, atol=1e-5)
    assert io.read_adapter_info(tmp_path / "ad")["method"] == "prefix_tuning"


def test_ours_loads_in_peft_with_same_outputs(arch, ids, tmp_path):
    model = _with_prefix(arch)
    io.save_adapter(model, "pre", tmp_path / "ad")
    reference = peft.PeftModel.from_pretrained(MODEL_FACTORIES[arch](0), tmp_path / "ad").eval()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=mask)
    with lorakit.use_adapter(model, "pre"), torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask)
    key = "logits" if arch != "bert" else "last_hidden_state"
    torch.testing.assert_close(getattr(ours, key), getattr(theirs, key), rtol=0, atol=1e-5)


@pytest.mark.parametrize("projection", [True, False])
def test_peft_prefix_loads_in_ours_with_same_outputs(arch, ids, tmp_path, projection):
    torch.manual_seed(3)
    config = peft.PrefixTuningConfig(task_type=TASKS[arch], num_virtual_tokens=5, prefix_projection=projection,
                                     encoder_hidden_size=10)
    reference = peft.get_peft_model(MODEL_FACTORIES[arch](0), config)
    reference.save_pretrained(tmp_path / "peft")
    loaded_back = peft.PeftModel.from_pretrained(MODEL_FACTORIES[arch](0), tmp_path / "peft").eval()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        theirs = loaded_back(input_ids=ids, attention_mask=mask)
    model = MODEL_FACTORIES[arch](0)
    io.load_adapter(model, tmp_path / "peft", "theirs")
    with lorakit.use_adapter(model, "theirs"), torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask)
    key = "logits" if arch != "bert" else "last_hidden_state"
    torch.testing.assert_close(getattr(ours, key), getattr(theirs, key), rtol=0, atol=1e-5)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, lorakit.adapter_names(model),
            prefix_store(model) is not None)


def _assert_same(model, before):
    state, names, store = before
    assert lorakit.adapter_names(model) == names and (prefix_store(model) is not None) == store
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_prefix_for_another_architecture_is_refused(tmp_path):
    io.save_adapter(_with_prefix("llama"), "pre", tmp_path / "llama")
    for arch in ("gpt2", "bert"):  # 4 kv heads of 8 vs llama's 2 of 8
        target = MODEL_FACTORIES[arch](0)
        before = _snapshot(target)
        with pytest.raises(PrefixMismatchError, match="key/value heads 2 vs the model's 4"):
            io.load_adapter(target, tmp_path / "llama")
        _assert_same(target, before)
    config = json.loads((tmp_path / "llama" / "adapter_config.json").read_text())
    config["num_layers"] = 3
    (tmp_path / "llama" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(PrefixMismatchError, match="layers 3 vs the model's 2"):
        io.load_adapter(MODEL_FACTORIES["llama"](0), tmp_path / "llama")


def test_bad_prefix_files(tmp_path):
    model = _with_prefix("gpt2", projection=False)
    io.save_adapter(model, "pre", tmp_path / "ad")
    weights, config_file = tmp_path / "ad" / "adapter_model.safetensors", tmp_path / "ad" / "adapter_config.json"
    good = load_file(weights)
    target = MODEL_FACTORIES["gpt2"](0)
    before = _snapshot(target)
    save_file({"prompt_embeddings": good["prompt_embeddings"][:, :-1].contiguous()}, weights)
    with pytest.raises(CorruptAdapterError, match="shape"):
        io.load_adapter(target, tmp_path / "ad")
    save_file({"other": good["prompt_embeddings"]}, weights)
    with pytest.raises(CorruptAdapterError, match="missing keys"):
        io.load_adapter(target, tmp_path / "ad")
    config = json.loads(config_file.read_text())
    config["num_virtual_tokens"] = 64  # tiny GPT-2 has 64 positions
    config_file.write_text(json.dumps(config))
    with pytest.raises(PrefixLengthError):
        io.load_adapter(target, tmp_path / "ad")
    _assert_same(target, before)
    save_file(good, weights)
    config["num_virtual_tokens"] = 4
    config_file.write_text(json.dumps(config))
    io.load_adapter(target, tmp_path / "ad", "x")
    with pytest.raises(AdapterExistsError):
        io.load_adapter(target, tmp_path / "ad", "x")


def test_smollm2_prefix_roundtrip_with_peft(tmp_path):
    from lorakit.base_models.load import load_base

    model, tokenizer = load_base("smollm2-135m")
    batch = tokenizer(["Prefix tuning on SmolLM2."], return_tensors="pt")
    torch.manual_seed(0)
    lorakit.attach(model, PrefixConfig(num_virtual_tokens=6), "pre")
    with torch.no_grad():
        prefix_adapter(model, "pre").embedding.weight.mul_(0.5)
    with lorakit.use_adapter(model, "pre"), torch.no_grad():
        ours = model(**batch).logits
    io.save_adapter(model, "pre", tmp_path / "ad")
    lorakit.delete_adapter(model, "pre")
    assert prefix_store(model) is None
    reference = peft.PeftModel.from_pretrained(model, tmp_path / "ad").eval()  # 3 kv heads of 64 (GQA)
    with torch.no_grad():
        theirs = reference(**batch).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
