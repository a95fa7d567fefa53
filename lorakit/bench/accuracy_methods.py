"""The methods of the reproduction table and how each one turns a fresh base model into a trainable one.

    full         every base weight trained (full fine-tuning: the papers' upper reference)
    head         classification only: the encoder frozen, only the classifier head trained (a linear probe)
    lora         LoRA r=8, α=16, every linear layer
    lora-xs-rN   LoRA-XS at rank N (r² trained numbers per layer), every linear layer
    vera         VeRA r=256 (shared random projections, trained vectors d and b)
    prefix       prefix tuning, 16 key/value slots per layer
    qlora        the base's linears quantized to NF4 with double quantization, then LoRA r=8
    lora-xs-4bit the same NF4 base, then LoRA-XS r=16 (its SVD basis from the dequantized weights)

A classification head (when the task has one) is trained in full by every method, as PEFT's
`modules_to_save` does; its parameters are counted apart from the method's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

import lorakit
from lorakit.config import LoraConfig, LoraXSConfig, PrefixConfig, VeraConfig

ADAPTER = "bench"  # name of the adapter each run trains
HEAD_NAMES = ("classifier", "score")


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    config: object | None  # an adapter config; None for full fine-tuning and the head-only probe
    family: str  # which learning-rate grid of the task applies: full | head | lora | small | vera (else small)
    quantize: str | None = None  # "nf4": quantize the base before attaching
    classification_only: bool = False


METHODS: tuple[Method, ...] = (
    Method("full", "Full fine-tuning", None, "full"),
    Method("head", "Head only (probe)", None, "head", classification_only=True),
    Method("lora", "LoRA r=8", LoraConfig(r=8, lora_alpha=16), "lora"),
    Method("lora-xs-r4", "LoRA-XS r=4", LoraXSConfig(r=4), "small"),
    Method("lora-xs-r8", "LoRA-XS r=8", LoraXSConfig(r=8), "small"),
    Method("lora-xs-r16", "LoRA-XS r=16", LoraXSConfig(r=16), "small"),
    Method("lora-xs-r32", "LoRA-XS r=32", LoraXSConfig(r=32), "small"),
    Method("vera", "VeRA r=256", VeraConfig(r=256), "vera"),
    Method("prefix", "Prefix tuning (16 slots)", PrefixConfig(num_virtual_tokens=16), "small"),
    Method("qlora", "QLoRA (NF4 base) r=8", LoraConfig(r=8, lora_alpha=16), "lora", quantize="nf4"),
    Method("lora-xs-4bit", "LoRA-XS r=16 on NF4 base", LoraXSConfig(r=16), "small", quantize="nf4"),
)
BY_KEY = {m.key: m for m in METHODS}


def head_names(model: nn.Module) -> list[str]:
    """Parameter names of the classification head (empty for a language model)."""
    return [n for n, _ in model.named_parameters() if n.split(".")[0] in HEAD_NAMES]


def prepare(model: nn.Module, method: Method) -> tuple[int, int]:
    """Make `model` trainable as `method` says, in place; returns (method's trainable numbers, head numbers)."""
    heads = set(head_names(model))
    if method.quantize:
        lorakit.quantize(model, method.quantize, double_quant=True, exclude_modules=tuple(HEAD_NAMES))
    if method.config is not None:
        lorakit.attach(model, method.config, ADAPTER)
    for name, p in model.named_parameters():
        if method.key == "full":
            p.requires_grad_(True)
        elif name in heads:
            p.requires_grad_(True)
        elif method.config is None:
            p.requires_grad_(False)
    own = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in heads)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n in heads)
    return own, head


def file_bytes(model: nn.Module, method: Method, scratch) -> int:
    """Bytes of what a user stores for this method: the adapter directory, or the whole fp32 model."""
    from pathlib import Path

    if method.config is None:
        trained = [p for p in model.parameters() if p.requires_grad]
        return sum(p.numel() * p.element_size() for p in trained)
    from lorakit.io import save_adapter

    path = save_adapter(model, ADAPTER, Path(scratch) / method.key)
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
