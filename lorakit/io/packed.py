"""The fast way in for a LoRA-XS adapter file: straight into the packed bank, in milliseconds.

When every module the file names already carries a LoRA-XS basis of enough rank (a serving model
after its first adapter), loading is: stack the file's cores, check shapes, finiteness and basis
fingerprints with a few tensor operations (the model's fingerprints are tabled once per registry
version), then one write into the bank. No model walk, no SVD, nothing changes until all checks pass.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from lorakit.model.bank import store_packed
from lorakit.config import LoraXSConfig
from lorakit.errors import AdapterMismatchError, NonFiniteAdapterError
from lorakit.io.files import NOT_STRICT_HINT
from lorakit.methods.lora_xs import basis_fingerprint
from lorakit.model.record import ATTR as ADAPTERS_ATTR

FINGERPRINT = "basis_fingerprint"
RTOL = 1e-3  # as lorakit.methods.basis.fingerprints_match


def _fingerprint_table(registry, model: nn.Module, modules: tuple[str, ...], r: int) -> torch.Tensor | None:
    """(n, 2r) fingerprints of this model's bases for `modules`, or None when one of them has no LoRA-XS
    basis of rank ≥ r. Cached until layers or bases change (registry.layers_version): walking 210 modules'
    ModuleDicts on every load cost more than the rest of the load."""
    cache = registry.__dict__.setdefault("_fingerprint_tables", {})
    key = (registry.layers_version, modules, r)
    if key not in cache:
        cache.clear()
        layers = registry.layer_map(model)
        bases = [layers[m].basis("lora_xs") if m in layers else None for m in modules]
        cache[key] = None if any(b is None or b.rank < r for b in bases) else \
            torch.stack([basis_fingerprint(b, r).float().cpu() for b in bases])
    return cache[key]


def try_load_packed(model: nn.Module, name: str, config: LoraXSConfig, modules: list[str],
                    tensors: dict[str, torch.Tensor], where: Path, strict: bool) -> bool:
    """Load into the bank if the fast path applies; False (nothing done) when it does not."""
    registry = model.__dict__.get(ADAPTERS_ATTR)
    if registry is None or not modules or name in registry.configs:
        return False  # (the general path raises the right error for a taken name)
    actual = _fingerprint_table(registry, model, tuple(modules), config.r)
    if actual is None:
        return False  # the general path computes the bases and reports what is wrong
    r = config.r
    cores = [tensors[f"{m}.lora_R"] for m in modules]
    prints = [tensors[f"{m}.{FINGERPRINT}"] for m in modules]
    for module, core, fp in zip(modules, cores, prints):
        if core.shape != (r, r) or fp.shape != (2 * r,):
            raise AdapterMismatchError(f"{where}: module {module}: lora_R {tuple(core.shape)} / fingerprint "
                                       f"{tuple(fp.shape)}, expected ({r}, {r}) / ({2 * r},)")
    stacked = torch.stack(cores)  # (n, r, r)
    if not torch.isfinite(stacked).all():
        bad = next(m for m, c in zip(modules, cores) if not torch.isfinite(c).all())
        raise NonFiniteAdapterError(f"{where}: NaN/inf values in lora_R of module {bad}")
    expected = torch.stack(prints).float()  # (n, 2r)
    scale = expected.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    ok = ((expected - actual).abs() <= RTOL * scale).all(dim=1)
    if strict and not bool(ok.all()):
        module = modules[int((~ok).nonzero()[0])]
        raise AdapterMismatchError(f"{where}: module {module}: the LoRA-XS basis of this model differs from the "
                                   f"one the adapter was trained on; is it for another base model? ({NOT_STRICT_HINT})")
    config = dataclasses.replace(config, target_modules=tuple(modules), exclude_modules=())
    store_packed(model, name, config, list(modules), stacked)
    return True
