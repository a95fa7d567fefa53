"""Embedding targets in PEFT LoRA files: their key names, and the base tables PEFT writes beside them.

    <module>.lora_A.weight / .lora_B.weight           a linear target (nn.Linear, Conv1D)
    <module>.lora_embedding_A / .lora_embedding_B     an nn.Embedding target: A (r, V), B (D, r), no `.weight`
    <module>.base_layer.weight                        PEFT's copy of a targeted embed_tokens / lm_head table
                                                      (save_embedding_layers="auto" writes it)

lorakit reads the copy only to check it: a copy equal to the model's table is the unchanged base and is
skipped; a different one (a resized or retrained vocabulary) is refused, since loading it would replace a
base weight. lorakit writes no copies (PEFT loads the file without them, and the base is already the base).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.layer.embedding import is_embedding
from lorakit.errors import AdapterMismatchError

LINEAR_KEYS = (".lora_A.weight", ".lora_B.weight")
EMBEDDING_KEYS = (".lora_embedding_A", ".lora_embedding_B")
BASE_COPY = ".base_layer.weight"


def pair_keys(model: nn.Module, module: str) -> tuple[str, str]:
    """The (A, B) key suffixes PEFT uses for `module` of `model`."""
    return EMBEDDING_KEYS if is_embedding(model.get_submodule(module)) else LINEAR_KEYS


def split_base_copies(tensors: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor],
                                                                                dict[str, torch.Tensor]]:
    """(the file's other tensors, module -> its base-table copy)."""
    copies = {k[len(prefix):-len(BASE_COPY)]: t for k, t in tensors.items()
              if k.startswith(prefix) and k.endswith(BASE_COPY)}
    rest = {k: t for k, t in tensors.items() if not (k.startswith(prefix) and k.endswith(BASE_COPY))}
    return rest, copies


def check_layouts(model: nn.Module, layouts: dict[str, str], where: object) -> None:
    """Each module's A/B keys must be the layout of its kind of layer (`layouts`: module -> "embedding"/"linear")."""
    for module, layout in layouts.items():
        want = "embedding" if pair_keys(model, module) == EMBEDDING_KEYS else "linear"
        if layout != want:
            raise AdapterMismatchError(f"{where}: module {module} is a{'n' if want == 'embedding' else ''} {want} "
                                       f"layer in {type(model).__name__}, but the file stores {layout} LoRA keys for it")


def check_base_copies(model: nn.Module, copies: dict[str, torch.Tensor], targets: set[str], where: object) -> None:
    """Accept PEFT's copies of base tables only when, rounded to the model's dtype, they equal its own."""
    present = dict(model.named_modules())
    for module, copy in copies.items():
        if module not in targets or module not in present:
            raise AdapterMismatchError(f"{where}: key {module}{BASE_COPY} is a base weight of a module the adapter "
                                       "does not target here; lorakit loads adapter weights only")
        weight = present[module].weight
        same = tuple(copy.shape) == tuple(weight.shape) and torch.equal(copy.to(weight.device, weight.dtype),
                                                                         weight.detach())
        if not same:
            raise AdapterMismatchError(
                f"{where}: {module}{BASE_COPY} {tuple(copy.shape)} differs from the model's {module}.weight "
                f"{tuple(weight.shape)} (a resized or retrained table?); lorakit does not replace base weights "
                "from an adapter file")
