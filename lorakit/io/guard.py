"""Changing a model only after a file was validated, and undoing a half-done load exactly.

`restore_on_error` records what a load may change (the named modules, their bases, ModelAdapters,
every parameter's requires_grad) and puts it back if anything raises, so a failed load leaves the same
adapter set, the same module objects and the same weights. `install_bases` puts precomputed frozen
bases on layers, so `attach` reuses them instead of recomputing an SVD.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

from lorakit.model.attach import find_targets
from lorakit.model.bases import layer_shape
from lorakit.config import AdapterConfig
from lorakit.errors import (AdapterExistsError, AdapterMismatchError, LorakitError, UnsupportedLayerError)
from lorakit.layer.embedding import adapted_layer, is_embedding
from lorakit.layer.linear import AdaptedLinear, is_adaptable
from lorakit.methods.basis import Basis
from lorakit.model.record import ATTR as ADAPTERS_ATTR, adapters_of
from lorakit.names import check_adapter_name
from lorakit.layer.surgery import replace_module


def check_free_name(model: nn.Module, name: str) -> None:
    check_adapter_name(name)
    registry = getattr(model, ADAPTERS_ATTR, None)
    if registry is not None and name in registry.configs:
        raise AdapterExistsError(f"adapter {name!r} is already attached; delete it first or load under another name")


def target_shapes(model: nn.Module, modules: Iterable[str], where: object) -> dict[str, tuple[int, int]]:
    """module -> (in, out) for every named module; unknown or unsupported modules are errors."""
    found = dict(model.named_modules())
    unknown = sorted(m for m in modules if m not in found or not m)
    if unknown:
        examples = [n for n, mod in found.items() if n and is_adaptable(mod)][:3]
        raise AdapterMismatchError(f"{where}: module(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} do not exist "
                                   f"in {type(model).__name__} (its adaptable layers look like {examples}): is the "
                                   "adapter for another model?")
    bad = sorted(f"{m} ({type(found[m]).__name__})" for m in modules
                 if not (is_adaptable(found[m]) or is_embedding(found[m])))
    if bad:
        raise UnsupportedLayerError(f"{where}: module(s) {bad[:5]} are not linear or embedding layers; lorakit "
                                    "adapts only nn.Linear, transformers' Conv1D and (LoRA) nn.Embedding")
    return {m: layer_shape(found[m]) for m in modules}


def config_for_modules(model: nn.Module, config: AdapterConfig, modules: list[str],
                       alternatives: Iterable[object] = ()) -> AdapterConfig:
    """`config`, with the first of its own targets or `alternatives` that selects exactly `modules` on this
    model (so ModelAdapters keeps a readable spec like "all-linear"), else naming the modules."""
    for targets in (config.target_modules, *alternatives):
        try:
            candidate = dataclasses.replace(config, target_modules=targets)
            if set(find_targets(model, candidate)) == set(modules):
                return candidate
        except (LorakitError, TypeError, ValueError):
            continue
    ordered = [n for n, _ in model.named_modules() if n in set(modules)]
    return dataclasses.replace(config, target_modules=tuple(ordered), exclude_modules=())


@contextmanager
def restore_on_error(model: nn.Module, name: str, modules: Iterable[str]) -> Iterator[None]:
    """On any exception inside the block, undo what attaching adapter `name` to `modules` changed."""
    modules = set(modules)
    before = {n: m for n, m in model.named_modules() if n in modules}
    bases_before = {n: dict(m.bases) for n, m in before.items() if isinstance(m, AdaptedLinear)}
    had_registry = ADAPTERS_ATTR in model.__dict__
    registry = getattr(model, ADAPTERS_ATTR, None)
    projections_before = dict(registry.vera_projections) if registry is not None else {}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        yield
    except BaseException:
        registry = getattr(model, ADAPTERS_ATTR, None)
        if registry is not None:
            registry.configs.pop(name, None)
            registry.slot_table.release(name)
            registry.vera_projections = projections_before
            registry.version += 1  # adapted layers changed: drop ModelAdapters' cached layer map
        for module_name, original in before.items():
            current = model.get_submodule(module_name)
            if current is not original:
                replace_module(model, module_name, original)
            if isinstance(original, AdaptedLinear):
                if name in original.adapters:
                    del original.adapters[name]
                for key in [k for k in original.bases if k not in bases_before[module_name]]:
                    del original.bases[key]
                for key, basis in bases_before[module_name].items():
                    original.bases[key] = basis
        if not had_registry and ADAPTERS_ATTR in model.__dict__:
            object.__delattr__(model, ADAPTERS_ATTR)
        for param_name, param in model.named_parameters():
            if param_name in grads:
                param.requires_grad_(grads[param_name])
        raise


def install_bases(model: nn.Module, key: str, bases: dict[str, Basis]) -> None:
    """Put `bases[module]` under `key` on each module (wrapping plain layers); call inside restore_on_error."""
    registry = adapters_of(model, create=True)
    for module_name, basis in bases.items():
        layer = model.get_submodule(module_name)
        if not isinstance(layer, AdaptedLinear):
            layer = adapted_layer(layer, module_name, registry)
            replace_module(model, module_name, layer)
            registry.version += 1
        have = layer.basis(key)
        if have is None or have.rank < basis.rank:
            layer.bases[key] = basis.to(layer.weight.device)
