"""The adapters `lorakit bench serve` serves: `count` per method, r=16 on every linear layer, random weights.

They are written from a copy of the base built exactly as the server builds it (same spec, device and
dtype), so LoRA-XS basis fingerprints match what the server computes.
"""

from __future__ import annotations

from pathlib import Path

import torch

import lorakit
from lorakit.io import save_adapter
from lorakit.serve.base_loader import load_serving_base

RANK = 16
PREFIX = {"lora_xs": "x", "lora": "l"}  # adapter names: x000, x001, ... and l000, ...


def adapter_name(method: str, i: int) -> str:
    return f"{PREFIX[method]}{i:03d}"


def _config(method: str):
    if method == "lora_xs":
        return lorakit.LoraXSConfig(r=RANK)
    if method == "lora":
        return lorakit.LoraConfig(r=RANK, lora_alpha=2 * RANK)
    raise ValueError(f"method must be one of {sorted(PREFIX)}, got {method!r}")


def write_adapters(directory: Path, methods: list[str], count: int, base: str, device: str, dtype: str,
                   seed: int = 0) -> dict[str, int]:
    """`count` adapters of each method under `directory`; returns the file bytes of one adapter per method."""
    model, _ = load_serving_base(base, device, dtype)
    gen = torch.Generator().manual_seed(seed)
    sizes = {}
    for method in methods:
        config = _config(method)
        lorakit.attach(model, config, f"keep-{method}")  # holds the shared LoRA-XS bases while the others come and go
        for i in range(count):
            name = adapter_name(method, i)
            lorakit.attach(model, config, name)
            with torch.no_grad():
                for p in lorakit.adapter_parameters(model, name):
                    values = torch.randn(p.shape, generator=gen) * (1e-3 if method == "lora_xs" else 1e-2)
                    p.copy_(values.to(p.device, p.dtype))
            path = save_adapter(model, name, directory / name)
            sizes[method] = sum(f.stat().st_size for f in path.iterdir())
            lorakit.delete_adapter(model, name)
        lorakit.delete_adapter(model, f"keep-{method}")
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the server, started next, gets the GPU memory this copy held
    return sizes
