"""What an adapted layer reads of its model's adapter record.

The record (lorakit.model.record.ModelAdapters) sits floors above the layers, since it walks them; a layer holds
it only through this contract, which points down: the slot table, what is merged, the packed bank, and the
route a call without a `use_adapter` block runs.
"""

from __future__ import annotations

from typing import Any, Protocol

from lorakit.routing.context import RowNames
from lorakit.routing.resolve import RouteSlots
from lorakit.routing.slot_table import SlotTable


class AdapterRecord(Protocol):
    slot_table: SlotTable  # model-wide slot numbers: slot k is one adapter in every layer
    merged: list[str]  # adapters merged into the weights, in merge order
    bank: Any  # the packed LoRA-XS cores (lorakit.model.bank.CoreBank), or None
    entry_slots: RouteSlots | None  # under torch.compile(model): the call's route, resolved at the entry
    traced_slots: RouteSlots | None  # while lorakit.model.compiled traces: the route as graph inputs

    def default_names(self) -> RowNames:
        """What a call without a route runs."""
        ...

    def slot_table_memo(self) -> dict:
        """Resolved default routes, kept until the slots change."""
        ...
