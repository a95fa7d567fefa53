"""Model-wide slot numbers: one per adapter within its kind, freed numbers reused, capacity in powers of two."""

import pytest

from lorakit.errors import AdapterExistsError
from lorakit.routing.slot_table import SlotTable


def test_numbers_start_at_one_are_reused_and_capacity_doubles():
    table = SlotTable()
    assert [table.assign("lora", f"a{i}") for i in range(3)] == [1, 2, 3]
    assert table.assign("lora_xs", "x") == 1  # numbering is per kind
    assert table.capacity("lora") == 4 and table.capacity("lora_xs") == 2 and table.capacity("vera_1_4") == 2
    version = table.version
    table.release("a1")
    assert table.version > version and table.kind("a1") is None and table.slot("a1") == 0
    assert table.assign("lora", "b") == 2  # the freed number
    table.assign("lora", "c")
    assert table.capacity("lora") == 8  # 4 used numbers + slot 0
    assert table.kind(None) is None and table.slot(None) == 0 and table.kinds() == ("lora", "lora_xs")
    with pytest.raises(AdapterExistsError, match="already has a slot"):
        table.assign("lora", "b")
