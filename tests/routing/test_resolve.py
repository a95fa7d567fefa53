"""A route resolved into index tensors: one group for a uniform route, one per row otherwise; merged adapters."""

import torch

from lorakit.routing.resolve import resolve
from lorakit.routing.context import blend_of
from lorakit.routing.slot_table import SlotTable


def _table() -> SlotTable:
    table = SlotTable()
    for kind, name in [("lora", "l0"), ("lora", "l1"), ("lora_xs", "x0"), ("vera_0_4", "v0")]:
        table.assign(kind, name)
    return table


def test_one_name_is_one_group_and_per_row_names_one_group_each():
    table = _table()
    uniform = resolve("l1", table, (), torch.device("cpu"))
    assert uniform.groups == 1 and list(uniform.kinds) == ["lora"]
    assert uniform.kinds["lora"][0].slots.tolist() == [2] and uniform.kinds["lora"][0].local.tolist() == [1]
    rows = resolve(("l1", None, "x0", "l0", "l1"), table, (), torch.device("cpu"))
    assert rows.groups == 5 and list(rows.kinds) == ["lora", "lora_xs"]
    lora = rows.kinds["lora"][0]
    assert lora.names == ("l1", "l0") and lora.slots.tolist() == [2, 0, 0, 1, 2]
    assert lora.local.tolist() == [1, 0, 0, 2, 1]  # into (nothing, l1, l0): per-call stacks in training
    assert rows.kinds["lora_xs"][0].slots.tolist() == [0, 0, 1, 0, 0] and not rows.merged


def test_merged_adapters_route_nothing_and_are_taken_out_of_other_rows():
    rows = resolve(("l0", "l1", None), _table(), ("l0",), torch.device("cpu"))
    assert rows.kinds["lora"][0].slots.tolist() == [0, 2, 0]  # l0 is in W already
    assert rows.merged["l0"].tolist() == [0.0, -1.0, -1.0]
    assert not resolve(("l0",), _table(), ("l0",), torch.device("cpu")).merged  # no row to take it out of


def test_complete_routes_have_the_same_structure_whatever_the_names():
    """What a compiled forward needs: only tensor values differ between routes of one batch size."""
    table = _table()
    a = resolve(("l0", None), table, ("l1",), torch.device("cpu"), complete=True)
    b = resolve(("v0", "x0"), table, ("l1",), torch.device("cpu"), complete=True)
    assert list(a.kinds) == list(b.kinds) == ["lora", "lora_xs", "vera_0_4"] and list(a.merged) == list(b.merged)
    assert all(a.kinds[k][0].slots.shape == b.kinds[k][0].slots.shape for k in a.kinds)


def test_a_blend_gives_its_kind_one_weighted_column_per_part():
    table = _table()
    blend = blend_of({"l0": 0.25, "l1": 0.5, "x0": 2.0})
    rows = resolve((blend, "l1", None), table, (), torch.device("cpu"))
    first, second = rows.kinds["lora"]
    assert first.slots.tolist() == [1, 2, 0] and first.weights.tolist() == [0.25, 1.0, 0.0]
    assert second.slots.tolist() == [2, 0, 0] and second.weights.tolist() == [0.5, 0.0, 0.0]
    (xs,) = rows.kinds["lora_xs"]
    assert xs.slots.tolist() == [1, 0, 0] and xs.weights.tolist() == [2.0, 0.0, 0.0]
    plain = resolve(("l0", "l1"), table, (), torch.device("cpu"))
    assert plain.kinds["lora"][0].weights is None  # no blend: no weight tensor, the plain path


def test_a_blend_with_a_merged_part_runs_it_at_its_weight():
    """W holds l0 fully: a row blending 0.25·l0 takes 0.75·l0 back out; other rows all of it."""
    rows = resolve((blend_of({"l0": 0.25, "l1": 1.0}), "l0", None), _table(), ("l0",), torch.device("cpu"))
    assert rows.merged["l0"].tolist() == [-0.75, 0.0, -1.0]
    assert rows.kinds["lora"][0].slots.tolist() == [2, 0, 0]  # l0 itself is not added again
