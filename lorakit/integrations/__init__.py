"""lorakit inside the tools people already train with: transformers' Trainer, TRL, accelerate (docs/ECOSYSTEM.md).

    enable_adapter_saving(model)            model.save_pretrained writes the adapters, not the base
    prepare_trainer(trainer, train=NAME)    that, plus checkpoints that resume in place, and one adapter trained
    save_adapters(model, dir) / restore_adapters(model, dir)   the layout both use, for your own loops

Above lorakit.io (it writes through its writers), below the applications.
"""

from lorakit.integrations.resume import load_into, restore_adapters
from lorakit.integrations.saving import AdapterSaving, enable_adapter_saving, save_adapters
from lorakit.integrations.trainer import AdapterCheckpointLoader, prepare_trainer

__all__ = ["AdapterCheckpointLoader", "AdapterSaving", "enable_adapter_saving", "load_into", "prepare_trainer",
           "restore_adapters", "save_adapters"]
