"""A layer's adapters of one kind held in preallocated slot tensors, indexed by model-wide slot numbers.

    LoRA      a (C, in, r_max), b (C, r_max, out)     adapter k's lora_A is the view a[k, :, :r_k]ᵀ
    LoRA-XS   core (C, r_max, r_max)                  lora_R is core[k, :r_k, :r_k]
    DoRA      LoRA's a and b, m (C, out)              and the magnitudes; `derived` keeps each slot's g − 1
    VeRA      d (C, r), b (C, out)                    the two scaling vectors
    scales    (C,)                                    each slot's α/r (0 for an empty slot)

C is the kind's capacity in the model's SlotTable (lorakit.routing.slot_table); slot k belongs to the same adapter
in every layer, and is zero in a layer the adapter does not touch. The fields come from each method's
`slot_shapes` / `slot_views` (lorakit.methods), so this module knows no method's math.

Building a stack moves the adapters' parameters into it (`param.data` becomes a view): the weights are
held once, optimizer steps and `load_state_dict` write straight into it, and a batch picks each row's
adapter with one `index_select` per field. Entries beyond an adapter's rank stay zero, so lower ranks are
exact. The Parameter objects never change, so optimizers holding them keep working.

When the model's slots change, a stack whose adapters are all still in it, at their slots, is extended in
place if the change only added adapters that fit it (a free slot within its capacity, a rank within its width,
its dtype and device): each new adapter is copied into its slot, so the k-th attach copies one adapter, not k.
Otherwise (an adapter deleted or packed, capacity doubled, a wider rank) or when a parameter no longer points
into it, it is rebuilt. `model.to(...)` moves it (`moved`, called by ModelAdapters' hook)
and points the parameters back into it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from lorakit.routing.slot_table import SlotTable

# `layer` below is an AdaptedLinear: lorakit.layer.linear imports this module, so annotations say nn.Module

# One build at a time, in any thread: a build re-points adapters' parameters (`param.data = view`), which
# frees their old storage while a concurrent build may still be copying from it (threads serving one model
# built their first stacks at once and read freed memory). Reading a built stack takes no lock.
_BUILDING = threading.Lock()


@dataclass(eq=False)
class SlotStack:
    kind: str
    fields: dict[str, torch.Tensor]  # name -> (C, ...)
    scales: torch.Tensor  # (C,)
    held: dict[str, int]  # adapter name -> slot
    pointers: dict[str, tuple[int, ...]]  # where each held adapter's parameters must start
    table_version: int  # the SlotTable version it was built against
    rank: int  # the width of its fields: the highest rank of the adapters it was built for
    # values computed from the fields and the layer's weight, kept until either changes (DoRA's gains,
    # lorakit.layer.deltas); empty in a fresh or moved stack
    derived: dict = field(default_factory=dict)

    @property
    def capacity(self) -> int:
        return self.scales.shape[0]

    def holds(self, layer: nn.Module, name: str) -> bool:
        """Whether adapter `name`'s parameters still live in this stack."""
        adapter = layer.adapters[name] if name in layer.adapters else None
        return adapter is not None and name in self.pointers and _pointers(adapter) == self.pointers[name]


@dataclass
class SlotStacks:
    """A layer's stacks (its field `slot_stacks`, never in its state_dict): one per kind, and the kinds known
    to have none at a slot-table version (so a layer without one is not walked on every call)."""

    by_kind: dict[str, SlotStack] = field(default_factory=dict)
    absent: dict[str, int] = field(default_factory=dict)


def kind_of(adapter: nn.Module) -> str:
    """The slot kind of an attached adapter (lorakit.methods.contract.LinearMethod.slot_kind)."""
    return adapter.slot_kind


def _pointers(adapter: nn.Module) -> tuple[int, ...]:
    return tuple(p.data_ptr() for p in adapter._parameters.values())  # its own, not a generator walk


def names_of_kind(layer: nn.Module, kind: str) -> tuple[str, ...]:
    return tuple(n for n, a in layer.adapters.items() if kind_of(a) == kind)


