"""A packed bank of inference-only LoRA-XS adapters: thousands resident, loaded in milliseconds.

An attached adapter is a set of small nn.Modules (about 1 MB of Python objects per adapter on a
135M model). For serving, a LoRA-XS adapter is just r² numbers per layer, so the bank keeps every
packed adapter as a slice of one tensor:

    cores: (L layers, capacity, r, r)   cores[l, slot] = (α/r)·R of one adapter at layer l, zero-padded
    slot 0 is always zero: rows that use no packed adapter gather it and get exactly nothing added

Per-row routing then gathers cores[l, slots] (B, r, r) with one index_select per layer. A packed
adapter cannot be trained (attach a module adapter for that) but can be merged, routed and deleted.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lorakit.model.manage import adapter_config
from lorakit.model.bases import lora_xs_bases_for
from lorakit.config import LoraXSConfig, adapter_dtype
from lorakit.errors import AdapterConfigError, AdapterExistsError, AdapterMismatchError, NonFiniteAdapterError
from lorakit.layer.linear import adapted_layers
from lorakit.model.record import adapters_of, install_bases
from lorakit.names import check_adapter_name
from lorakit.layer.slots import unshare
from lorakit.layer.surgery import freeze_base

BANK_ATTR = "lorakit_bank"


class CoreBank:
    """The model-level store of packed LoRA-XS cores; layers index it by `layer.bank_index`."""

    def __init__(self, rank: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rank = rank
        self.layer_names: list[str] = []
        self._layer_index: dict[str, int] = {}
        self.cores = torch.zeros(0, 1, rank, rank, dtype=dtype, device=device)  # (L, capacity, r, r)
        self.slots: dict[str, int] = {}  # name -> model-wide LoRA-XS slot (lorakit.routing.slot_table)
        self.targets: dict[str, frozenset[int]] = {}  # name -> layer indices the adapter touches

    @property
    def capacity(self) -> int:
        return self.cores.shape[1]

    def nbytes(self) -> int:
        return self.cores.numel() * self.cores.element_size()

    def _grow(self, layers: int, capacity: int, rank: int) -> None:
        L, C, r, _ = self.cores.shape
        if (layers, capacity, rank) == (L, C, r):
            return
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor even if first grown in inference
            grown = torch.zeros(max(L, layers), max(C, capacity), max(r, rank), max(r, rank), dtype=self.cores.dtype,
                                device=self.cores.device)
            grown[:L, :C, :r, :r] = self.cores
        self.cores = grown
        self.rank = grown.shape[2]

    def reserve(self, n_adapters: int) -> None:
        """Make room for n more adapters up front (avoids regrowth copies when loading many)."""
        self._grow(len(self.layer_names), max(self.slots.values(), default=0) + 1 + n_adapters, self.rank)

    def layer_index(self, module_name: str) -> int:
        if module_name not in self._layer_index:
            self._layer_index[module_name] = len(self.layer_names)
            self.layer_names.append(module_name)
            self._grow(len(self.layer_names), self.capacity, self.rank)
        return self._layer_index[module_name]

    def add(self, name: str, layers: list[int], cores: torch.Tensor, slot: int) -> None:
        """Store one adapter's pre-scaled cores (n, r, r) at `layers`, in `slot` (its model-wide LoRA-XS slot,
        lorakit.routing.slot_table: attached and packed LoRA-XS adapters share one numbering, so one index tensor
        per route serves both)."""
        if name in self.slots:
            raise AdapterExistsError(f"adapter {name!r} is already in the bank")
        if slot >= self.capacity:
            self._grow(len(self.layer_names), max(slot + 1, int(self.capacity * 1.5) + 1), self.rank)
        r = cores.shape[-1]
        if r > self.rank:
            self._grow(len(self.layer_names), self.capacity, r)
        index = torch.tensor(layers, dtype=torch.long, device=self.cores.device)  # (n,)
        with torch.no_grad():
            self.cores[:, slot].zero_()
            self.cores[index, slot, :r, :r] = cores.to(self.cores.device, self.cores.dtype)  # cores may come from a file
        self.slots[name] = slot
        self.targets[name] = frozenset(layers)

    def ensure_capacity(self, capacity: int) -> None:
        """At least `capacity` slots: attached LoRA-XS adapters take numbers too, and rows routed to them
        index the bank (at zeros)."""
        if capacity > self.capacity:
            self._grow(len(self.layer_names), capacity, self.rank)
    
    def apply_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Move the cores as `model.to(...)` / `.half()` moved the model (called by ModelAdapters' hook)."""
        moved = fn(self.cores)
        if moved is not self.cores:
            self.cores = moved

    def remove(self, name: str) -> None:
        slot = self.slots.pop(name)
        self.targets.pop(name)
        with torch.no_grad():
            self.cores[:, slot].zero_()

    def core(self, layer_index: int, name: str) -> torch.Tensor:
        return self.cores[layer_index, self.slots[name]]  # (r, r), scaled


