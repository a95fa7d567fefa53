"""Putting prefix adapters into a transformers model's attention, per call and per row.

A forward pre-hook on the model's backbone (LlamaModel, GPT2Model, BertModel...) reads the call's route
(lorakit.use_adapter) and, when some row uses a prefix adapter, hands the backbone a key/value cache
that already holds the prefixes, a 2-D mask that covers them, and position ids shifted past them:

    cache, layer l   keys (B, H, P, D) + the call's own    row i: its adapter's T_i keys in slots [0, T_i),
                                                            zeros elsewhere; P = the longest prefix in the batch
    attention_mask   [prefix_mask (B, P) ; mask (B, n)]    prefix_mask[i, t] = t < T_i  (rows without a prefix:
                                                            all slots masked, so they get the base model's output)
    position_ids     positions + T_i                        a row's tokens follow its prefix, as in PEFT

During generate() the filled cache comes back on every step; the hook recognises it (`lorakit_prefix`)
and only extends the mask and shifts the positions. When nothing needs storing (training, use_cache
off) the prefix layers are read-only, which also lets gradient checkpointing recompute a layer safely.
"""

from __future__ import annotations

import inspect
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from lorakit.config import PrefixConfig, adapter_dtype
from lorakit.errors import (AdapterExistsError, AdapterNotFoundError, LorakitError, PrefixLengthError,
                            RoutingError)
from lorakit.methods.prefix import PrefixAdapter, PrefixShape, check_fits, prefix_shape
from lorakit.model.record import ModelAdapters, adapters_of
from lorakit.names import check_adapter_name
from lorakit.routing.context import AS_STORED, carry_routes_through_checkpointing, current_route
from lorakit.layer.surgery import freeze_base
from lorakit.versions import SUPPORTED_TRANSFORMERS

STORE_NAME = "lorakit_prefix"  # the child module of the model that holds its prefix adapters
STATE_ATTR = "lorakit_prefix"  # the attribute marking a cache filled with prefixes
_ACTIVE: ContextVar[dict] = ContextVar("lorakit_prefix_calls", default={})  # id(store) -> state of the running call


