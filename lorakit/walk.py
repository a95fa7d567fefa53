"""Walking a model's modules without entering what adapted layers hold for each adapter.

torch's `named_modules` visits every adapter's own modules (a LoRA adapter and its dropout, per layer and
adapter), so a walk of a model holding n adapters costs O(n), and attach, which walks the model a few
times, grew slower with every adapter already attached. A module class whose children hold only
per-adapter state sets `lorakit_sealed = True` (lorakit.layer.linear.AdaptedLinear); these walks yield such a
module but nothing below it. Nothing below it is ever a target, a checkpointed block or a wrapped module.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

SEALED = "lorakit_sealed"  # the class attribute a module sets to keep walks out of its children


def is_sealed(module: nn.Module) -> bool:
    return getattr(type(module), SEALED, False)


def named_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """`model.named_modules()` (same names, order and de-duplication) less what sealed modules hold."""
    seen: set[int] = set()
    stack = [(prefix, model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if is_sealed(module):
            continue
        children = [(f"{name}.{child_name}" if name else child_name, child)
                    for child_name, child in module.named_children()]
        stack.extend(reversed(children))  # popped in registration order: depth first, as torch walks


def modules(model: nn.Module) -> Iterator[nn.Module]:
    """`model.modules()` less what sealed modules hold."""
    return (module for _, module in named_modules(model))
