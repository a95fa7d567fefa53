"""Loading saved adapters back into the adapters a model already has, in place: what resuming needs.

A resumed Trainer already attached the adapters (the user's script ran again) and will hand their
Parameter objects to the optimizer whose state it then restores, so the weights are copied into those
very tensors rather than attached anew. The files go through lorakit.io.load_adapter under a temporary
name first (every check it makes: keys, shapes, finiteness, basis fingerprints), so a bad checkpoint
raises and leaves the model as it was.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch
from torch import nn

from lorakit.model.manage import adapter_names, adapter_state_dict, delete_adapter
from lorakit.errors import AdapterMismatchError, AdapterNotFoundError
from lorakit.io import load_adapter
from lorakit.io.files import CONFIG_NAME


def saved_adapter_dirs(directory: str | os.PathLike, names: list[str]) -> dict[str, Path]:
    """Adapter name -> its directory in a save_adapters layout (one at the top, or one subdirectory each);
    empty when `directory` holds none."""
    directory = Path(directory)
    if (directory / CONFIG_NAME).is_file():
        return {names[0]: directory} if len(names) == 1 else {}
    return {n: directory / n for n in names if (directory / n / CONFIG_NAME).is_file()}


def load_into(model: nn.Module, path: str | os.PathLike, name: str) -> None:
    """Copy the adapter saved in `path` into the attached adapter `name`, keeping its Parameter objects."""
    staged = f"resume-{uuid.uuid4().hex[:12]}"
    load_adapter(model, path, staged)
    try:
        saved, current = adapter_state_dict(model, staged), adapter_state_dict(model, name)  # keys: module.param
        if set(saved) != set(current):
            raise AdapterMismatchError(f"{path}: adapter {name!r} differs from the file in modules "
                                       f"{sorted(set(saved) ^ set(current))[:5]}")
        wrong = [k for k in current if saved[k].shape != current[k].shape]
        if wrong:
            raise AdapterMismatchError(f"{path}: {wrong[0]} has shape {tuple(saved[wrong[0]].shape)} in the file, "
                                       f"{tuple(current[wrong[0]].shape)} in adapter {name!r}")
        with torch.no_grad():
            for key, target in current.items():
                target.copy_(saved[key])
    finally:
        delete_adapter(model, staged)


def restore_adapters(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Load every adapter saved in `directory` (save_adapters' layout) into the model's adapters of the same
    names; returns the names restored. An attached adapter with no file there is an error."""
    names = adapter_names(model)
    found = saved_adapter_dirs(directory, names)
    missing = [n for n in names if n not in found]
    if missing:
        raise AdapterNotFoundError(f"{directory}: no saved adapter for {missing} (attached: {names})")
    for name, path in found.items():
        load_into(model, path, name)
    return list(found)
