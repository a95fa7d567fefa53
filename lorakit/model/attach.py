"""`attach`: put a named adapter on the target layers of any torch model.

Targets are found and every adapter is built before the model is touched, so a bad config (unknown
module, rank too large, unsupported layer) raises and leaves the model exactly as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit import names, walk
from lorakit.model.manage import apply_trainable
from lorakit.model.bases import layer_shape, lora_xs_bases_for
from lorakit.model.compiled import install_route_entry
from lorakit.config import AdapterConfig, LoraConfig, VeraConfig, adapter_dtype
from lorakit.errors import AdapterConfigError, AdapterExistsError, UnsupportedLayerError
from lorakit.layer.embedding import check_embedding, is_embedding
from lorakit.layer.linear import AdaptedLinear, is_adaptable
from lorakit.methods.basis import Basis
from lorakit.methods.table import method_for
from lorakit.methods.vera import vera_basis, vera_fingerprint, vera_projections
from lorakit.model.record import ModelAdapters, adapters_of, wrap_layer
from lorakit.model.prefix_hook import attach_prefix
from lorakit.layer.quantized import is_quantized_linear
from lorakit.routing.context import carry_routes_through_checkpointing
from lorakit.layer.saved_modules import install_saved, plan_saved
from lorakit.layer.slots import kind_of
from lorakit.layer.surgery import PREFIX_STORE_PREFIX, freeze_base, select_modules
from lorakit.layer.trainable_tokens import install_tokens, plan_tokens
from lorakit.layer.wrapped import wrapped_prefixes


def check_adapter_name(name: str) -> None:
    """Raise AdapterConfigError unless `name` follows lorakit.names' rule (shared with io and the server)."""
    names.check_adapter_name(name)


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Full names of the modules `config` targets, in model order; errors name what exists."""
    # lorakit's own modules (a prefix adapter's MLP under `lorakit_prefix`) are never targets
    # nor is anything inside a module lorakit wraps whole (modules_to_save copies, trainable-token layers)
    skip = (PREFIX_STORE_PREFIX,) + wrapped_prefixes(model)
    chosen = select_modules(model, config.target_modules, config.exclude_modules, is_adaptable, skip)
    modules = dict(walk.named_modules(model))
    bad = [f"{n} ({type(modules[n]).__name__})" for n in chosen
           if not (is_adaptable(modules[n]) or is_embedding(modules[n]))]
    if bad:
        raise UnsupportedLayerError(f"cannot adapt {bad[:5]}: only nn.Linear, transformers' Conv1D and (LoRA) "
                                    "nn.Embedding are supported")
    for n in chosen:
        if is_embedding(modules[n]):
            check_embedding(modules[n], n, config)
    return chosen


def _check_rank(config: AdapterConfig, name: str, in_f: int, out_f: int) -> None:
    if method_for(config).rank_bounded and config.r > min(in_f, out_f):
        raise AdapterConfigError(f"rank r={config.r} exceeds min(in, out)={min(in_f, out_f)} of module {name} "
                                 f"({in_f}->{out_f})")


def _check_dense(module: nn.Module, name: str, method: str) -> None:
    """A method that reads the dense base weight (DoRA's row norms) takes plain float linear layers only."""
    if is_embedding(module) or (isinstance(module, AdaptedLinear) and not module.wraps_linear):
        raise UnsupportedLayerError(f"cannot put a {method} adapter on embedding {name}: lorakit's {method} adapts "
                                    "linear layers only (leave it out with exclude_modules)")
    if is_quantized_linear(module) or (isinstance(module, AdaptedLinear) and module.quant is not None):
        raise UnsupportedLayerError(f"cannot put a {method} adapter on quantized module {name}: lorakit's {method} "
                                    "needs a float base weight")


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The base weight (out, in) of a linear, Conv1D or adapted layer, without anything merged into it."""
    if isinstance(module, AdaptedLinear):
        return module.unmerged_weight()
    return module.weight if isinstance(module, nn.Linear) else module.weight.T  # Conv1D holds (in, out)


def attach(model: nn.Module, config: AdapterConfig, name: str = "default") -> nn.Module:
    """Attach adapter `name` with `config` to `model` in place and return the model.

    Base parameters are frozen; only adapter parameters require grad. Base state-dict keys are kept.
    """
    check_adapter_name(name)
    method = method_for(config)
    if method.build is None:  # not a linear-layer adapter (prefix tuning: keys/values prepended to attention)
        attach_prefix(model, config, name)
        apply_trainable(model)
        return model
    registry = adapters_of(model, create=True)
    if name in registry.configs:
        raise AdapterExistsError(f"adapter {name!r} is already attached; delete it first or pick another name")
    targets = find_targets(model, config)
    modules = dict(walk.named_modules(model))
    for target in targets:
        _check_rank(config, target, *layer_shape(modules[target]))
        if method.reads_weight:
            _check_dense(modules[target], target, method.label)
    saved, tokens = [], []
    if isinstance(config, LoraConfig):  # modules_to_save, trainable tokens: planned (checked) before any change
        if config.target_modules == "all-linear" and config.modules_to_save:  # a saved module is copied whole
            held = plan_saved(model, config.modules_to_save, name, [])
            targets = [t for t in targets if not any(t == h or t.startswith(f"{h}.") for h in held)]
        saved = plan_saved(model, config.modules_to_save, name, targets)
        tokens = plan_tokens(model, config.trainable_token_indices, name, targets)

    # Build everything first: nothing below touches the model until all of it succeeded.
    built: dict[str, tuple[nn.Module, tuple[str, Basis] | None]] = {}
    vera = VeraPlacer(model, config, registry) if method.basis == "projections" else None
    xs_bases = lora_xs_bases_for(model, targets, config.r) if method.basis == "svd" else {}
    for target in targets:
        module = modules[target]
        in_f, out_f = layer_shape(module)
        dtype = adapter_dtype(module.weight.dtype, config.autocast_adapter_dtype)
        build = method.build_embedding if is_embedding(module) else method.build  # find_targets checked it
        adapter: nn.Module = build(in_f, out_f, config, dtype, module.weight.device, lambda: _dense_weight(module))
        new_basis = None
        key = adapter.basis_key
        if method.basis == "svd" and target in xs_bases:  # computed (or read from the bases cache) where missing
            new_basis = (key, xs_bases[target])
        elif vera is not None and not (isinstance(module, AdaptedLinear) and module.basis(key) is not None):
            new_basis = (key, vera.basis(module, in_f, out_f))
        built[target] = (adapter, new_basis)

    for target, (adapter, new_basis) in built.items():
        layer = wrap_layer(model, target)
        if new_basis is not None:
            layer.bases[new_basis[0]] = new_basis[1]
        layer.adapters[name] = adapter
    install_saved(model, saved, name, registry)
    install_tokens(model, tokens, name, registry, config.autocast_adapter_dtype)
    registry.slot_table.assign(kind_of(next(iter(built.values()))[0]), name)  # same number in every layer
    registry.configs[name] = config
    registry.layers_changed()
    freeze_base(model)
    apply_trainable(model)  # a declared trained adapter (set_trainable) stays the only one that trains
    carry_routes_through_checkpointing(model)  # routes hold for gradient checkpointing's recomputation
    install_route_entry(model)  # torch.compile(model): the route read once per call, outside the graph
    return model


class VeraPlacer:
    """VeRA's shared projections for one attach call: generated at the model's largest layer sizes, held
    once per model in its ModelAdapters on the base's device and dtype, and sliced (not copied) by every layer.
    Fingerprints come from the float32 projections, so they do not depend on the model's dtype."""

    def __init__(self, model: nn.Module, config: VeraConfig, registry: ModelAdapters) -> None:
        sizes = [layer_shape(m) for m in model.modules() if is_adaptable(m)]
        self.key = (config.projection_seed, config.r, max(s[0] for s in sizes), max(s[1] for s in sizes))
        self.registry = registry
        self._float32: tuple[torch.Tensor, torch.Tensor] | None = None

    def basis(self, module: nn.Module, in_f: int, out_f: int) -> Basis:
        weight = module.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        if self._float32 is None:
            self._float32 = vera_projections(*self.key)  # (r, max_in), (max_out, r) on the CPU
        shared = self.registry.vera_projections.get(self.key)
        if shared is None:  # first VeRA adapter of this seed and rank: place it where the base is
            shared = tuple(t.to(weight.device, dtype) for t in self._float32)
            self.registry.vera_projections[self.key] = shared
        if shared[0].device != weight.device:  # a layer elsewhere than the first (a model spread over devices)
            shared = tuple(t.to(weight.device) for t in shared)
        return vera_basis(shared, in_f, out_f, dtype, vera_fingerprint(self._float32, in_f, out_f))