def stacks(layer: nn.Module) -> dict[str, SlotStack]:
    return layer.slot_stacks.by_kind


def stack_for(layer: nn.Module, kind: str, table: SlotTable, stale: SlotStack | None = None) -> SlotStack | None:
    """The layer's stack of `kind`, extended or rebuilt when the model's slot table changed since it was made
    (rebuilt when it is `stale`: found not to hold its adapters' parameters any more); None when the layer has
    no adapter of that kind or its adapters cannot share one tensor (mixed dtypes or devices: the forward then
    stacks their parameters per call, lorakit.layer.deltas)."""
    stack = stacks(layer).get(kind)
    if stack is not None and stack is not stale and stack.table_version == table.version:
        return stack
    with _BUILDING:
        found = stacks(layer)
        stack = found.get(kind)  # another thread may have built it while this one waited
        if stack is not None and stack is not stale and stack.table_version == table.version:
            return stack
        absent = layer.slot_stacks.absent
        if stack is None and absent.get(kind) == table.version:  # known to have none: no walk over its adapters
            return None
        stack = _extended(layer, stack, table) if stack is not None and stack is not stale else None
        if stack is None:
            stack = _build(layer, kind, table)
        if stack is None:
            found.pop(kind, None)
            absent[kind] = table.version
        else:
            found[kind] = stack
        return stack


def _build(layer: nn.Module, kind: str, table: SlotTable) -> SlotStack | None:
    names = names_of_kind(layer, kind)
    adapters = [layer.adapters[n] for n in names]
    if not adapters:
        return None
    first = next(adapters[0].parameters())
    params = [p for a in adapters for p in a.parameters()]
    if any(p.dtype != first.dtype or p.device != first.device for p in params):
        return None
    r_max = max(a.r for a in adapters)
    capacity = table.capacity(kind)
    shapes = type(adapters[0]).slot_shapes(layer.in_features, layer.out_features, r_max)
    # plain tensors even when first built inside torch.inference_mode(): they back trainable parameters
    with torch.inference_mode(False), torch.no_grad():
        fields = {f: torch.zeros(capacity, *shape, dtype=first.dtype, device=first.device)
                  for f, shape in shapes.items()}
        scales = torch.zeros(capacity, dtype=first.dtype, device=first.device)
        held, pointers = {}, {}
        for name, adapter in zip(names, adapters):
            slot = table.slot(name)
            _point_into(adapter, fields, slot, copy=True)
            scales[slot] = adapter.scaling
            held[name], pointers[name] = slot, _pointers(adapter)
    return SlotStack(kind, fields, scales, held, pointers, table.version, r_max)


def _extended(layer: nn.Module, stack: SlotStack, table: SlotTable) -> SlotStack | None:
    """`stack` brought up to the table's version with the layer's new adapters copied into their slots, exactly
    what a rebuild would hold; None when a rebuild is needed (see the module docstring)."""
    names = names_of_kind(layer, stack.kind)
    new = [n for n in names if n not in stack.held]
    if not _fits(layer, stack, table, names, new):
        return None
    with torch.inference_mode(False), torch.no_grad():
        for name in new:
            slot = table.slot(name)
            for tensor in stack.fields.values():
                tensor[slot].zero_()  # padding beyond the adapter's rank must read zero
            _point_into(layer.adapters[name], stack.fields, slot, copy=True)
            stack.scales[slot] = layer.adapters[name].scaling
    held = {n: table.slot(n) for n in names}
    pointers = {n: stack.pointers[n] if n in stack.pointers else _pointers(layer.adapters[n]) for n in names}
    return replace(stack, held=held, pointers=pointers, table_version=table.version, derived={})


