"""A route resolved into tensors once, for the whole model: per kind, each row's slot.

Layers never look names up: they read a `RouteSlots` made once per route (and kept in the route's
cache, so a decode loop re-entering one route resolves it once) and gather from their slot stacks
(lorakit.layer.slots). Slot numbers are model-wide (lorakit.routing.slot_table), so one (n,) index tensor per kind serves
every layer. `n` is 1 when every row runs the same adapter (two GEMMs over the whole batch) or the
number of rows (one adapter per row); the layer's math is the same code either way. A blend (lorakit.
route_state.Blend) of m adapters of one kind gives that kind m columns, each with a weight per group.

`complete=True` gives every kind of the model and every merged adapter a tensor even when no row uses
it, and every column a weight tensor: a compiled forward then sees the same structure for every route of
the same batch size and blend width, and only the tensors' values change (lorakit.model.compiled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.methods.table import method_of_kind
from lorakit.routing.context import RowNames, row_parts
from lorakit.routing.slot_table import SlotTable


@dataclass(frozen=True, eq=False)
class KindRows:
    """One column of one kind's part of a route: each group's adapter of the kind in this column. A route
    without blends has one column per kind; a blend of m adapters of a kind gives that kind m columns."""

    names: tuple[str, ...]  # the kind's adapters the route uses, in order of first use (every column alike)
    slots: torch.Tensor  # (n,) long: each group's model-wide slot (0: none of this kind)
    local: torch.Tensor  # (n,) long: index into (nothing, *names), for sources built per call (training)
    weights: torch.Tensor | None = None  # (n,) float32: each group's blend weight; None when every weight is 1
    lead: str | None = None  # group 0's adapter in this column (the whole batch's, when n = 1)
    lead_weight: float = 1.0  # and its weight


@dataclass(frozen=True, eq=False)
class RouteSlots:
    groups: int  # n: 1 (one adapter or blend for all rows) or the batch's rows
    kinds: dict[str, tuple[KindRows, ...]]  # kind -> its columns
    merged: dict[str, torch.Tensor]  # merged adapter -> (n,) float32: w − 1 for a row running it at weight w
    # (kind, its method's name) in the order the layers run them: a method that rescales the base output
    # (DoRA) first; found once per route here, not in every layer's call (lorakit.methods.table)
    order: tuple[tuple[str, str], ...] = ()
    rescales: bool = False  # some kind's method rescales the base output


def resolve(names: RowNames, table: SlotTable, merged: tuple[str, ...], device: torch.device,
            complete: bool = False) -> RouteSlots:
    """The tensors of route `names` (one name, blend or None for all rows, or a tuple with one per row)."""
    rows = list(names) if isinstance(names, tuple) else [names]
    parts = [row_parts(n) for n in rows]
    live = [[(n, w) for n, w in p if n not in merged] for p in parts]  # a merged adapter is already in W
    kinds: dict[str, tuple[KindRows, ...]] = {}
    for kind in (table.kinds() if complete else dict.fromkeys(table.kind(n) for p in live for n, _ in p)):
        if kind is None:  # prefix adapters do not live in layers
            continue
        per_row = [[(n, w) for n, w in p if table.kind(n) == kind] for p in live]
        used = tuple(dict.fromkeys(n for p in per_row for n, _ in p))
        kinds[kind] = tuple(_column(used, [p[j] if j < len(p) else (None, 0.0) for p in per_row], table, device,
                                    weighted=complete) for j in range(max(1, *(len(p) for p in per_row))))
    subtract = {}
    for m in merged:
        coef = [sum(w for n, w in p if n == m) - 1.0 for p in parts]  # 0: the row runs m as merged; −1: not at all
        if complete or any(coef):
            subtract[m] = torch.tensor(coef, dtype=torch.float32, device=device)
    methods = {kind: method_of_kind(kind) for kind in kinds}
    order = tuple((k, methods[k].name) for k in sorted(kinds, key=lambda k: not methods[k].rescales_output))
    return RouteSlots(len(rows), kinds, subtract, order, any(m.rescales_output for m in methods.values()))


def _column(used: tuple[str, ...], picked: list[tuple[str | None, float]], table: SlotTable,
            device: torch.device, weighted: bool) -> KindRows:
    """`weighted`: a weight tensor even when every weight is 1, so a compiled graph sees one structure."""
    local = {n: i for i, n in enumerate(used, start=1)}
    plain = not weighted and all(w == 1.0 for n, w in picked if n is not None)
    return KindRows(
        used,
        torch.tensor([table.slot(n) for n, _ in picked], dtype=torch.long, device=device),
        torch.tensor([local.get(n, 0) if n is not None else 0 for n, _ in picked], dtype=torch.long, device=device),
        None if plain else torch.tensor([w for _, w in picked], dtype=torch.float32, device=device),
        picked[0][0], picked[0][1])
