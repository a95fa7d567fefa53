"""The one rule for adapter names, shared by attach (core), io and the server.

A name is 1-128 ASCII letters, digits, '_' or '-' (the whole string: no '.', no '/', no trailing
newline), and not an attribute of torch.nn.ModuleDict (adapters live in ModuleDicts, so "train",
"eval", "to", "training"... would shadow a method). The server serves a directory under its name, so a
directory named `v1.2` is not an adapter; one rule keeps what it lists and what it can load the same.
"""

from __future__ import annotations

import re

from torch import nn

from lorakit.errors import AdapterConfigError

ADAPTER_NAME_RULE = "1-128 letters, digits, '_' or '-'"
ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9_\-]{1,128}")
_MODULE_DICT = nn.ModuleDict()


def adapter_name_problem(name: object) -> str | None:
    """Why `name` cannot name an adapter, or None when it can."""
    if not isinstance(name, str) or ADAPTER_NAME_PATTERN.fullmatch(name) is None:
        return f"adapter name must be {ADAPTER_NAME_RULE}, got {name!r}"
    if hasattr(_MODULE_DICT, name):
        return (f"adapter name {name!r} is reserved (a torch.nn.Module attribute); pick another, "
                f"e.g. {name + '_adapter'!r}")
    return None


def is_valid_adapter_name(name: object) -> bool:
    return adapter_name_problem(name) is None


def check_adapter_name(name: object) -> None:
    """Raise AdapterConfigError saying why `name` is not a valid adapter name."""
    problem = adapter_name_problem(name)
    if problem is not None:
        raise AdapterConfigError(problem)
