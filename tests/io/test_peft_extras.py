"""modules_to_save and trainable tokens in PEFT files, both ways, checked against real PEFT 0.21."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification

import lorakit as lk
from lorakit import io
from lorakit.errors import AdapterMismatchError, CorruptAdapterError, UnsupportedAdapterError
from tests.layer.test_saved_modules import IDS as CLS_IDS, perturb_copies, tiny_classifier
from tests.layer.test_trainable_tokens import IDS as LM_IDS, tiny_lm

ATOL = 2e-5


def trained_peft(model, config):
    """A PEFT model with every trainable tensor (LoRA, copies, token rows) given values of its own."""
    peft_model = get_peft_model(model, config).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return peft_model


def test_peft_modules_to_save_load_in_ours_with_equal_logits(tmp_path):
    peft_model = trained_peft(tiny_classifier(), PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                modules_to_save=["score", "model.norm"]))
    expected = peft_model(input_ids=CLS_IDS).logits
    peft_model.save_pretrained(tmp_path / "peft")
    ours = tiny_classifier()
    io.load_adapter(ours, tmp_path / "peft", "p")
    assert set(lk.adapter_config(ours, "p").modules_to_save) == {"score", "model.norm"}
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=CLS_IDS).logits, expected, rtol=0, atol=ATOL)
        with lk.disable_adapters(ours):
            torch.testing.assert_close(ours(input_ids=CLS_IDS).logits, tiny_classifier()(input_ids=CLS_IDS).logits,
                                       rtol=0, atol=0)


def test_ours_with_modules_to_save_loads_in_peft_with_equal_logits(tmp_path):
    ours = tiny_classifier()
    lk.attach(ours, lk.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["score", "norm"]), "a")
    perturb_copies(ours, "a", 5)
    with torch.no_grad():
        for p in lk.adapter_parameters(ours, "a"):
            p.add_(torch.randn_like(p) * 0.1)
        expected = ours(input_ids=CLS_IDS).logits
    io.save_adapter(ours, "a", tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.norm", "score"]  # full names: PEFT matches by string suffix
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert {"base_model.model.score.weight", "base_model.model.model.norm.weight"} <= keys
    peft_model = PeftModel.from_pretrained(tiny_classifier(), tmp_path / "ours").eval()
    torch.testing.assert_close(peft_model(input_ids=CLS_IDS).logits, expected, rtol=0, atol=ATOL)


def test_peft_sequence_classification_file_loads_with_its_head(tmp_path):
    """task_type SEQ_CLS: PEFT adds the head (classifier/score) to modules_to_save by itself."""
    def classifier():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(vocab_size=101, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=2, num_attention_heads=4)).eval()
    peft_model = trained_peft(classifier(), PeftLoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    expected = peft_model(input_ids=CLS_IDS).logits
    peft_model.save_pretrained(tmp_path / "cls")
    ours = classifier()
    io.load_adapter(ours, tmp_path / "cls", "c")
    assert lk.adapter_config(ours, "c").modules_to_save == ("classifier",)
    torch.testing.assert_close(ours(input_ids=CLS_IDS).logits, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("tied", [False, True])
def test_peft_trainable_tokens_load_in_ours_with_equal_logits(tmp_path, tied):
    peft_model = trained_peft(tiny_lm(tied), PeftLoraConfig(r=4, target_modules=["q_proj"],
                                                            trainable_token_indices=[3, 5, 7]))
    expected = peft_model(input_ids=LM_IDS).logits
    peft_model.save_pretrained(tmp_path / "peft")
    ours = tiny_lm(tied)
    io.load_adapter(ours, tmp_path / "peft", "p")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=LM_IDS).logits, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("indices", [[3, 5, 7], {"embed_tokens": [9, 2]}])
def test_ours_with_trainable_tokens_loads_in_peft_with_equal_logits(tmp_path, tied, indices):
    ours = tiny_lm(tied)
    lk.attach(ours, lk.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=indices), "a")
    with torch.no_grad():
        for p in lk.adapter_parameters(ours, "a"):
            p.add_(torch.randn_like(p) * 0.3)
        expected = ours(input_ids=LM_IDS).logits
    io.save_adapter(ours, "a", tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == (indices if isinstance(indices, list) else
                                                 {"model.embed_tokens": [9, 2]})
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"].shape == (
        len(indices if isinstance(indices, list) else indices["embed_tokens"]), 32)
    peft_model = PeftModel.from_pretrained(tiny_lm(tied), tmp_path / "ours").eval()
    torch.testing.assert_close(peft_model(input_ids=LM_IDS).logits, expected, rtol=0, atol=ATOL)
    again = tiny_lm(tied)  # and back into lorakit
    io.load_adapter(again, tmp_path / "ours", "a")
    torch.testing.assert_close(again(input_ids=LM_IDS).logits, expected, rtol=0, atol=ATOL)


def _saved_pair(tmp_path):
    ours = tiny_classifier()
    lk.attach(ours, lk.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["score"],
                                  trainable_token_indices=[3, 4]), "a")
    io.save_adapter(ours, "a", tmp_path / "good")
    return tmp_path / "good"


@pytest.mark.parametrize("key, tensor, error, match", [
    ("base_model.model.score.weight", torch.zeros(4, 32), AdapterMismatchError, "score"),
    ("base_model.model.score.bias", torch.zeros(3), CorruptAdapterError, r"score has tensors \['bias', 'weight'\]"),
    ("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta", torch.zeros(3, 32),
     AdapterMismatchError, "expected \\(2, 32\\)"),
    ("base_model.model.score.weight", torch.full((3, 32), float("nan")), lk.NonFiniteAdapterError, "score"),
])
def test_bad_extras_are_named_and_leave_the_model(tmp_path, key, tensor, error, match):
    path = _saved_pair(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    tensors[key] = tensor
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    model = tiny_classifier()
    before = set(model.state_dict())
    with pytest.raises(error, match=match):
        io.load_adapter(model, path, "b")
    assert set(model.state_dict()) == before and type(model.score) is torch.nn.Linear


def test_token_rows_without_the_config_field_are_refused(tmp_path):
    path = _saved_pair(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["trainable_token_indices"] = None
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptAdapterError, match="unexpected keys"):
        io.load_adapter(tiny_classifier(), path, "b")


def test_export_refuses_to_drop_extras_unless_asked(tmp_path):
    ours = tiny_classifier()
    lk.attach(ours, lk.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["score"]), "a")
    with pytest.raises(UnsupportedAdapterError, match=r"modules_to_save \['score'\].*drop_extras"):
        io.export_to_peft(ours, "a", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    io.export_to_peft(ours, "a", tmp_path / "x", drop_extras=True)
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None
    assert all(".lora_" in k for k in load_file(tmp_path / "x" / "adapter_model.safetensors"))