def get_bank(model: nn.Module) -> CoreBank | None:
    return model.__dict__.get(BANK_ATTR)


def _bank_for(model: nn.Module, config: LoraXSConfig, weight: torch.Tensor) -> CoreBank:
    """The model's bank, created on the base's device, in the dtype adapters get on this base (float32 on a
    bf16/fp16 base by default, as attached adapters: packed and attached cores then give the same outputs)."""
    bank = get_bank(model)
    if bank is None:
        bank = CoreBank(config.r, adapter_dtype(weight.dtype, config.autocast_adapter_dtype), weight.device)
        object.__setattr__(model, BANK_ATTR, bank)
        adapters_of(model, create=True).bank = bank
    return bank


def add_packed_lora_xs(model: nn.Module, name: str, config: LoraXSConfig,
                       cores: dict[str, torch.Tensor]) -> None:
    """Add a LoRA-XS adapter straight into the bank: {module_name: R (r, r)}, unscaled as trained.

    Every target layer must already carry a LoRA-XS basis of rank ≥ r (attach one adapter of this
    rank first, or `ensure_lora_xs_bases`). All checks run before anything is stored.
    """
    check_adapter_name(name)
    registry = adapters_of(model, create=True)
    if name in registry.configs:
        raise AdapterExistsError(f"adapter {name!r} is already attached")
    if not cores:
        raise AdapterConfigError(f"adapter {name!r} has no modules")
    layers = registry.layer_map(model)
    for module_name, core in cores.items():
        layer = layers.get(module_name)
        basis = layer.basis("lora_xs") if layer is not None else None
        if basis is None:
            raise AdapterMismatchError(f"module {module_name} has no LoRA-XS basis; call "
                                       "lorakit.model.bank.ensure_lora_xs_bases(model, names, r) first")
        if core.shape != (config.r, config.r):
            raise AdapterMismatchError(f"module {module_name}: core shape {tuple(core.shape)}, expected "
                                       f"({config.r}, {config.r})")
        if basis.rank < config.r:
            raise AdapterMismatchError(f"module {module_name}: basis rank {basis.rank} < adapter rank {config.r}")
    stacked = torch.stack(list(cores.values()))  # (n, r, r)
    if not torch.isfinite(stacked).all():
        bad = next(n for n, c in cores.items() if not torch.isfinite(c).all())
        raise NonFiniteAdapterError(f"adapter {name!r} has NaN/inf values in module {bad}")
    store_packed(model, name, config, list(cores), stacked)


def store_packed(model: nn.Module, name: str, config: LoraXSConfig, modules: list[str],
                 stacked: torch.Tensor) -> None:
    """Write validated cores (n, r, r) for `modules` into the bank; callers have checked everything."""
    registry = adapters_of(model)
    layers = registry.layer_map(model)
    first = layers[modules[0]]
    bank = _bank_for(model, config, first.weight)
    indices = []
    for module_name in modules:
        layer = layers[module_name]
        if layer.bank_index is None:
            layer.bank_index = bank.layer_index(module_name)
        indices.append(layer.bank_index)
    slot = registry.slot_table.assign("lora_xs", name)
    bank.add(name, indices, stacked * config.scaling, slot)
    registry.configs[name] = config
    registry.packed.add(name)  # layers and bases are unchanged


def pack_adapter(model: nn.Module, name: str) -> None:
    """Move an attached LoRA-XS module adapter into the bank (frees its modules; it stops training)."""
    config = adapter_config(model, name)
    registry = adapters_of(model)
    if not isinstance(config, LoraXSConfig) or name in registry.packed:
        raise AdapterConfigError(f"only attached LoRA-XS module adapters can be packed; {name!r} is not one")
    if name in registry.merged:
        raise AdapterConfigError(f"adapter {name!r} is merged; unmerge it before packing")
    layers = {n: l for n, l in adapted_layers(model).items() if name in l.adapters}
    cores = {n: l.adapters[name].lora_R.detach().clone() for n, l in layers.items()}
    bad = [n for n, c in cores.items() if not torch.isfinite(c).all()]
    if bad:
        raise NonFiniteAdapterError(f"adapter {name!r} has NaN/inf values in module {bad[0]}")
    for layer in layers.values():  # bases stay: the bank uses them
        unshare(layer, name)
        del layer.adapters[name]
    del registry.configs[name]
    registry.slot_table.release(name)
    add_packed_lora_xs(model, name, config, cores)
    freeze_base(model)


def ensure_lora_xs_bases(model: nn.Module, module_names: list[str], r: int, *,
                         progress: bool | None = None) -> None:
    """Give each named layer a LoRA-XS basis of rank ≥ r (computed once per layer, or read from the
    bases cache: lorakit.model.bases); adapters then share it. Nothing changes if a module is bad."""
    install_bases(model, "lora_xs", lora_xs_bases_for(model, module_names, r, progress=progress))
