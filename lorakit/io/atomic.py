"""Atomic writes: a reader sees the old file (or directory) or the new one, never half of either.

Files: write a temp file in the same directory, fsync it, `os.replace` it over the target, fsync the
directory. Adapter directories: write every file into a temp directory beside the target, fsync, then
swap it into place — with Linux's `renameat2(RENAME_EXCHANGE)` where available (one atomic step, so
a server reading the directory never finds it missing), else by two renames that keep the old copy
until the new one is in place.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

# Files lorakit writes into an adapter directory; a directory holding anything else is never replaced.
REPLACEABLE = frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md"})


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


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically: readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_durable(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def tensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file as bytes; every tensor is copied to contiguous CPU memory (no shared storage)."""
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return safetensors_bytes(plain, metadata=metadata)


def atomic_write_json(path: str | os.PathLike, obj: object) -> Path:
    return atomic_write_bytes(path, json_bytes(obj))


def atomic_write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                             metadata: dict[str, str] | None = None) -> Path:
    return atomic_write_bytes(path, tensors_bytes(tensors, metadata))


def write_directory(path: str | os.PathLike, files: Mapping[str, bytes]) -> Path:
    """Write `files` (name -> bytes) as the directory `path`, replacing an existing adapter directory.

    An existing directory is replaced only if it holds nothing but adapter files (REPLACEABLE), so a
    checkpoint or a model directory is never deleted by mistake.
    """
    with atomic_directory(path) as tmp:
        for name, data in files.items():
            _write_durable(tmp / name, data)
    return Path(path)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp directory beside `path`; on clean exit it becomes `path` in one swap."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; refusing to replace it")
    if path.is_dir():
        foreign = sorted(p.name for p in path.iterdir() if p.name not in REPLACEABLE)
        if foreign:
            raise FileExistsError(f"{path} holds files that are not adapter files ({foreign[:5]}); refusing to "
                                  "replace it: save the adapter into its own (new or adapter-only) directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        _publish(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new files on failure, the old directory on success
    fsync_dir(path.parent)


def _publish(tmp: Path, path: Path) -> None:
    """Move the finished `tmp` to `path`; afterwards `tmp` holds the replaced directory (if any)."""
    if not path.exists():
        os.rename(tmp, path)
        tmp.mkdir()  # leave an empty directory for the caller's cleanup to remove
        return
    if _rename_exchange(tmp, path):
        return
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)  # put the old adapter back
        raise
    os.rename(old, tmp)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
