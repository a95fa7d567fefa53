"""LoRA-XS and VeRA files: only what was trained, plus fingerprints of the frozen bases they expect.

    adapter_config.json         {"lorakit_method": "lora_xs" | "vera", "lorakit_format": 1,
                                 "config": config_to_dict(...), "modules": [...], "base_model_name_or_path": ...,
                                 LoRA-XS: "basis": {"kind": "svd", "rank": r}
                                 VeRA:    "projections": {"seed", "r", "max_in", "max_out"}}
    adapter_model.safetensors   LoRA-XS: <module>.lora_R (r, r)          <module>.basis_fingerprint (2r,)
                                VeRA:    <module>.vera_lambda_d (r,)     <module>.vera_lambda_b (out,)
                                         <module>.basis_fingerprint (2,)

The bases themselves belong to the base model and are rebuilt on load (LoRA-XS: SVD of W, canonical
signs; VeRA: the seeded projections at the model's largest layer sizes). Each rebuilt basis is checked
against the stored fingerprint before the model is touched, so an adapter trained on another base is
refused (AdapterMismatchError naming the module) instead of silently producing garbage.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from lorakit.model.manage import adapter_config, adapter_state_dict
from lorakit.model.attach import attach
from lorakit.model.bank import add_packed_lora_xs
from lorakit.model.bases import layer_shape, lora_xs_bases_for
from lorakit.config import LoraXSConfig, VeraConfig, config_from_dict, config_to_dict
from lorakit.errors import AdapterConfigError, AdapterMismatchError, CorruptAdapterError, UnsupportedAdapterError
from lorakit.io.atomic import json_bytes, tensors_bytes, write_directory
from lorakit.io.files import CONFIG_NAME, NOT_STRICT_HINT, WEIGHTS_NAME, AdapterFiles, check_finite, expect_keys
from lorakit.io.guard import check_free_name, config_for_modules, restore_on_error, target_shapes
from lorakit.io.packed import try_load_packed
from lorakit.io.peft_lora import base_model_name
from lorakit.layer.linear import is_adaptable
from lorakit.methods.basis import Basis, fingerprints_match
from lorakit.methods.lora_xs import basis_fingerprint
from lorakit.methods.table import METHODS
from lorakit.methods.vera import vera_basis, vera_basis_key, vera_projections
from lorakit.model.record import install_bases
from lorakit.versions import LORAKIT_VERSION

NATIVE_FORMAT = 1
FINGERPRINT = "basis_fingerprint"
# the native format holds the methods whose layers share a frozen basis: only what they trained per layer
TRAINED = {name: method.trained for name, method in METHODS.items() if method.basis is not None}


def basis_key(config: LoraXSConfig | VeraConfig) -> str:
    """Where a layer keeps the frozen basis of this config's method."""
    return "lora_xs" if config.method == "lora_xs" else vera_basis_key(config)


def vera_sizes(model: nn.Module) -> tuple[int, int]:
    """(max_in, max_out) over every linear layer: the size attach generates VeRA's projections at."""
    sizes = [layer_shape(m) for m in model.modules() if is_adaptable(m)]
    return max(s[0] for s in sizes), max(s[1] for s in sizes)


def save_native(model: nn.Module, name: str, path: str | os.PathLike) -> Path:
    """Save LoRA-XS or VeRA adapter `name`: trained tensors + basis fingerprints + config."""
    config = adapter_config(model, name)
    if not isinstance(config, (LoraXSConfig, VeraConfig)):
        raise AdapterConfigError(f"adapter {name!r} is {config.method}: save it with lorakit.io.save_adapter")
    trained = adapter_state_dict(model, name)  # "module.param" -> tensor; packed LoRA-XS adapters too
    modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in trained))
    tensors: dict[str, torch.Tensor] = dict(trained)
    for module in modules:
        basis = model.get_submodule(module).basis(basis_key(config))
        fingerprint = basis_fingerprint(basis, config.r) if config.method == "lora_xs" else basis.fingerprint
        tensors[f"{module}.{FINGERPRINT}"] = fingerprint.float()
    dtype = next(iter(trained.values())).dtype
    data = {"lorakit_method": config.method, "lorakit_format": NATIVE_FORMAT, "lorakit_version": LORAKIT_VERSION,
            "config": config_to_dict(config), "modules": modules, "dtype": str(dtype).removeprefix("torch."),
            "base_model_name_or_path": base_model_name(model), "base_model_class": type(model).__name__}
    if config.method == "lora_xs":
        data["basis"] = {"kind": "svd", "rank": config.r,
                         "fingerprint": "top-r singular values, then a fixed probe vector times U_r"}
    else:
        max_in, max_out = vera_sizes(model)
        data["projections"] = {"seed": config.projection_seed, "r": config.r, "max_in": max_in, "max_out": max_out}
    metadata = {"format": "pt", "lorakit_method": config.method}
    return write_directory(path, {CONFIG_NAME: json_bytes(data), WEIGHTS_NAME: tensors_bytes(tensors, metadata)})


