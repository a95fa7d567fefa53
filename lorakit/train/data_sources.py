"""Where training rows come from, each row named so an error can point at it.

    file.jsonl                       read here, line by line, no `datasets` needed; rows are "file:LINE"
    file.json .csv .parquet .arrow   read through `datasets` (pip install 'lorakit[data]'); rows "file: row N"
    a save_to_disk directory         datasets.load_from_disk (of a DatasetDict, its "train" split)
    a datasets.Dataset               the Python API; rows are "dataset: row N"

Rows are counted from 0, as dataset[N] counts them; JSONL lines from 1, as editors do.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.train.errors import DataDependencyError, DataFormatError, EmptyDatasetError

# file suffix -> the `datasets` builder that reads it (.jsonl is read here)
BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}

JSONL = ".jsonl"
SPLIT = "train"  # the split taken from a DatasetDict directory


@dataclass(frozen=True)
class Row:
    """One row as read: its data (anything; the format checks it) or why it could not be read."""

    where: str  # "file:line" or "file: row N"
    data: Any = None
    error: str | None = None


def is_hf_dataset(source: Any) -> bool:
    """Whether `source` is a datasets.Dataset (checked without importing datasets)."""
    return type(source).__module__.startswith("datasets.") and hasattr(source, "column_names")


def describe(source: Any) -> str:
    """A label for logs and run.json: the path, or a Dataset's content fingerprint and size."""
    if is_hf_dataset(source):
        return f"datasets.Dataset({getattr(source, '_fingerprint', '?')}, {source.num_rows} rows)"
    return str(source)


def read_rows(source: Any) -> Iterator[Row]:
    """Every row of a JSONL file, another file `datasets` reads, a save_to_disk directory or a Dataset."""
    if is_hf_dataset(source):
        yield from _dataset_rows(source, "dataset")
        return
    path = Path(source)
    if path.is_dir():
        yield from _dataset_rows(_from_disk(path), str(path))
    elif path.suffix.lower() == JSONL:
        yield from _jsonl_rows(path)
    elif path.suffix.lower() in BUILDERS:
        yield from _dataset_rows(_from_file(path, BUILDERS[path.suffix.lower()]), str(path))
    elif not path.exists():
        raise EmptyDatasetError(f"cannot read data file {path}: no such file or directory")
    else:
        raise DataFormatError(f"{path}: unknown data file type {path.suffix!r}; lorakit reads {JSONL}, "
                              f"{', '.join(BUILDERS)} and save_to_disk directories")


def _jsonl_rows(path: Path) -> Iterator[Row]:
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise EmptyDatasetError(f"cannot read data file {path}: {exc}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Row(where, error=f"not UTF-8 text (byte {exc.start}); is this a JSONL file?")
                continue
            if not line.strip():
                continue
            try:
                yield Row(where, json.loads(line))
            except json.JSONDecodeError as exc:
                yield Row(where, error=f"not JSON: {exc.msg} at column {exc.colno}")


def _dataset_rows(dataset: Any, label: str) -> Iterator[Row]:
    for index, row in enumerate(dataset):
        yield Row(f"{label}: row {index}", row)


def _datasets(path: Path) -> Any:
    if importlib.util.find_spec("datasets") is None:
        raise DataDependencyError(f"{path}: reading {path.suffix or 'a dataset directory'} needs the `datasets` "
                                  "package (pip install 'lorakit[data]'); JSONL files need nothing more")
    import datasets

    return datasets


@contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No 'Generating train split' bars for one read (lorakit prints its own summary)."""
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def _from_file(path: Path, builder: str) -> Any:
    datasets = _datasets(path)
    if not path.is_file():
        raise EmptyDatasetError(f"cannot read data file {path}: no such file")
    # an in-memory table, its build cache in a temp dir: reading a file leaves nothing behind
    with tempfile.TemporaryDirectory(prefix="lorakit-data-") as cache, _quiet(datasets):
        try:
            options = _csv_options(datasets, path) if builder == "csv" else {}
            return datasets.load_dataset(builder, data_files=str(path), split=SPLIT, keep_in_memory=True,
                                         cache_dir=cache, **options)
        except Exception as exc:  # noqa: BLE001 - pyarrow/datasets raise many types for one cause: bad input
            raise DataFormatError(f"{path}: cannot be read as {builder} ({_reason(exc)})") from None


def _csv_options(datasets: Any, path: Path) -> dict[str, Any]:
    """Every column as text: CSV has no types, and a completion "5" must stay "5" (inferred, it becomes 5)."""
    with path.open(encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle), [])
    return {"features": datasets.Features({name: datasets.Value("string") for name in header}),
            "keep_default_na": False}


def _from_disk(path: Path) -> Any:
    datasets = _datasets(path)
    try:
        loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
    except Exception as exc:  # noqa: BLE001 - not a save_to_disk directory, or a damaged one
        raise DataFormatError(f"{path}: a directory, but not one datasets.save_to_disk wrote ({_reason(exc)})") \
            from None
    if isinstance(loaded, datasets.DatasetDict):
        if SPLIT not in loaded:
            raise DataFormatError(f"{path}: a DatasetDict without a {SPLIT!r} split (it has {sorted(loaded)}); "
                                  f"pass one split's directory")
        loaded = loaded[SPLIT]
    return loaded


def _reason(exc: Exception) -> str:
    cause = exc.__cause__ or exc.__context__ or exc  # datasets wraps the pyarrow error that says what is wrong
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"
