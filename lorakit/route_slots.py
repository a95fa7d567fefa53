"""A route resolved into tensors once, for the whole model: per kind, each row's slot.

Layers never look names up: they read a `RouteSlots` made once per route (and kept in the route's
cache, so a decode loop re-entering one route resolves it once) and gather from their slot stacks
(lorakit.slots). Slot numbers are model-wide (lorakit.slot_table), so one (n,) index tensor per kind serves
every layer. `n` is 1 when every row runs the same adapter (two GEMMs over the whole batch) or the
number of rows (one adapter per row); the layer's math is the same code either way.

`complete=True` gives every kind of the model and every merged adapter a tensor even when no row uses
it: a compiled forward then sees the same structure for every route of the same batch size, and only the
tensors' values change (lorakit.compiled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.route_state import RowNames
from lorakit.slot_table import SlotTable


@dataclass(frozen=True, eq=False)
class KindRows:
    """One kind's part of a route."""

    names: tuple[str, ...]  # the kind's adapters the route uses, in order of first use
    slots: torch.Tensor  # (n,) long: each group's model-wide slot (0: none of this kind)
    local: torch.Tensor  # (n,) long: index into (nothing, *names), for sources built per call (training)


@dataclass(frozen=True, eq=False)
class RouteSlots:
    groups: int  # n: 1 (one adapter for all rows) or the batch's rows
    kinds: dict[str, KindRows]
    merged: dict[str, torch.Tensor]  # merged adapter -> (n,) float32: −1 where a row must not see it, else 0


def resolve(names: RowNames, table: SlotTable, merged: tuple[str, ...], device: torch.device,
            complete: bool = False) -> RouteSlots:
    """The tensors of route `names` (one name or None for all rows, or a tuple with one per row)."""
    rows = list(names) if isinstance(names, tuple) else [names]
    wanted = [None if n in merged else n for n in rows]  # a merged adapter is already in W
    kinds: dict[str, KindRows] = {}
    for kind in (table.kinds() if complete else dict.fromkeys(table.kind(n) for n in wanted if n is not None)):
        if kind is None:  # prefix adapters do not live in layers
            continue
        used = tuple(dict.fromkeys(n for n in wanted if table.kind(n) == kind))
        local = {n: i for i, n in enumerate(used, start=1)}
        kinds[kind] = KindRows(
            used,
            torch.tensor([table.slot(n) if table.kind(n) == kind else 0 for n in wanted], dtype=torch.long,
                         device=device),
            torch.tensor([local.get(n, 0) for n in wanted], dtype=torch.long, device=device))
    subtract = {}
    for m in merged:
        coef = [0.0 if n == m else -1.0 for n in rows]
        if complete or any(coef):
            subtract[m] = torch.tensor(coef, dtype=torch.float32, device=device)
    return RouteSlots(len(rows), kinds, subtract)
