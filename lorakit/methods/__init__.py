"""Adapter methods: each module holds one method's math (lorakit.methods.contract), and lorakit.methods.table
lists them: a new method is its module and one row there."""

from lorakit.methods.dora import DoraAdapter
from lorakit.methods.lora import LoraAdapter
from lorakit.methods.lora_xs import LoraXSAdapter
from lorakit.methods.vera import VeraAdapter

__all__ = ["DoraAdapter", "LoraAdapter", "LoraXSAdapter", "VeraAdapter"]
