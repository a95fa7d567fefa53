"""Training data formats, read from JSONL, parquet, Arrow, CSV, JSON, save_to_disk or a datasets.Dataset.

    {"text": ...}                                  language modelling: loss on every token
    {"prompt": ..., "completion": ...}             loss on the completion (+ eos) only
    {"messages": [{"role", "content"}, ...]}       chat template; loss on every assistant turn (or the last:
                                                   last_turn_only). Also content parts, tool calls, ShareGPT
                                                   and TRL's conversational prompt/completion (chat_format)
    {"text": ..., "label": ...}                    sequence classification (encoder + trained head)
    {"text": ..., "text_pair": ..., "label": ...}  sentence-pair classification

Where rows come from is data_sources' concern. The format is set by the first valid row; a later row of
another shape is a bad row. Bad rows raise DataFormatError naming file:line (or file: row N), or are
skipped and counted (on_bad_line="skip").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorakit.train.chat_format import conversation, is_chat, segments
from lorakit.train.data_sources import describe, read_rows
from lorakit.train.errors import DataFormatError, EmptyDatasetError, LabelMismatchError

IGNORE = -100  # label of positions the loss skips
FORMATS = ("text", "prompt_completion", "chat", "classification")
GENERATIVE = ("text", "prompt_completion", "chat")


@dataclass(frozen=True)
class Record:
    """One parsed row and where it came from."""

    data: dict[str, Any]
    where: str  # "file:line" or "file: row N"


@dataclass(frozen=True)
class Sample:
    """One tokenized example. Causal LM: `labels` per token (IGNORE where no loss). Classifier: `label`."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...] | None = None
    label: int | None = None
    token_type_ids: tuple[int, ...] | None = None
    prompt_len: int = 0  # tokens before the answer (prompt/chat), for exact-match generation


@dataclass(frozen=True)
class Dataset:
    samples: tuple[Sample, ...]
    format: str
    path: str
    truncated: int  # samples cut to max_length
    skipped: tuple[str, ...]  # "file:line: why" of every skipped line
    labels: tuple[str, ...] | None = None  # classification label names, in head order
    records: tuple[Record, ...] = ()

    def __len__(self) -> int:
        return len(self.samples)


def detect_format(data: dict[str, Any]) -> str | None:
    keys = set(data)
    if is_chat(data):
        return "chat"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "text"
    return None


def _check(fmt: str, data: dict[str, Any]) -> None:
    """Raise ValueError describing what is wrong with a record of format `fmt`."""
    def need_str(key: str) -> None:
        if not isinstance(data.get(key), str):
            raise ValueError(f"{key!r} must be a string, got {type(data.get(key)).__name__}")

    if fmt == "text":
        need_str("text")
    elif fmt == "prompt_completion":
        need_str("prompt"), need_str("completion")
        if not data["completion"]:
            raise ValueError("'completion' is empty: nothing to train on")
    elif fmt == "chat":
        conversation(data)
    else:
        need_str("text")
        if "text_pair" in data:
            need_str("text_pair")
        if not isinstance(data.get("label"), (str, int)) or isinstance(data.get("label"), bool):
            raise ValueError(f"'label' must be a string or an integer, got {data.get('label')!r}")


def read_records(source: Any, on_bad_line: str = "stop") -> tuple[list[Record], str, list[str]]:
    """(records, format, skipped) of a data file, save_to_disk directory or datasets.Dataset."""
    records: list[Record] = []
    skipped: list[str] = []
    fmt: str | None = None
    for row in read_rows(source):
        try:
            if row.error is not None:
                raise ValueError(row.error)
            data = row.data
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            row_fmt = detect_format(data)
            if row_fmt is None:
                raise ValueError(f"keys {sorted(data)} fit no format (text | prompt+completion | messages | "
                                 "conversations | text+label)")
            if fmt is not None and row_fmt != fmt:
                raise ValueError(f"a {row_fmt} record in a {fmt} file (set by its first record)")
            _check(row_fmt, data)
        except ValueError as exc:
            message = f"{row.where}: {exc}"
            if on_bad_line == "skip":
                skipped.append(message)
                continue
            raise DataFormatError(f"{message} (use on_bad_line='skip' / --on-bad-line skip to skip it)") from None
        fmt = fmt or row_fmt
        records.append(Record(data, row.where))
    if not records:
        extra = f"; {len(skipped)} bad row(s) skipped, first: {skipped[0]}" if skipped else ""
        raise EmptyDatasetError(f"{describe(source)} holds no usable example{extra}")
    return records, fmt, skipped


def label_names(records: Sequence[Record]) -> tuple[str, ...]:
    """Sorted label names found in the data (numerically when all are integers)."""
    names = {str(r.data["label"]) for r in records}
    numeric = all(n.lstrip("-").isdigit() for n in names)
    return tuple(sorted(names, key=int if numeric else str))


