"""Fault injection: saves killed at every file-system call, a full disk, a read-only disk.

Crash points run in one child process (tests/io/crash_child.py) that forks a save per point and kills
it there, so the whole sweep costs one interpreter start. The disk faults use a 2 MB tmpfs mounted for
the test (root only; skipped, with the reason, where mounting is not allowed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import lorakit
import lorakit.train.checkpoint as ckpt
from lorakit.config import LoraConfig
from lorakit.errors import WriteError
from lorakit.io import load_adapter, save_adapter
from lorakit.io.atomic import atomic_write_json, is_temp_name, sweep_stale
from lorakit.cli.train import main as train_main
from tests.conftest import tiny_llama
from tests.train.conftest import llama_dir, prompt_rows, write_jsonl  # noqa: F401 - llama_dir is a fixture

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ["save_adapter, rename-exchange", "save_adapter, two renames", "trainer adapter, rename-exchange",
             "trainer adapter, two renames", "checkpoint re-save, rename-exchange", "checkpoint re-save, two renames",
             "first run_config.json"]


@pytest.fixture(scope="module")
def crash_results(tmp_path_factory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("crashes")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "tests.io.crash_child", str(work)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {r["scenario"]: r for r in results}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_save_killed_at_any_call_leaves_the_old_or_the_new_version(crash_results, scenario):
    result = crash_results[scenario]
    outcomes = result["outcomes"]
    assert result["points"] >= 5, result  # the injection really reached the save's calls
    assert Counter(outcomes).keys() <= {"old", "new"}, [o for o in outcomes if o not in ("old", "new")][:3]
    assert outcomes[0] == "old" and outcomes[-1] == "new"
    first_new = outcomes.index("new")
    assert set(outcomes[first_new:]) == {"new"}, outcomes  # once visible, the new version stays


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_next_write_sweeps_what_a_killed_save_left(crash_results, scenario):
    result = crash_results[scenario]
    assert any(result["leftovers"]), result  # kills did leave temporaries ...
    assert all(a["left"] == [] for a in result["after_sweep"]), result["after_sweep"]  # ... the next write removed them
    assert {a["reads"] for a in result["after_sweep"]} == {"new"}


def test_sweep_spares_fresh_temporaries_and_foreign_files(tmp_path):
    """Only lorakit's own names, and only once they are old: a save in progress elsewhere keeps its files."""
    fresh = tmp_path / ".adapter.tmp-0123abcd"
    fresh.mkdir()
    stale = tmp_path / ".adapter.tmp-89abcdef"
    stale.mkdir()
    os.utime(stale, (1, 1))
    for name in (".adapter.tmp-notours", "adapter.tmp-01234567", ".hidden"):
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (1, 1))
    assert sweep_stale(tmp_path) == [stale]
    assert sorted(os.listdir(tmp_path)) == sorted([fresh.name, ".adapter.tmp-notours", "adapter.tmp-01234567",
                                                    ".hidden"])


def test_a_half_swapped_adapter_is_read_and_then_put_back(tmp_path):
    """The state a crash between the two renames leaves (without rename-exchange): the adapter's own name
    is absent, the complete old copy sits beside it. Readers use it; the next write restores it."""
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(r=2, target_modules=("q_proj",)), "a")
    save_adapter(model, "a", tmp_path / "adapter")
    os.rename(tmp_path / "adapter", tmp_path / ".adapter.old-0123abcd")
    assert load_adapter(tiny_llama(), tmp_path / "adapter", "a") == "a"
    assert lorakit.io.read_adapter_info(tmp_path / "adapter")["method"] == "lora"
    os.utime(tmp_path / ".adapter.old-0123abcd", (1, 1))
    atomic_write_json(tmp_path / "other.json", {})  # any write in the directory
    assert sorted(os.listdir(tmp_path)) == ["adapter", "other.json"]


