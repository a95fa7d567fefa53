"""PEFT interop both ways on the embedded real models (SmolLM2-135M and all-MiniLM-L6-v2)."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit import io
from tests.conftest import model_output, randomize_adapters

peft = pytest.importorskip("peft")
models = pytest.importorskip("lorakit.base_models.load")

CASES = {"smollm2-135m": ["q_proj", "v_proj"], "minilm-l6": ["query", "value"]}


@pytest.fixture(scope="module", params=sorted(CASES))
def real(request):
    """(name, base model, input ids); the base is never modified: every test works on deep copies."""
    try:
        model, tokenizer = models.load_base(request.param)
    except lk.BaseModelNotFoundError as exc:
        pytest.skip(f"embedded model {request.param} unavailable: {exc}")
    ids = tokenizer(["LoRA adapters are small.", "Files are the interface"], return_tensors="pt",
                    padding=True).input_ids
    return request.param, model, ids


def _output(model, ids):
    with torch.no_grad():
        return model_output(model, ids)


def test_ours_loads_in_peft(real, tmp_path):
    name, base, ids = real
    ours = lk.attach(copy.deepcopy(base), lk.LoraConfig(r=8, lora_alpha=16, target_modules=CASES[name]), "a")
    randomize_adapters(ours, std=0.02)
    expected = _output(ours, ids)
    assert (expected - _output(base, ids)).abs().max() > 1e-3  # the adapter does something
    io.save_adapter(ours, "a", tmp_path / "ad")
    assert io.read_adapter_info(tmp_path / "ad")["base_model"] == base.name_or_path
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad").eval()
    torch.testing.assert_close(_output(peft_model, ids), expected, rtol=0, atol=1e-5)


def test_peft_adapter_loads_in_ours(real, tmp_path):
    name, base, ids = real
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=CASES[name], init_lora_weights=False)).eval()
    expected = _output(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    io.load_adapter(ours, tmp_path / "peft", "p")
    torch.testing.assert_close(_output(ours, ids), expected, rtol=0, atol=1e-5)
