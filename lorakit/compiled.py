"""A forward compiled once for every route of one batch size: the route is an input, not code.

    step = lorakit.CompiledForward(model, mode="reduce-overhead")   # CUDA graphs on a GPU
    logits = step(["fr", None, "de", "fr"], input_ids=ids).logits    # any names, same graph

Adapted layers normally find their route in a ContextVar, which torch.compile cannot trace (a graph break
in every layer). Here the route is resolved into slot index tensors before the call (lorakit.route_slots,
`complete=True`: every kind and merged adapter of the model has a tensor, whichever rows use it), and the
compiled function hands them to the layers through the model's record while it is traced. At run time
the compiled graph takes them as ordinary tensor inputs, so a new route of the same batch size changes
values, not code: no graph break, no recompile. Slot stacks are built before the call, never inside it.
Blends (`{"pirate": 0.7, "poet": 0.3}` for a row) are weight tensors: new weights change values only; a
route with more parts of one kind than any before, or the first blend after plain names, compiles anew.

Inference only (the layers read the slot stacks, not per-call stacks of parameters), and only adapters
that live in layers: a prefix adapter's keys and values come from a hook this path does not carry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lorakit.config import PrefixConfig
from lorakit.errors import RoutingError
from lorakit.layer import adapted_layers
from lorakit.model_adapters import ATTR as ADAPTERS_ATTR, ModelAdapters
from lorakit.route_slots import RouteSlots, resolve
from lorakit.route_state import Route, RowName, normalised_names, route_for
from lorakit.slots import kind_of, stack_for


class CompiledForward:
    """`model(*args, **kwargs)` under a per-row route, through one torch.compile'd function."""

    def __init__(self, model: nn.Module, *, backend: str = "inductor", mode: str | None = None,
                 dynamic: bool | None = None, fullgraph: bool = True) -> None:
        self.model = model
        self._prepared = (None, -1)
        self.compiled = torch.compile(self._run, backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph)

    @property
    def registry(self) -> ModelAdapters | None:
        """The model's adapter record, looked up per call: adapters may be attached after this was made."""
        return self.model.__dict__.get(ADAPTERS_ATTR)

    def _run(self, slots: RouteSlots | None, args: tuple, kwargs: dict) -> Any:
        registry = self.registry
        if registry is None:  # a plain model (base-only serving): nothing to route
            return self.model(*args, **kwargs)
        registry.traced_slots = slots  # read only while tracing (AdaptedLinear.forward); reset below
        try:
            return self.model(*args, **kwargs)
        finally:
            registry.traced_slots = None

    def __call__(self, names: Route | RowName | Mapping[str, float] | Sequence[RowName | Mapping[str, float]],
                 *args: Any, **kwargs: Any) -> Any:
        rows = _batch_rows(args, kwargs)
        route = names if isinstance(names, Route) else Route(normalised_names(
            names if isinstance(names, (str, type(None), Mapping, list, tuple)) else tuple(names)))
        per_row = route.names if isinstance(route.names, tuple) else (route.names,) * rows
        if len(per_row) != rows:
            raise RoutingError(f"route has {len(per_row)} row names but the batch has {rows} rows")
        registry = self.registry
        if registry is None:
            if any(n is not None for n in per_row):
                raise RoutingError(f"adapter {next(n for n in per_row if n)!r} requested but the model has no "
                                   "lorakit adapters attached")
            with torch.no_grad():
                return self.compiled(None, args, kwargs)
        with route_for(registry, per_row):  # validates the names
            pass
        prefix = sorted({n for n in per_row if isinstance(registry.configs.get(n), PrefixConfig)})
        if prefix:
            raise RoutingError(f"prefix adapter(s) {prefix} cannot run in a compiled forward; use the eager model")
        self.prepare()
        device = next(self.model.parameters()).device
        table = registry.slot_table
        key = ("compiled", per_row, table.version, tuple(registry.merged), str(device))
        slots = route.cache.get(key)
        if slots is None:
            slots = route.cache[key] = resolve(per_row, table, tuple(registry.merged), device, complete=True)
        with torch.no_grad():
            return self.compiled(slots, args, kwargs)

    def prepare(self) -> None:
        """Build every layer's slot stacks (and grow the bank) now, outside the compiled region; again only
        when the model's slots changed (an adapter attached, deleted or packed)."""
        registry = self.registry
        table = registry.slot_table
        if self._prepared == (id(registry), table.version):
            return
        bank = registry.bank
        for layer in adapted_layers(self.model).values():
            for kind in {kind_of(a) for a in layer.adapters.values()}:
                stack_for(layer, kind, table)
        if bank is not None:
            bank.ensure_capacity(table.capacity("lora_xs"))
        self._prepared = (id(registry), table.version)


def _batch_rows(args: tuple, kwargs: dict) -> int:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args):
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise RoutingError("CompiledForward needs the batch as a tensor argument (input_ids, inputs_embeds or the "
                       "first positional tensor) to know its rows")
