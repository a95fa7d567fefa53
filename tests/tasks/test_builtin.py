"""The built-in real-text data sets are deterministic, disjoint, and load as training data."""

from __future__ import annotations

from lorakit.cli.train import main
from lorakit.train.data import read_records
from lorakit.tasks.docstrings import FAMILIES, docstring_rows
from lorakit.tasks.topics import topics_rows


def test_docstrings_deterministic_disjoint_and_all_labels():
    train, test = docstring_rows()
    assert (train, test) == docstring_rows()
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert {r["label"] for r in train} == {r["label"] for r in test} == set(FAMILIES)
    assert len(train) > 300 and len(test) > 50


def test_topics_split_by_topic():
    train, test = topics_rows()
    assert (train, test) == topics_rows()
    assert len(train) > 100 and len(test) > 10
    assert not {r["text"] for r in train} & {r["text"] for r in test}


def test_data_command_writes_readable_jsonl(tmp_path, capsys):
    assert main(["data", "docstrings", "--out", str(tmp_path)]) == 0
    records, fmt, skipped = read_records(tmp_path / "train.jsonl")
    assert fmt == "classification" and not skipped and len(records) > 300
    assert "test.jsonl" in capsys.readouterr().out


def test_data_command_writes_the_arithmetic_task_as_chat(tmp_path):
    from lorakit.tasks import arithmetic

    assert main(["data", "arithmetic", "--out", str(tmp_path)]) == 0
    records, fmt, _ = read_records(tmp_path / "test.jsonl")
    assert fmt == "chat" and len(records) == 100
    first = arithmetic.make_splits().test[0]
    assert [m["content"] for m in records[0].data["messages"]] == [arithmetic.SYSTEM_PROMPT, first.question,
                                                                   first.answer_text]