def load_dataset(source: Any, tokenizer: Any, *, max_length: int, on_bad_line: str = "stop",
                 labels: Sequence[str] | None = None, expect_format: str | None = None,
                 last_turn_only: bool = False) -> Dataset:
    """Read and tokenize a data file or datasets.Dataset. `labels` fixes the classifier's label order (else
    from the data); `last_turn_only` takes a chat's loss on its last assistant turn only."""
    path = describe(source)
    records, fmt, skipped = read_records(source, on_bad_line)
    if expect_format is not None and not _compatible(fmt, expect_format):
        raise DataFormatError(f"{path}: holds {fmt} records but the run trains on {expect_format} records")
    names: tuple[str, ...] | None = None
    if fmt == "classification":
        found = label_names(records)
        names = tuple(labels) if labels is not None else found
        if len(names) < 2:
            raise LabelMismatchError(f"{path}: classification needs at least 2 labels, found {list(found)}")
        unknown = [r for r in records if str(r.data["label"]) not in names]
        if unknown:
            raise LabelMismatchError(f"{unknown[0].where}: label {unknown[0].data['label']!r} is not one of the "
                                     f"head's {len(names)} labels {list(names)}")
    samples: list[Sample] = []
    truncated = 0
    for record in records:
        try:
            sample, cut = encode(record.data, fmt, tokenizer, max_length, names, last_turn_only=last_turn_only)
        except ValueError as exc:
            if on_bad_line == "skip":
                skipped.append(f"{record.where}: {exc}")
                continue
            raise DataFormatError(f"{record.where}: {exc}") from None
        samples.append(sample)
        truncated += cut
    if not samples:
        raise EmptyDatasetError(f"{path} holds no usable example ({len(skipped)} skipped)")
    kept = tuple(r for r in records if not any(s.startswith(r.where + ":") for s in skipped))
    return Dataset(tuple(samples), fmt, path, truncated, tuple(skipped), names, kept)


def _compatible(found: str, expected: str) -> bool:
    return found == expected or (found in GENERATIVE and expected in GENERATIVE)


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode(data: dict[str, Any], fmt: str, tokenizer: Any, max_length: int,
           names: Sequence[str] | None = None, *, last_turn_only: bool = False) -> tuple[Sample, bool]:
    """(sample, whether it was truncated) for one record."""
    if fmt == "classification":
        enc = tokenizer(data["text"], data.get("text_pair"), truncation=False)
        ids = list(enc["input_ids"])
        cut = len(ids) > max_length
        if cut:
            enc = tokenizer(data["text"], data.get("text_pair"), truncation=True, max_length=max_length)
            ids = list(enc["input_ids"])
        types = tuple(enc["token_type_ids"]) if "token_type_ids" in enc else None
        return Sample(tuple(ids), label=list(names).index(str(data["label"])), token_type_ids=types), cut
    eos = tokenizer.eos_token_id
    if fmt == "text":
        ids = _ids(tokenizer, data["text"], True) + ([eos] if eos is not None else [])
        cut = len(ids) > max_length
        ids = ids[:max_length]
        if len(ids) < 2:
            raise ValueError("text has fewer than 2 tokens: nothing to predict")
        return Sample(tuple(ids), labels=tuple(ids)), cut
    prompt, answer = _split(data, fmt, tokenizer, last_turn_only)  # prompt: (ids, labels); answer: ids
    cut = len(prompt[0]) + len(answer) > max_length
    if cut:  # keep the answer: drop the prompt's oldest tokens first, then the answer's tail
        answer = answer[: max_length - 1]
        keep = max_length - len(answer)
        prompt = (prompt[0][len(prompt[0]) - keep:], prompt[1][len(prompt[1]) - keep:])
    ids = prompt[0] + answer
    return Sample(tuple(ids), labels=tuple(prompt[1] + answer), prompt_len=len(prompt[0])), cut


def _split(data: dict[str, Any], fmt: str, tokenizer: Any,
           last_turn_only: bool) -> tuple[tuple[list[int], list[int]], list[int]]:
    """((ids, labels) before the last answer, ids of the last answer). Before it, earlier assistant turns of
    a chat carry their own ids as labels; everything else is IGNORE."""
    eos = tokenizer.eos_token_id
    if fmt == "prompt_completion":
        answer = _ids(tokenizer, data["completion"], False) + ([eos] if eos is not None else [])
        prompt = _ids(tokenizer, data["prompt"], True)
        return (prompt, [IGNORE] * len(prompt)), answer
    pieces = segments(tokenizer, conversation(data), last_turn_only)
    last = max(i for i, (_, trained) in enumerate(pieces) if trained)
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces[:last]:
        piece = _ids(tokenizer, text, False)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    answer = _ids(tokenizer, pieces[last][0], False)
    return (ids, labels), answer