class _PrefixLayer(DynamicLayer):
    """One layer's cache, starting with the prefix keys/values; read-only when `store` is False."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, store: bool) -> None:
        super().__init__()
        self.keys, self.values = keys, values  # (B, H, P, D)
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.store = store
        self.calls = 0  # update() calls: the model really read the prefix

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.calls += 1
        keys = torch.cat([self.keys.to(key_states.dtype), key_states], dim=-2)
        values = torch.cat([self.values.to(value_states.dtype), value_states], dim=-2)
        if self.store:
            self.keys, self.values = keys, values
        return keys, values


@dataclass
class _PrefixState:
    """What a cache filled with prefixes needs on every later step."""

    rows: tuple[str | None, ...]  # each row's prefix adapter (None: no prefix)
    length: int  # prefix slots P at the front of the cache
    mask: torch.Tensor  # (B, P) bool: slot t of row i holds a prefix
    shift: torch.Tensor  # (B,) long: row i's positions move by its prefix length
    store: bool  # False: read-only, good for one call only
    layers: list[_PrefixLayer]
    cache: Cache | None = None


class PrefixStore(nn.Module):
    """The model's prefix adapters (`adapters`, a ModuleDict) and the hooks that inject them."""

    def __init__(self, registry: ModelAdapters, backbone: nn.Module, shape: PrefixShape) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.shape = shape
        object.__setattr__(self, "registry", registry)  # plain references, not submodules
        object.__setattr__(self, "backbone", backbone)
        self._params = inspect.signature(backbone.forward).parameters
        self.cache_arg = cache_argument(self._params)  # transformers >= 5.2x: `cache`; before: `past_key_values`
        self._handles = [backbone.register_forward_pre_hook(partial(_before, self), with_kwargs=True),
                         backbone.register_forward_hook(partial(_after, self), always_call=True)]
        for layer in backbone.modules():  # transformers' checkpointable layers: GC may drop their cache argument
            if hasattr(type(layer), "_can_checkpoint_with_cache"):
                self._handles.append(layer.register_forward_pre_hook(partial(_restore_cache, self), with_kwargs=True))

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- routing ---------------------------------------------------------------------------------
    def row_prefixes(self, batch: int) -> tuple[str | None, ...] | None:
        """Each row's prefix adapter under the current route, or None when no row uses one."""
        route = current_route(id(self.registry))
        names = route.names if route is not None else self.registry.default_names()
        if names is AS_STORED or names is None:
            return None
        if isinstance(names, str):
            rows = (names,) * batch if names in self.adapters else ()
        else:
            if len(names) != batch:
                raise RoutingError(f"route has {len(names)} row names but the batch has {batch} rows")
            rows = tuple(n if n in self.adapters else None for n in names)
        return rows if any(r is not None for r in rows) else None

    # -- building the cache -----------------------------------------------------------------------
    def prefix_tensors(self, rows: tuple[str | None, ...], dtype: torch.dtype, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L, 2, B, H, P, D) keys/values, (B, P) mask and (B,) shift for the rows' adapters."""
        used = list(dict.fromkeys(r for r in rows if r is not None))
        kvs = {n: self.adapters[n].key_values().to(dtype) for n in used}  # (L, 2, H, T_n, D) each
        lengths = {n: kv.shape[3] for n, kv in kvs.items()}
        batch, longest = len(rows), max(lengths.values())
        shift = torch.tensor([lengths[r] if r is not None else 0 for r in rows], device=device)
        mask = torch.arange(longest, device=device)[None, :] < shift[:, None]  # (B, P)
        if len(used) == 1 and all(r is not None for r in rows):  # one adapter for every row: a broadcast view
            kv = kvs[used[0]]
            return kv.unsqueeze(2).expand(-1, -1, batch, -1, -1, -1), mask, shift
        padded = [F.pad(kvs[n], (0, 0, 0, longest - lengths[n])) for n in used]  # (L, 2, H, P, D) each
        stack = torch.stack([torch.zeros_like(padded[0])] + padded)  # slot 0: no prefix (zeros, and masked)
        slot = torch.tensor([used.index(r) + 1 if r is not None else 0 for r in rows], device=device)
        return stack.index_select(0, slot).permute(1, 2, 0, 3, 4, 5), mask, shift

    def fill_cache(self, rows: tuple[str | None, ...], given: Cache | None, store: bool, dtype: torch.dtype,
                   device: torch.device) -> tuple[Cache, _PrefixState]:
        kv, mask, shift = self.prefix_tensors(rows, dtype, device)
        layers = [_PrefixLayer(kv[l, 0], kv[l, 1], store) for l in range(kv.shape[0])]
        if store:
            if isinstance(given, DynamicCache) and any(getattr(layer, "is_sliding", False) for layer in given.layers):
                raise LorakitError("prefix adapters do not support sliding-window caches")
            cache = given if isinstance(given, DynamicCache) else DynamicCache()
            cache.layers = list(layers)
        else:
            cache = Cache(layers=list(layers))
        state = _PrefixState(rows, mask.shape[1], mask, shift, store, layers, cache)
        setattr(cache, STATE_ATTR, state)
        return cache, state


