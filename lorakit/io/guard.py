"""Changing a model only after a file was validated, and undoing a half-done load exactly.

`restore_on_error` records what a load may change (the named modules, their bases, ModelAdapters,
every parameter's requires_grad) and puts it back if anything raises, so a failed load leaves the same
adapter set, the same module objects and the same weights.
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
from lorakit.layer.embedding import is_embedding
from lorakit.layer.linear import is_adaptable
from lorakit.model.record import ATTR as ADAPTERS_ATTR, unwrap_on_error
from lorakit.names import check_adapter_name


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
    """On any exception inside the block, undo what attaching adapter `name` to `modules` changed: the
    layers and the record (lorakit.model.record.unwrap_on_error), and every parameter's requires_grad."""
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        with unwrap_on_error(model, name, modules):
            yield
    except BaseException:
        for param_name, param in model.named_parameters():
            if param_name in grads:
                param.requires_grad_(grads[param_name])
        raise
