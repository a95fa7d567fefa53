"""Module surgery on any torch model: name matching, swapping a submodule, freezing the base.

The lowest model-level layer: it knows nn.Module and nothing of lorakit's own layers, so every part of
lorakit that walks or edits a model (attach, the bank, quantize, merge, io) shares these few rules.
"""

from __future__ import annotations

from torch import nn

OUTPUT_HEAD_SUFFIXES = frozenset({"lm_head", "classifier", "score"})
PREFIX_STORE_PREFIX = "lorakit_prefix."  # lorakit's own prefix modules: never targets of anything


def matches(name: str, pattern: str) -> bool:
    """A target pattern names a module by its full name or by its last dotted parts ("q_proj")."""
    return name == pattern or name.endswith("." + pattern)


def output_head_names(model: nn.Module) -> set[str]:
    """The output projection (lm_head, tied to the embeddings) and classifier heads are never adapted."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
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
