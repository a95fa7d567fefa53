"""Reading an adapter directory: every failure becomes a specific error that names the file.

Both files are read through one open handle on the directory, so a writer swapping in a new version
meanwhile (see atomic.py) cannot pair the old config with the new weights. Safetensors only: a
pickle (`adapter_model.bin`) is refused, never unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes

from lorakit.errors import AdapterNotFoundError, CorruptAdapterError, NonFiniteAdapterError
from lorakit.io.fast_safetensors import read_float_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
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


def _read_at(dir_fd: int, name: str, path: Path) -> bytes:
    try:
        fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    except FileNotFoundError:
        hint = ""
        if name == WEIGHTS_NAME:
            pickles = [p for p in PICKLE_NAMES if (path / p).exists()]
            if pickles:
                hint = (f"; found {pickles[0]}, a pickle file, which lorakit never loads (it can run code): "
                        "convert it to safetensors with the tool that wrote it")
        raise CorruptAdapterError(f"{path / name} is missing{hint}") from None
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def parse_json(data: bytes, where: Path) -> dict:
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptAdapterError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CorruptAdapterError(f"{where} must hold a JSON object, got {type(config).__name__}")
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
        header = json.loads(data[8 : 8 + header_len])
    except Exception as exc:  # safetensors raises its own SafetensorError, or ValueError/OSError
        raise CorruptAdapterError(f"{where} is not a readable safetensors file (truncated or corrupt?): "
                                  f"{exc}") from None
    metadata = header.get("__metadata__") or {}
    bad = sorted(k for k, v in tensors.items() if not v.is_floating_point())
    if bad:
        raise CorruptAdapterError(f"{where}: tensors {bad[:5]} have non-float dtype "
                                  f"{tensors[bad[0]].dtype}; adapter weights are floats")
    return tensors, metadata


def read_adapter_dir(path: str | os.PathLike) -> AdapterFiles:
    """Read and parse adapter_config.json and adapter_model.safetensors from directory `path`."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not an adapter directory" if path.exists() else "does not exist"
        raise AdapterNotFoundError(f"adapter directory {path} {what}")
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        if not os.path.exists(os.path.join(path, CONFIG_NAME)):
            raise AdapterNotFoundError(f"{path} holds no {CONFIG_NAME}, so it is not an adapter directory")
        config_data = _read_at(dir_fd, CONFIG_NAME, path)
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
    file = path / CONFIG_NAME
    if not file.is_file():
        raise AdapterNotFoundError(f"{path} holds no {CONFIG_NAME}, so it is not an adapter directory")
    return parse_json(file.read_bytes(), file)


def tensor_shapes(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) from a safetensors header, without reading the tensor data."""
    if not file.is_file():
        raise CorruptAdapterError(f"{file} is missing")
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {k: (tuple(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype())
                    for k in handle.keys()}
    except Exception as exc:
        raise CorruptAdapterError(f"{file} is not a readable safetensors file (truncated or corrupt?): "
                                  f"{exc}") from None


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