# --------------------------------------------------------------------------------------- loading

def _read_config(files: AdapterFiles) -> tuple[LoraXSConfig | VeraConfig, list[str]]:
    cfg, where = files.config, files.path / CONFIG_NAME
    method = cfg.get("lorakit_method")
    if method not in TRAINED:
        raise UnsupportedAdapterError(f"{where}: lorakit_method {method!r} is not a native lorakit format "
                                      f"(known: {sorted(TRAINED)}; LoRA adapters are PEFT files)")
    if cfg.get("lorakit_format") != NATIVE_FORMAT:
        raise UnsupportedAdapterError(f"{where}: lorakit_format {cfg.get('lorakit_format')!r} is not "
                                      f"{NATIVE_FORMAT}; written by another lorakit version?")
    try:
        config = config_from_dict(cfg["config"])
    except (KeyError, TypeError, AdapterConfigError) as exc:
        raise CorruptAdapterError(f"{where}: bad 'config': {exc}") from None
    modules = cfg.get("modules")
    if config.method != method or not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise CorruptAdapterError(f"{where}: 'config' method {config.method!r} vs lorakit_method {method!r}, "
                                  f"'modules' must be a list of module names")
    return config, modules


def _check_shapes(config, module: str, in_out: tuple[int, int], tensors: dict, where: Path) -> None:
    in_f, out_f, r = *in_out, config.r
    if config.method == "lora_xs":
        expected = {"lora_R": (r, r), FINGERPRINT: (2 * r,)}
        if r > min(in_f, out_f):
            raise AdapterMismatchError(f"{where}: module {module} ({in_f}->{out_f}) cannot hold a rank-{r} "
                                       "LoRA-XS basis: is the adapter for another model?")
    else:
        expected = {"vera_lambda_d": (r,), "vera_lambda_b": (out_f,), FINGERPRINT: (2,)}
    for param, shape in expected.items():
        actual = tuple(tensors[f"{module}.{param}"].shape)
        if actual != shape:
            raise AdapterMismatchError(f"{where}: module {module} ({in_f}->{out_f}): {param} expected shape "
                                       f"{shape}, file has {actual}")


def _rebuild_bases(model: nn.Module, config, modules: list[str], files: AdapterFiles,
                   shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, Basis], list[str]]:
    """The bases this model gives each module, and the modules whose fingerprint disagrees with the file."""
    fresh: dict[str, Basis] = {}  # LoRA-XS bases computed here, installed later so attach reuses them
    mismatched = []
    if config.method == "vera":
        have = vera_sizes(model)
        proj = files.config.get("projections") or {}
        want = (proj.get("max_in"), proj.get("max_out"))
        if want != have:
            raise AdapterMismatchError(f"{files.path / CONFIG_NAME}: VeRA projections were generated at (max_in, "
                                       f"max_out)={want}, this {type(model).__name__} gives {have}: the adapter is "
                                       "for another base model")
        shared = vera_projections(config.projection_seed, config.r, *have)
    else:  # one batched computation (or bases-cache read) for every layer that lacks a basis
        fresh = lora_xs_bases_for(model, modules, config.r)
    for module in modules:
        layer = model.get_submodule(module)
        if config.method == "lora_xs":
            basis = fresh[module] if module in fresh else layer.basis("lora_xs")
            actual = basis_fingerprint(basis, config.r)
        else:
            dtype = layer.weight.dtype if layer.weight.is_floating_point() else torch.float32
            actual = vera_basis(shared, *shapes[module], dtype).fingerprint
        expected = files.tensors[f"{module}.{FINGERPRINT}"]
        if not fingerprints_match(expected, actual.cpu()):
            diff = (expected.float() - actual.float().cpu()).abs().max().item()
            mismatched.append(f"{module}: expected {expected[:3].tolist()}..., this base gives "
                              f"{actual[:3].tolist()}... (max diff {diff:.3g})")
    return fresh, mismatched


