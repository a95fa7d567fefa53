"""Adapter files: PEFT-compatible LoRA, compact native LoRA-XS / VeRA, export to plain LoRA, shared bases.

    save_adapter(model, name, path)                 LoRA -> PEFT layout; LoRA-XS / VeRA -> native layout
    load_adapter(model, path, name=None, strict=True) -> name   any layout; model untouched on any error
    (which layout a directory holds and which one a method saves in: the one table, lorakit.io.formats)
    read_adapter_info(path) -> dict                 method, rank, modules, sizes (no weights read)
    export_to_peft(model, name, path)               any adapter as a plain PEFT LoRA adapter
    save_bases(model, path) / load_bases(model, path)   LoRA-XS SVD bases, computed once per base model

Writes are atomic (temp directory, fsync, swap); reads accept safetensors only, never pickles.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from torch import nn

from lorakit.model.manage import adapter_config
from lorakit.io.bases import load_bases, save_bases
from lorakit.io.export import export_to_peft
from lorakit.io.files import CONFIG_NAME, read_adapter_dir
from lorakit.io.formats import format_for, format_of
from lorakit.io.info import read_adapter_info


def save_adapter(model: nn.Module, name: str, path: str | os.PathLike) -> Path:
    """Write adapter `name` to directory `path` (replaced atomically if it is an adapter directory), in the
    format its method is saved in (lorakit.io.formats)."""
    return format_for(adapter_config(model, name)).save(model, name, path)


def default_name(path: str | os.PathLike) -> str:
    """The adapter name load_adapter uses when none is given: the directory's name, made valid."""
    name = re.sub(r"[^A-Za-z0-9_\-]", "_", Path(path).resolve().name)[:128]
    return name or "default"


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, *, strict: bool = True,
                 packed: bool = False) -> str:
    """Attach the adapter in directory `path` (PEFT LoRA or prefix, lorakit LoRA-XS / VeRA) as `name`; returns it.

    Everything is checked before the model changes: files, keys, shapes, finiteness, module names and
    (LoRA-XS / VeRA) basis fingerprints. strict=False skips file modules the model lacks and downgrades
    a fingerprint mismatch (e.g. a quantized base) to a warning. The default name is the directory's.
    packed=True loads a LoRA-XS adapter into the packed bank (lorakit.model.bank) for many-adapter serving.
    """
    files = read_adapter_dir(path)
    name = default_name(path) if name is None else name
    return format_of(files.config, files.path / CONFIG_NAME).load(model, files, name, strict=strict, packed=packed)


__all__ = ["default_name", "export_to_peft", "load_adapter", "load_bases", "read_adapter_info", "save_adapter",
           "save_bases"]
