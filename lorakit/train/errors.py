"""Training errors: each names the file, line, step or directory involved."""

from __future__ import annotations

from lorakit.errors import LorakitError


class TrainConfigError(LorakitError, ValueError):
    """A training setting is invalid or unknown (the message names the field and the value)."""


class DataFormatError(LorakitError, ValueError):
    """A JSONL line is malformed or fits no known format; the message starts with file:line."""


class EmptyDatasetError(LorakitError, ValueError):
    """A data file holds no usable example (empty, or every line was skipped)."""


class LabelMismatchError(LorakitError, ValueError):
    """Classification labels in the data do not match the head (unknown label, wrong count)."""


class RunExistsError(LorakitError, FileExistsError):
    """The output directory already holds another run; pass resume=True (--resume) to continue it."""


class CheckpointError(LorakitError, ValueError):
    """A checkpoint is missing, unreadable, or was written by a run with different settings."""


class NonFiniteLossError(LorakitError, FloatingPointError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""

    def __init__(self, message: str, step: int, last_checkpoint: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


class DataDependencyError(LorakitError, ImportError):
    """Reading this data needs an optional package (`datasets` for parquet, Arrow, CSV, JSON, save_to_disk)."""
