"""`torchrun ... lorakit train --fsdp`: FSDP2 over 2 gloo processes ≡ DDP ≡ 1 process; resumes exactly.

Each run is a real torchrun launch of the CLI (about 9 s of CPU each, 20-40 s wall on the shared 2-core
machine); runs are shared through a module fixture. The default suite launches two (1 process, FSDP);
the DDP comparison, the resume and the LoRA-XS twin are marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train import TrainConfigError, train
from tests.train.conftest import prompt_rows, run_config, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--steps", "4", "--batch-size", "8", "--lr", "1e-2", "--rank", "4", "--no-progress", "--schedule", "cosine",
        "--warmup-steps", "1", "--save-every", "2"]
ADAPTER = Path("adapter") / "adapter_model.safetensors"
# packing and checkpointing change no number (tests/train/test_packing.py, test_knobs.py): here they run sharded.
# The eval at step 2 runs a no-grad forward mid-run, after which the shards must still reach the layers.
FSDP_FLAGS = ("--fsdp", "--packing", "--gradient-checkpointing")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _launch(base: Path, data: Path, out: Path, *extra: str, processes: int = 1) -> None:
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
            if processes > 1 else [sys.executable])
    cmd = [*head, "-m", "lorakit", "train", "--base", str(base), "--data", str(data), "--output-dir", str(out),
           *ARGS, *extra]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _assert_close(a_dir: Path, b_dir: Path, atol: float) -> None:
    a, b = load_file(a_dir / ADAPTER), load_file(b_dir / ADAPTER)
    assert set(a) == set(b) and a
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), (key, float((a[key] - b[key]).abs().max()))


class Runs:
    """The LoRA runs of this module, each launched once, when a test first asks for it."""

    def __init__(self, root: Path, base: Path) -> None:
        self.root, self.base = root, base
        self.data = write_jsonl(root / "d.jsonl", prompt_rows())
        self.done: dict[str, Path] = {}

    def get(self, kind: str) -> Path:
        if kind not in self.done:
            flags, processes = {"one": ((), 1), "ddp": ((), 2), "fsdp": (FSDP_FLAGS, 2)}[kind]
            _launch(self.base, self.data, self.root / kind, "--eval-data", str(self.data), "--eval-every", "2",
                    *flags, processes=processes)
            self.done[kind] = self.root / kind
        return self.done[kind]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, llama_dir) -> Runs:
    return Runs(tmp_path_factory.mktemp("fsdp_runs"), llama_dir)


def test_fsdp_adapter_equals_one_process(lora_runs):
    _assert_close(lora_runs.get("fsdp"), lora_runs.get("one"), atol=1e-5)
    logs = [json.loads((lora_runs.get(k) / "metrics.json").read_text()) for k in ("fsdp", "one")]
    assert [r["eval_loss"] for r in logs[0]] == pytest.approx([r["eval_loss"] for r in logs[1]], abs=1e-5)
    assert [r["loss"] for r in logs[0]] == pytest.approx([r["loss"] for r in logs[1]], abs=1e-5)
    saved = load_file(lora_runs.get("fsdp") / "checkpoints" / "step-000004" / "state.safetensors")
    assert any(k.startswith("optim/") for k in saved)  # whole AdamW moments, gathered from the shards
    ref = load_file(lora_runs.get("one") / "checkpoints" / "step-000004" / "state.safetensors")
    assert set(saved) == set(ref)  # one checkpoint format for 1 process, DDP and FSDP
    for key in saved:
        if saved[key].is_floating_point() and not key.startswith("rng/"):
            assert saved[key].shape == ref[key].shape
            assert torch.allclose(saved[key], ref[key], atol=1e-5, rtol=1e-4), key


@pytest.mark.slow
def test_fsdp_adapter_equals_ddp(lora_runs):
    _assert_close(lora_runs.get("fsdp"), lora_runs.get("ddp"), atol=1e-5)


@pytest.mark.slow
def test_fsdp_resume_from_its_checkpoint_is_exact(lora_runs, tmp_path):
    run = lora_runs.get("fsdp")
    kept = tmp_path / "kept"
    shutil.copytree(run, kept)  # the uninterrupted run's files, to compare with
    shutil.rmtree(run / "checkpoints" / "step-000004")  # as if it had stopped after step 2
    shutil.rmtree(run / "adapter")
    _launch(lora_runs.base, lora_runs.data, run, "--eval-data", str(lora_runs.data), "--eval-every", "2", *FSDP_FLAGS,
            "--resume", processes=2)
    a, b = load_file(kept / ADAPTER), load_file(run / ADAPTER)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_fsdp_lora_xs_equals_one_process(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    _launch(llama_dir, data, tmp_path / "one", "--method", "lora_xs")
    _launch(llama_dir, data, tmp_path / "fsdp", "--method", "lora_xs", "--fsdp", processes=2)
    _assert_close(tmp_path / "fsdp", tmp_path / "one", atol=1e-5)


def test_fsdp_refusals_say_why(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    with pytest.raises(TrainConfigError, match="torchrun"):
        train(run_config(llama_dir, data, tmp_path / "a", fsdp=True))
    with pytest.raises(TrainConfigError, match="fsdp_pre_all_gather"):
        from lorakit.train.setup import refuse_unsupported

        refuse_unsupported(run_config(llama_dir, data, tmp_path / "b", fsdp=True, quantize="nf4"), world=2)
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_qlora_over_processes_runs_as_ddp(tmp_path, llama_dir):
    """The multi-process QLoRA path that --fsdp refuses: DDP over a 4-bit base equals one process."""
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    _launch(llama_dir, data, tmp_path / "one", "--quantize", "nf4")
    _launch(llama_dir, data, tmp_path / "ddp", "--quantize", "nf4", processes=2)
    _assert_close(tmp_path / "ddp", tmp_path / "one", atol=1e-5)
