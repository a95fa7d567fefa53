"""Atomic writes: a reader sees the old file (or directory) or the new one, never half of either, nor nothing.

Files: write a temp file in the same directory, fsync it, `os.replace` it over the target, fsync the
directory (lorakit.atomic_write, the one primitive, shared with the LoRA-XS bases cache below io). Directories (adapters, checkpoints): write every file into a temp directory beside the target,
fsync, then swap it into place, with Linux's `renameat2(RENAME_EXCHANGE)` where available (one atomic
step). Elsewhere two renames: the old copy moves aside as `.NAME.old-XXXXXXXX` before the new one takes
its name, so a crash between the two leaves the old copy complete under that name; readers use it
(`readable_directory`) and the next write to the directory puts it back (`sweep_stale`).

A write that fails (no space, no permission) raises WriteError naming the path, after removing its own
temporary files; temporaries a crashed process left behind are recognised by name and age and swept
when the same directory is next written.
"""

import ctypes
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from lorakit import atomic_write
from lorakit.atomic_write import TEMP_NAME, fsync_dir, is_temp_name, replace_file, temp_path  # noqa: F401 - io's
# callers (checkpoints, the trainer, the server's directory listing) take the temp names from here
from lorakit.errors import WriteError

# Files lorakit writes into an adapter directory; a directory holding anything else is never replaced.
REPLACEABLE = frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md"})
STALE_AFTER_S = 900.0  # a temporary untouched this long belongs to a process that died (saves take seconds)


def orphan_of(path: Path) -> Path | None:
    """The complete old copy a two-rename swap moved aside, when a crash left `path` itself absent."""
    if os.path.lexists(path):
        return None
    try:
        names = os.listdir(path.parent)
    except OSError:
        return None
    found = [path.parent / n for n in names if (m := TEMP_NAME.match(n)) and m["kind"] == "old"
             and m["target"] == path.name]
    found = [p for p in found if p.is_dir()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def readable_directory(path: Path) -> Path:
    """`path`, or the old copy standing in for it after a crash mid-swap (see the module docstring)."""
    return orphan_of(path) or path


def sweep_stale(directory: str | os.PathLike, older_than: float = STALE_AFTER_S) -> list[Path]:
    """Remove lorakit's temporaries older than `older_than` seconds in `directory`, first putting back an
    old copy whose target a crash left absent. Returns what was removed or restored."""
    directory = Path(directory)
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    cutoff = time.time() - older_than
    swept = []
    for name in names:
        match = TEMP_NAME.match(name)
        entry = directory / name
        try:
            if match is None or entry.lstat().st_mtime > cutoff:
                continue
            target = directory / match["target"]
            if match["kind"] == "old" and not os.path.lexists(target) and orphan_of(target) == entry:
                os.rename(entry, target)  # the crash came between the two renames: the old copy is the live one
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue  # another process got there first, or it is not ours to remove
        swept.append(entry)
    return swept


@contextmanager
def reporting_write_errors(path: Path) -> Iterator[None]:
    """OSError (ENOSPC, EACCES, EROFS...) inside the block -> WriteError naming `path`."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise WriteError(f"cannot write {path}: {reason} (errno {exc.errno}); nothing was replaced, "
                         "its temporary files are removed") from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (lorakit.atomic_write): readers never see a partial file."""
    path = Path(path)
    sweep_stale(path.parent)
    with reporting_write_errors(path):
        return replace_file(path, data)


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
            atomic_write.write_durable(tmp / name, data)  # through the module: crash tests' one seam
    return Path(path)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (files another library wrote, e.g. save_pretrained)."""
    for folder, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


@contextmanager
def atomic_directory(path: str | os.PathLike, *, replace_any: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory beside `path`; on clean exit it becomes `path` in one swap.

    replace_any=True (the caller was told to overwrite, e.g. `merge --overwrite`) replaces a directory
    whatever it holds, and fsyncs every file written into the temp directory, since others wrote them."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; refusing to replace it")
    if path.is_dir() and not replace_any:
        foreign = sorted(p.name for p in path.iterdir() if p.name not in REPLACEABLE)
        if foreign:
            raise FileExistsError(f"{path} holds files that are not adapter files ({foreign[:5]}); refusing to "
                                  "replace it: save the adapter into its own (new or adapter-only) directory")
    with reporting_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path.parent)
        tmp = temp_path(path)
        tmp.mkdir()
    with reporting_write_errors(path):
        try:
            yield tmp
            if replace_any:
                fsync_tree(tmp)
            fsync_dir(tmp)
            replace_directory(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the new files on failure, the old directory on success
        fsync_dir(path.parent)


def replace_directory(tmp: Path, path: Path) -> None:
    """Move the finished, fsynced `tmp` to `path`; afterwards `tmp` holds the replaced directory (if any),
    for the caller to remove. At no moment is neither the old nor the new copy complete on disk."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        tmp.mkdir()  # leave an empty directory for the caller's cleanup to remove
        return
    if rename_exchange(tmp, path):
        return
    old = temp_path(path, "old")
    os.rename(path, old)
    fsync_dir(path.parent)  # the old copy is durable under its new name before the new one takes `path`
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)  # put the old adapter back
        raise
    os.rename(old, tmp)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
