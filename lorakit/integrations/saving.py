"""`model.save_pretrained` writes the adapters, not the base: what transformers' Trainer, TRL and accelerate call.

transformers' `Trainer.save_model` and every `checkpoint-N` go through `model.save_pretrained(dir,
state_dict=..., is_main_process=...)` (Trainer._save), as do accelerate scripts (`unwrap_model(model)`). So
the one seam that covers them all is the model's own `save_pretrained`: `enable_adapter_saving` gives the
model an instance attribute of that name (an object holding the model, as ModelAdapters' `_apply` hook),
and the class's method stays untouched. While adapters are attached it writes them with lorakit.io's
writers (LoRA in PEFT's layout, LoRA-XS / VeRA in lorakit's native one, prefix in PEFT's): one adapter at
the top of the directory, several each in a subdirectory named after it (as PEFT lays out several). Once
`merge_and_unload` made the model plain again, it is transformers' own save: the full merged model.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.model.manage import adapter_names
from lorakit.errors import LorakitError
from lorakit.io import save_adapter
from lorakit.io.atomic import fsync_dir
from lorakit.io.files import CONFIG_NAME, WEIGHTS_NAME
from lorakit.model.record import ATTR as ADAPTERS_ATTR

HOOK_ATTR = "save_pretrained"  # the instance attribute that shadows the class's method


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> list[Path]:
    """Write every attached adapter into `directory` (which may hold other files: a Trainer checkpoint's
    optimizer, a tokenizer): one adapter as its two files at the top, several in one subdirectory each.
    Returns the adapter directories written."""
    directory = Path(directory)
    names = adapter_names(model)
    if not names:
        raise LorakitError(f"{type(model).__name__} has no lorakit adapters to save")
    directory.mkdir(parents=True, exist_ok=True)
    if len(names) > 1:
        for stale in (CONFIG_NAME, WEIGHTS_NAME):  # a single adapter saved here before must not shadow them
            (directory / stale).unlink(missing_ok=True)
        return [save_adapter(model, name, directory / name) for name in names]
    staged = directory / f".lorakit-adapter-{uuid.uuid4().hex[:8]}"
    try:  # written whole and checked by lorakit.io beside the target, then each file renamed into place
        save_adapter(model, names[0], staged)
        for file in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(staged / file, directory / file)
        fsync_dir(directory)
    finally:
        for leftover in staged.glob("*") if staged.is_dir() else ():
            leftover.unlink()
        if staged.is_dir():
            staged.rmdir()
    return [directory]


class AdapterSaving:
    """`model.save_pretrained` while lorakit adapters are attached: the adapters; afterwards the class's own.

    Takes transformers' arguments: `is_main_process=False` writes nothing (the other ranks of a DDP run),
    `state_dict` is ignored (the adapters are read from the model, so a Trainer's full state dict, base
    included, never reaches the file), `push_to_hub` is refused rather than pushing only part of it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | os.PathLike, *args: Any, is_main_process: bool = True,
                 push_to_hub: bool = False, **kwargs: Any) -> Any:
        model = self.model
        if ADAPTERS_ATTR not in model.__dict__ or not adapter_names(model):  # merged and unloaded: plain again
            return type(model).save_pretrained(model, save_directory, *args, is_main_process=is_main_process,
                                               push_to_hub=push_to_hub, **kwargs)
        if push_to_hub:
            raise LorakitError("save_pretrained(push_to_hub=True) is not supported for a lorakit model: save, "
                               "then upload the directory with huggingface_hub.upload_folder")
        if not is_main_process:
            return None
        save_adapters(model, save_directory)
        return None


def enable_adapter_saving(model: nn.Module) -> nn.Module:
    """Make `model.save_pretrained(dir)` (and so Trainer.save_model, Trainer/TRL checkpoints, accelerate's
    `unwrap_model(model).save_pretrained`) write the model's lorakit adapters instead of the base; returns
    the model. Idempotent."""
    if not isinstance(model.__dict__.get(HOOK_ATTR), AdapterSaving):
        if not callable(getattr(type(model), HOOK_ATTR, None)):
            raise LorakitError(f"{type(model).__name__} has no save_pretrained; save with lorakit.io.save_adapter")
        object.__setattr__(model, HOOK_ATTR, AdapterSaving(model))
    return model