# -- a full disk, a read-only disk ---------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 2 MB tmpfs at tmp_path/disk (unmounted afterwards)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}); needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def _fill(disk: Path, leave: int = 0) -> Path:
    """Fill `disk` until at most `leave` bytes are free; returns the filler file."""
    filler = disk / "filler"
    with open(filler, "ab") as handle:
        try:
            while os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize > leave:
                handle.write(b"\0" * 4096)
                handle.flush()
        except OSError:
            pass
    return filler


def _lora(seed: int, r: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(r=r), "a")
    return model


def _listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_a_full_disk_fails_an_adapter_save_by_name_and_keeps_the_old_one(small_disk):
    save_adapter(_lora(1), "a", small_disk / "adapter")
    old = (small_disk / "adapter" / "adapter_model.safetensors").read_bytes()
    _fill(small_disk)
    with pytest.raises(WriteError, match=f"cannot write {small_disk / 'adapter'}: No space left on device"):
        save_adapter(_lora(2, r=8), "a", small_disk / "adapter")
    assert (small_disk / "adapter" / "adapter_model.safetensors").read_bytes() == old
    assert not [n for n in _listing(small_disk) if is_temp_name(n)]  # its own temporaries are gone
    assert load_adapter(tiny_llama(), small_disk / "adapter", "a") == "a"


def test_a_full_disk_fails_a_checkpoint_and_a_file_by_name(small_disk):
    params = {"w": torch.ones(20_000)}
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = {"tokens": 0, "elapsed_s": 0.0, "log": []}
    ckpt.save_checkpoint(small_disk / "checkpoints", 1, params, optimizer, scheduler, state)
    _fill(small_disk, leave=40_000)
    with pytest.raises(WriteError, match="step-000002: No space left on device"):
        ckpt.save_checkpoint(small_disk / "checkpoints", 2, params, optimizer, scheduler, state)
    assert [p.name for p in ckpt.list_checkpoints(small_disk / "checkpoints")] == ["step-000001"]
    assert not [n for n in _listing(small_disk / "checkpoints") if is_temp_name(n)]
    _fill(small_disk)
    with pytest.raises(WriteError, match="metrics.json: No space left on device"):
        atomic_write_json(small_disk / "metrics.json", {"rows": list(range(10_000))})
    assert "metrics.json" not in _listing(small_disk) and not [n for n in _listing(small_disk) if is_temp_name(n)]


def test_a_read_only_disk_fails_a_save_by_name(small_disk):
    save_adapter(_lora(1), "a", small_disk / "adapter")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(WriteError, match="adapter: Read-only file system"):
        save_adapter(_lora(2), "a", small_disk / "adapter")
    assert load_adapter(tiny_llama(), small_disk / "adapter", "a") == "a"


def test_lorakit_train_on_a_disk_that_fills_exits_2_and_resumes(small_disk, tmp_path, llama_dir, capsys,
                                                                 monkeypatch):
    """The disk fills after the second checkpoint: one line naming the checkpoint, exit 2, the second
    checkpoint intact; once there is room, --resume continues from it to the end."""
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    out = small_disk / "run"
    argv = ["train", "--base", str(llama_dir), "--data", str(data), "--output-dir", str(out), "--steps", "4",
            "--save-every", "1", "--rank", "2", "--batch-size", "2", "--no-progress"]
    real, saves = ckpt.save_checkpoint, {"n": 0}

    def fill_after_two(*args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 3:
            _fill(small_disk)
        return real(*args, **kwargs)
    monkeypatch.setattr(ckpt, "save_checkpoint", fill_after_two)
    capsys.readouterr()
    assert train_main(argv) == 2
    err = capsys.readouterr().err  # (transformers' own "Loading weights" progress lines come first)
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("lorakit: error: cannot write") and "step-000003: No space left on device" in errors[0]
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-000001", "step-000002"]
    monkeypatch.undo()
    (small_disk / "filler").unlink()
    assert train_main(argv + ["--resume"]) == 0
    assert "resuming from" in capsys.readouterr().err
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not [n for n in _listing(out) if is_temp_name(n)]
