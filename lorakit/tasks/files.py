"""Built-in tasks as JSONL files (`lorakit data NAME --out DIR`): the row builders by name and the writer."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from lorakit.io.atomic import atomic_write_bytes
from lorakit.tasks.arithmetic import arithmetic_rows
from lorakit.tasks.docstrings import docstring_rows
from lorakit.tasks.topics import topics_rows

# name -> () -> (train rows, test rows), each row a record of one lorakit.train.data format
ROWS: dict[str, Callable[[], tuple[list[dict], list[dict]]]] = {
    "arithmetic": arithmetic_rows, "docstrings": docstring_rows, "topics": topics_rows}


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write one JSON object per line (UTF-8, non-ASCII kept), atomically (an interrupted write leaves no
    truncated file for a later run to read); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    return path


def write_task(name: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Write <out_dir>/train.jsonl and test.jsonl for built-in task `name`; returns their paths."""
    if name not in ROWS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(ROWS)}")
    train, test = ROWS[name]()
    out = Path(out_dir)
    return write_jsonl(train, out / "train.jsonl"), write_jsonl(test, out / "test.jsonl")
