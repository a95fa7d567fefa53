"""The command line: flags, config files, eval side by side, and 2-process DDP ≡ 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli.train import main
from tests.train.conftest import class_rows, prompt_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_ddp_two_processes_match_one(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    args = ["train", "--base", str(llama_dir), "--data", str(data), "--steps", "4", "--batch-size", "8",
            "--lr", "1e-2", "--rank", "4", "--no-progress", "--schedule", "cosine", "--warmup-steps", "1",
            "--eval-data", str(data), "--eval-every", "2"]  # a mid-run eval on rank 0 alone must not make DDP drift
    single = subprocess.run([sys.executable, "-m", "lorakit.train", *args, "--output-dir", str(tmp_path / "one")],
                            env=_env(), capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "lorakit.train", *args, "--output-dir", str(tmp_path / "two")],
                         env=_env(), capture_output=True, text=True, timeout=180)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b)
    # same global batch and loss normalisation; only the summation order differs, and by how much depends on the
    # CPU's kernels (2.3e-6 seen on an AVX2-only machine): a wrong batch or gradient moves weights by ~lr = 1e-2
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), (key, (a[key] - b[key]).abs().max())
    log1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    log2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert [r["loss"] for r in log1] == pytest.approx([r["loss"] for r in log2], abs=1e-5)
    assert [r["eval_loss"] for r in log1] == pytest.approx([r["eval_loss"] for r in log2], abs=1e-5)
    assert log1[-1]["tokens"] == log2[-1]["tokens"]


def test_config_file_with_flag_override(tmp_path, llama_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    toml = tmp_path / "run.toml"
    toml.write_text(f'base = "{llama_dir}"\ndata = "{data}"\noutput_dir = "{tmp_path / "run"}"\nmethod = "lora_xs"\n'
                    'steps = 50\nprogress = false\n[adapter]\nr = 4\nlora_alpha = 8.0\n')
    assert main(["train", "--config", str(toml), "--steps", "3", "--set", "init_std=0.001"]) == 0
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["steps"] == 3 and saved["method"] == "lora_xs"
    assert saved["adapter"] == {"r": 4, "lora_alpha": 8.0, "init_std": 0.001}
    assert "trained 3 steps" in capsys.readouterr().out
    yaml = tmp_path / "run.yaml"
    yaml.write_text(f"base: {llama_dir}\ndata: {data}\noutput_dir: {tmp_path / 'run2'}\nsteps: 2\nprogress: false\n"
                    "adapter: {r: 2, target_modules: [q_proj, v_proj]}\n")
    assert main(["train", "--config", str(yaml)]) == 0
    cfg = json.loads((tmp_path / "run2" / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


def test_cli_errors_exit_2_with_message(tmp_path, llama_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ['{"prompt": "x"'])
    code = main(["train", "--base", str(llama_dir), "--data", str(data), "--output-dir", str(tmp_path / "r"),
                 "--steps", "1", "--no-progress"])
    assert code == 2 and "d.jsonl:1" in capsys.readouterr().err


def test_eval_base_and_adapter_side_by_side(tmp_path, llama_dir, bert_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    assert main(["train", "--base", str(llama_dir), "--data", str(data), "--output-dir", str(tmp_path / "lm"),
                 "--steps", "40", "--lr", "2e-2", "--rank", "8", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--base", str(llama_dir), "--adapter", str(tmp_path / "lm" / "adapter"), "--data",
                 str(data), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["base"]) == {"loss", "perplexity", "exact_match"}
    assert res["adapter"]["loss"] < res["base"]["loss"] and res["adapter"]["perplexity"] < res["base"]["perplexity"]

    cls = write_jsonl(tmp_path / "c.jsonl", class_rows(30))
    assert main(["train", "--base", str(bert_dir), "--data", str(cls), "--output-dir", str(tmp_path / "cls"),
                 "--steps", "40", "--lr", "2e-2", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--base", str(bert_dir), "--adapter", str(tmp_path / "cls" / "adapter"), "--data",
                 str(cls)]) == 0
    table = capsys.readouterr().out
    assert "accuracy" in table and "macro_f1" in table and "base" in table and "adapter" in table
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in table.splitlines()[1:4]}
    assert rows["loss"][1] < rows["loss"][0] and rows["accuracy"][1] > rows["accuracy"][0]
