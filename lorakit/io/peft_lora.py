"""LoRA adapters in Hugging Face PEFT's file format, both ways.

    adapter_config.json         every field PEFT 0.21 writes: peft_type "LORA", r, lora_alpha, target_modules,
                                use_rslora, fan_in_fan_out, rank_pattern, alpha_pattern, task_type ...
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight  (r, in)
                                base_model.model.<module path>.lora_B.weight  (out, r)
                                base_model.model.<module path>.lora_magnitude_vector  (out,)  DoRA only
                                (use_dora in the config; lorakit.methods.dora)
                                (an nn.Embedding target: .lora_embedding_A (r, V), .lora_embedding_B (D, r),
                                lorakit.io.peft_embedding)

PEFT wraps the user's model, hence the `base_model.model.` prefix; the module path is the path in the
model the adapter was attached to, and the adapter's name is not part of any key. Per-module ranks and
alphas (`rank_pattern` / `alpha_pattern`) are read and written, and DoRA on linear layers; features that
change the forward pass in ways lorakit does not implement (biases, conv targets...) are refused by name before
the model is touched. modules_to_save and trainable tokens are read and written by lorakit.io.peft_extras; embedding
targets by lorakit.io.peft_embedding.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Collection
from pathlib import Path, PureWindowsPath

import torch
from torch import nn

from lorakit.model.manage import adapter_config
from lorakit.model.attach import attach
from lorakit.config import LoraConfig
from lorakit.errors import AdapterConfigError, AdapterMismatchError, CorruptAdapterError, UnsupportedAdapterError
from lorakit.io.atomic import json_bytes, tensors_bytes, write_directory
from lorakit.io.files import CONFIG_NAME, NOT_STRICT_HINT, PEFT_KEY_PREFIX, WEIGHTS_NAME, AdapterFiles, check_finite
from lorakit.io.guard import check_free_name, config_for_modules, restore_on_error, target_shapes
from lorakit.io.peft_embedding import (EMBEDDING_KEYS, check_base_copies, check_layouts, pair_keys,
                                       split_base_copies)
from lorakit.io.peft_extras import fill_extras, peft_extras, split_extras
from lorakit.layer.linear import AdaptedLinear, adapted_layers

PEFT_FORMAT_VERSION = "0.21.2"  # the PEFT release whose file layout this module writes
KEY_PREFIX = PEFT_KEY_PREFIX
_A, _B = ".lora_A.weight", ".lora_B.weight"
_M = ".lora_magnitude_vector"  # DoRA's (out,) magnitudes: PEFT drops the ".weight" of its DoraLinearLayer

# Config fields whose non-default value changes the forward pass in a way lorakit does not implement.
_UNSUPPORTED: dict[str, str] = {
    "lora_bias": "LoRA bias terms (lora_bias)",
    "target_parameters": "parameter targets (target_parameters)",
    "layer_replication": "layer_replication",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
}


def base_model_name(model: nn.Module) -> str | None:
    """The base model's name as adapters record it: a hub id as transformers keeps it (embedded models
    report theirs), a local directory by its own name (portable_base_name), never a path of this machine."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return portable_base_name(str(name)) if name else None


_HUB_SNAPSHOT = re.compile(r"(?:^|[\\/])models--([^\\/]+)[\\/]snapshots(?:[\\/]|$)")  # HF cache: models--org--name


def portable_base_name(name: str) -> str:
    """`name` if it is a hub id; for a local path, the hub id of a Hugging Face cache snapshot, else the
    directory's own name (an absolute path does not carry to another machine)."""
    snapshot = _HUB_SNAPSHOT.search(name)
    if snapshot:
        return snapshot.group(1).replace("--", "/")
    if "\\" in name:  # a Windows path
        return PureWindowsPath(name).name or name
    path = Path(name).expanduser()
    local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or path.exists()
    if not local:
        return name
    return (path.resolve() if path.exists() else path).name or name


def _number(x: float) -> int | float:
    """16.0 -> 16 (PEFT writes alphas as ints), anything else as it is."""
    return int(round(x)) if abs(x - round(x)) < 1e-9 else float(x)


def _target_list(model: nn.Module, modules: list[str]) -> list[str]:
    """Leaf names (q_proj, ...) when they select exactly `modules` in PEFT's suffix matching, else full paths."""
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules})
    selected = {n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in suffixes}
    return suffixes if selected == set(modules) else sorted(modules)


def _task_type(model: nn.Module) -> str | None:
    # Only causal LMs: PEFT's classification wrappers expect the head's weights in the file.
    return "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None


