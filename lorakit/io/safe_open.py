"""The one guarded way to read an adapter or checkpoint file: regular files only, sizes bounded first.

A path that is not a regular file can hang or kill a reader: a FIFO blocks `open` until a writer comes,
`/dev/zero` never ends, a symlink loop or a directory raises a bare OSError. So a file is `stat`ed
before it is opened (symlinks followed by the kernel, which refuses loops after 40 hops), opened with
O_NONBLOCK (a FIFO swapped in meanwhile cannot block), checked again with `fstat` on the open handle,
and read only up to a size known beforehand: a JSON config under `MAX_CONFIG_BYTES`, a safetensors
file exactly as long as its own header says. Every refusal is the caller's error class naming the path;
a missing file stays FileNotFoundError, which each caller words in its own terms.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from lorakit.errors import CorruptAdapterError

MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json / state.json is kilobytes; more is not a config
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header
MAX_TENSOR_FILE_BYTES = 64 << 30  # far above any adapter or adapter checkpoint

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def _open_regular(path: Path, name: str, dir_fd: int | None, error: type[Exception]) -> tuple[int, int]:
    """(fd, size) of the regular file `name` (relative to `dir_fd`, else the path itself)."""
    target = name if dir_fd is not None else str(path)
    try:
        before = os.stat(target, dir_fd=dir_fd)
    except FileNotFoundError:
        try:  # a dangling symlink: say where it points
            pointed = os.readlink(target, dir_fd=dir_fd)
        except OSError:
            raise FileNotFoundError(errno.ENOENT, "no such file", str(path)) from None
        raise error(f"{path} is a symbolic link to {pointed}, which does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"{path} is a symbolic link loop (or a chain of more than 40 links)") from None
        raise error(f"{path} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(before.st_mode):
        raise error(f"{path} is {_kind(before.st_mode)}, not a regular file") from None
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags, dir_fd=dir_fd)
    except OSError as exc:
        raise error(f"{path} cannot be opened: {exc.strerror or exc}") from None
    now = os.fstat(fd)
    if not stat.S_ISREG(now.st_mode):  # replaced between the stat and the open
        os.close(fd)
        raise error(f"{path} is {_kind(now.st_mode)}, not a regular file") from None
    return fd, now.st_size


def _read_exactly(fd: int, size: int, path: Path, error: type[Exception]) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 24))
        if not chunk:
            raise error(f"{path} shrank while it was read ({size - left} of {size} bytes): written meanwhile?")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_bounded(path: str | os.PathLike, *, limit: int = MAX_CONFIG_BYTES, dir_fd: int | None = None,
                 name: str | None = None, error: type[Exception] = CorruptAdapterError) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (a JSON config); `name` is read relative to
    `dir_fd` when given, `path` is what errors name."""
    path = Path(path)
    fd, size = _open_regular(path, name or path.name, dir_fd, error)
    try:
        if size > limit:
            raise error(f"{path} is {size} bytes, more than the {limit} bytes a config may be")
        return _read_exactly(fd, size, path, error)
    finally:
        os.close(fd)


def _header(fd: int, size: int, path: Path, error: type[Exception]) -> tuple[int, dict]:
    """(header length, parsed header) of an open safetensors file, checked against the file's size."""
    if size < 8:
        raise error(f"{path} is truncated ({size} bytes): not a safetensors file")
    header_len = int.from_bytes(_read_exactly(fd, 8, path, error), "little")
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise error(f"{path} is not a safetensors file (truncated or corrupt?): its header claims {header_len} "
                    f"bytes, the file has {size}")
    raw = _read_exactly(fd, header_len, path, error)
    try:
        header = json.loads(raw, object_pairs_hook=lambda pairs: _no_duplicates(pairs, path, error))
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, error):
            raise
        raise error(f"{path} is not a safetensors file (truncated or corrupt?): bad header: {exc}") from None
    if not isinstance(header, dict):
        raise error(f"{path} is not a safetensors file: its header is not a JSON object")
    return header_len, header


def _no_duplicates(pairs: list[tuple[str, object]], path: Path, error: type[Exception]) -> dict:
    """A JSON object, refusing a name given twice (json keeps the last one silently)."""
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise error(f"{path}: the name {key!r} appears twice; refusing to guess which one is meant")
        seen[key] = value
    return seen


def data_end(header: dict, path: Path, error: type[Exception] = CorruptAdapterError) -> int:
    """Where the last tensor's bytes end, from the header's data_offsets."""
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise error(f"{path}: tensor {key!r} has no valid data_offsets in the header") from None
        if not 0 <= begin <= stop:
            raise error(f"{path}: tensor {key!r} has data_offsets {[begin, stop]}")
        end = max(end, stop)
    return end


def read_safetensors_header(path: str | os.PathLike, *, dir_fd: int | None = None, name: str | None = None,
                            error: type[Exception] = CorruptAdapterError) -> dict:
    """The parsed header of a safetensors file (tensor names, dtypes, shapes, metadata), no tensor data read."""
    return _checked_safetensors(Path(path), dir_fd, name, error, whole=False)[0]


def _checked_safetensors(path: Path, dir_fd: int | None, name: str | None, error: type[Exception],
                         whole: bool) -> tuple[dict, bytes | None]:
    """(header, the whole file when `whole`), read only once the header (unique names, offsets) matches the size."""
    fd, size = _open_regular(path, name or path.name, dir_fd, error)
    try:
        header_len, header = _header(fd, size, path, error)
        _check_size(header, header_len, size, path, error)
        if not whole:
            return header, None
        os.lseek(fd, 0, os.SEEK_SET)
        return header, _read_exactly(fd, size, path, error)
    finally:
        os.close(fd)


def _check_size(header: dict, header_len: int, size: int, path: Path, error: type[Exception]) -> None:
    expected = 8 + header_len + data_end(header, path, error)
    if expected != size:
        what = "truncated" if size < expected else f"{size - expected} bytes longer than its tensors"
        raise error(f"{path} is {what}: its header describes {expected} bytes, the file has {size}")
    if size > MAX_TENSOR_FILE_BYTES:
        raise error(f"{path} is {size} bytes, more than the {MAX_TENSOR_FILE_BYTES} bytes lorakit reads")


def read_safetensors_bytes(path: str | os.PathLike, *, dir_fd: int | None = None, name: str | None = None,
                           error: type[Exception] = CorruptAdapterError) -> bytes:
    """A whole safetensors file, read only once its header (unique names, offsets) matches its size."""
    return _checked_safetensors(Path(path), dir_fd, name, error, whole=True)[1]


def parse_json_object(data: bytes, where: Path, error: type[Exception] = CorruptAdapterError) -> dict:
    """A JSON object from a config file; bad UTF-8/JSON, NaN/Infinity and repeated names are refused."""
    def constant(token: str) -> float:
        raise error(f"{where} holds {token}, which is not a number JSON allows")

    try:
        value = json.loads(data.decode("utf-8"), parse_constant=constant,
                           object_pairs_hook=lambda pairs: _no_duplicates(pairs, where, error))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise error(f"{where} must hold a JSON object, got {type(value).__name__}")
    return value