def _bound_arguments(store: PrefixStore, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The backbone call's arguments by name (positional ones too)."""
    names = [n for n, p in store._params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise LorakitError(f"{type(store.backbone).__name__} got {len(args)} positional arguments; prefix "
                           "adapters need the model called with keyword arguments")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    for alias in CACHE_ARGUMENTS:  # a caller may still pass the name the backbone renamed
        if alias != store.cache_arg and alias in bound:
            value = bound.pop(alias)
            if bound.get(store.cache_arg) is None:
                bound[store.cache_arg] = value
    return bound


CACHE_ARGUMENTS = ("cache", "past_key_values", "layer_past")  # transformers' names for it, newest first


def cache_argument(params: Any) -> str:
    """The name under which a transformers forward takes its key/value cache (renamed across releases)."""
    for name in CACHE_ARGUMENTS:
        if name in params:
            return name
    return "past_key_values"


def _wants_cache(store: PrefixStore, bound: dict) -> bool:
    use_cache = bound.get("use_cache")
    if use_cache is None:
        use_cache = getattr(getattr(store.backbone, "config", None), "use_cache", False)
    return bool(use_cache) and not store.backbone.training


def _before(store: PrefixStore, backbone: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: give prefixed rows their cache, mask and positions; leave other calls alone."""
    bound = _bound_arguments(store, args, kwargs)
    ref = bound.get("input_ids")
    ref = ref if ref is not None else bound.get("inputs_embeds")
    if ref is None:
        return None
    batch, length = ref.shape[0], ref.shape[1]
    rows = store.row_prefixes(batch)
    cache = bound.get(store.cache_arg)
    state: _PrefixState | None = getattr(cache, STATE_ATTR, None) if cache is not None else None
    if state is not None and not state.store:  # a read-only cache from an earlier call holds nothing more
        state, cache = None, None
    if state is None:
        if rows is None:
            return None  # no prefix anywhere: exactly the base call
        if isinstance(cache, Cache) and cache.get_seq_length() > 0:
            raise RoutingError("a prefix adapter must come before every token, but this call continues a cache "
                               "that already holds tokens without it; start from an empty cache")
        store_kv = cache is not None or _wants_cache(store, bound)
        embeds = bound.get("inputs_embeds")
        dtype = embeds.dtype if embeds is not None else backbone.get_input_embeddings().weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        cache, state = store.fill_cache(rows, cache, store_kv, dtype, ref.device)
        past = 0
    else:
        if (rows or (None,) * batch) != state.rows:
            raise RoutingError(f"this cache was filled with prefix adapters {list(state.rows)}; continue it with the "
                               f"same route (got {list(rows) if rows else 'no prefix'})")
        past = cache.get_seq_length() - state.length
    mask = bound.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, past + length, dtype=torch.long, device=ref.device)
    elif mask.dim() != 2 or mask.shape[1] != past + length:
        raise RoutingError(f"with prefix adapters the attention mask must be 2-D (batch, {past + length}) covering "
                           f"the {past} cached and {length} new tokens; got shape {tuple(mask.shape)}")
    positions = bound.get("position_ids")
    if positions is None:
        positions = torch.arange(past, past + length, device=ref.device)[None, :]
    positions = positions + state.shift[:, None].to(positions.device)  # (B, n)
    limit = store.shape.max_positions
    if limit is not None and int(positions.max()) >= limit:
        raise PrefixLengthError(f"prefix ({state.length} slots) + {past + length} tokens need position "
                                f"{int(positions.max())}, beyond the model's context of {limit} positions")
    bound["attention_mask"] = torch.cat([state.mask.to(mask.dtype), mask], dim=1)  # (B, P + past + n)
    bound["position_ids"] = positions
    bound[store.cache_arg] = cache
    if not state.store and backbone.training:
        _allow_checkpointed_cache(backbone, True)
    _ACTIVE.set({**_ACTIVE.get(), id(store): state})
    return (), bound


def _after(store: PrefixStore, backbone: nn.Module, args: tuple, output: Any):
    """Forward hook: undo per-call flags, and refuse to return a result the prefix never reached."""
    active = dict(_ACTIVE.get())
    state = active.pop(id(store), None)
    if state is None:
        return None
    _ACTIVE.set(active)
    if not state.store:
        _allow_checkpointed_cache(backbone, False)
    if not any(layer.calls for layer in state.layers):
        raise LorakitError(
            f"{type(backbone).__name__} did not read the prefix cache handed to it as `{store.cache_arg}`: this "
            f"transformers release may pass the cache under another name or drop it (supported: "
            f"{SUPPORTED_TRANSFORMERS}), or, for GPT-2 style models, gradient checkpointing dropped it")
    return None


def _restore_cache(store: PrefixStore, layer: nn.Module, args: tuple, kwargs: dict):
    """Layer pre-hook: GPT-2 style models pass no cache to checkpointed layers; give them the read-only one."""
    state = _ACTIVE.get().get(id(store))
    if state is None or state.store:
        return None
    for key in CACHE_ARGUMENTS:
        if key in kwargs:
            if kwargs[key] is None:
                return args, {**kwargs, key: state.cache}
            return None
    params = _positional_names(type(layer))
    for key in CACHE_ARGUMENTS:
        if key in params and params.index(key) < len(args) and args[params.index(key)] is None:
            i = params.index(key)
            return args[:i] + (state.cache,) + args[i + 1:], kwargs
    return None


@lru_cache(maxsize=None)
def _positional_names(cls: type) -> list[str]:
    return [n for n in inspect.signature(cls.forward).parameters if n != "self"]


def _allow_checkpointed_cache(backbone: nn.Module, allow: bool) -> None:
    """Checkpointed transformers layers drop caches unless told the cache is only read (ours is)."""
    for module in backbone.modules():
        if hasattr(type(module), "_can_checkpoint_with_cache"):
            if allow:
                module._can_checkpoint_with_cache = True
            else:
                module.__dict__.pop("_can_checkpoint_with_cache", None)


# ---------------------------------------------------------------------------------- model level

def prefix_store(model: nn.Module) -> PrefixStore | None:
    return model._modules.get(STORE_NAME)


def prefix_adapter(model: nn.Module, name: str) -> PrefixAdapter:
    store = prefix_store(model)
    if store is None or name not in store.adapters:
        raise AdapterNotFoundError(f"prefix adapter {name!r} not attached")
    return store.adapters[name]


def attach_prefix(model: nn.Module, config: PrefixConfig, name: str = "default") -> nn.Module:
    """Attach prefix adapter `name` to a transformers decoder or encoder model; returns the model."""
    check_adapter_name(name)
    registry = adapters_of(model, create=True)
    if name in registry.configs:
        raise AdapterExistsError(f"adapter {name!r} is already attached; delete it first or pick another name")
    shape = prefix_shape(model)
    check_fits(config, shape, type(model).__name__)
    param = next(model.parameters())
    adapter = PrefixAdapter(config, shape, adapter_dtype(param.dtype, config.autocast_adapter_dtype), param.device)
    store = prefix_store(model)
    if store is None:
        backbone = getattr(model, "base_model", model)
        store = PrefixStore(registry, backbone, shape)
        model.add_module(STORE_NAME, store)
    store.adapters[name] = adapter
    registry.configs[name] = config
    registry.layers_changed()
    freeze_base(model)
    carry_routes_through_checkpointing(model)  # the prefix cache must reach recomputed layers too
    return model


def remove_prefix(model: nn.Module, name: str) -> None:
    """Drop prefix adapter `name` (its config is the caller's to drop); the hooks go with the last one."""
    store = prefix_store(model)
    if store is None or name not in store.adapters:
        return
    del store.adapters[name]
    if not store.adapters:
        unload_prefixes(model)


def unload_prefixes(model: nn.Module) -> None:
    """Remove every prefix adapter and the hooks: the model runs as before any was attached."""
    store = prefix_store(model)
    if store is not None:
        store.remove_hooks()
        del model._modules[STORE_NAME]


def fold_prefix(model: nn.Module, name: str) -> None:
    """Fold prefix adapter `name`'s reparameterisation MLP into its prefix (same outputs, no MLP)."""
    prefix_adapter(model, name).fold_()


__all__ = ["PrefixStore", "attach_prefix", "fold_prefix", "prefix_adapter", "prefix_store", "remove_prefix",
           "unload_prefixes"]
