"""Merging is exact bookkeeping: W += ΔW once, recorded; unmerge subtracts the same ΔW back.

Every layer's ΔW is computed and checked finite before any weight changes, so a refused merge
leaves the model untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.model.bank import BANK_ATTR
from lorakit.config import PrefixConfig
from lorakit.errors import AdapterNotFoundError, MergeStateError
from lorakit.layer.linear import adapted_layers
from lorakit.methods.table import method_for
from lorakit.model.record import adapters_of, release
from lorakit.model.prefix_hook import unload_prefixes
from lorakit.layer.quantized import dequantize_model
from lorakit.layer.saved_modules import check_merge_saved, saved_modules, unwrap_saved
from lorakit.layer.trainable_tokens import check_merge_tokens, merge_tokens, token_layers, unwrap_tokens
from lorakit.layer.surgery import replace_module
from lorakit.model.tied import check_untied


def merge(model: nn.Module, name: str) -> None:
    """Add adapter `name` into the base weights (idempotence is refused: merging twice is an error)."""
    registry = adapters_of(model)
    if name not in registry.configs:
        raise AdapterNotFoundError(f"adapter {name!r} not attached; attached: {sorted(registry.configs)}")
    if name in registry.merged:
        raise MergeStateError(f"adapter {name!r} is already merged")
    if isinstance(registry.configs[name], PrefixConfig):
        raise MergeStateError(f"adapter {name!r} is a prefix adapter: it adds attention keys and values, not a weight "
                              "update, so there is nothing to merge")
    touched = {n: layer for n, layer in adapted_layers(model).items() if layer.has(name)}
    check_untied(model, name, list(touched))  # a tied embedding / output head: merging would change both
    layers = list(touched.values())
    factors = [layer.check_mergeable(name) for layer in layers]  # all checked before any write
    check_merge_saved(model, name, registry.merged)
    check_merge_tokens(model, name, registry.merged)
    for layer, (up, down) in zip(layers, factors):
        layer.merge_factors_(name, up, down)
    merge_tokens(model, name, merge=True)  # a saved module's copy needs no write: as-stored calls run it
    registry.merged.append(name)


def unmerge(model: nn.Module, name: str) -> None:
    """Subtract a merged adapter back out of the base weights."""
    registry = adapters_of(model)
    if name not in registry.merged:
        raise MergeStateError(f"adapter {name!r} is not merged; merged: {registry.merged}")
    for layer in adapted_layers(model).values():
        if layer.has(name):
            layer.unmerge_factors_(name)  # exactly what the merge added
    merge_tokens(model, name, merge=False)  # the rows the merge overwrote, back
    registry.merged.remove(name)


def swap_merged(model: nn.Module, old: str, new: str) -> None:
    """Unmerge `old` and merge `new` in one pass over each weight: W += [up_new, −up_old]·[down_new; down_old].

    The single-tenant fast path: one fused addmm per layer instead of two full passes over W.
    """
    registry = adapters_of(model)
    if old not in registry.merged:
        raise MergeStateError(f"adapter {old!r} is not merged; merged: {registry.merged}")
    if new not in registry.configs:
        raise AdapterNotFoundError(f"adapter {new!r} not attached; attached: {sorted(registry.configs)}")
    if new in registry.merged:
        raise MergeStateError(f"adapter {new!r} is already merged")
    if isinstance(registry.configs[new], PrefixConfig):
        raise MergeStateError(f"adapter {new!r} is a prefix adapter: there is nothing to merge")
    check_untied(model, new, [n for n, layer in adapted_layers(model).items() if layer.has(new)])
    rescaling = any(method_for(registry.configs[n]).rescales_output for n in (old, new))  # DoRA: not additive
    if rescaling or saved_modules(model) or token_layers(model):  # whole-module copies, token rows: one after the other
        unmerge(model, old)
        try:
            merge(model, new)
        except BaseException:  # a refused merge leaves the model as it was: `old` merged
            merge(model, old)
            raise
        return
    plan = []
    for layer in adapted_layers(model).values():
        added = layer.check_mergeable(new) if layer.has(new) else None  # every layer checked before any write
        removed = layer.merged_factors(old) if layer.has(old) else None
        if removed is None and layer.has(old):
            removed = layer.factors(old)
        if added is not None or removed is not None:
            plan.append((layer, added, removed))
    for layer, added, removed in plan:
        if layer.quant is not None or added is None or removed is None:
            # a quantized base keeps exact per-adapter records (lorakit.layer.quantized): one entry each
            if removed is not None:
                layer.unmerge_factors_(old)
            if added is not None:
                layer.merge_factors_(new, *added)
            continue
        up_new, down_new = added[0].detach().clone(), added[1].detach().clone()
        up_old, down_old = removed
        wide = torch.promote_types(up_new.dtype, up_old.dtype)
        layer.add_factors_(torch.cat([up_new.to(wide), -up_old.to(wide)], 1),
                           torch.cat([down_new.to(wide), down_old.to(wide)], 0), +1.0)
        layer.forget_merge(old)
        layer.record_merge(new, up_new, down_new)
    registry.merged[registry.merged.index(old)] = new


def merged_names(model: nn.Module) -> list[str]:
    return list(adapters_of(model).merged)


def merge_and_unload(model: nn.Module, names: str | list[str] | None = None, *,
                     full_precision: bool = False) -> nn.Module:
    """Merge `names` (default: the only adapter, or what is already merged) and return the model with
    plain layers and standard state-dict keys. Other adapters (prefix adapters too) are dropped.

    On a quantized base the merged layers stay bitsandbytes layers (requantized), unless `full_precision`:
    then every quantized layer becomes a float nn.Linear, the merged ones holding D(W₀) + ΔW unrounded."""
    registry = adapters_of(model)
    if names is None:
        if registry.merged:
            names = []
        elif len(registry.configs) == 1:
            names = list(registry.configs)
        else:
            raise MergeStateError(f"several adapters attached ({sorted(registry.configs)}): say which to merge")
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name not in registry.merged:
            merge(model, name)
    for full_name, layer in adapted_layers(model).items():
        replace_module(model, full_name, layer.to_plain(full_precision=full_precision))
    unwrap_saved(model)  # the merged adapter's copy (or the original) in place of each wrapper
    unwrap_tokens(model)  # the merged rows are in W already
    if full_precision:
        dequantize_model(model)
    unload_prefixes(model)
    model.__dict__.pop(BANK_ATTR, None)  # the model is plain again
    release(model)
    for param in model.parameters():
        param.requires_grad_(False)
    return model
