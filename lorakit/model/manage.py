"""Managing named adapters on a model: list, count, extract state, delete."""

from __future__ import annotations

import torch
from torch import nn

from lorakit import walk
from lorakit.config import AdapterConfig, PrefixConfig
from lorakit.errors import AdapterNotFoundError, MergeStateError
from lorakit.layer.linear import AdaptedLinear, adapted_layers
from lorakit.layer.slots import unshare
from lorakit.model.record import ATTR, adapters_of
from lorakit.model.prefix_hook import prefix_adapter, remove_prefix
from lorakit.layer.saved_modules import SavedModule, copy_parameters, remove_saved, saved_state
from lorakit.layer.surgery import freeze_base
from lorakit.layer.trainable_tokens import TokenLayer, delta_parameters, remove_tokens, token_state


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
    return parameters_by_adapter(model).get(name, [])


def parameters_by_adapter(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Adapter name -> its parameters in layers, then in modules_to_save copies, then trainable tokens (the order
    optimizers and their saved states were built in; prefix adapters aside), from one walk of the model: a walk
    per adapter made each attach cost a walk per adapter already there, each visiting every adapter's modules."""
    layers: dict[str, list[nn.Parameter]] = {}
    copies: dict[str, list[nn.Parameter]] = {}
    tokens: dict[str, list[nn.Parameter]] = {}
    for module in walk.modules(model):  # an adapted layer's adapters are read from it, not walked into
        if isinstance(module, AdaptedLinear):
            found, into = {name: list(a.parameters()) for name, a in module.adapters.items()}, layers
        elif isinstance(module, SavedModule):
            found, into = copy_parameters(module), copies
        elif isinstance(module, TokenLayer):
            found, into = delta_parameters(module), tokens
        else:
            continue
        for name, params in found.items():
            into.setdefault(name, []).extend(params)
    return {name: layers.get(name, []) + copies.get(name, []) + tokens.get(name, [])
            for name in {**layers, **copies, **tokens}}


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
    trained = registry.trained
    groups = parameters_by_adapter(model)
    for other, config in registry.configs.items():
        if other in registry.packed:
            continue
        prefix = isinstance(config, PrefixConfig)
        params = prefix_adapter(model, other).parameters() if prefix else groups.get(other, [])
        for param in params:
            param.requires_grad_(trained is None or other == trained)


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
