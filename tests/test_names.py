"""The adapter-name rule shared by attach, io and the server (lorakit.names)."""

from __future__ import annotations

import pytest

from lorakit.model.attach import check_adapter_name as attach_check
from lorakit.errors import AdapterConfigError
from lorakit.names import ADAPTER_NAME_RULE, check_adapter_name, is_valid_adapter_name


@pytest.mark.parametrize("name", ["a", "xs0", "my-adapter_2", "A" * 128])
def test_valid_names(name):
    assert is_valid_adapter_name(name)
    check_adapter_name(name)
    attach_check(name)


@pytest.mark.parametrize("name", ["", "v1.2", "xs0\n", "a b", "../x", "x/y", "A" * 129, "\u00e9", None, 3,
                                  "train", "to", "training"])
def test_invalid_names_are_refused_everywhere_with_the_reason(name):
    assert not is_valid_adapter_name(name)
    with pytest.raises(AdapterConfigError, match="reserved" if name in ("train", "to", "training") else "letters"):
        attach_check(name)
    assert "letters, digits" in ADAPTER_NAME_RULE
