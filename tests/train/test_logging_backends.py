"""report_to: TensorBoard event files hold the CSV log's numbers, read back with tensorboard's own reader."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lorakit.train import TrainConfigError, train
from lorakit.train.logging_backends import TENSORBOARD_DIR
from tests.train.conftest import interrupt_at_call, prompt_rows, run_config, write_jsonl


def _scalars(directory) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_match_the_csv_log(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    run = train(run_config(llama_dir, data, tmp_path / "run", steps=6, eval_data=str(data), eval_every=3,
                           report_to=["tensorboard"]))
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    got = _scalars(tmp_path / "run" / TENSORBOARD_DIR)
    assert set(got) == {"train/loss", "train/lr", "train/tokens_per_s", "eval/loss"}
    assert [s for s, _ in got["train/loss"]] == [r["step"] for r in rows] == list(range(1, 7))
    assert [v for _, v in got["train/loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [v for _, v in got["train/lr"]] == pytest.approx([r["lr"] for r in rows], rel=1e-6)
    assert got["eval/loss"] == [(3, pytest.approx(rows[2]["eval_loss"], rel=1e-6)),
                                (6, pytest.approx(run.eval_loss, rel=1e-6))]
    assert (tmp_path / "run" / "metrics.csv").is_file() and (tmp_path / "run" / "loss.png").is_file()


def test_tensorboard_after_resume_holds_each_step_once(tmp_path, llama_dir, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    kw = dict(steps=6, save_every=2, report_to=["tensorboard"])
    interrupt_at_call(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):  # steps 1-3 logged, step 2 checkpointed
        train(run_config(llama_dir, data, tmp_path / "run", **kw))
    monkeypatch.undo()
    train(run_config(llama_dir, data, tmp_path / "run", **kw), resume=True)  # redoes step 3
    steps = [s for s, _ in _scalars(tmp_path / "run" / TENSORBOARD_DIR)["train/loss"]]
    assert steps == list(range(1, 7))


def test_unknown_or_missing_backend_is_refused(tmp_path, llama_dir):
    with pytest.raises(TrainConfigError, match="report_to"):
        run_config(llama_dir, tmp_path / "d.jsonl", tmp_path / "run", report_to=["comet"])


def test_wandb_offline_run_records_the_losses(tmp_path, llama_dir, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is lorakit's default
    monkeypatch.setenv("WANDB_SILENT", "true")
    started, summaries = [], []
    real_init = wandb.init

    def spy(**kwargs):
        run = real_init(**kwargs)
        real_finish = run.finish

        def finish(*a, **kw):
            summaries.append(dict(run.summary))  # W&B clears it once the run is finished
            return real_finish(*a, **kw)
        run.finish = finish
        started.append(run)
        return run
    monkeypatch.setattr(wandb, "init", spy)
    data = write_jsonl(tmp_path / "d.jsonl", prompt_rows())
    run = train(run_config(llama_dir, data, tmp_path / "run", steps=3, report_to=["wandb"]))
    assert len(started) == 1 and started[0].settings.mode == "offline"
    assert summaries[0]["train/loss"] == pytest.approx(run.losses[-1], rel=1e-6) and summaries[0]["_step"] == 3
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    assert wandb.run is None  # the run was finished
