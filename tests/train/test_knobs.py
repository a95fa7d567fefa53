"""The training knobs: grad_accum, gradient_checkpointing, quantize, optimizer, device/dtype, prefix."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.layer.linear import adapted_layers
from lorakit.train import TrainConfig, TrainConfigError, train
from lorakit.base_models.load import NO_HUB_KERNELS
from tests.train.conftest import char_tokenizer, interrupt_at_call, prompt_rows, run_config, text_rows, write_jsonl

ADAPTER = "adapter/adapter_model.safetensors"


def _adapter(run) -> dict[str, torch.Tensor]:
    return load_file(run.output_dir / "adapter" / "adapter_model.safetensors")


def _close(a: dict, b: dict, atol: float) -> float:
    assert set(a) == set(b) and a
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, worst
    return worst


def test_grad_accum_equals_one_larger_batch(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    kw = dict(steps=4, schedule="cosine", warmup_steps=1)
    big = train(run_config(llama_dir, data, tmp_path / "big", batch_size=8, **kw))
    two = train(run_config(llama_dir, data, tmp_path / "two", batch_size=4, grad_accum=2, **kw))
    four = train(run_config(llama_dir, data, tmp_path / "four", batch_size=2, grad_accum=4, **kw))
    _close(_adapter(big), _adapter(two), 1e-5)
    _close(_adapter(big), _adapter(four), 1e-5)
    assert two.losses == pytest.approx(big.losses, abs=1e-5)
    small = train(run_config(llama_dir, data, tmp_path / "small", batch_size=4, **kw))  # no accumulation
    assert max(float((a - b).abs().max()) for a, b in zip(_adapter(small).values(), _adapter(big).values())) > 1e-3
    rows = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert rows[-1]["epoch"] == round(4 * 8 / 24, 4)  # an epoch counts examples, 8 per step


def test_gradient_checkpointing_same_adapter(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    kw = dict(steps=3, adapter={"r": 4, "lora_dropout": 0.1})  # dropout: recomputation must redraw the same masks
    plain = train(run_config(llama_dir, data, tmp_path / "plain", **kw))
    model = LlamaForCausalLM.from_pretrained(llama_dir, **NO_HUB_KERNELS)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    calls = {"n": 0}
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    ckpt = train(run_config(llama_dir, data, tmp_path / "ckpt", gradient_checkpointing=True, **kw), model=model,
                 tokenizer=tokenizer)
    assert model.is_activation_checkpointing
    assert calls["n"] >= 2 * 3 * len(model.model.layers)  # every layer ran again in each backward
    _close(_adapter(plain), _adapter(ckpt), 1e-6)


def test_quantize_nf4_trains_a_qlora_adapter(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    model = LlamaForCausalLM.from_pretrained(llama_dir, **NO_HUB_KERNELS)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    run = train(run_config(llama_dir, data, tmp_path / "q", steps=12, quantize="nf4"), model=model,
                tokenizer=tokenizer)
    layers = adapted_layers(model)
    assert layers and all(layer.quant is not None for layer in layers.values())  # every adapted base is 4-bit
    assert run.losses[-1] < run.losses[0] - 0.3
    saved = _adapter(run)
    assert all(t.dtype == torch.float32 for t in saved.values())
    fresh = LlamaForCausalLM.from_pretrained(llama_dir, **NO_HUB_KERNELS)  # the file loads on a full-precision base too
    lorakit.io.load_adapter(fresh, run.adapter_dir, "q")


def _wide_llama(path):
    """A 1-layer Llama 128 wide: LoRA r=32 factors hold 4096 numbers, bitsandbytes' threshold for 8-bit state."""
    torch.manual_seed(0)
    tokenizer = char_tokenizer("llama")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_adamw8bit_runs_and_resumes_exactly(tmp_path, monkeypatch):
    llama_dir = _wide_llama(tmp_path / "wide")
    data = write_jsonl(tmp_path / "d.jsonl", text_rows())
    kw = dict(steps=6, save_every=3, optimizer="adamw8bit", adapter={"r": 32, "target_modules": ["q_proj"]}, lr=1e-3)
    full = train(run_config(llama_dir, data, tmp_path / "full", **kw))
    state = load_file(tmp_path / "full" / "checkpoints" / "step-000006" / "state.safetensors")
    assert any(v.dtype == torch.uint8 for k, v in state.items() if k.startswith("optim/"))  # 8-bit moments saved
    adamw = train(run_config(llama_dir, data, tmp_path / "adamw", **{**kw, "optimizer": "adamw"}))
    assert max(float((a - b).abs().max()) for a, b in zip(_adapter(full).values(), _adapter(adamw).values())) > 0

    interrupt_at_call(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(llama_dir, data, tmp_path / "cut", **kw))
    monkeypatch.undo()
    resumed = train(run_config(llama_dir, data, tmp_path / "cut", **kw), resume=True)
    assert resumed.resumed_from.endswith("step-000003")
    a, b = _adapter(full), _adapter(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_base_keeps_float32_adapter(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    run = train(run_config(llama_dir, data, tmp_path / "bf16", steps=12, dtype="bfloat16"))
    assert run.losses[-1] < run.losses[0] - 0.3
    assert all(t.dtype == torch.float32 for t in _adapter(run).values())
    state = load_file(tmp_path / "bf16" / "checkpoints" / "step-000012" / "state.safetensors")
    assert all(v.dtype == torch.float32 for k, v in state.items() if k.startswith("param/"))


def test_cuda_without_a_gpu_is_refused(tmp_path, llama_dir):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    with pytest.raises(TrainConfigError, match="no CUDA device"):
        train(run_config(llama_dir, data, tmp_path / "c", device="cuda"))
    assert not (tmp_path / "c").exists()


def test_prefix_method_from_the_cli(tmp_path, llama_dir, capsys):
    from lorakit.cli.train import main

    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    assert main(["train", "--base", str(llama_dir), "--data", str(data), "--output-dir", str(tmp_path / "p"),
                 "--method", "prefix", "--set", "num_virtual_tokens=4", "--steps", "12", "--lr", "3e-2",
                 "--no-progress"]) == 0
    config = json.loads((tmp_path / "p" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 4
    losses = [r["loss"] for r in json.loads((tmp_path / "p" / "metrics.json").read_text())]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("bad, match", [
    ({"grad_accum": 0}, "grad_accum"), ({"optimizer": "sgd"}, "optimizer"), ({"quantize": "int3"}, "quantize"),
    ({"device": "tpu"}, "device"), ({"dtype": "float64"}, "dtype"), ({"report_to": ["mlflow"]}, "report_to"),
    ({"packing": "yes"}, "packing"), ({"method": "prefix", "adapter": {}, "packing": True}, "prefix"),
])
def test_bad_knob_values_name_the_field(bad, match):
    with pytest.raises(TrainConfigError, match=match):
        TrainConfig(base="b", data="d", output_dir="o", **bad)


def test_help_shows_the_knobs_defaults(capsys):
    from lorakit.cli.train import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--grad-accum", "1"), ("--optimizer", "adamw"), ("--device", "cpu"),
                          ("--fsdp", "off"), ("--packing", "off"), ("--gradient-checkpointing", "off")]:
        assert flag in text
        assert f"(default: {default})" in text.split(flag, 2)[-1][:400]
