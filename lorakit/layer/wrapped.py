"""What the whole-module wrappers (lorakit.layer.saved_modules, lorakit.layer.trainable_tokens) share.

A wrapper takes the place of a base module but keeps its state-dict keys: it registers the original's own
parameters, buffers and children as its own (the same objects), so `score.weight` stays `score.weight`,
and calls the original's forward through a plain reference. Which adapter applies comes from the call's
route, as for AdaptedLinear: one key for the whole batch, or one per row (`row_keys`), and `by_rows` runs
a row-independent function once per distinct key on that key's rows and puts the rows back in order.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn

from lorakit import walk
from lorakit.errors import RoutingError, UnsupportedLayerError
from lorakit.routing.context import AS_STORED, Blend, current_route

# One row's key: an adapter that has something at this module, or None (the module as stored / the base).
RowKey = Hashable


class WholeModuleWrapper(nn.Module):
    """Base of the wrappers: takes over `original`'s tensors and children under their own names (the same
    objects) and keeps the original, called through a plain reference, in step with .to() and .train()."""

    def __init__(self, original: nn.Module, reserved: tuple[str, ...]) -> None:
        super().__init__()
        clash = sorted(set(reserved) & (set(original._parameters) | set(original._buffers) | set(original._modules)))
        if clash:
            raise UnsupportedLayerError(f"{type(original).__name__} already has attributes {clash}; it cannot be "
                                        "wrapped")
        self._parameters.update(original._parameters)
        self._buffers.update(original._buffers)
        self._non_persistent_buffers_set.update(original._non_persistent_buffers_set)
        self._modules.update(original._modules)
        object.__setattr__(self, "original_module", original)  # a plain reference: its tensors are the wrapper's
        self.training = original.training

    def _apply(self, fn: Any, recurse: bool = True) -> "WholeModuleWrapper":
        """.to(), .half()...: after they rebind tensors, point the original at the same ones."""
        super()._apply(fn, recurse)
        original = self.original_module
        for name in original._parameters:
            original._parameters[name] = self._parameters[name]
        for name in original._buffers:
            original._buffers[name] = self._buffers[name]
        return self

    def train(self, mode: bool = True) -> "WholeModuleWrapper":
        super().train(mode)  # the adopted children and the copies are submodules; the original itself is not
        self.original_module.training = mode
        return self


def wrapped_prefixes(model: nn.Module) -> tuple[str, ...]:
    """'name.' of every module lorakit wraps whole: what lies below is the wrapper's, never a target."""
    return tuple(f"{n}." for n, m in walk.named_modules(model) if isinstance(m, WholeModuleWrapper))


def route_names(registry: Any, module_name: str) -> object:
    """The adapter names this call runs (the route's, else the record's default; AS_STORED when merged).

    Under torch.compile the route is handed to AdaptedLinear layers as slot tensors, never to these
    wrappers: refused rather than run with the wrong adapter."""
    if torch.compiler.is_compiling():
        raise RoutingError(f"{module_name}: modules_to_save copies and trainable tokens do not run under "
                           "torch.compile or lorakit.CompiledForward; run this model eagerly")
    route = current_route(id(registry))
    return route.names if route is not None else registry.default_names()


def row_keys(names: object, key_of: Callable[[str | None], RowKey], module_name: str, what: str) -> object:
    """The key of each row (a tuple) or of the whole call; a blend touching this module is refused."""
    def one(name: object) -> RowKey:
        if isinstance(name, Blend):
            involved = [n for n in name.names if key_of(n) is not None]
            if involved:
                raise RoutingError(f"{module_name}: adapter(s) {involved} hold {what} here, which has no blended "
                                   "meaning; route them by name, not in a blend")
            return key_of(None)
        return key_of(name)  # type: ignore[arg-type]

    if names is AS_STORED:
        return AS_STORED
    if isinstance(names, tuple):
        keys = tuple(one(n) for n in names)
        return keys[0] if len(set(keys)) == 1 else keys
    return one(names)


def by_rows(keys: tuple, x: torch.Tensor, run: Callable[[RowKey, torch.Tensor], torch.Tensor],
            module_name: str) -> torch.Tensor:
    """run(key, x[rows]) for each distinct key, the outputs put back in row order (batch is dim 0)."""
    if x.shape[0] != len(keys):
        raise RoutingError(f"{module_name}: route has {len(keys)} row names but the batch has {x.shape[0]} rows "
                           f"(input shape {tuple(x.shape)})")
    groups: dict[RowKey, list[int]] = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    order = torch.tensor([r for rows in groups.values() for r in rows], device=x.device)
    outs = [run(key, x[torch.tensor(rows, device=x.device)]) for key, rows in groups.items()]
    return torch.cat(outs).index_select(0, torch.argsort(order))  # row i of the output is input row i's