def peft_config_dict(model: nn.Module, modules: list[str], r: int, lora_alpha: float, *, use_rslora: bool = False,
                     lora_dropout: float = 0.0, rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                     task_type: str | None | bool = True, use_dora: bool = False) -> dict:
    """The adapter_config.json PEFT writes for a LoRA (or, use_dora, DoRA) adapter on `modules` of `model`."""
    task = _task_type(model) if task_type is True else (task_type or None)
    cls = type(model)
    fan_in_fan_out = any(getattr(model.get_submodule(m), "fan_in_fan_out", False) or
                         type(model.get_submodule(m)).__name__ == "Conv1D" for m in modules)
    return {
        "alora_invocation_tokens": None, "alpha_pattern": dict(alpha_pattern or {}), "arrow_config": None,
        "auto_mapping": None if task else {"base_model_class": cls.__name__, "parent_library": cls.__module__},
        "base_model_name_or_path": base_model_name(model), "bias": "none", "corda_config": None,
        "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out, "inference_mode": True, "init_lora_weights": True,
        "kasa_config": None, "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
        "loftq_config": {}, "lora_alpha": _number(lora_alpha), "lora_bias": False,
        "lora_dropout": float(lora_dropout), "lora_ga_config": None, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None,
        "peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION, "qalora_group_size": 16, "r": int(r),
        "rank_pattern": dict(rank_pattern or {}), "revision": None, "target_modules": _target_list(model, modules),
        "target_parameters": None, "task_type": task, "trainable_token_indices": None, "use_bdlora": None,
        "use_dora": bool(use_dora), "use_qalora": False, "use_rslora": bool(use_rslora), "velora_config": None,
    }


