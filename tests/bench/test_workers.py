"""The benchmarks' worker processes, run for real: `bench memory` and `bench speed --only training` each spawn
`python -m lorakit.cli.bench ...` per configuration and read back the one JSON line it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.bench import memory, speed, train_step
from lorakit.cli import bench_memory
from tests.train.conftest import char_tokenizer


def _tiny_base(path: Path) -> Path:
    """A 2-layer Llama whose vocabulary covers the workers' random ids (0..31999), with a character tokenizer."""
    torch.manual_seed(0)
    tokenizer = char_tokenizer("llama")
    config = LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return _tiny_base(tmp_path_factory.mktemp("bench_workers") / "base")


def test_the_workers_are_spawned_through_the_command_line():
    assert memory.WORKER_COMMAND[:3] == train_step.COMMAND[:2] + ("memory",) == ("-m", "lorakit.cli.bench", "memory")
    assert train_step.COMMAND == ("-m", "lorakit.cli.bench", "train-step")


def test_bench_memory_runs_its_workers_and_writes_the_report(base, tmp_path):
    out, figures = tmp_path / "MEMORY.md", tmp_path / "memory.json"
    assert bench_memory.main(["--model", str(base), "--rank", "4", "--batch", "1", "--seq", "8", "--steps", "1",
                              "--repeats", "1", "--configs", "lorakit-fp32", "--out", str(out),
                              "--json", str(figures)]) == 0
    report = json.loads(figures.read_text())
    row = report["configs"]["lorakit-fp32"]
    assert row["trainable"] == 2 * 4 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))  # r=4 × (in + out), 2 layers
    assert row["step_s"] > 0 and row["peak_mib"] > 0 and row["bits_per_weight"] is None
    accuracy = report["accuracy"]  # the accuracy worker: NF4 (scales weigh more on 32-wide layers), then a merge
    assert 4.0 < accuracy["bits_per_weight"] < 32 and accuracy["merge_layers"] == 14
    assert report["settings"]["configs"] == ["lorakit-fp32"] and "worker" not in report["settings"]
    assert f"lorakit bench memory --model {base} --rank 4 --batch 1 --seq 8" in out.read_text()


def test_a_training_step_worker_prints_its_result_as_one_json_line(base):
    done = subprocess.run([sys.executable, *train_step.COMMAND, "--impl", "ours", "--method", "lora_xs", "--rank", "4",
                           "--model", str(base), "--batch", "1", "--seq", "8", "--steps", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["impl"] == "ours" and result["method"] == "lora_xs" and result["step_s"] > 0
    assert result["trainable"] == 2 * 7 * 4 * 4  # LoRA-XS: an r×r core per projection


@pytest.mark.slow
def test_training_steps_run_in_their_own_processes(base):
    results = speed.bench_training(str(base), repeats=1)
    by_measure = {r.measure: r for r in results}
    lora_time = by_measure["LoRA training step (4×128), time"]
    assert lora_time.ours > 0 and lora_time.peft > 0  # lorakit's and PEFT's processes both answered
    assert by_measure["LoRA-XS training step (4×128), time"].ours > 0
