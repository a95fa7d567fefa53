"""The lorakit command line: help, one-line errors with exit status 2, inspect on a tiny adapter."""

import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.cli import main


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands():
    res = _run("--help")
    assert res.returncode == 0
    for cmd in ("quickstart", "inspect", "merge", "export"):
        assert cmd in res.stdout


def test_lorakit_error_is_one_line_exit_2(tmp_path):
    res = _run("inspect", str(tmp_path / "missing"))
    assert res.returncode == 2
    assert res.stderr.strip().startswith("lorakit: error:") and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_inspect_tiny_adapter(tmp_path, capsys):
    from lorakit.io import save_adapter

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    lorakit.attach(model, lorakit.LoraXSConfig(r=4), "tiny")
    save_adapter(model, "tiny", tmp_path / "ad")
    assert main(["inspect", str(tmp_path / "ad")]) == 0
    out = capsys.readouterr().out
    assert "lora_xs" in out and "14" in out  # 2 layers x 7 linear modules


@pytest.mark.slow
def test_quickstart_quick_end_to_end(tmp_path):
    res = _run("quickstart", "--quick", "--out", str(tmp_path / "qs"), timeout=1800)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "EM" in res.stdout and (tmp_path / "qs" / "adapter_model.safetensors").is_file()
