"""Checkpoints resume exactly: an interrupted-then-resumed run ends with the uninterrupted run's adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit.train.trainer as trainer
from lorakit.train import RunExistsError, TrainConfigError, train
from lorakit.train.checkpoint import list_checkpoints
from tests.train.conftest import class_rows, prompt_rows, run_config, write_jsonl


def _interrupt_at(monkeypatch, call: int) -> None:
    """Make the `call`-th loss computation raise KeyboardInterrupt, like a killed job."""
    real, calls = trainer.loss_sum, {"n": 0}

    def flaky(model, batch):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(model, batch)
    monkeypatch.setattr(trainer, "loss_sum", flaky)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_resume_reproduces_uninterrupted_run(arch, tmp_path, monkeypatch, llama_dir, bert_dir):
    rows = prompt_rows() if arch == "llama" else class_rows()
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    base = llama_dir if arch == "llama" else bert_dir
    # dropout on the adapter input: the resumed run must also restore the RNG to match
    kw = dict(steps=10, save_every=4, schedule="cosine", warmup_steps=3, adapter={"r": 4, "lora_dropout": 0.1},
              weight_decay=0.01)
    full = train(run_config(base, data, tmp_path / "full", **kw))

    _interrupt_at(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(base, data, tmp_path / "cut", **kw))
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step-000004"]
    monkeypatch.undo()
    with pytest.raises(RunExistsError):
        train(run_config(base, data, tmp_path / "cut", **kw))
    resumed = train(run_config(base, data, tmp_path / "cut", **kw), resume=True)
    assert resumed.resumed_from.endswith("step-000004") and len(resumed.losses) == 6

    for name in ["adapter_model.safetensors"] + (["head.safetensors"] if arch == "bert" else []):
        a = load_file(tmp_path / "full" / "adapter" / name)
        b = load_file(tmp_path / "cut" / "adapter" / name)
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key, (a[key] - b[key]).abs().max())
    assert resumed.losses == full.losses[4:]
    log_full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    log_cut = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert [r["loss"] for r in log_full] == [r["loss"] for r in log_cut]


def test_resume_refuses_changed_settings(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    train(run_config(llama_dir, data, tmp_path / "run", steps=3))
    with pytest.raises(TrainConfigError, match="lr"):
        train(run_config(llama_dir, data, tmp_path / "run", steps=3, lr=0.5), resume=True)


def test_output_dir_with_foreign_files_is_refused(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunExistsError, match="notes.txt"):
        train(run_config(llama_dir, data, tmp_path / "run", steps=2))
    with pytest.raises(RunExistsError, match="not a lorakit run"):
        train(run_config(llama_dir, data, tmp_path / "run", steps=2), resume=True)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_checkpoint_holds_no_pickle(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    train(run_config(llama_dir, data, tmp_path / "run", steps=2))
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step-000002").iterdir())
    assert files == ["state.json", "state.safetensors"]
    state = load_file(tmp_path / "run" / "checkpoints" / "step-000002" / "state.safetensors")
    assert any(k.startswith("optim/") for k in state) and "rng/torch" in state


def _cli_train(llama_dir, data, out, *extra):
    from lorakit.cli.train import main

    return main(["train", "--base", str(llama_dir), "--data", str(data), "--output-dir", str(out), "--steps", "3",
                 "--save-every", "2", "--rank", "4", "--no-progress", *extra])


@pytest.mark.parametrize("make_dir", [False, True])
def test_cli_resume_without_a_checkpoint_is_an_error(tmp_path, llama_dir, capsys, make_dir):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    if make_dir:
        (tmp_path / "run").mkdir()
    assert _cli_train(llama_dir, data, tmp_path / "run", "--resume") == 2
    err = capsys.readouterr().err
    assert f"no checkpoint in {tmp_path / 'run' / 'checkpoints'}" in err and "--resume-if-present" in err
    assert not (tmp_path / "run" / "adapter").exists()


def test_cli_resume_if_present_starts_fresh_then_resumes(tmp_path, llama_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    assert _cli_train(llama_dir, data, tmp_path / "run", "--resume-if-present") == 0
    assert "starting from step 0" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-000002", "step-000003"]
    assert _cli_train(llama_dir, data, tmp_path / "run", "--resume") == 0
    assert "step-000003 at step 3" in capsys.readouterr().err
