"""`modules_to_save`: a fully trained copy of a module per adapter (a classifier head, a norm), routed per call.

    score                       SavedModule: the original's tensors under their own keys (score.weight)
    score.modules_to_save.<a>   adapter a's copy, trained; the original stays frozen

A call routed to adapter `a` runs a's copy, any other route (or None) the original. Per-row routes run each
distinct copy on its rows where the module is row-independent (output row i depends on input row i alone:
linear layers, norms, embeddings); for any other module a batch mixing copies is refused, naming it.
Merging `a` makes routeless (as-stored) calls run a's copy; `plain_module` gives the module to keep when
lorakit is unloaded. PEFT's ModulesToSaveWrapper keeps the same `modules_to_save.<adapter>` layout.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterConfigError, MergeStateError, RoutingError, TargetNotFoundError
from lorakit.routing.context import AS_STORED
from lorakit.layer.surgery import PREFIX_STORE_PREFIX, matches, replace_module
from lorakit.layer.wrapped import WholeModuleWrapper, by_rows, route_names, row_keys

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = nn.Linear  # type: ignore[assignment,misc]

COPIES = "modules_to_save"  # the ModuleDict of copies, PEFT's name
# Module types whose output row i depends only on input row i, so a batch may run a different copy per row.
# transformers' RMSNorm classes (LlamaRMSNorm, ...) are not torch's: they are known by the name they all share.
ROW_INDEPENDENT: tuple[type, ...] = (nn.Linear, Conv1D, nn.Embedding, nn.LayerNorm, nn.RMSNorm)
ROW_INDEPENDENT_SUFFIXES = ("RMSNorm",)


def row_independent(module: nn.Module) -> bool:
    return isinstance(module, ROW_INDEPENDENT) or type(module).__name__.endswith(ROW_INDEPENDENT_SUFFIXES)


class SavedModule(WholeModuleWrapper):
    """A base module plus one trained copy per adapter, the copy chosen by the call's route."""

    def __init__(self, original: nn.Module, module_name: str, registry: Any) -> None:
        super().__init__(original, reserved=(COPIES,))
        self.modules_to_save = nn.ModuleDict()
        self.module_name = module_name
        object.__setattr__(self, "registry", registry)

    def extra_repr(self) -> str:
        return f"original={type(self.original_module).__name__}, copies={list(self.modules_to_save)}"

    def module_for(self, key: str | None) -> nn.Module:
        return self.original_module if key is None else self.modules_to_save[key]

    def key_of(self, name: str | None) -> str | None:
        return name if name is not None and name in self.modules_to_save else None

    def merged_copy(self) -> str | None:
        """The merged adapter whose copy routeless calls run here, if any."""
        return next((n for n in self.registry.merged if n in self.modules_to_save), None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        keys = row_keys(route_names(self.registry, self.module_name), self.key_of, self.module_name, "a trained copy of the module")
        if keys is AS_STORED:
            keys = self.merged_copy()
        if not isinstance(keys, tuple):
            return self.module_for(keys)(*args, **kwargs)
        if not row_independent(self.original_module):
            raise RoutingError(f"{self.module_name} ({type(self.original_module).__name__}) mixes rows, so a batch "
                               f"cannot run different copies of it per row (rows want {sorted(set(map(str, keys)))}); "
                               "send one adapter per batch")
        x, rest = args[0], args[1:]
        return by_rows(keys, x, lambda key, rows: self.module_for(key)(rows, *rest, **kwargs), self.module_name)


# -------------------------------------------------------------------------- attach / delete / unload

def saved_modules(model: nn.Module) -> dict[str, SavedModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SavedModule)}


def plan_saved(model: nn.Module, patterns: tuple[str, ...], name: str, lora_targets: list[str]) -> list[str]:
    """The modules `patterns` name (full names or dotted suffixes), checked before anything is changed."""
    if not patterns:
        return []
    modules = dict(model.named_modules())
    inside = tuple(f"{n}." for n in saved_modules(model)) + (PREFIX_STORE_PREFIX,)  # copies, lorakit's own
    chosen = [n for n in modules if n and not n.startswith(inside) and any(matches(n, p) for p in patterns)]
    missing = [p for p in patterns if not any(matches(n, p) for n in chosen)]
    if missing:
        raise TargetNotFoundError(f"modules_to_save {missing} not found in {type(model).__name__}")
    for n in chosen:
        module = modules[n]
        if isinstance(module, SavedModule) and name in module.modules_to_save:
            raise AdapterConfigError(f"{n} already holds a copy for adapter {name!r}")
        nested = [o for o in chosen if o != n and o.startswith(f"{n}.")]
        if nested:
            raise AdapterConfigError(f"modules_to_save: {nested[0]} lies inside {n}; name one of them")
        overlap = [t for t in lora_targets if t == n or t.startswith(f"{n}.")]
        if overlap:
            raise AdapterConfigError(f"module {overlap[0]} is both a LoRA target and in modules_to_save ({n}); "
                                     "exclude it from target_modules")
        if not isinstance(module, SavedModule) and any(type(m).__module__.startswith("lorakit.")
                                                       for m in module.modules()):
            raise AdapterConfigError(f"modules_to_save {n} holds lorakit adapters already; it cannot also be copied")
    return chosen


def install_saved(model: nn.Module, chosen: list[str], name: str, registry: Any) -> None:
    """Give each module in `chosen` a trainable copy for adapter `name` (wrapping it on first use)."""
    for n in chosen:
        module = model.get_submodule(n)
        if not isinstance(module, SavedModule):
            module = SavedModule(module, n, registry)
            replace_module(model, n, module)
        replica = copy.deepcopy(module.original_module)
        for param in replica.parameters():
            param.requires_grad_(True)
        module.modules_to_save[name] = replica


def copy_parameters(module: SavedModule) -> dict[str, list[nn.Parameter]]:
    """Adapter name -> the parameters of its copy in `module` (read per module, so one model walk serves all)."""
    return {name: list(replica.parameters()) for name, replica in module.modules_to_save.items()}


def saved_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """'<module>.modules_to_save.<param>' -> tensor for adapter `name`'s copies."""
    return {f"{n}.{COPIES}.{k}": v.detach() for n, m in saved_modules(model).items() if name in m.modules_to_save
            for k, v in m.modules_to_save[name].state_dict().items()}


def remove_saved(model: nn.Module, name: str) -> None:
    """Drop adapter `name`'s copies; a module left without copies is the original again."""
    for n, module in saved_modules(model).items():
        if name in module.modules_to_save:
            del module.modules_to_save[name]
            if not len(module.modules_to_save):
                replace_module(model, n, module.original_module)


def check_merge_saved(model: nn.Module, name: str, merged: list[str]) -> None:
    """Two merged adapters cannot both own the as-stored module: refuse before anything changes."""
    for n, module in saved_modules(model).items():
        other = [m for m in merged if m in module.modules_to_save]
        if name in module.modules_to_save and other:
            raise MergeStateError(f"adapter {other[0]!r} is merged and also holds a copy of {n}; unmerge it before "
                                  f"merging {name!r}")


def unwrap_saved(model: nn.Module) -> None:
    """Put back a plain module everywhere: the merged adapter's copy, else the original."""
    for n, module in saved_modules(model).items():
        key = module.merged_copy()
        replace_module(model, n, module.module_for(key))
