"""Adapter files: PEFT-compatible LoRA, compact native LoRA-XS / VeRA, export to plain LoRA, shared bases.

    save_adapter(model, name, path)                 LoRA -> PEFT layout; LoRA-XS / VeRA -> native layout
    load_adapter(model, path, name=None, strict=True) -> name   either layout; model untouched on any error
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
from lorakit.config import LoraConfig, PrefixConfig
from lorakit.errors import UnsupportedAdapterError
from lorakit.io.bases import load_bases, save_bases
from lorakit.io.export import export_to_peft
from lorakit.io.files import read_adapter_dir
from lorakit.io.info import read_adapter_info
from lorakit.io.native import load_native, save_native
from lorakit.io.peft_lora import load_lora, save_lora
from lorakit.io.prefix import PEFT_TYPE as PREFIX_PEFT_TYPE, load_prefix, save_prefix


def save_adapter(model: nn.Module, name: str, path: str | os.PathLike) -> Path:
    """Write adapter `name` to directory `path` (replaced atomically if it is an adapter directory)."""
    config = adapter_config(model, name)
    if isinstance(config, LoraConfig):
        return save_lora(model, name, path)
    if isinstance(config, PrefixConfig):  # PEFT's prefix-tuning layout (lorakit.io.prefix)
        return save_prefix(model, name, path)
    return save_native(model, name, path)


def default_name(path: str | os.PathLike) -> str:
    """The adapter name load_adapter uses when none is given: the directory's name, made valid."""
    name = re.sub(r"[^A-Za-z0-9_\-]", "_", Path(path).resolve().name)[:128]
    return name or "default"


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, *, strict: bool = True,
                 packed: bool = False) -> str:
    """Attach the adapter in directory `path` (PEFT LoRA or lorakit LoRA-XS / VeRA) as `name`; returns it.

    Everything is checked before the model changes: files, keys, shapes, finiteness, module names and
    (LoRA-XS / VeRA) basis fingerprints. strict=False skips file modules the model lacks and downgrades
    a fingerprint mismatch (e.g. a quantized base) to a warning. The default name is the directory's.
    packed=True loads a LoRA-XS adapter into the packed bank (lorakit.model.bank) for many-adapter serving.
    """
    files = read_adapter_dir(path)
    name = default_name(path) if name is None else name
    if "lorakit_method" in files.config:
        return load_native(model, files, name, strict=strict, packed=packed)
    if files.config.get("peft_type") == PREFIX_PEFT_TYPE and not packed:
        return load_prefix(model, files, name)
    if packed:
        raise UnsupportedAdapterError(f"{path}: only LoRA-XS adapters can be loaded packed; this is a PEFT LoRA file")
    return load_lora(model, files, name, strict=strict)


__all__ = ["default_name", "export_to_peft", "load_adapter", "load_bases", "read_adapter_info", "save_adapter",
           "save_bases"]