def check_native_files(model: nn.Module, files: AdapterFiles) -> tuple[LoraXSConfig | VeraConfig, list[str]]:
    """Every check of a native adapter that needs no SVD: method and format, that its modules exist on
    this base and are linear, and each tensor's shape (LoRA-XS: rank <= min(in, out)). Run before any
    basis is computed, so a config claiming r=100000 is refused in milliseconds, not after minutes of SVDs."""
    where = files.path / WEIGHTS_NAME
    config, modules = _read_config(files)
    expect_keys(set(files.tensors), {f"{m}.{p}" for m in modules for p in TRAINED[config.method] + (FINGERPRINT,)},
                where)
    shapes = target_shapes(model, modules, where)
    for module in modules:
        _check_shapes(config, module, shapes[module], files.tensors, where)
    return config, modules


def missing_lora_xs_bases(model: nn.Module, config: LoraXSConfig, modules: list[str]) -> dict[str, Basis]:
    """The LoRA-XS SVD bases `modules` lack at `config.r` (call check_native_files first: this is the
    expensive part; one batched computation per weight shape, or a bases-cache read)."""
    return lora_xs_bases_for(model, modules, config.r, progress=False)


def native_bases_to_precompute(model: nn.Module, files: AdapterFiles) -> dict[str, Basis]:
    """The LoRA-XS SVD bases loading `files` will need and the model lacks, computed without touching the model
    (a server does this off its engine's thread). The files are checked first (method, modules of this base,
    rank <= min(in, out)), so a bad file costs no SVD at all; VeRA needs none."""
    config, modules = check_native_files(model, files)
    return missing_lora_xs_bases(model, config, modules) if isinstance(config, LoraXSConfig) else {}


def load_native(model: nn.Module, files: AdapterFiles, name: str, *, strict: bool = True,
                packed: bool = False) -> str:
    """Attach a LoRA-XS / VeRA adapter from `files` as `name` after checking it against this base.

    packed=True puts a LoRA-XS adapter in the model's packed bank (lorakit.model.bank: inference only, no
    modules) instead of attaching module adapters.
    """
    check_free_name(model, name)
    where = files.path / WEIGHTS_NAME
    config, modules = _read_config(files)
    if packed and config.method != "lora_xs":
        raise UnsupportedAdapterError(f"{files.path}: only LoRA-XS adapters can be loaded packed, this one is "
                                      f"{config.method}")
    expect_keys(set(files.tensors), {f"{m}.{p}" for m in modules for p in TRAINED[config.method] + (FINGERPRINT,)},
                where)
    if packed and try_load_packed(model, name, config, modules, files.tensors, where, strict):
        return name
    if not strict:
        present = {n for n, _ in model.named_modules()}
        modules = [m for m in modules if m in present]
    try:
        shapes = target_shapes(model, modules, where)
    except AdapterMismatchError as exc:  # modules this model lacks: a non-strict load skips them
        raise AdapterMismatchError(f"{exc} ({NOT_STRICT_HINT})") from None
    for module in modules:
        _check_shapes(config, module, shapes[module], files.tensors, where)
    check_finite({k: v for k, v in files.tensors.items() if k.rsplit(".", 1)[0] in set(modules)}, where)
    fresh, mismatched = _rebuild_bases(model, config, modules, files, shapes)
    if mismatched:
        message = (f"{files.path}: the {config.method} bases of this model differ from those the adapter was "
                   f"trained on ({len(mismatched)} of {len(modules)} modules), e.g. {mismatched[0]}")
        if strict:
            raise AdapterMismatchError(f"{message}; is it for another base model? ({NOT_STRICT_HINT})")
        warnings.warn(message, stacklevel=3)
    config = config_for_modules(model, config, modules)
    with restore_on_error(model, name, modules), torch.no_grad():
        if fresh:
            install_bases(model, "lora_xs", fresh)
        if packed:
            add_packed_lora_xs(model, name, config, {m: files.tensors[f"{m}.lora_R"] for m in modules})
            return name
        attach(model, config, name)
        for module in modules:
            adapter = model.get_submodule(module).adapters[name]
            for param in TRAINED[config.method]:
                getattr(adapter, param).copy_(files.tensors[f"{module}.{param}"])
    return name
