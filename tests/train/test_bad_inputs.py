"""Bad input fails early with a specific error that names the file and line (or is skipped and counted)."""

from __future__ import annotations

import math

import pytest
import torch

import lorakit.train.trainer as trainer
from lorakit.train import (DataFormatError, EmptyDatasetError, LabelMismatchError, NonFiniteLossError, TrainConfig,
                           TrainConfigError, train)
from lorakit.train.checkpoint import list_checkpoints, read_checkpoint
from lorakit.train.data import read_records
from tests.train.conftest import class_rows, prompt_rows, run_config, write_jsonl

BAD = ['{"prompt": "1+1=", "completion": "2"}', '{"prompt": "2+2=", "completion": "4"', '[1, 2]',
       '{"prompt": "3+3="}', '{"text": "a text line in a prompt file"}', '{"prompt": 5, "completion": "5"}',
       '{"prompt": "4+4=", "completion": "8"}']


def test_malformed_line_names_file_and_line(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", BAD)
    with pytest.raises(DataFormatError, match=r"d\.jsonl:2: .*--on-bad-line skip"):
        train(run_config(llama_dir, data, tmp_path / "run", steps=2))
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_skip_bad_lines_reports_each(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", BAD)
    records, fmt, skipped = read_records(data, "skip")
    assert fmt == "prompt_completion" and len(records) == 2
    assert [s.split(": ")[0].rsplit(":", 1)[1] for s in skipped] == ["2", "3", "4", "5", "6"]
    assert "fit no format" in skipped[2] and "a text record in a prompt_completion file" in skipped[3]
    result = train(run_config(llama_dir, data, tmp_path / "run", steps=2, on_bad_line="skip", batch_size=2))
    assert len(result.skipped) == 5


@pytest.mark.parametrize("content", ["", "\n\n", '{"nothing": 1}\n'])
def test_empty_dataset(content, tmp_path, llama_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    with pytest.raises(EmptyDatasetError, match="no usable example"):
        train(run_config(llama_dir, data, tmp_path / "run", steps=2, on_bad_line="skip"))


def test_missing_data_file(tmp_path, llama_dir):
    with pytest.raises(EmptyDatasetError, match="cannot read"):
        train(run_config(llama_dir, tmp_path / "absent.jsonl", tmp_path / "run", steps=2))


def test_labels_that_do_not_match_the_head(tmp_path, bert_dir):
    data = write_jsonl(tmp_path / "d.jsonl", class_rows())
    with pytest.raises(LabelMismatchError, match=r"d\.jsonl:3: label 'neutral' is not one of the head's 2"):
        train(run_config(bert_dir, data, tmp_path / "a", steps=2, labels=("pos", "neg")))
    ev = write_jsonl(tmp_path / "e.jsonl", class_rows(3) + [{"text": "odd", "label": "sarcastic"}])
    with pytest.raises(LabelMismatchError, match=r"e\.jsonl:4: label 'sarcastic'"):
        train(run_config(bert_dir, data, tmp_path / "b", steps=2, eval_data=str(ev)))
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "x", "label": "only"}] * 4)
    with pytest.raises(LabelMismatchError, match="at least 2 labels"):
        train(run_config(bert_dir, one, tmp_path / "c", steps=2))


def test_eval_file_of_another_kind_is_refused(tmp_path, bert_dir):
    data = write_jsonl(tmp_path / "d.jsonl", class_rows())
    ev = write_jsonl(tmp_path / "e.jsonl", prompt_rows(3))
    with pytest.raises(DataFormatError, match="prompt_completion records but the run trains on classification"):
        train(run_config(bert_dir, data, tmp_path / "run", steps=2, eval_data=str(ev)))


def test_long_sequences_are_truncated_and_counted(tmp_path, llama_dir, capfd):
    rows = prompt_rows(8) + [{"prompt": "1+" * 40 + "1=", "completion": "41"}] * 3
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    result = train(run_config(llama_dir, data, tmp_path / "run", steps=2, max_length=16))
    assert result.truncated == 3
    assert "3 of 11 samples longer than 16 tokens were truncated" in capfd.readouterr().err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    real, calls = trainer.loss_sum, {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        nll, n = real(model, batch)
        return (nll * math.nan if calls["n"] == 6 else nll), n
    monkeypatch.setattr(trainer, "loss_sum", poisoned)
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 6") as info:
        train(run_config(llama_dir, data, tmp_path / "run", steps=10, save_every=3))
    assert info.value.step == 6 and info.value.last_checkpoint.endswith("step-000005")
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-000003", "step-000005"]
    tensors, meta = read_checkpoint(tmp_path / "run" / "checkpoints" / "step-000005")
    assert meta["step"] == 5 and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    monkeypatch.undo()
    resumed = train(run_config(llama_dir, data, tmp_path / "run", steps=10, save_every=3), resume=True)
    assert resumed.steps == 10 and len(resumed.losses) == 5


@pytest.mark.parametrize("bad", [{"steps": 0}, {"batch_size": -1}, {"schedule": "step"}, {"method": "dora"},
                                 {"on_bad_line": "ignore"}, {"adapter": {"r": 0}}, {"adapter": {"rank": 4}}])
def test_bad_settings(bad, tmp_path):
    settings = dict(base="b", data="d", output_dir=str(tmp_path))
    settings.update(bad)
    with pytest.raises(TrainConfigError):
        TrainConfig(**settings)
