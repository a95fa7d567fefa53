"""`combine`: a new adapter made of several attached ones, with PEFT's combination types.

    combine(model, {"pirate": 0.7, "poet": 0.3}, "blend", combination_type="linear")

LoRA adapters combine as PEFT's `add_weighted_adapter` combines them (same types, same argument meanings):
`cat` and the `_svd` forms are exact weighted sums of the ΔWs (the `_svd` forms truncated to `svd_rank`),
`linear`, `ties`, `dare_*` and `magnitude_prune` mix the A and the B factors separately (√|wᵢ·sᵢ| on each).

LoRA-XS adapters on one base share each layer's SVD basis, so any weighted sum of them is exactly one r×r
core, Σ wᵢ·sᵢ·Rᵢ: `linear` and `cat` give that (a LoRA-XS adapter, no rank growth, the cost of one
adapter); `ties`, `dare_*` and `magnitude_prune` apply to the scaled cores. Adapters of other kinds (VeRA,
or a mix of kinds) are read as LoRA factors (VeRA: up = Λ_b·B, down = Λ_d·A) and combined as LoRA.

The result is an ordinary attached adapter (route, merge, save, delete) with scaling 1 (lora_alpha = r).
Everything is computed and checked before the model changes: a refused combination leaves it as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.model.attach import attach
from lorakit.config import LoraConfig, LoraXSConfig, PrefixConfig
from lorakit.errors import AdapterConfigError, AdapterExistsError, AdapterNotFoundError, NonFiniteAdapterError
from lorakit.layer.linear import AdaptedLinear
from lorakit.methods.table import method_for
from lorakit.methods.task_merging import MERGERS, NEEDS_DENSITY, SIGN_METHODS, low_rank
from lorakit.model.record import adapters_of

SVD_TYPES = {"svd": "linear", "ties_svd": "ties", "dare_linear_svd": "dare_linear", "dare_ties_svd": "dare_ties",
             "magnitude_prune_svd": "magnitude_prune"}  # an `_svd` type: its element-wise merger on dense ΔWs
FACTOR_TYPES = frozenset(MERGERS)  # merged factor by factor (LoRA) or core by core (LoRA-XS)
COMBINATION_TYPES = frozenset(SVD_TYPES) | FACTOR_TYPES | {"cat"}
CORE_EXACT = frozenset({"linear", "cat"})  # on LoRA-XS cores these are the exact weighted sum


@dataclass(frozen=True)
class Factors:
    """One adapter on one layer read as LoRA: ΔW = scaling·up @ down, up (out, k), down (k, in)."""

    up: torch.Tensor
    down: torch.Tensor
    scaling: float


def combine(model: nn.Module, weights: dict[str, float], new_name: str, combination_type: str = "svd", *,
            svd_rank: int | None = None, svd_clamp: float | None = None, svd_full_matrices: bool = True,
            svd_driver: str | None = None, density: float | None = None, majority_sign_method: str = "total",
            generator: torch.Generator | None = None) -> nn.Module:
    """Attach `new_name`, the combination of the adapters in `weights` (name -> weight, negative subtracts).

    `density` (in [0, 1]) is the kept fraction for ties, dare_* and magnitude_prune; DARE's masks come from
    `generator` (torch's default one when None, drawn in PEFT's order: seed it for the same masks)."""
    registry = adapters_of(model)
    configs = _checked_sources(registry, weights, new_name)
    if combination_type not in COMBINATION_TYPES:
        raise AdapterConfigError(f"combination_type {combination_type!r} is not one of {sorted(COMBINATION_TYPES)}")
    if len(weights) == 1:  # one adapter: a weighted copy (as PEFT does)
        combination_type = "linear"
    merger_name = SVD_TYPES.get(combination_type, combination_type)
    if merger_name in NEEDS_DENSITY and (density is None or not 0.0 <= density <= 1.0):
        raise AdapterConfigError(f"combination_type {combination_type!r} needs density in [0, 1], got {density!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise AdapterConfigError(f"svd_rank must be a positive integer or None, got {svd_rank!r}")
    if svd_clamp is not None and not 0.0 < svd_clamp <= 1.0:
        raise AdapterConfigError(f"svd_clamp must be a quantile in (0, 1] or None, got {svd_clamp!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise AdapterConfigError(f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}")
    rescaling = sorted(n for n, config in configs.items() if method_for(config).rescales_output)
    if rescaling:  # a DoRA update rescales W's rows: no sum of low-rank factors stands for it
        raise AdapterConfigError(f"adapters {rescaling} are {method_for(configs[rescaling[0]]).label}: combining "
                                 "rescaled rows is not a weighted sum of LoRA factors, so lorakit does not combine them")
    methods = {config.method for config in configs.values()}
    ranks = [config.r for config in configs.values()]
    on_cores = methods == {"lora_xs"} and combination_type in FACTOR_TYPES | {"cat"}
    if not on_cores and combination_type in FACTOR_TYPES and len(set(ranks)) != 1:
        raise AdapterConfigError(f"combination_type {combination_type!r} needs adapters of one rank, got ranks "
                                 f"{dict(zip(configs, ranks))}; use 'cat' or an '_svd' type")
    new_rank = (max(ranks) if on_cores or combination_type in FACTOR_TYPES else
                sum(ranks) if combination_type == "cat" else svd_rank or max(ranks))

    layers = [(n, layer) for n, layer in registry.layer_map(model).items() if any(layer.has(a) for a in weights)]
    results: dict[str, tuple[torch.Tensor, ...]] = {}
    with torch.no_grad():
        for module_name, layer in layers:  # model order, as PEFT walks it (DARE's masks depend on the order)
            present = {a: w for a, w in weights.items() if layer.has(a)}
            if on_cores:
                results[module_name] = (_combined_core(layer, present, configs, new_rank, combination_type,
                                                       density, majority_sign_method, generator),)
            else:
                factors = {a: layer_factors(layer, a, configs[a]) for a in present}
                up, down = _combined_factors(factors, present, combination_type, new_rank, density,
                                             majority_sign_method, generator, svd_clamp, svd_full_matrices,
                                             svd_driver)
                results[module_name] = (up, down)
            if not all(torch.isfinite(t).all() for t in results[module_name]):
                raise NonFiniteAdapterError(f"combining {sorted(present)} into {new_name!r} gives NaN/inf values in "
                                            f"module {module_name}; nothing was attached")

    first = next(iter(configs.values()))
    targets = tuple(name for name, _ in layers)
    dropout = getattr(first, "lora_dropout", 0.0)
    if on_cores:
        config = LoraXSConfig(r=new_rank, lora_alpha=float(new_rank), lora_dropout=dropout, target_modules=targets,
                              autocast_adapter_dtype=first.autocast_adapter_dtype)
    else:
        config = LoraConfig(r=new_rank, lora_alpha=float(new_rank), lora_dropout=dropout, target_modules=targets,
                            autocast_adapter_dtype=first.autocast_adapter_dtype)
    attach(model, config, new_name)
    modules = registry.layer_map(model)
    with torch.no_grad():
        for module_name, tensors in results.items():
            adapter = modules[module_name].adapters[new_name]
            if on_cores:
                adapter.lora_R.copy_(tensors[0])
            else:
                adapter.lora_B.copy_(tensors[0])
                adapter.lora_A.copy_(tensors[1])
    return model


def _checked_sources(registry, weights: dict[str, float], new_name: str) -> dict:
    if not isinstance(weights, dict) or not weights:
        raise AdapterConfigError(f"weights must be a non-empty {{adapter name: weight}} dict, got {weights!r}")
    if new_name in registry.configs:
        raise AdapterExistsError(f"adapter {new_name!r} is already attached; pick another name for the combination")
    configs = {}
    for name, weight in weights.items():
        if name not in registry.configs:
            raise AdapterNotFoundError(f"cannot combine {name!r}: not attached; attached: {sorted(registry.configs)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise AdapterConfigError(f"weight of adapter {name!r} must be a finite number, got {weight!r}")
        config = registry.configs[name]
        if isinstance(config, PrefixConfig):
            raise AdapterConfigError(f"adapter {name!r} is a prefix adapter: prefixes add attention keys and values, "
                                     "not weight updates, so they do not combine")
        if getattr(config, "modules_to_save", ()) or getattr(config, "trainable_token_indices", None) is not None:
            raise AdapterConfigError(f"adapter {name!r} holds modules_to_save copies or trainable tokens, which have "
                                     "no combined meaning here; the combination would silently lose them")
        configs[name] = config
    return configs


def layer_factors(layer: AdaptedLinear, name: str, config) -> Factors:
    """Adapter `name` on `layer` as LoRA factors, in float32 at least (LoRA: its own A, B and α/r)."""
    if config.method == "lora":
        adapter = layer.adapters[name]
        return Factors(_wide(adapter.lora_B), _wide(adapter.lora_A), adapter.scaling)
    up, down = layer.factors(name)  # LoRA-XS: (α/r)·B·R and A; VeRA: Λ_b·B and Λ_d·A
    return Factors(_wide(up), _wide(down), 1.0)


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.promote_types(tensor.dtype, torch.float32))


def _core(layer: AdaptedLinear, name: str, config: LoraXSConfig, rank: int) -> torch.Tensor:
    """The scaled core (α/r)·R of a LoRA-XS adapter (attached or packed), zero-padded to (rank, rank): on the
    shared basis its first r directions are the adapter's own, so the padding changes nothing."""
    if name in layer.adapters:
        adapter = layer.adapters[name]
        core = _wide(adapter.lora_R) * adapter.scaling  # (r, r)
    else:  # packed: the bank keeps the scaled core
        core = _wide(layer.registry.bank.core(layer.bank_index, name)[: config.r, : config.r])
    padded = core.new_zeros(rank, rank)
    padded[: config.r, : config.r] = core
    return padded


