"""Data from the files people have (JSONL, JSON, CSV, parquet, Arrow, save_to_disk) and from a
datasets.Dataset: the same records as JSONL, and bad input named by file and row, exit 2, no traceback."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lorakit.cli.main import main
from lorakit.train import train
from lorakit.train.data import read_records
from lorakit.train.errors import DataDependencyError, DataFormatError
from tests.train.conftest import chat_rows, prompt_rows, run_config, write_jsonl

datasets = pytest.importorskip("datasets")

MULTI = [{"messages": [{"role": "user", "content": "one?"}, {"role": "assistant", "content": "uno"},
                       {"role": "user", "content": "two?"},
                       {"role": "assistant", "content": "dos"}]}] + chat_rows(3)


def write(kind: str, rows: list[dict], tmp_path):
    """`rows` as a file (or directory) of `kind`, written the way `datasets` writes it."""
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"d.{kind}"
    if kind == "jsonl":
        return write_jsonl(path, rows)
    if kind == "json":  # a JSON array, as people hand-write or export
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        ds.to_csv(str(path), index=False)
    elif kind == "parquet":
        ds.to_parquet(str(path))
    elif kind == "arrow":
        ds.save_to_disk(str(tmp_path / "disk"))
        return next((tmp_path / "disk").glob("*.arrow")).rename(path)
    elif kind == "disk":
        ds.save_to_disk(str(path))
    elif kind == "dict":
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "arrow", "disk", "dict"])
def test_every_source_gives_the_jsonl_records(kind, tmp_path):
    records, fmt, skipped = read_records(write(kind, MULTI, tmp_path))
    assert fmt == "chat" and not skipped and [r.data for r in records] == MULTI  # Arrow's None fields dropped later
    assert records[1].where.endswith((":2", ": row 1"))


def test_csv_and_a_dataset_object_give_prompt_completion_records(tmp_path):
    rows = prompt_rows(5)
    csv_records, fmt, _ = read_records(write("csv", rows, tmp_path))
    assert fmt == "prompt_completion" and [r.data for r in csv_records] == rows
    ds_records, _, _ = read_records(datasets.Dataset.from_list(rows))
    assert [r.data for r in ds_records] == rows and ds_records[2].where == "dataset: row 2"


def test_a_parquet_of_multi_turn_chats_trains_through_the_command_line(tmp_path, llama_dir, capsys):
    data = write("parquet", MULTI * 4, tmp_path)
    code = main(["train", "--base", str(llama_dir), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                 "--steps", "2", "--batch-size", "4", "--rank", "2", "--no-progress"])
    assert code == 0 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["data"] == str(data)


def test_the_python_api_trains_on_a_dataset_and_resume_checks_its_content(tmp_path, llama_dir):
    ds = datasets.Dataset.from_list(MULTI * 4)
    config = run_config(llama_dir, tmp_path, tmp_path / "run", steps=3, save_every=1)
    config = type(config)(**{**config.to_dict(), "data": ds, "eval_data": ds, "last_turn_only": True})
    result = train(config)
    assert result.steps == 3 and result.eval_loss is not None
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["data"].startswith("datasets.Dataset(") and "16 rows" in saved["data"]
    other = type(config)(**{**config.to_dict(), "data": ds.select(range(8)), "eval_data": None, "steps": 4})
    with pytest.raises(Exception, match="differ"):
        train(other, resume=True)


def cli_error(tmp_path, llama_dir, data, capsys) -> str:
    capsys.readouterr()  # not what writing the file printed
    code = main(["train", "--base", str(llama_dir), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                 "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lorakit: error:") and len(err.strip().splitlines()) == 1, err
    return err


def test_a_bad_row_of_a_parquet_is_named_by_file_and_row(tmp_path, llama_dir, capsys):
    bad = {"messages": [{"role": "user", "content": [{"type": "image_url", "text": None}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}]}
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]}] * 3 + [bad]
    data = write("parquet", rows, tmp_path)
    err = cli_error(tmp_path, llama_dir, data, capsys)
    assert f"{data}: row 3: messages[0].content[0] is a 'image_url' part" in err


@pytest.mark.parametrize("name, content, says", [
    ("d.parquet", b"PAR1 not really", "cannot be read as parquet"),
    ("d.jsonl", b"PAR1\x15\x04\x15\xe0\x9f\xff\x00binary", "d.jsonl:1: not UTF-8 text"),  # was a traceback
    ("d.arrow", b"\x00\x01", "cannot be read as arrow"),
    ("d.txt", b"hello", "unknown data file type '.txt'"),
])
def test_files_that_are_not_what_they_say_exit_2_in_one_line(name, content, says, tmp_path, llama_dir, capsys):
    (tmp_path / name).write_bytes(content)
    assert says in cli_error(tmp_path, llama_dir, tmp_path / name, capsys)


def test_a_real_parquet_given_as_jsonl_names_its_first_line(tmp_path, llama_dir, capsys):
    data = write("parquet", prompt_rows(3), tmp_path).rename(tmp_path / "d.jsonl")
    assert f"{data}:1: not" in cli_error(tmp_path, llama_dir, data, capsys)


def test_a_directory_that_is_no_dataset_and_a_dict_without_train(tmp_path, llama_dir, capsys):
    (tmp_path / "empty").mkdir()
    assert "not one datasets.save_to_disk wrote" in cli_error(tmp_path, llama_dir, tmp_path / "empty", capsys)
    datasets.DatasetDict({"test": datasets.Dataset.from_list(prompt_rows(2))}).save_to_disk(str(tmp_path / "dd"))
    assert "without a 'train' split (it has ['test'])" in cli_error(tmp_path, llama_dir, tmp_path / "dd", capsys)


def test_without_datasets_jsonl_still_reads_and_parquet_says_what_to_install(tmp_path, monkeypatch):
    parquet = write("parquet", prompt_rows(2), tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    with pytest.raises(DataDependencyError, match=r"d.parquet: reading .parquet needs the `datasets` package"):
        read_records(parquet)
    assert len(read_records(write_jsonl(tmp_path / "d.jsonl", prompt_rows(2)))[0]) == 2


def test_tool_calls_survive_arrow_s_shared_schema(tmp_path):
    """Arrow gives every message every field (tool_calls=None on plain ones): the reader drops them."""
    from lorakit.train.chat_format import conversation

    rows = [{"messages": [{"role": "user", "content": "rain?"},
                          {"role": "assistant", "content": "", "tool_calls": [
                              {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
                          {"role": "tool", "content": "dry"}, {"role": "assistant", "content": "no"}]}]
    records, _, _ = read_records(write("parquet", rows, tmp_path))
    assert records[0].data["messages"][0]["tool_calls"] is None  # what Arrow hands over
    messages = conversation(records[0].data).messages
    assert "tool_calls" not in messages[0] and messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}


def test_a_json_file_that_is_not_json(tmp_path):
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(DataFormatError, match="d.json: cannot be read as json"):
        read_records(tmp_path / "d.json")
