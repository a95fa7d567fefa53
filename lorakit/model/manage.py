"""Managing named adapters on a model: list, count, extract state, delete."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.config import AdapterConfig, PrefixConfig
from lorakit.errors import AdapterNotFoundError, MergeStateError
from lorakit.layer.linear import adapted_layers
from lorakit.layer.slots import unshare
from lorakit.model.record import ATTR, adapters_of
from lorakit.model.prefix_hook import prefix_adapter, remove_prefix
from lorakit.layer.saved_modules import remove_saved, saved_parameters, saved_state
from lorakit.layer.surgery import freeze_base
from lorakit.layer.trainable_tokens import remove_tokens, token_parameters, token_state


def adapter_names(model: nn.Module) -> list[str]:
    registry = getattr(model, ATTR, None)
    return list(registry.configs) if registry is not None else []


def adapter_config(model: nn.Module, name: str) -> AdapterConfig:
    registry = adapters_of(model)
    if name not in registry.configs:
        raise AdapterNotFoundError(f"adapter {name!r} not attached; attached: {sorted(registry.configs)}")
    return registry.configs[name]


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """{module_name: {param: tensor}} flattened as 'module.param' — only what adapter `name` trained."""
    config = adapter_config(model, name)
    if isinstance(config, PrefixConfig):  # on no linear layer: the prefix adapter's own tensors
        return {k: v.detach() for k, v in prefix_adapter(model, name).state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    registry = adapters_of(model)
    if name in registry.packed:  # packed LoRA-XS: the trained R, unscaled
        bank = registry.bank
        for module_name, layer in adapted_layers(model).items():
            if layer.has(name):
                state[f"{module_name}.lora_R"] = bank.core(layer.bank_index, name)[: config.r, : config.r] / config.scaling
        return state
    for module_name, layer in adapted_layers(model).items():
        if name in layer.adapters:
            for pname, param in layer.adapters[name].named_parameters():
                state[f"{module_name}.{pname}"] = param.detach()
    return state | saved_state(model, name) | token_state(model, name)


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The trainable parameters of adapter `name` (what an optimiser should get)."""
    if isinstance(adapter_config(model, name), PrefixConfig):
        return list(prefix_adapter(model, name).parameters())
    return [p for layer in adapted_layers(model).values() if name in layer.adapters
            for p in layer.adapters[name].parameters()] + saved_parameters(model, name) + token_parameters(model, name)


def set_trainable(model: nn.Module, name: str | None) -> None:
    """Declare adapter `name` the one being trained (None: undo): only its parameters require gradients, so an
    optimizer built from `requires_grad` parameters (transformers' Trainer, TRL) holds it alone, and calls
    without a `use_adapter` block run it instead of raising RoutingError. The model's own state, like the
    `requires_grad` flags it sets; a per-call route (use_adapter, per row too) still overrides it."""
    registry = adapters_of(model)
    if name is not None:
        adapter_config(model, name)
    registry.trained = name
    apply_trainable(model)


def apply_trainable(model: nn.Module) -> None:
    """Freeze every adapter but the declared trained one (after attach or delete re-ran freeze_base)."""
    registry = adapters_of(model)
    for other in registry.configs:
        if other in registry.packed:
            continue
        for param in adapter_parameters(model, other):
            param.requires_grad_(registry.trained is None or other == registry.trained)


def count_trainable(model: nn.Module, name: str) -> int:
    """Numbers the adapter trains (for a packed adapter: the numbers it trained, r² per module)."""
    return sum(t.numel() for t in adapter_state_dict(model, name).values())


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere and free its memory (and bases no other adapter uses)."""
    registry = adapters_of(model)
    adapter_config(model, name)
    if name in registry.merged:
        raise MergeStateError(f"adapter {name!r} is merged; unmerge it before deleting")
    packed = name in registry.packed
    if packed:  # its cores live in the bank alone: no layer changes, so cached layer maps stay valid
        registry.bank.remove(name)
        registry.packed.discard(name)
    layers_changed = False
    for layer in ({} if packed else registry.layer_map(model)).values():
        if name in layer.adapters:
            unshare(layer, name)  # the slot stack (lorakit.layer.slots) would keep the adapter's memory alive
            del layer.adapters[name]
            layer.drop_unused_bases()
            layers_changed = True
    if isinstance(registry.configs[name], PrefixConfig):
        remove_prefix(model, name)
    remove_saved(model, name)
    remove_tokens(model, name)
    del registry.configs[name]
    if registry.trained == name:
        registry.trained = None
    registry.slot_table.release(name)
    if layers_changed:
        registry.layers_changed()
    if not packed:
        freeze_base(model)
        apply_trainable(model)