def _fits(layer: nn.Module, stack: SlotStack, table: SlotTable, names: tuple[str, ...], new: list[str]) -> bool:
    """Whether the layer's adapters of the stack's kind are its held ones, unchanged, plus `new` ones it can take."""
    if table.capacity(stack.kind) != stack.capacity or len(names) != len(stack.held) + len(new):
        return False
    if any(table.slot(n) != slot or not stack.holds(layer, n) for n, slot in stack.held.items()):
        return False
    like = stack.scales
    return all(layer.adapters[n].r <= stack.rank and all(p.dtype == like.dtype and p.device == like.device
                                                         for p in layer.adapters[n].parameters()) for n in new)


def _point_into(adapter: nn.Module, fields: dict[str, torch.Tensor], slot: int, copy: bool) -> None:
    views = adapter.slot_views({f: t[slot] for f, t in fields.items()})
    for attr, view in views.items():
        param = getattr(adapter, attr)
        if copy:
            view.copy_(param)
        param.data = view


def param_source(adapters: list[nn.Module | None], shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                 device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Fields (1 + len(adapters), ...) and scales built from the adapters' own parameters, so gradients reach
    them (training), slot 0 and missing adapters zero; the layout of a stack, in `dtype`."""
    fields = {f: torch.zeros(len(adapters) + 1, *shape, dtype=dtype, device=device) for f, shape in shapes.items()}
    scales = [0.0]
    for k, adapter in enumerate(adapters, start=1):
        scales.append(adapter.scaling if adapter is not None else 0.0)
        if adapter is None:
            continue
        for attr, view in adapter.slot_views({f: t[k] for f, t in fields.items()}).items():
            view.copy_(getattr(adapter, attr))  # differentiable: the zeros become a function of the parameter
    return fields, torch.tensor(scales, dtype=dtype, device=device)


def unshare(layer: nn.Module, deleting: str) -> None:
    """Called before adapter `deleting` is removed: if a stack holds it, give every other adapter of that
    stack its own storage again and drop the stack, so the deleted adapter's memory is freed at once."""
    for kind, stack in list(stacks(layer).items()):
        if deleting not in stack.held:
            continue
        with torch.inference_mode(False), torch.no_grad():
            for name in stack.held:
                if stack.holds(layer, name):
                    for param in layer.adapters[name].parameters():
                        param.data = param.data.clone(memory_format=torch.contiguous_format)
        del stacks(layer)[kind]


def held_names(layer: nn.Module) -> dict[str, tuple[str, ...]]:
    """Per kind, the adapters whose parameters live in the layer's stacks now (recorded before a move)."""
    return {kind: tuple(n for n in stack.held if stack.holds(layer, n))
            for kind, stack in stacks(layer).items()}


def moved(layer: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], held: dict[str, tuple[str, ...]]) -> None:
    """After `layer` went through `fn` (a `.to(...)`, `.half()`, `.cuda()`...): move its stacks the same way and
    point the adapters that lived in them back in, so the weights stay held once and no stale copy on the
    old device or dtype stays alive. A stack nobody lived in is dropped."""
    layer.slot_stacks.absent.clear()  # adapters of mixed dtypes may share one now
    for kind, stack in list(stacks(layer).items()):
        names = held.get(kind, ())
        if not names:
            stacks(layer).pop(kind, None)
            continue
        with torch.inference_mode(False), torch.no_grad():
            fields = {f: fn(t) for f, t in stack.fields.items()}
            scales = fn(stack.scales)
            if all(fields[f] is stack.fields[f] for f in fields):
                continue
            pointers, kept = {}, {}
            for name in names:
                adapter = layer.adapters[name] if name in layer.adapters else None
                param = next(adapter.parameters()) if adapter is not None else None
                if param is None or param.dtype != scales.dtype or param.device != scales.device:
                    continue
                _point_into(adapter, fields, stack.held[name], copy=False)
                kept[name], pointers[name] = stack.held[name], _pointers(adapter)
        # an adapter left behind (another dtype or device) would read stale values here: rebuild on next use
        version = stack.table_version if len(kept) == len(names_of_kind(layer, kind)) else -1
        stacks(layer)[kind] = replace(stack, fields=fields, scales=scales, held=kept, pointers=pointers,
                                      table_version=version, derived={})