def _combined_core(layer: AdaptedLinear, present: dict[str, float], configs: dict, rank: int, combination_type: str,
                   density: float | None, sign_method: str, generator: torch.Generator | None) -> torch.Tensor:
    cores = [_core(layer, name, configs[name], rank) for name in present]
    weights = torch.tensor(list(present.values()), dtype=cores[0].dtype, device=cores[0].device)
    merger = MERGERS["linear" if combination_type in CORE_EXACT else combination_type]
    return merger(cores, weights, density if density is not None else 1.0, sign_method, generator)  # scaling 1


def _combined_factors(factors: dict[str, Factors], present: dict[str, float], combination_type: str, rank: int,
                      density: float | None, sign_method: str, generator: torch.Generator | None,
                      clamp: float | None, full_matrices: bool,
                      driver: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (out, rank), down (rank, in)) of the combination on one layer, for a scaling of 1."""
    parts = list(factors.values())
    keep = density if density is not None else 1.0
    if combination_type == "cat":  # exact: [w₁s₁A₁; w₂s₂A₂; ...] under [B₁ B₂ ...], zero-padded to the total rank
        up = torch.cat([f.up for f in parts], dim=1)
        down = torch.cat([f.down * (w * f.scaling) for f, w in zip(parts, present.values())], dim=0)
        return _pad(up, down, rank)
    if combination_type in SVD_TYPES:  # weighted dense ΔWs, then their best rank-`rank` factors
        deltas = [(f.up @ f.down) * f.scaling for f in parts]  # (out, in) each
        weights = torch.tensor(list(present.values()), dtype=deltas[0].dtype, device=deltas[0].device)
        delta = MERGERS[SVD_TYPES[combination_type]](deltas, weights, keep, sign_method, generator)
        return _pad(*low_rank(delta, rank, clamp, full_matrices, driver), rank)
    # factor by factor: the sign of wᵢ·sᵢ on the A side only, so the product keeps it
    scaled = [w * f.scaling for f, w in zip(parts, present.values())]
    device = parts[0].down.device
    weights_down = torch.tensor([math.copysign(math.sqrt(abs(s)), s) for s in scaled], device=device)
    weights_up = torch.tensor([math.sqrt(abs(s)) for s in scaled], device=device)
    merger = MERGERS[combination_type]
    down = merger([f.down for f in parts], weights_down, keep, sign_method, generator)  # A first, as PEFT draws
    up = merger([f.up for f in parts], weights_up, keep, sign_method, generator)
    return up, down


def _pad(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of fewer than `rank` directions (a layer some adapters do not touch) padded with zeros."""
    k = down.shape[0]
    if k == rank:
        return up, down
    return (torch.cat([up, up.new_zeros(up.shape[0], rank - k)], dim=1),
            torch.cat([down, down.new_zeros(rank - k, down.shape[1])], dim=0))


__all__ = ["COMBINATION_TYPES", "Factors", "combine", "layer_factors"]
