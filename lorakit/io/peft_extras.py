"""PEFT's `modules_to_save` and `trainable_token_indices` in PEFT LoRA files, both ways.

    adapter_config.json         "modules_to_save": [module, ...]   (full names: PEFT matches by string suffix)
                                "trainable_token_indices": [id, ...] (the input embedding) or {module: [id, ...]}
    adapter_model.safetensors   base_model.model.<module>.<param>   a saved module's copy (weight, bias...)
                                base_model.model.<embedding>.token_adapter.trainable_tokens_delta   (n_tokens, dim)

PEFT strips `modules_to_save.<adapter>` from the copy's keys, so a copy is stored under the module's own
path; on load the config's names say which keys are copies. The tied output head has no tensors of its
own (it reads the embedding's rows). Everything is checked against the model before it is touched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.model.manage import adapter_state_dict
from lorakit.config import LoraConfig
from lorakit.errors import AdapterMismatchError, CorruptAdapterError
from lorakit.io.files import PEFT_KEY_PREFIX, AdapterFiles, check_finite
from lorakit.layer.saved_modules import COPIES, SavedModule
from lorakit.layer.trainable_tokens import TokenLayer

TOKENS_KEY = ".token_adapter.trainable_tokens_delta"  # after the embedding's path, in PEFT's files
FIELDS = ("modules_to_save", "trainable_token_indices")


@dataclass(frozen=True)
class Extras:
    """What a PEFT file holds beside LoRA: copies of whole modules and trained token rows."""

    saved: dict[str, dict[str, torch.Tensor]]  # module -> {param: tensor} of its trained copy
    tokens: dict[str, torch.Tensor]  # embedding module -> (n_tokens, dim) new rows
    token_indices: object  # LoraConfig.trainable_token_indices: ids, {module: ids} or None

    def modules(self) -> list[str]:
        return list(self.saved) + list(self.tokens)

    def config(self, config: LoraConfig) -> LoraConfig:
        return dataclasses.replace(config, modules_to_save=tuple(self.saved), trainable_token_indices=self.token_indices)


def _original(module: nn.Module) -> nn.Module:
    return module.original_module if isinstance(module, (SavedModule, TokenLayer)) else module


def split_extras(model: nn.Module, files: AdapterFiles) -> tuple[AdapterFiles, Extras]:
    """(the files with only their LoRA part left, the extras checked against `model`)."""
    cfg, where = files.config, files.path
    patterns = cfg.get("modules_to_save") or []
    token_cfg = cfg.get("trainable_token_indices")
    modules = dict(model.named_modules())
    # PEFT's rule: a module is saved when its name ends with a listed string; the longest owner wins
    owners = sorted((n for n in modules if n and any(n.endswith(p) for p in patterns)), key=len, reverse=True)
    rest: dict[str, torch.Tensor] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    tokens: dict[str, torch.Tensor] = {}
    for key, tensor in files.tensors.items():
        path = key[len(PEFT_KEY_PREFIX):] if key.startswith(PEFT_KEY_PREFIX) else ""
        owner = next((o for o in owners if path.startswith(f"{o}.")), None) if ".lora_" not in path else None
        if token_cfg is not None and path.endswith(TOKENS_KEY):
            tokens[path[: -len(TOKENS_KEY)]] = tensor
        elif path and owner is not None:
            saved.setdefault(owner, {})[path[len(owner) + 1:]] = tensor
        else:
            rest[key] = tensor
    for module, state in saved.items():
        expected = {k: v.shape for k, v in _original(modules[module]).state_dict().items()}
        if set(state) != set(expected):
            raise CorruptAdapterError(f"{where}: modules_to_save {module} has tensors {sorted(state)} but the "
                                      f"{type(_original(modules[module])).__name__} holds {sorted(expected)}")
        bad = [f"{k} {tuple(v.shape)} vs {tuple(expected[k])}" for k, v in state.items() if v.shape != expected[k]]
        if bad:
            raise AdapterMismatchError(f"{where}: modules_to_save {module}: file vs model shapes {bad[:3]}")
    indices = _token_indices(model, token_cfg, tokens, where)
    check_finite({f"{m}.{k}": v for m, s in saved.items() for k, v in s.items()} | tokens, where)
    left = dataclasses.replace(files, config={k: v for k, v in cfg.items() if k not in FIELDS}, tensors=rest)
    return left, Extras(saved, tokens, indices)


def _token_indices(model: nn.Module, token_cfg: object, tokens: dict[str, torch.Tensor], where: object) -> object:
    if token_cfg is None:
        return None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embed_name = next((n for n, m in model.named_modules() if m is embed), None)
    if isinstance(token_cfg, list):
        wanted = {embed_name: token_cfg}
    elif isinstance(token_cfg, dict):
        wanted = {}
        for module in tokens:
            pattern = next((p for p in token_cfg if module.endswith(p)), None)
            if pattern is None:
                raise CorruptAdapterError(f"{where}: trainable tokens for {module}, which trainable_token_indices "
                                          f"{sorted(token_cfg)} does not name")
            wanted[module] = token_cfg[pattern]
    else:
        raise CorruptAdapterError(f"{where}: trainable_token_indices must be a list or a mapping, got {token_cfg!r}")
    if set(wanted) != set(tokens):
        raise CorruptAdapterError(f"{where}: trainable_token_indices is for {sorted(map(str, wanted))} but the "
                                  f"file has token rows for {sorted(tokens)}")
    for module, ids in wanted.items():
        dim = _original(model.get_submodule(module)).weight.shape[1]
        if not isinstance(ids, list) or tuple(tokens[module].shape) != (len(ids), dim):
            raise AdapterMismatchError(f"{where}: {module}{TOKENS_KEY} is {tuple(tokens[module].shape)}, expected "
                                       f"({len(ids) if isinstance(ids, list) else '?'}, {dim}) for ids {ids!r}")
    return token_cfg if isinstance(token_cfg, list) else {m: ids for m, ids in wanted.items()}


@torch.no_grad()
def fill_extras(model: nn.Module, name: str, extras: Extras) -> None:
    """Copy the file's values into adapter `name`'s copies and token rows (attached by `attach` just before)."""
    for module, state in extras.saved.items():
        model.get_submodule(f"{module}.{COPIES}.{name}").load_state_dict(state, strict=True)
    for module, rows in extras.tokens.items():
        delta = model.get_submodule(module).trainable_tokens_delta[name]
        delta.copy_(rows)


def peft_extras(model: nn.Module, name: str, config: LoraConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config fields, tensors) PEFT's save_pretrained writes for adapter `name`'s copies and token rows."""
    state = adapter_state_dict(model, name)
    tensors: dict[str, torch.Tensor] = {}
    saved: list[str] = []
    for key, tensor in state.items():
        if f".{COPIES}." in key:
            module, param = key.split(f".{COPIES}.", 1)
            saved += [module] if module not in saved else []
            tensors[f"{PEFT_KEY_PREFIX}{module}.{param}"] = tensor
        elif key.endswith(".trainable_tokens_delta"):
            tensors[f"{PEFT_KEY_PREFIX}{key.removesuffix('.trainable_tokens_delta')}{TOKENS_KEY}"] = tensor
    indices = config.trainable_token_indices
    if indices is not None and not isinstance(indices[0], int):  # full names: PEFT matches by string suffix
        indices = {n: m.ids(name).tolist() for n, m in model.named_modules()
                   if isinstance(m, TokenLayer) and not m.is_head and name in m.names()}
    elif indices is not None:
        indices = list(indices)
    return {"modules_to_save": saved or None, "trainable_token_indices": indices}, tensors


def extras_of(model: nn.Module, name: str) -> list[str]:
    """What adapter `name` holds beyond LoRA factors, in words (empty for a plain LoRA adapter)."""
    state = adapter_state_dict(model, name)
    saved = sorted({k.split(f".{COPIES}.", 1)[0] for k in state if f".{COPIES}." in k})
    tokens = sorted(k.removesuffix(".trainable_tokens_delta") for k in state if k.endswith(".trainable_tokens_delta"))
    return ([f"modules_to_save {saved}"] if saved else []) + ([f"trainable tokens on {tokens}"] if tokens else [])
