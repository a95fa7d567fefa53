"""The one table of adapter file formats: which format a directory holds, how to load it, how to save one.

    format        sniffed in adapter_config.json      saves                        packed bank   served
    native        "lorakit_method" (LoRA-XS, VeRA)    LoraXSConfig, VeraConfig     LoRA-XS       yes
    peft-lora     peft_type "LORA"                    LoraConfig                   no            yes
    peft-prefix   peft_type "PREFIX_TUNING"           PrefixConfig                 no            no

load_adapter, save_adapter and the server's AdapterStore all read this table; nothing else tells formats
apart. A format is sniffed from the parsed config rather than from the path: read_adapter_dir reads the
config and the weights through one directory handle, and a second read could meet a newer version mid-swap.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lorakit.config import AdapterConfig, LoraConfig, LoraXSConfig, PrefixConfig, VeraConfig
from lorakit.errors import AdapterConfigError, CorruptAdapterError, UnsupportedAdapterError
from lorakit.io.files import NATIVE_MARKER, PEFT_MARKER, AdapterFiles
from lorakit.io.native import load_native, native_bases_to_precompute, save_native
from lorakit.io.peft_lora import load_lora, save_lora
from lorakit.io.prefix import PEFT_TYPE as PREFIX_PEFT_TYPE, load_prefix, save_prefix
from lorakit.methods.basis import Basis


@dataclass(frozen=True)
class AdapterFormat:
    """One row of the table: how a format is recognised, loaded and saved."""

    name: str  # how messages name it
    sniff: Callable[[dict], bool]  # whether a parsed adapter_config.json is in this format
    load: Callable[..., str]  # (model, files, name, *, strict, packed) -> name; the model untouched on error
    save: Callable[[nn.Module, str, str | os.PathLike], Path]  # (model, name, directory) -> directory
    configs: tuple[type, ...]  # the adapter configs saved in this format
    packs: Callable[[dict], bool]  # whether an adapter with this config can go into the packed LoRA-XS bank
    served: bool  # whether the serving engine runs it (prefix adapters carry per-call cache state it does not keep)
    # read-only work a load needs (LoRA-XS SVDs), done before the model is touched: a server does it off the
    # engine's thread and installs the bases, which the load then finds and reuses
    precompute: Callable[[nn.Module, AdapterFiles], dict[str, Basis]]


def _refuse_packed(files: AdapterFiles, what: str, packed: bool) -> None:
    if packed:
        raise UnsupportedAdapterError(f"{files.path}: only LoRA-XS adapters can be loaded packed; this is {what}")


def _load_lora(model: nn.Module, files: AdapterFiles, name: str, *, strict: bool = True, packed: bool = False) -> str:
    _refuse_packed(files, "a PEFT LoRA file", packed)
    return load_lora(model, files, name, strict=strict)


def _load_prefix(model: nn.Module, files: AdapterFiles, name: str, *, strict: bool = True,
                 packed: bool = False) -> str:
    _refuse_packed(files, "a PEFT prefix-tuning file", packed)
    return load_prefix(model, files, name)  # a prefix has no modules to skip: strict changes nothing


def _nothing(model: nn.Module, files: AdapterFiles) -> dict[str, Basis]:
    return {}


FORMATS: tuple[AdapterFormat, ...] = (
    AdapterFormat("native", lambda c: NATIVE_MARKER in c, load_native, save_native, (LoraXSConfig, VeraConfig),
                  packs=lambda c: c.get(NATIVE_MARKER) == "lora_xs", served=True,
                  precompute=native_bases_to_precompute),
    AdapterFormat("peft-lora", lambda c: c.get(PEFT_MARKER) == "LORA", _load_lora, save_lora, (LoraConfig,),
                  packs=lambda c: False, served=True, precompute=_nothing),
    AdapterFormat("peft-prefix", lambda c: c.get(PEFT_MARKER) == PREFIX_PEFT_TYPE, _load_prefix, save_prefix,
                  (PrefixConfig,), packs=lambda c: False, served=False, precompute=_nothing),
)


def format_of(config: dict, where: Path) -> AdapterFormat:
    """The format of a parsed adapter_config.json (at `where`); anything the table lacks is refused by name."""
    for row in FORMATS:
        if row.sniff(config):
            return row
    peft_type = config.get(PEFT_MARKER)
    if peft_type is None:
        raise CorruptAdapterError(f"{where}: no {PEFT_MARKER!r} and no {NATIVE_MARKER!r}: not an adapter config")
    raise UnsupportedAdapterError(f"{where}: peft_type {peft_type!r} is not supported; lorakit reads PEFT LoRA and "
                                  "prefix-tuning adapters and its own LoRA-XS / VeRA files")


def format_for(config: AdapterConfig) -> AdapterFormat:
    """The format an adapter with `config` is saved in."""
    for row in FORMATS:
        if isinstance(config, row.configs):
            return row
    raise AdapterConfigError(f"no adapter file format saves a {type(config).__name__}")
