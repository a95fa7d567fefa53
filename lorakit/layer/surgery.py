"""Module surgery on any torch model: name matching, swapping a submodule, freezing the base.

The lowest model-level layer: it knows nn.Module and nothing of lorakit's own layers, so every part of
lorakit that walks or edits a model (attach, the bank, quantize, merge, io) shares these few rules.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from torch import nn

from lorakit import walk
from lorakit.errors import AdapterConfigError, TargetNotFoundError

OUTPUT_HEAD_SUFFIXES = frozenset({"lm_head", "classifier", "score"})
PREFIX_STORE_PREFIX = "lorakit_prefix."  # lorakit's own prefix modules: never targets of anything


def matches(name: str, pattern: str) -> bool:
    """A target pattern names a module by its full name or by its last dotted parts ("q_proj")."""
    return name == pattern or name.endswith("." + pattern)


def select_modules(model: nn.Module, targets: str | Iterable[str], exclude: Iterable[str],
                   eligible: Callable[[nn.Module], bool], skip: tuple[str, ...] = (PREFIX_STORE_PREFIX,)) -> list[str]:
    """Full names of the modules `targets` selects, less `exclude`, in model order: the one target rule of attach
    and quantize. "all-linear" takes every `eligible` module but the output heads; a string is a regex matched
    against full names; a list names modules by full name or suffix. Names under `skip` are never selected.

    Raises AdapterConfigError (a bad regex) or TargetNotFoundError (nothing matches, a listed name matches
    nothing, or exclusions leave nothing), naming the eligible layers. Whether each chosen module can take
    what the caller puts there is the caller's check."""
    modules = {n: m for n, m in walk.named_modules(model) if n and not n.startswith(skip)}
    layers = [n for n, m in modules.items() if eligible(m)]
    if targets == "all-linear":
        heads = output_head_names(model)
        chosen = [n for n in layers if n not in heads]
    elif isinstance(targets, str):
        try:
            regex = re.compile(targets)
        except re.error as exc:
            raise AdapterConfigError(f"target_modules regex {targets!r} is invalid: {exc}") from None
        chosen = [n for n in modules if regex.fullmatch(n)]
        if not chosen:
            raise TargetNotFoundError(f"regex {targets!r} matches no module; adaptable layers look like: "
                                      f"{suffix_summary(layers)}")
    else:
        targets = list(targets)
        chosen = [n for n in modules if any(matches(n, t) for t in targets)]
        missing = [t for t in targets if not any(matches(n, t) for n in modules)]
        if missing:
            raise TargetNotFoundError(f"target module(s) {missing} not found in {type(model).__name__}; "
                                      f"adaptable layers: {suffix_summary(layers)}")
    exclude = tuple(exclude)
    chosen = [n for n in chosen if not any(matches(n, e) for e in exclude)]
    if not chosen:
        raise TargetNotFoundError(f"no module of {type(model).__name__} left to select after exclusions "
                                  f"{list(exclude)}; adaptable layers: {suffix_summary(layers)}" if exclude else
                                  f"no module of {type(model).__name__} matches {targets!r}; adaptable layers: "
                                  f"{suffix_summary(layers)}")
    return chosen


def suffix_summary(names: list[str]) -> str:
    """The distinct last parts of module names ("q_proj, v_proj"): what an error shows of a model's layers."""
    suffixes = sorted({n.split(".")[-1] for n in names})
    return ", ".join(suffixes) if suffixes else "none"


def output_head_names(model: nn.Module) -> set[str]:
    """The output projection (lm_head, tied to the embeddings) and classifier heads are never adapted."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    for name, module in walk.named_modules(model):
        if out_emb is not None and module is out_emb:
            heads.add(name)
        if name.split(".")[-1] in OUTPUT_HEAD_SUFFIXES:
            heads.add(name)
    return heads


def replace_module(model: nn.Module, full_name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `full_name` is (its parent's attribute is rebound)."""
    parent_name, _, child = full_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze_base(model: nn.Module) -> None:
    """Only adapter parameters train; everything else (base weights, biases, norms, embeddings) is frozen."""
    for param_name, param in model.named_parameters():
        param.requires_grad_(".adapters." in f".{param_name}")
