"""Adapter methods: each module holds one method's math (parameters, delta(x), delta_weight())."""

from lorakit.methods.dora import DoraAdapter
from lorakit.methods.lora import LoraAdapter
from lorakit.methods.lora_xs import LoraXSAdapter
from lorakit.methods.vera import VeraAdapter

__all__ = ["DoraAdapter", "LoraAdapter", "LoraXSAdapter", "VeraAdapter"]
