"""Reading an adapter directory: every failure becomes a specific error that names the file.

Both files are read through one open handle on the directory, so a writer swapping in a new version
meanwhile (see atomic.py) cannot pair the old config with the new weights. Safetensors only: a
pickle (`adapter_model.bin`) is refused, never unpickled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes

from lorakit.errors import AdapterNotFoundError, CorruptAdapterError, NonFiniteAdapterError
from lorakit.io.atomic import readable_directory
from lorakit.io.fast_safetensors import read_float_tensors
from lorakit.io.safe_open import (parse_json_object, read_bounded, read_safetensors_bytes,
                                  read_safetensors_header)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
NATIVE_MARKER = "lorakit_method"  # in a lorakit LoRA-XS / VeRA config
PEFT_MARKER = "peft_type"  # in a PEFT config
PEFT_KEY_PREFIX = "base_model.model."  # PEFT's tensor keys: the wrapped model's module paths after it
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# Ends the errors that a non-strict load would get past; names both the API and the command-line form.
NOT_STRICT_HINT = "load_adapter(..., strict=False), or --no-strict on the command line, loads it anyway"


@dataclass(frozen=True)
class AdapterFiles:
    """The parsed contents of one adapter directory."""

    path: Path
    config: dict  # adapter_config.json
    tensors: dict[str, torch.Tensor]  # adapter_model.safetensors, on CPU
    metadata: dict[str, str]  # the safetensors header's __metadata__
    file_bytes: dict[str, int]  # size of each file read


def _missing(path: Path, name: str) -> CorruptAdapterError:
    hint = ""
    if name == WEIGHTS_NAME:
        pickles = [p for p in PICKLE_NAMES if (path / p).exists()]
        if pickles:
            hint = (f"; found {pickles[0]}, a pickle file, which lorakit never loads (it can run code): "
                    "convert it to safetensors with the tool that wrote it")
    return CorruptAdapterError(f"{path / name} is missing{hint}")


def _read_at(dir_fd: int, name: str, path: Path) -> bytes:
    """One file of the directory open as `dir_fd`, through the guarded reader (lorakit.io.safe_open)."""
    try:
        if name == WEIGHTS_NAME:
            return read_safetensors_bytes(path / name, dir_fd=dir_fd, name=name)
        return read_bounded(path / name, dir_fd=dir_fd, name=name)
    except FileNotFoundError:
        raise _missing(path, name) from None


def parse_json(data: bytes, where: Path) -> dict:
    """An adapter config: a JSON object (no NaN, no name twice) naming one format, never two."""
    config = parse_json_object(data, where)
    if NATIVE_MARKER in config and PEFT_MARKER in config:
        raise CorruptAdapterError(f"{where} carries both {NATIVE_MARKER!r} (lorakit's native layout, "
                                  f"{config[NATIVE_MARKER]!r}) and {PEFT_MARKER!r} (PEFT's, {config[PEFT_MARKER]!r}); "
                                  "refusing to guess which format it is")
    return config


def parse_safetensors(data: bytes, where: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata from safetensors bytes; truncation or a bad header -> CorruptAdapterError."""
    if len(data) < 8:
        raise CorruptAdapterError(f"{where} is truncated ({len(data)} bytes): not a safetensors file")
    try:
        tensors = read_float_tensors(data)  # fast for the usual file; None hands it to safetensors
        if tensors is None:
            tensors = load_safetensors_bytes(data)
        header_len = int.from_bytes(data[:8], "little")
        header = parse_json_object(data[8 : 8 + header_len], where)  # a tensor name given twice is refused
    except CorruptAdapterError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError, or ValueError/OSError
        raise CorruptAdapterError(f"{where} is not a readable safetensors file (truncated or corrupt?): "
                                  f"{exc}") from None
    metadata = header.get("__metadata__") or {}
    bad = sorted(k for k, v in tensors.items() if not v.is_floating_point())
    if bad:
        raise CorruptAdapterError(f"{where}: tensors {bad[:5]} have non-float dtype "
                                  f"{tensors[bad[0]].dtype}; adapter weights are floats")
    return tensors, metadata


def _open_dir(path: Path) -> int:
    """A handle on the adapter directory `path`; anything else is AdapterNotFoundError naming it."""
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise AdapterNotFoundError(f"adapter directory {path} does not exist") from None
    except NotADirectoryError:
        raise AdapterNotFoundError(f"adapter directory {path} is a file, not an adapter directory") from None
    except OSError as exc:
        raise AdapterNotFoundError(f"adapter directory {path} cannot be opened: {exc.strerror or exc}") from None


def _config_at(dir_fd: int, path: Path) -> bytes:
    try:
        return read_bounded(path / CONFIG_NAME, dir_fd=dir_fd, name=CONFIG_NAME)
    except FileNotFoundError:
        raise AdapterNotFoundError(f"{path} holds no {CONFIG_NAME}, so it is not an adapter directory") from None


def read_adapter_dir(path: str | os.PathLike) -> AdapterFiles:
    """Read and parse adapter_config.json and adapter_model.safetensors from directory `path`.

    A directory that a save without rename-exchange left half swapped (lorakit.io.atomic) is read from
    the complete copy the save left beside it."""
    path = Path(path)
    dir_fd = _open_dir(readable_directory(path))
    try:
        config_data = _config_at(dir_fd, path)
        weights_data = _read_at(dir_fd, WEIGHTS_NAME, path)
    finally:
        os.close(dir_fd)
    config = parse_json(config_data, path / CONFIG_NAME)
    tensors, metadata = parse_safetensors(weights_data, path / WEIGHTS_NAME)
    return AdapterFiles(path, config, tensors, metadata,
                        {CONFIG_NAME: len(config_data), WEIGHTS_NAME: len(weights_data)})


def read_config_only(path: str | os.PathLike) -> dict:
    """adapter_config.json alone (for inspecting without loading weights)."""
    path = Path(path)
    dir_fd = _open_dir(readable_directory(path))
    try:
        data = _config_at(dir_fd, path)
    finally:
        os.close(dir_fd)
    return parse_json(data, path / CONFIG_NAME)


def tensor_shapes(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) from a safetensors header, without reading the tensor data."""
    file = Path(file)
    try:
        header = read_safetensors_header(readable_directory(file.parent) / file.name)
    except FileNotFoundError:
        raise _missing(file.parent, file.name) from None
    shapes = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            shapes[key] = (tuple(int(n) for n in info["shape"]), str(info["dtype"]))
        except (KeyError, TypeError, ValueError):
            raise CorruptAdapterError(f"{file}: tensor {key!r} has no valid shape and dtype in the header") from None
    return shapes


def check_finite(tensors: dict[str, torch.Tensor], where: Path) -> None:
    """NaN/inf anywhere -> NonFiniteAdapterError naming the tensors."""
    bad = sorted(k for k, v in tensors.items() if not torch.isfinite(v).all())
    if bad:
        raise NonFiniteAdapterError(f"{where}: tensors hold NaN/inf values: {bad[:5]}"
                                    f"{f' (+{len(bad) - 5} more)' if len(bad) > 5 else ''}")


def expect_keys(actual: set[str], expected: set[str], where: Path) -> None:
    """Missing or unexpected keys -> CorruptAdapterError naming them."""
    missing, unexpected = sorted(expected - actual), sorted(actual - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{f' (+{len(missing) - 5} more)' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}"
                         f"{f' (+{len(unexpected) - 5} more)' if len(unexpected) > 5 else ''}")
        raise CorruptAdapterError(f"{where}: {'; '.join(parts)}")
