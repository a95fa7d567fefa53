"""Any adapter as a plain PEFT LoRA adapter, for PEFT, vLLM, LoRAX and other LoRA runtimes.

Each method's update is rewritten as B'·A' with the scaling folded in (the file says lora_alpha = r, so
PEFT's scaling α/r is 1):

    LoRA     A' = A,                 B' = B           (written as is, with its own r and lora_alpha)
    DoRA     A' = A,                 B' = B           only where every g = m/‖W + s·B·A‖ is 1 (an adapter
                                                      whose magnitudes never moved); otherwise refused, since
                                                      diag(g)·(W + s·B·A) − W is not low-rank
    LoRA-XS  A' = (α/r)·R·Σ_r·V_rᵀ,  B' = U_r         (r, in), (out, r)
    VeRA     A' = diag(d)·A_shared,  B' = diag(b)·B_shared

The exported file is larger than the native one (it carries the bases), but any LoRA runtime reads it.

Embedding and output-head targets (`embed_tokens` as lora_embedding_A/B, `lm_head`) are written as PEFT
writes them, and PEFT reads them; vLLM serves them only for model classes that declare those modules as LoRA
embedding modules (its Llama does; its Qwen2/Qwen3 did not as of early 2026) and raises "expected target
modules ... but received" for the others. Export therefore warns when an adapter has such modules, and
`drop_modules` leaves named modules out explicitly (the file then differs from the trained adapter, and says
so in the warning); nothing is ever dropped silently.

It is plain LoRA: an adapter that also holds modules_to_save copies or trainable tokens is refused, since
vLLM-style runtimes load neither (save_adapter keeps them, for PEFT), unless drop_extras=True leaves them out.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Collection
from pathlib import Path

import torch
from torch import nn

from lorakit.model.manage import adapter_config, adapter_state_dict
from lorakit.config import LoraConfig, LoraXSConfig, VeraConfig
from lorakit.layer.embedding import is_embedding
from lorakit.errors import AdapterConfigError, UnsupportedAdapterError
from lorakit.io.peft_extras import extras_of
from lorakit.io.peft_lora import peft_config_dict, save_lora, write_peft_lora
from lorakit.layer.linear import adapted_layers
from lorakit.methods.vera import vera_basis_key
from lorakit.layer.surgery import matches, output_head_names


DORA_EXPORT_TOLERANCE = 1e-5  # max |g − 1| for a DoRA adapter to be written as the plain LoRA it then equals


class ServingCompatibilityWarning(UserWarning):
    """An exported adapter holds modules some LoRA runtimes (vLLM) refuse for some models."""


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


def check_dora_is_plain(model: nn.Module, name: str, modules: Collection[str]) -> None:
    """Refuse, naming the module, unless DoRA adapter `name` rescales no row (|g − 1| within tolerance) in
    `modules`: then it computes exactly what its LoRA part alone does."""
    for module in modules:
        layer = model.get_submodule(module)
        gap = (layer.adapters[name].gain(layer.unmerged_weight()) - 1).abs().max().item()
        if not gap <= DORA_EXPORT_TOLERANCE:
            raise UnsupportedAdapterError(
                f"adapter {name!r} is DoRA and rescales the rows of module {module} (max |g - 1| = {gap:.3g} > "
                f"{DORA_EXPORT_TOLERANCE:g}): no plain LoRA adapter computes that, and vLLM-style runtimes do not "
                "serve DoRA; save it with save_adapter (a PEFT DoRA adapter) or merge it into the base instead")


def vocabulary_modules(model: nn.Module, modules: Collection[str]) -> list[str]:
    """Those of `modules` that are embedding tables or the output head: what vLLM serves for some models only."""
    heads = output_head_names(model)
    return [m for m in modules if m in heads or is_embedding(model.get_submodule(m))]


def kept_modules(model: nn.Module, name: str, modules: list[str], drop_modules: Collection[str]) -> list[str]:
    """`modules` less `drop_modules` (full names or suffixes, each of which must name one of them), with a
    ServingCompatibilityWarning for what is dropped and for embedding / output-head modules kept."""
    unknown = [d for d in drop_modules if not any(matches(m, d) for m in modules)]
    if unknown:
        raise AdapterConfigError(f"drop_modules {unknown} name no module of adapter {name!r}; it has "
                                 f"{sorted({m.rsplit('.', 1)[-1] for m in modules})}")
    dropped = [m for m in modules if any(matches(m, d) for d in drop_modules)]
    if dropped:
        warnings.warn(f"adapter {name!r}: leaving out {dropped} as asked (drop_modules); the exported adapter "
                      "no longer computes what the trained one does", ServingCompatibilityWarning, stacklevel=3)
    kept = [m for m in modules if m not in dropped]
    if not kept:
        raise AdapterConfigError(f"drop_modules {list(drop_modules)} leaves adapter {name!r} with no module")
    vocab = vocabulary_modules(model, kept)
    if vocab:
        warnings.warn(f"adapter {name!r} adapts {vocab} (embedding / output head): PEFT loads them, but vLLM serves "
                      "them only for model classes that declare embed_tokens / lm_head as LoRA embedding modules "
                      "(Llama does, Qwen2/Qwen3 did not) and refuses the adapter otherwise; export with drop_modules "
                      "(lorakit export --drop-modules) to leave them out", ServingCompatibilityWarning, stacklevel=3)
    return kept


def export_to_peft(model: nn.Module, name: str, path: str | os.PathLike, *,
                   drop_modules: Collection[str] = (), drop_extras: bool = False) -> Path:
    """Write adapter `name` (any method) as a plain PEFT LoRA adapter directory that real PEFT and LoRA runtimes
    load, less the modules named in `drop_modules` (see `kept_modules`). modules_to_save copies and trainable
    tokens are refused, or left out with `drop_extras`."""
    config = adapter_config(model, name)
    extras = extras_of(model, name)
    if extras and not drop_extras:
        raise UnsupportedAdapterError(
            f"adapter {name!r} holds {' and '.join(extras)}, which a plain LoRA export cannot carry (vLLM loads "
            "neither trained module copies nor trainable tokens): use save_adapter for a PEFT file that keeps them, "
            "or export with drop_extras=True (lorakit export --drop-extras) to write the LoRA part alone")
    if isinstance(config, LoraConfig):
        modules = [m for m, layer in adapted_layers(model).items() if name in layer.adapters]
        kept = set(kept_modules(model, name, modules, drop_modules))
        if config.use_dora:
            check_dora_is_plain(model, name, [m for m in modules if m in kept])
        return save_lora(model, name, path, modules=kept, extras=False, magnitudes=False)
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter_state_dict(model, name).items():  # module adapters and packed ones alike
        module, param = key.rsplit(".", 1)
        per_module.setdefault(module, {})[param] = tensor
    kept = set(kept_modules(model, name, list(per_module), drop_modules))
    per_module = {m: t for m, t in per_module.items() if m in kept}
    weights = {m: lora_factors(model.get_submodule(m), config, t) for m, t in per_module.items()}
    dropout = getattr(config, "lora_dropout", getattr(config, "vera_dropout", 0.0))
    peft_config = peft_config_dict(model, list(weights), config.r, lora_alpha=config.r, lora_dropout=dropout)
    return write_peft_lora(model, path, weights, peft_config)
