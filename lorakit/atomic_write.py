"""The atomic file write every part of lorakit shares: temp file beside the target, fsync, rename, fsync the directory.

A reader sees the old file or the new one, never half of either. It sits at the foundation so that
the lowest writers (the LoRA-XS bases cache) and io (lorakit.io.atomic, which adds error reporting,
sweeping of stale temporaries and whole-directory swaps) use the same steps and the same temp names.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path

# `.<target>.tmp-<8 hex>` (being written) and `.<target>.old-<8 hex>` (moved aside): lorakit's temporaries.
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}$")


def temp_path(path: Path, kind: str = "tmp") -> Path:
    """A fresh temporary name beside `path` that `TEMP_NAME` recognises."""
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")


def is_temp_name(name: str) -> bool:
    """Whether `name` is one of lorakit's temporaries (never an adapter, a checkpoint or a user's file)."""
    return TEMP_NAME.match(name) is not None


def write_durable(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it: on disk before anything renames it into view."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def replace_file(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; OSError (no space, no permission) propagates with the temp file gone.

    `write_durable` is looked up at call time: it is the seam crash tests replace to write in halves."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write_durable(tmp, data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # a failed cleanup must not hide the write's own error
            tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path
