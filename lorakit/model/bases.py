"""The one way a layer gets a LoRA-XS basis: `lora_xs_bases_for(model, modules, r)`.

attach, load_adapter, the packed bank and the server's adapter store all ask this for "a basis of rank ≥ r
on each of these modules". It returns only what is missing, without touching the model (callers
install the bases once all their checks passed), and gets each one the cheapest way:
  1. the layer already holds one of rank ≥ r         -> nothing to do
  2. the bases cache (lorakit.model.bases_cache) has it     -> read + verified, no SVD
  3. else computed, batched per weight shape on the weight's device (lorakit.methods.svd), and cached
A tqdm bar on stderr appears when computing takes over a second (progress=False or
LORAKIT_PROGRESS=0 silences it; progress=True shows it at once).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.model.bases_cache import MIN_NUMEL, BasesCache, default_cache, weight_key
from lorakit.errors import AdapterConfigError, AdapterMismatchError, MergeStateError
from lorakit.layer.linear import AdaptedLinear
from lorakit.methods.basis import Basis
from lorakit.methods.lora_xs import lora_xs_bases
from lorakit.layer.quantized import quantized_base

KEY = "lora_xs"  # the layer's bases key for LoRA-XS
BATCH = 16  # weights per batched decomposition (bounds memory; one progress step)
PROGRESS_ENV = "LORAKIT_PROGRESS"
_DEFAULT = object()


def weight_as_out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in): a 4-bit base dequantized, a Conv1D (in, out) weight transposed."""
    quant = module.quant if isinstance(module, AdaptedLinear) else quantized_base(module)
    if quant is not None:  # a quantized base: its dequantized weight (LoRA-XS takes its SVD from it)
        return quant.dequantize(module.weight)
    fan_in_fan_out = isinstance(module, AdaptedLinear) and module.fan_in_fan_out or (
        not isinstance(module, (AdaptedLinear, nn.Linear)))
    return module.weight.T if fan_in_fan_out else module.weight


def lora_xs_bases_for(model: nn.Module, module_names: Iterable[str], r: int, *,
                      progress: bool | None = None, cache: BasesCache | None | object = _DEFAULT,
                      ) -> dict[str, Basis]:
    """module -> a new rank-r basis, for each named module that lacks one of rank ≥ r (model untouched).

    Unknown modules raise AdapterMismatchError, r > min(in, out) AdapterConfigError. `cache` defaults to
    lorakit.model.bases_cache.default_cache(); None turns it off.
    """
    if cache is _DEFAULT:
        cache = default_cache()
    modules = dict(model.named_modules())
    wanted: dict[str, nn.Module] = {}
    for name in module_names:
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            raise AdapterMismatchError(f"module {name} does not exist in {type(model).__name__} or has no weight")
        have = module.basis(KEY) if isinstance(module, AdaptedLinear) else None
        if have is not None and have.rank >= r:
            continue
        if isinstance(module, AdaptedLinear) and module.merged_names():  # W now holds W0 + ΔW: not the base
            raise MergeStateError(f"module {name} holds merged adapter(s) {module.merged_names()}: a LoRA-XS basis "
                                  "must come from the base weight; unmerge them first (lorakit.unmerge)")
        in_f, out_f = layer_shape(module)
        if r > min(in_f, out_f):
            raise AdapterConfigError(f"rank r={r} exceeds min(in, out)={min(in_f, out_f)} of module {name} "
                                     f"({in_f}->{out_f})")
        wanted[name] = module
    # weights are read per module / per batch: a 4-bit base is dequantized a few layers at a time
    found: dict[str, Basis] = {}
    keys: dict[str, str] = {}
    if cache is not None:
        for name, module in wanted.items():
            in_f, out_f = layer_shape(module)
            if in_f * out_f >= MIN_NUMEL:
                weight = weight_as_out_in(module).detach()  # (out, in)
                keys[name] = weight_key(weight)
                basis = cache.get(weight, r, keys[name])
                if basis is not None:
                    found[name] = basis
    missing = [n for n in wanted if n not in found]
    with progress_bar(len(missing), progress) as bar:
        for batch in _batches(missing, wanted):
            weights = [weight_as_out_in(wanted[n]).detach() for n in batch]
            for name, weight, basis in zip(batch, weights, lora_xs_bases(weights, r)):
                found[name] = basis
                if cache is not None and name in keys:
                    cache.put(weight, basis, keys[name])
            bar.update(len(batch))
    return {n: found[n] for n in wanted}


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, Conv1D or AdaptedLinear (a 4-bit weight is packed, so
    never its weight's shape for a Linear)."""
    if isinstance(module, (AdaptedLinear, nn.Linear)):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # Conv1D: (in, out)


def _batches(names: list[str], modules: dict[str, nn.Module]) -> list[list[str]]:
    """Names grouped by (shape, device), in chunks of BATCH: one batched decomposition each."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        groups.setdefault((layer_shape(modules[name]), modules[name].weight.device), []).append(name)
    return [g[i:i + BATCH] for g in groups.values() for i in range(0, len(g), BATCH)]


def progress_bar(total: int, progress: bool | None) -> tqdm:
    """A stderr bar: shown at once (True), never (False), or after a second of work (None, unless
    LORAKIT_PROGRESS=0)."""
    quiet = os.environ.get(PROGRESS_ENV, "1").strip().lower() in {"0", "false", "no", "off"}
    disable = total == 0 or progress is False or (progress is None and quiet)
    return tqdm(total=total, desc="LoRA-XS bases (SVD)", unit="module", file=sys.stderr, disable=disable,
                delay=0 if progress else 1.0, leave=False, dynamic_ncols=True)