def write_peft_lora(model: nn.Module, path: str | os.PathLike, weights: dict[str, tuple[torch.Tensor, ...]],
                    config: dict, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `weights` (module -> (lora_A (r, in), lora_B (out, r)[, DoRA's magnitude (out,)])), `extra` tensors
    (full PEFT keys) and `config` as a PEFT adapter dir."""
    tensors = dict(extra or {})
    for module, (a, b, *magnitude) in weights.items():
        a_key, b_key = pair_keys(model, module)
        tensors[f"{KEY_PREFIX}{module}{a_key}"] = a
        tensors[f"{KEY_PREFIX}{module}{b_key}"] = b
        if magnitude:
            tensors[f"{KEY_PREFIX}{module}{_M}"] = magnitude[0]
    return write_directory(path, {CONFIG_NAME: json_bytes(config),
                                  WEIGHTS_NAME: tensors_bytes(tensors, {"format": "pt"})})


def save_lora(model: nn.Module, name: str, path: str | os.PathLike, *, task_type: str | None | bool = True,
              modules: Collection[str] | None = None, extras: bool = True, magnitudes: bool = True) -> Path:
    """Save LoRA (or DoRA) adapter `name` exactly as PEFT's save_pretrained would (task_type=True infers it);
    `modules` (full names) keeps only those (lorakit.io.export drops modules a runtime cannot serve, when
    asked); extras=False leaves out its modules_to_save copies and trainable tokens, magnitudes=False a DoRA
    adapter's magnitudes (lorakit.io.export's plain LoRA, written where they are a no-op)."""
    config = adapter_config(model, name)
    if not isinstance(config, LoraConfig):
        raise AdapterConfigError(f"adapter {name!r} is {config.method}, not LoRA; use lorakit.io.save_adapter, or "
                                 "export_to_peft for a PEFT copy")
    weights, rank_pattern, alpha_pattern = {}, {}, {}
    for module, layer in adapted_layers(model).items():
        if name not in layer.adapters or (modules is not None and module not in modules):
            continue
        adapter = layer.adapters[name]
        dora = config.use_dora and magnitudes
        weights[module] = (adapter.lora_A, adapter.lora_B) + ((adapter.lora_magnitude_vector,) if dora else ())
        root = adapter.r**0.5 if config.use_rslora else adapter.r
        if adapter.r != config.r:
            rank_pattern[module] = adapter.r
        if not math.isclose(adapter.scaling, config.lora_alpha / root, rel_tol=1e-9):
            alpha_pattern[module] = _number(adapter.scaling * root)
    peft_config = peft_config_dict(model, list(weights), config.r, config.lora_alpha, use_rslora=config.use_rslora,
                                   lora_dropout=config.lora_dropout, rank_pattern=rank_pattern,
                                   alpha_pattern=alpha_pattern, task_type=task_type,
                                   use_dora=config.use_dora and magnitudes)
    fields, extra = peft_extras(model, name, config) if extras else ({}, {})  # copies, trainable token rows
    return write_peft_lora(model, path, weights, peft_config | fields, extra)


# --------------------------------------------------------------------------------------- loading

def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank/alpha pattern rule: the first key that matches the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def check_supported(config: dict, where: Path) -> None:
    """Refuse PEFT files that are not plain LoRA, naming the feature."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        if peft_type is None:
            raise CorruptAdapterError(f"{where}: no 'peft_type' and no 'lorakit_method': not an adapter config")
        raise UnsupportedAdapterError(f"{where}: peft_type {peft_type!r} is not supported; lorakit reads PEFT "
                                      "LoRA adapters (peft_type 'LORA') and its own LoRA-XS / VeRA files")
    used = [label for field, label in _UNSUPPORTED.items() if config.get(field)]
    if config.get("bias", "none") not in ("none", None):
        used.append(f"bias={config['bias']!r}")
    if used:
        raise UnsupportedAdapterError(f"{where}: this PEFT adapter uses {', '.join(used)}, which lorakit does not "
                                      "support; only plain LoRA (optionally rsLoRA, rank/alpha patterns) loads")


def _split_keys(tensors: dict[str, torch.Tensor], where: Path,
                layouts: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """module -> {"A": lora_A, "B": lora_B[, "M": DoRA's magnitude]} (`layouts` gets each module's key layout);
    foreign keys are named (by feature where recognised)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    features, unexpected = set(), []
    suffixes = {_A: ("A", "linear"), _B: ("B", "linear"), _M: ("M", "linear"),
                EMBEDDING_KEYS[0]: ("A", "embedding"), EMBEDDING_KEYS[1]: ("B", "embedding")}
    for key, tensor in tensors.items():
        rest = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else None
        suffix = next((s for s in suffixes if rest is not None and rest.endswith(s)), None)
        if suffix is not None:
            part, layout = suffixes[suffix]
            pairs.setdefault(rest[: -len(suffix)], {})[part] = tensor
            if part != "M":  # a magnitude says nothing of the layer's kind
                layouts[rest[: -len(suffix)]] = layout
        elif "lora_magnitude_vector" in key:
            features.add("DoRA beyond linear layers (lora_magnitude_vector)")
        elif ".lora_B.bias" in key:
            features.add("LoRA bias terms (lora_B.bias)")
        else:
            unexpected.append(key)
    if features:
        raise UnsupportedAdapterError(f"{where}: the file uses {', '.join(sorted(features))}, which lorakit does "
                                      "not support")
    if unexpected:
        raise CorruptAdapterError(f"{where}: unexpected keys {sorted(unexpected)[:5]}: expected only "
                                  f"'{KEY_PREFIX}<module>{_A}' and '...{_B}' (modules_to_save or a non-PEFT file?)")
    keys = {"linear": (_A, _B), "embedding": EMBEDDING_KEYS}
    missing = sorted(f"{KEY_PREFIX}{m}{keys[layouts.get(m, 'linear')][0 if 'A' not in p else 1]}"
                     for m, p in pairs.items() if not {"A", "B"} <= set(p))
    if missing:
        raise CorruptAdapterError(f"{where}: missing keys {missing[:5]} (every module needs both A and B)")
    if not pairs:
        raise CorruptAdapterError(f"{where}: holds no LoRA tensors")
    return pairs


def _plan(model: nn.Module, files: AdapterFiles, strict: bool) -> tuple[LoraConfig, dict]:
    """Check everything against the model and return (config, module -> (A, B, r, scaling))."""
    cfg, where = files.config, files.path / WEIGHTS_NAME
    check_supported(cfg, files.path / CONFIG_NAME)
    try:
        r, alpha = cfg["r"], cfg["lora_alpha"]
        config = LoraConfig(r=r, lora_alpha=float(alpha), use_rslora=bool(cfg.get("use_rslora", False)),
                            lora_dropout=float(cfg.get("lora_dropout") or 0.0), use_dora=bool(cfg.get("use_dora")))
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptAdapterError(f"{files.path / CONFIG_NAME}: bad or missing LoRA field: {exc}") from None
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    tensors, base_copies = split_base_copies(files.tensors, KEY_PREFIX)
    layouts: dict[str, str] = {}
    pairs = _split_keys(tensors, where, layouts)
    if not strict:
        present = {n for n, _ in model.named_modules()}
        pairs = {m: p for m, p in pairs.items() if m in present}
        base_copies = {m: t for m, t in base_copies.items() if m in pairs}
        if not pairs:
            raise AdapterMismatchError(f"{where}: none of the adapter's modules exist in {type(model).__name__}")
    try:
        shapes = target_shapes(model, list(pairs), where)
    except AdapterMismatchError as exc:  # modules this model lacks: a non-strict load skips them
        raise AdapterMismatchError(f"{exc} ({NOT_STRICT_HINT})") from None
    check_layouts(model, {m: layouts[m] for m in pairs}, where)
    check_base_copies(model, base_copies, set(pairs), where)
    plan = {}
    for module, pair in pairs.items():
        a, b = pair["A"], pair["B"]
        magnitude = _magnitude(pair, module, config.use_dora, layouts[module], where)
        if a.dim() != 2 or b.dim() != 2:
            raise UnsupportedAdapterError(f"{where}: module {module} has {a.dim()}-D LoRA weights (a conv layer "
                                          "target?); lorakit supports linear layers only")
        in_f, out_f = shapes[module]
        r_mod = a.shape[0]
        if tuple(a.shape) != (r_mod, in_f) or tuple(b.shape) != (out_f, r_mod):
            raise AdapterMismatchError(f"{where}: module {module} expects lora_A ({r_mod}, {in_f}) and lora_B "
                                       f"({out_f}, {r_mod}) for a {in_f}->{out_f} layer, the file has "
                                       f"{tuple(a.shape)} and {tuple(b.shape)}")
        if magnitude is not None and tuple(magnitude.shape) != (out_f,):
            raise AdapterMismatchError(f"{where}: module {module} expects lora_magnitude_vector ({out_f},) for a "
                                       f"{in_f}->{out_f} layer, the file has {tuple(magnitude.shape)}")
        want_r = _pattern_value(rank_pattern, module, config.r)
        if r_mod != want_r:
            raise CorruptAdapterError(f"{where}: module {module} has rank {r_mod} but the config says r={want_r}")
        alpha_mod = _pattern_value(alpha_pattern, module, config.lora_alpha)
        try:
            dataclasses.replace(config, lora_alpha=alpha_mod)  # the same bounds as the config's own alpha
        except (TypeError, ValueError) as exc:
            raise CorruptAdapterError(f"{files.path / CONFIG_NAME}: alpha_pattern for module {module}: {exc}") from None
        alpha_mod = float(alpha_mod)
        scaling = alpha_mod / (r_mod**0.5 if config.use_rslora else r_mod)
        plan[module] = (a, b, r_mod, scaling, magnitude)
    check_finite({f"{KEY_PREFIX}{m}{_A}": p[0] for m, p in plan.items()} |
                 {f"{KEY_PREFIX}{m}{_B}": p[1] for m, p in plan.items()} |
                 {f"{KEY_PREFIX}{m}{_M}": p[4] for m, p in plan.items() if p[4] is not None}, where)
    return config, plan


def _magnitude(pair: dict[str, torch.Tensor], module: str, use_dora: bool, layout: str,
               where: Path) -> torch.Tensor | None:
    """DoRA's magnitude of `module`: present exactly when the config says use_dora, on linear layers only."""
    if use_dora and layout != "linear":
        raise UnsupportedAdapterError(f"{where}: DoRA on embedding {module}: lorakit's DoRA adapts linear layers only")
    if use_dora and "M" not in pair:
        raise CorruptAdapterError(f"{where}: missing key {KEY_PREFIX}{module}{_M}: the config says use_dora, so "
                                  "every module needs its DoRA magnitude")
    if not use_dora and "M" in pair:
        raise CorruptAdapterError(f"{where}: key {KEY_PREFIX}{module}{_M} is a DoRA magnitude, but the config "
                                  "does not say use_dora")
    return pair.get("M")


def load_lora(model: nn.Module, files: AdapterFiles, name: str, *, strict: bool = True) -> str:
    """Attach PEFT LoRA adapter `files` as `name`; the model is untouched unless all checks pass."""
    check_free_name(model, name)
    files, extras = split_extras(model, files)  # modules_to_save copies and token rows, checked
    config, plan = _plan(model, files, strict)
    peft_targets = files.config.get("target_modules")
    if isinstance(peft_targets, list):
        peft_targets = sorted(peft_targets)
    config = config_for_modules(model, config, list(plan), [t for t in (peft_targets, "all-linear") if t])
    config = extras.config(config)
    with restore_on_error(model, name, list(plan) + extras.modules()), torch.no_grad():
        attach(model, config, name)
        fill_extras(model, name, extras)
        for module, (a, b, r_mod, scaling, magnitude) in plan.items():
            layer: AdaptedLinear = model.get_submodule(module)
            adapter = layer.adapters[name]
            if adapter.r != r_mod:  # rank_pattern: this module's rank differs from the config's r
                dtype, device = adapter.lora_A.dtype, adapter.lora_A.device
                adapter.lora_A = nn.Parameter(torch.empty(a.shape, dtype=dtype, device=device))
                adapter.lora_B = nn.Parameter(torch.empty(b.shape, dtype=dtype, device=device))
                adapter.r = r_mod
            adapter.scaling = scaling
            adapter.lora_A.copy_(a)
            adapter.lora_B.copy_(b)
            if magnitude is not None:
                adapter.lora_magnitude_vector.copy_(magnitude)
    return name
