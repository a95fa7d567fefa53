"""Any adapter as a plain PEFT LoRA adapter, for PEFT, vLLM, LoRAX and other LoRA runtimes.

Each method's update is rewritten as B'·A' with the scaling folded in (the file says lora_alpha = r, so
PEFT's scaling α/r is 1):

    LoRA     A' = A,                 B' = B           (written as is, with its own r and lora_alpha)
    LoRA-XS  A' = (α/r)·R·Σ_r·V_rᵀ,  B' = U_r         (r, in), (out, r)
    VeRA     A' = diag(d)·A_shared,  B' = diag(b)·B_shared

The exported file is larger than the native one (it carries the bases), but any LoRA runtime reads it.
It is plain LoRA: an adapter that also holds modules_to_save copies or trainable tokens is refused, since
vLLM-style runtimes load neither (save_adapter keeps them, for PEFT), unless drop_extras=True leaves them out.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters import adapter_config, adapter_state_dict
from lorakit.config import LoraConfig, LoraXSConfig, VeraConfig
from lorakit.errors import UnsupportedAdapterError
from lorakit.io.peft_extras import extras_of
from lorakit.io.peft_lora import peft_config_dict, save_lora, write_peft_lora
from lorakit.methods.vera import vera_basis_key


def lora_factors(layer: nn.Module, config: LoraXSConfig | VeraConfig,
                 trained: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' (r, in), B' (out, r)) with B'·A' = this layer's ΔW; `trained` is {param: tensor} as trained."""
    if config.method == "lora_xs":
        down, up = layer.basis("lora_xs").sliced(config.r)  # (r, in), (out, r)
        a = config.scaling * (trained["lora_R"].float() @ down.float())  # (r, in)
        b = up.float()  # (out, r)
    else:
        basis = layer.basis(vera_basis_key(config))
        a = trained["vera_lambda_d"].float()[:, None] * basis.down.float()  # (r, in)
        b = trained["vera_lambda_b"].float()[:, None] * basis.up.float()  # (out, r)
    dtype = next(iter(trained.values())).dtype
    return a.to(dtype), b.to(dtype)


def export_to_peft(model: nn.Module, name: str, path: str | os.PathLike, *, drop_extras: bool = False) -> Path:
    """Write adapter `name` (any method) as a plain PEFT LoRA adapter directory that real PEFT and LoRA
    runtimes load. modules_to_save copies and trainable tokens are refused, or left out with `drop_extras`."""
    config = adapter_config(model, name)
    extras = extras_of(model, name)
    if extras and not drop_extras:
        raise UnsupportedAdapterError(
            f"adapter {name!r} holds {' and '.join(extras)}, which a plain LoRA export cannot carry (vLLM loads "
            "neither trained module copies nor trainable tokens): use save_adapter for a PEFT file that keeps them, "
            "or export with drop_extras=True (lorakit export --drop-extras) to write the LoRA part alone")
    if isinstance(config, LoraConfig):
        return save_lora(model, name, path, extras=False)
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter_state_dict(model, name).items():  # module adapters and packed ones alike
        module, param = key.rsplit(".", 1)
        per_module.setdefault(module, {})[param] = tensor
    weights = {m: lora_factors(model.get_submodule(m), config, t) for m, t in per_module.items()}
    dropout = getattr(config, "lora_dropout", getattr(config, "vera_dropout", 0.0))
    peft_config = peft_config_dict(model, list(weights), config.r, lora_alpha=config.r, lora_dropout=dropout)
    return write_peft_lora(model, path, weights, peft_config)
