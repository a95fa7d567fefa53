"""A route resolved into index tensors: one group for a uniform route, one per row otherwise; merged adapters."""

import torch

from lorakit.route_slots import resolve
from lorakit.slot_table import SlotTable


def _table() -> SlotTable:
    table = SlotTable()
    for kind, name in [("lora", "l0"), ("lora", "l1"), ("lora_xs", "x0"), ("vera_0_4", "v0")]:
        table.assign(kind, name)
    return table


def test_one_name_is_one_group_and_per_row_names_one_group_each():
    table = _table()
    uniform = resolve("l1", table, (), torch.device("cpu"))
    assert uniform.groups == 1 and list(uniform.kinds) == ["lora"]
    assert uniform.kinds["lora"].slots.tolist() == [2] and uniform.kinds["lora"].local.tolist() == [1]
    rows = resolve(("l1", None, "x0", "l0", "l1"), table, (), torch.device("cpu"))
    assert rows.groups == 5 and list(rows.kinds) == ["lora", "lora_xs"]
    lora = rows.kinds["lora"]
    assert lora.names == ("l1", "l0") and lora.slots.tolist() == [2, 0, 0, 1, 2]
    assert lora.local.tolist() == [1, 0, 0, 2, 1]  # into (nothing, l1, l0): per-call stacks in training
    assert rows.kinds["lora_xs"].slots.tolist() == [0, 0, 1, 0, 0] and not rows.merged


def test_merged_adapters_route_nothing_and_are_taken_out_of_other_rows():
    rows = resolve(("l0", "l1", None), _table(), ("l0",), torch.device("cpu"))
    assert rows.kinds["lora"].slots.tolist() == [0, 2, 0]  # l0 is in W already
    assert rows.merged["l0"].tolist() == [0.0, -1.0, -1.0]
    assert not resolve(("l0",), _table(), ("l0",), torch.device("cpu")).merged  # no row to take it out of


def test_complete_routes_have_the_same_structure_whatever_the_names():
    """What a compiled forward needs: only tensor values differ between routes of one batch size."""
    table = _table()
    a = resolve(("l0", None), table, ("l1",), torch.device("cpu"), complete=True)
    b = resolve(("v0", "x0"), table, ("l1",), torch.device("cpu"), complete=True)
    assert list(a.kinds) == list(b.kinds) == ["lora", "lora_xs", "vera_0_4"] and list(a.merged) == list(b.merged)
    assert all(a.kinds[k].slots.shape == b.kinds[k].slots.shape for k in a.kinds)
