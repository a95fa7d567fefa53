"""A transformers `Trainer` (or TRL `SFTTrainer`, any subclass) training a lorakit adapter: one call.

    trainer = SFTTrainer(model=model, args=args, train_dataset=data)
    lorakit.integrations.prepare_trainer(trainer, train="poet")   # the only added line
    trainer.train(resume_from_checkpoint=...)

What it does, each through the seam transformers offers for it:
- saving: `model.save_pretrained` writes the adapters (lorakit.integrations.saving), which is what
  Trainer.save_model and every checkpoint call;
- which adapter trains: `lorakit.set_trainable` (only its parameters require gradients, which is all
  Trainer's create_optimizer puts in the optimizer; calls without a route run it);
- resuming: the Trainer's checkpoint loader, for this trainer object only, first looks for lorakit adapter
  files and copies them into the attached adapters in place (lorakit.integrations.resume); anything else
  (a merged full model's checkpoint) goes to transformers' own loader; `load_best_model_at_end` likewise.
  Optimizer, scheduler and RNG state are transformers' own files, restored by the Trainer as always, so a
  resumed run continues bit-exact.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from lorakit.model.manage import adapter_names, set_trainable
from lorakit.errors import LorakitError
from lorakit.integrations.resume import restore_adapters, saved_adapter_dirs
from lorakit.integrations.saving import enable_adapter_saving
from lorakit.io.files import CONFIG_NAME
from lorakit.model.record import adapters_of

LOADER_ATTR = "_load_from_checkpoint"  # transformers' Trainer method that loads a checkpoint's weights
BEST_ATTR = "_load_best_model"  # and the one load_best_model_at_end calls
FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


class AdapterCheckpointLoader:
    """A Trainer's checkpoint loader that restores lorakit adapter files into the model's adapters and hands
    any other checkpoint to transformers' loader (`fallback`)."""

    def __init__(self, trainer: Any, fallback: Any) -> None:
        self.trainer = trainer
        self.fallback = fallback

    def __call__(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = _unwrapped(self.trainer, model if model is not None else self.trainer.model)
        names = adapter_names(target)
        full = any(os.path.isfile(os.path.join(resume_from_checkpoint, f)) for f in FULL_WEIGHTS)
        if names and not full and saved_adapter_dirs(resume_from_checkpoint, names):
            restore_adapters(target, resume_from_checkpoint)
            return
        if names and not full:
            raise LorakitError(f"{resume_from_checkpoint}: no lorakit adapter files for {names} "
                               f"(neither {CONFIG_NAME} nor one subdirectory per adapter)")
        self.fallback(resume_from_checkpoint, model)


class BestAdapterLoader:
    """`load_best_model_at_end`: the best checkpoint's adapters copied into the model's (transformers' own
    loader would look for model.safetensors there)."""

    def __init__(self, trainer: Any, fallback: Any) -> None:
        self.trainer = trainer
        self.fallback = fallback

    def __call__(self) -> None:
        best = self.trainer.state.best_model_checkpoint
        target = _unwrapped(self.trainer, self.trainer.model)
        if saved_adapter_dirs(best, adapter_names(target)):
            restore_adapters(target, best)
        else:
            self.fallback()


def _unwrapped(trainer: Any, model: nn.Module) -> nn.Module:
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator.unwrap_model(model) if accelerator is not None else model


def prepare_trainer(trainer: Any, train: str | None = None) -> Any:
    """Make `trainer` (transformers.Trainer or a subclass: TRL's SFTTrainer...) save, checkpoint and resume its
    model's lorakit adapters, and train adapter `train` alone (required when several are attached; the
    others are frozen and stay out of the optimizer). Returns the trainer. Call it before `trainer.train()`."""
    model = _unwrapped(trainer, trainer.model)
    names = list(adapters_of(model).configs)
    if train is None and len(names) > 1:
        raise LorakitError(f"{len(names)} adapters are attached ({', '.join(sorted(names))}): name the one to "
                           "train, prepare_trainer(trainer, train=NAME)")
    if train is not None:
        set_trainable(model, train)
    enable_adapter_saving(model)
    for attr, kind in ((LOADER_ATTR, AdapterCheckpointLoader), (BEST_ATTR, BestAdapterLoader)):
        if not isinstance(trainer.__dict__.get(attr), kind):
            fallback = getattr(trainer, attr, None)
            if fallback is None:
                raise LorakitError(f"{type(trainer).__name__} has no {attr}: not a transformers Trainer")
            trainer.__dict__[attr] = kind(trainer, fallback)
    return trainer
