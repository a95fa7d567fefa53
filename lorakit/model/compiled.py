"""A forward compiled once for every route of one batch size: the route is an input, not code.

    step = lorakit.CompiledForward(model, mode="reduce-overhead")   # CUDA graphs on a GPU
    logits = step(["fr", None, "de", "fr"], input_ids=ids).logits    # any names, same graph

Adapted layers normally find their route in a ContextVar, which torch.compile cannot trace (a graph break
in every layer). Here the route is resolved into slot index tensors before the call (lorakit.routing.resolve,
`complete=True`: every kind and merged adapter of the model has a tensor, whichever rows use it), and the
compiled function hands them to the layers through the model's record while it is traced. At run time
the compiled graph takes them as ordinary tensor inputs, so a new route of the same batch size changes
values, not code: no graph break, no recompile. Slot stacks are built before the call, never inside it.
Blends (`{"pirate": 0.7, "poet": 0.3}` for a row) are weight tensors: new weights change values only; a
route with more parts of one kind than any before, or the first blend after plain names, compiles anew.

Inference only (the layers read the slot stacks, not per-call stacks of parameters), and only adapters
that live in layers: a prefix adapter's keys and values come from a hook this path does not carry.

`torch.compile(model)`, the plain idiom, goes through the same seam (`RouteEntry`, hooks attach puts on the
model): on entering the model, outside the graph (Dynamo runs these disabled functions around it: no graph
break was counted), the call's route is read from its ContextVar, resolved once into slot tensors and handed
to the layers; on leaving it is taken back. The whole model between is one graph, inference and training
alike; a new route of the same structure changes only tensor values. A lock held from entry to exit keeps
two threads from sharing a model's handed-over route (their compiled calls take turns; eager calls never
read it). A call that fails inside the graph skips the exit hook: its thread re-enters the hand-over it
still holds on its next compiled call.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

from typing import Any

import torch
from torch import nn

from lorakit.layer.deltas import refresh_gains
from lorakit.config import PrefixConfig
from lorakit.errors import RoutingError
from lorakit.layer.linear import adapted_layers
from lorakit.layer.wrapped import wrapped_prefixes
from lorakit.model.record import ATTR as ADAPTERS_ATTR, ModelAdapters
from lorakit.routing.resolve import RouteSlots, resolve
from lorakit.routing.context import AS_STORED, Route, RowName, current_route, normalised_names, route_for
from lorakit.layer.slots import kind_of, stack_for


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
        wrapped = wrapped_prefixes(self.model)
        if wrapped:  # they read the route from its ContextVar, which this path does not set
            raise RoutingError(f"modules {[w[:-1] for w in wrapped][:3]} hold modules_to_save copies or trainable "
                               "tokens, which cannot run in a compiled forward; use the eager model")
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
        if self._prepared != (id(registry), registry.slot_table.version):
            prepare_stacks(self.model, registry)
            self._prepared = (id(registry), registry.slot_table.version)
        refresh_dora(self.model, registry)


def prepare_stacks(model: nn.Module, registry: ModelAdapters) -> None:
    """Every layer's slot stacks built (and the bank grown) for the model's current slots, outside any graph."""
    table = registry.slot_table
    for layer in adapted_layers(model).values():
        for kind in {kind_of(a) for a in layer.adapters.values()}:
            stack_for(layer, kind, table)
    if registry.bank is not None:
        registry.bank.ensure_capacity(table.capacity("lora_xs"))


def refresh_dora(model: nn.Module, registry: ModelAdapters) -> None:
    """DoRA's kept gains brought up to date outside the graph, every call: the graph reads them as they stand."""
    if "dora" in registry.slot_table.kinds():
        for layer in registry.layer_map(model).values():
            refresh_gains(layer)


@torch.compiler.disable
def _enter(entry: "RouteEntry", model: nn.Module) -> None:
    """Run eagerly, outside the graph, at a compiled model call's start: hand its resolved route to the layers."""
    registry = model.__dict__.get(ADAPTERS_ATTR)
    if registry is None:
        return
    if not getattr(entry.held, "yes", False):  # held already: an earlier call of this thread ended without _leave
        entry.lock.acquire()
        entry.held.yes = True
    try:
        route = current_route(id(registry))
        names = route.names if route is not None else registry.default_names()  # RoutingError if ambiguous
        cache = route.cache if route is not None else registry.slot_table_memo()
        device = next(model.parameters()).device
        table = registry.slot_table
        key = ("compiled-entry", names, table.version, tuple(registry.merged), str(device), torch.is_grad_enabled())
        slots = cache.get(key)
        if slots is None:
            if names is AS_STORED:  # merged weights as they stand: nothing added, nothing taken out
                slots = RouteSlots(1, {}, {})
            else:
                slots = resolve(names, table, tuple(registry.merged), device, complete=True)
            cache[key] = slots
        if not torch.is_grad_enabled() and entry.prepared != (id(registry), table.version):
            prepare_stacks(model, registry)  # inference reads the slot stacks: built here, never in the graph
            entry.prepared = (id(registry), table.version)
        if not torch.is_grad_enabled():
            refresh_dora(model, registry)
        registry.entry_slots = slots
    except BaseException:
        _leave(entry, model)
        raise


@torch.compiler.disable
def _leave(entry: "RouteEntry", model: nn.Module) -> None:
    """Run eagerly, outside the graph, when a compiled model call ends, even by an exception: take the route back."""
    if not getattr(entry.held, "yes", False):  # this thread handed nothing over
        return
    registry = model.__dict__.get(ADAPTERS_ATTR)
    if registry is not None:
        registry.entry_slots = None
    entry.held.yes = False
    entry.lock.release()


class RouteEntry:
    """The model's forward pre-hook and (always called) forward hook for `torch.compile(model)`; nothing at all
    in an eager call, nor inside CompiledForward (which hands the route over itself). Holds no model, so a
    deepcopy's hooks serve the copy; deepcopy and pickle give the copy its own lock."""

    def __init__(self) -> None:
        self.__setstate__({})

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.lock = threading.Lock()
        self.held = threading.local()  # .yes: this thread holds the lock
        self.prepared: tuple[int, int] = (-1, -1)  # (record id, slot-table version) the stacks were built for

    # `traced_slots` is set only while CompiledForward traces (never at run time: its trace resets it), so these
    # trace-time checks see no other thread's call; the route handed over at run time is `entry_slots`
    def enter(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        registry = model.__dict__.get(ADAPTERS_ATTR)
        if torch.compiler.is_compiling() and registry is not None and registry.traced_slots is None:
            _enter(self, model)

    def leave(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        registry = model.__dict__.get(ADAPTERS_ATTR)
        if torch.compiler.is_compiling() and registry is not None and registry.traced_slots is None:
            _leave(self, model)


ENTRY_ATTR = "lorakit_route_entry"  # on the model: its RouteEntry, once installed


def install_route_entry(model: nn.Module) -> None:
    """Hook `model` so that `torch.compile(model)` reads the route once per call (attach calls it; idempotent)."""
    if ENTRY_ATTR in model.__dict__:
        return
    entry = RouteEntry()
    model.__dict__[ENTRY_ATTR] = entry
    model.register_forward_pre_hook(entry.enter, with_kwargs=True)
    model.register_forward_hook(entry.leave, with_kwargs=True, always_call=True)


def _batch_rows(args: tuple, kwargs: dict) -> int:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args):
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise RoutingError("CompiledForward needs the batch as a tensor argument (input_ids, inputs_embeds or the "
                       "first positional tensor) to know its rows")
