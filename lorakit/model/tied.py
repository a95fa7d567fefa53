"""Tied weights (an output head sharing the input embedding's table): adapters may sit on either, merges may not.

An adapter on `lm_head` or `embed_tokens` of a model with tie_word_embeddings=True changes only its own
module's output: the shared Parameter is never written, so the embedding stays the embedding and the tie
survives saving. Merging would write ΔW into that one Parameter and so change both modules; it is refused
(TiedWeightError) unless the caller unties the module first, explicitly, with `untie`.
"""

from __future__ import annotations

from torch import nn

from lorakit.errors import TiedWeightError


def tied_to(model: nn.Module, module_name: str) -> list[str]:
    """Full names of the other parameters that are the same Parameter as `module_name`'s weight."""
    return _shared_with(model, [module_name])[module_name]


def _shared_with(model: nn.Module, module_names: list[str]) -> dict[str, list[str]]:
    """module -> the other parameter names holding its weight, from one walk over the model's parameters."""
    weights = {id(model.get_submodule(m).weight): m for m in module_names}
    shared: dict[str, list[str]] = {m: [] for m in module_names}
    for param_name, param in model.named_parameters(remove_duplicate=False):
        owner = weights.get(id(param))
        if owner is not None and param_name != f"{owner}.weight":
            shared[owner].append(param_name)
    return shared


def check_untied(model: nn.Module, name: str, module_names: list[str]) -> None:
    """Raise TiedWeightError if merging adapter `name` into these modules would write a shared weight."""
    for module_name, shared in _shared_with(model, module_names).items():
        if shared:
            raise TiedWeightError(
                f"cannot merge adapter {name!r}: {module_name}.weight is tied to {shared} (tie_word_embeddings), so "
                f"merging would change both; keep the adapter unmerged, or untie first with "
                f"lorakit.untie(model, {module_name!r}) (the module then gets its own copy of the weight)")


def untie(model: nn.Module, module_name: str) -> None:
    """Give `module_name` its own copy of a tied weight, and record in the model's config that it is untied
    (so transformers does not tie it again on save or load)."""
    module = model.get_submodule(module_name)
    if not tied_to(model, module_name):
        return
    weight = module.weight
    module.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
