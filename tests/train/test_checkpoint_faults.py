"""Broken checkpoint files: `lorakit train --resume` and read_checkpoint name the file at once, the same
words as load_adapter uses (one guarded reader, lorakit.io.safe_open); a crash's leftovers never block a run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorakit.train.checkpoint import list_checkpoints, read_checkpoint
from lorakit.cli.train import main
from lorakit.train.errors import CheckpointError
from tests.broken_files import answer_without_blocking, make_dev_zero, make_fifo, make_symlink_loop
from tests.train.conftest import prompt_rows, write_jsonl





def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _longer(path: Path) -> None:
    os.truncate(path, 2 << 30)  # sparse


BREAKERS = [(make_fifo, "FIFO"), (make_dev_zero, "character device"), (make_symlink_loop, "symbolic link loop"),
            (_directory, "is a directory"), (_longer, "longer than its tensors")]


@pytest.fixture(scope="module")
def run(llama_dir, tmp_path_factory) -> tuple[list[str], Path]:
    """argv of a finished 2-step run (a checkpoint per step) and its output directory."""
    root = tmp_path_factory.mktemp("run")
    data = write_jsonl(root / "d.jsonl", prompt_rows())
    argv = ["train", "--base", str(llama_dir), "--data", str(data), "--output-dir", str(root / "out"),
            "--steps", "2", "--save-every", "1", "--rank", "2", "--batch-size", "2", "--no-progress"]
    assert main(argv) == 0
    return argv, root / "out"


@pytest.mark.parametrize("breaker, phrase", BREAKERS, ids=[b.__name__.strip("_") for b, _ in BREAKERS])
@pytest.mark.parametrize("file", ["state.safetensors", "state.json"])
def test_resume_names_a_broken_checkpoint_file(run, capsys, breaker, phrase, file):
    if breaker is _longer and file == "state.json":
        phrase = "more than the"  # a JSON file has no header to compare with: its size bound speaks
    argv, out = run
    latest = list_checkpoints(out / "checkpoints")[-1]
    target = latest / file
    saved = target.read_bytes()
    breaker(target)
    try:
        err = answer_without_blocking(lambda: read_checkpoint(latest))
        assert isinstance(err, CheckpointError) and phrase in str(err) and str(target) in str(err), repr(err)
        capsys.readouterr()
        assert answer_without_blocking(lambda: main(argv + ["--resume"])) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
        assert len(lines) == 1 and phrase in lines[0] and str(target) in lines[0], lines
    finally:
        if target.is_dir() and not target.is_symlink():
            target.rmdir()
        else:
            target.unlink()
        target.write_bytes(saved)


def test_a_run_left_by_a_crash_in_its_first_run_config_write_starts_over(llama_dir, tmp_path, capsys):
    """Issue 23: the half-written `.run_config.json.tmp-…` made --resume-if-present refuse the directory."""
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    out = tmp_path / "out"
    out.mkdir()
    leftover = out / ".run_config.json.tmp-0123abcd"
    leftover.write_text('{"base": ')  # the crash came mid-write
    argv = ["train", "--base", str(llama_dir), "--data", str(data), "--output-dir", str(out), "--steps", "1",
            "--rank", "2", "--batch-size", "2", "--no-progress", "--resume-if-present"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "run_config.json").is_file() and (out / "adapter").is_dir()
