"""`ModelAdapters`: the model-level record of attached adapters: configs, what is merged, shared projections.

It says which adapters exist, never which one is active (that is the caller's `Route`); the one exception
is `trained`, the adapter a training run declared (lorakit.model.manage.set_trainable): the model's own record of
which parameters train, which calls without a route then also use. It hangs off
the model as the plain attribute `lorakit_registry` (the name kept for saved models and callers), and
every adapted layer points to it. It sits above lorakit.layer.linear: it walks the model's AdaptedLinear layers.

What lorakit holds outside the model's parameters and buffers (the packed bank, the layers' slot stacks,
VeRA's shared projections) follows the model through `model.to(...)`, `.half()`, `.cuda()`...: all of them
go through `nn.Module._apply`, which the record wraps on the model it was created for (`moved_with`).

Because the record caches which layers are adapted, a layer becomes adapted in one place only, `wrap_layer`
(attach, the bank's bases, io's loads), and a failed add is undone in one place, `unwrap_on_error`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from lorakit.layer import slots
from lorakit.config import AdapterConfig
from lorakit.layer.embedding import adapted_layer
from lorakit.errors import LorakitError, RoutingError
from lorakit.layer.linear import AdaptedLinear, adapted_layers
from lorakit.methods.basis import Basis
from lorakit.methods.vera import vera_key
from lorakit.routing.context import AS_STORED
from lorakit.routing.slot_table import SlotTable
from lorakit.layer.surgery import replace_module

ATTR = "lorakit_registry"  # the model attribute holding its ModelAdapters


class ModelAdapters:
    """Adapters attached to one model: name -> config, merged names, VeRA's shared projections."""

    def __init__(self) -> None:
        self.configs: dict[str, AdapterConfig] = {}
        self.merged: list[str] = []
        self.vera_projections: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.packed: set[str] = set()  # adapters held in the packed bank (lorakit.model.bank), not as modules
        self.bank = None  # the model's CoreBank, once something is packed
        self._layers_version = 0  # see layers_changed
        self.slot_table = SlotTable()  # model-wide slot numbers of the adapters in layers (lorakit.routing.slot_table)
        self.traced_slots = None  # set only while lorakit.model.compiled traces a forward: the route as inputs
        self.entry_slots = None  # torch.compile(model): the call's route, from entry to exit (compiled.RouteEntry)
        self.trained: str | None = None  # the adapter being trained (set_trainable): routeless calls use it
        self._memo: tuple[int, dict] = (-1, {})
        self._layer_map: tuple[int, dict] = (-1, {})

    def layer_map(self, model: nn.Module) -> dict:
        """Full name -> AdaptedLinear, cached until the next change (a model walk costs milliseconds)."""
        if self._layer_map[0] != self._layers_version:
            self._layer_map = (self._layers_version, adapted_layers(model))
        return self._layer_map[1]

    @property
    def layers_version(self) -> int:
        """Changes with every layers_changed(): a key for what is cached from a walk of the model."""
        return self._layers_version

    def layers_changed(self) -> None:
        """The one way to say adapters or adapted layers were added or removed (slot changes are the slot
        table's own): what was cached from a walk of the model is walked again."""
        self._layers_version += 1

    def slot_table_memo(self) -> dict:
        """Resolved routes of calls without a `use_adapter` block (the default route), kept until the
        slots change: a pure function of names, slots and device, not a record of what is active."""
        if self._memo[0] != self.slot_table.version:
            self._memo = (self.slot_table.version, {})
        return self._memo[1]

    def moved_with(self, model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool) -> None:
        """Run the model's own `_apply(fn)`, then move what lorakit holds the same way: the bank's cores, each
        layer's slot stacks (parameters pointed back into them), VeRA's shared projections (every layer's basis
        pointed back at one moved pair), and basis fingerprints (device only: their float32 is what files
        are checked against, so a bf16 model must not round them)."""
        layers = self.layer_map(model)
        held = {name: slots.held_names(layer) for name, layer in layers.items()}
        fingerprints = {(name, key): basis.fingerprint for name, layer in layers.items()
                        for key, basis in layer.bases.items()}
        type(model)._apply(model, fn, recurse)
        for (name, key), fingerprint in fingerprints.items():
            basis = layers[name].bases[key]
            basis._buffers["fingerprint"] = fingerprint.to(basis.down.device)
        for name, layer in layers.items():
            slots.moved(layer, fn, held[name])
        if self.bank is not None:
            self.bank.apply_(fn)
        for (seed, r, max_in, max_out), shared in list(self.vera_projections.items()):
            down, up = fn(shared[0]), fn(shared[1])
            self.vera_projections[(seed, r, max_in, max_out)] = (down, up)
            key = vera_key(seed, r)
            for layer in layers.values():
                basis = layer.bases[key] if key in layer.bases else None
                if basis is not None and (basis.down.dtype, basis.down.device) == (down.dtype, down.device):
                    basis._buffers["down"] = down[:, :layer.in_features]  # (r, in): a view, not a copy
                    basis._buffers["up"] = up[:layer.out_features]  # (out, r)

    def forget_failed(self, name: str, vera_projections: dict) -> None:
        """Take back a failed add of `name`: its config and slot go, VeRA's projections are those of before."""
        self.configs.pop(name, None)
        self.slot_table.release(name)
        self.vera_projections = vera_projections
        self.layers_changed()

    def default_names(self) -> str | None | object:
        """What a call without a route runs: the weights as they stand if anything is merged, else the
        only adapter or the one declared trained (set_trainable), else (several attached) an error asking the
        caller to choose."""
        if self.merged:
            return AS_STORED
        if self.trained is not None:
            return self.trained
        if len(self.configs) == 1:
            return next(iter(self.configs))
        if not self.configs:
            return None
        raise RoutingError(
            f"{len(self.configs)} adapters are attached ({', '.join(sorted(self.configs))}): choose one per "
            "call with `with lorakit.use_adapter(model, name):` or `lorakit.disable_adapters(model)`, or declare "
            "the one a training run trains with `lorakit.set_trainable(model, name)`")


def adapters_of(model: nn.Module, create: bool = False) -> ModelAdapters:
    """The model's ModelAdapters; with create=False a model without adapters is an error."""
    record = getattr(model, ATTR, None)
    if record is None:
        if not create:
            raise LorakitError(f"{type(model).__name__} has no lorakit adapters attached; call lorakit.attach first")
        record = ModelAdapters()
        object.__setattr__(model, ATTR, record)  # a plain attribute, not a submodule
        object.__setattr__(model, "_apply", ApplyHook(model))  # the model's own _apply, wrapped
    return record


class ApplyHook:
    """`model._apply` while lorakit adapters are attached: the model's own, then what the record holds.

    An object holding the model rather than a closure, so `copy.deepcopy` points the copy's hook at the copy
    and `pickle` restores it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        model = self.model
        record = model.__dict__.get(ATTR)
        if record is None:  # adapters unloaded since
            return type(model)._apply(model, fn, recurse)
        record.moved_with(model, fn, recurse)
        return model


def wrap_layer(model: nn.Module, module_name: str) -> AdaptedLinear:
    """The adapted layer at `module_name`: the one already there, or the plain layer wrapped now (its base keys
    kept; AdaptedEmbedding for an embedding table). The record is created if need be and told of the change."""
    layer = model.get_submodule(module_name)
    if isinstance(layer, AdaptedLinear):
        return layer
    record = adapters_of(model, create=True)
    layer = adapted_layer(layer, module_name, record)
    replace_module(model, module_name, layer)
    record.layers_changed()
    return layer


def unwrap_layer(model: nn.Module, module_name: str, original: nn.Module) -> None:
    """Undo `wrap_layer`: put `original` back at `module_name` if something else took its place."""
    if model.get_submodule(module_name) is not original:
        replace_module(model, module_name, original)
        record = model.__dict__.get(ATTR)
        if record is not None:
            record.layers_changed()


def install_bases(model: nn.Module, key: str, bases: dict[str, Basis]) -> None:
    """Put `bases[module]` under `key` on each named layer (wrapping plain ones) that lacks one of that rank."""
    adapters_of(model, create=True)
    for module_name, basis in bases.items():
        layer = wrap_layer(model, module_name)
        have = layer.basis(key)
        if have is None or have.rank < basis.rank:
            layer.bases[key] = basis.to(layer.weight.device)


@contextmanager
def unwrap_on_error(model: nn.Module, name: str, modules: Iterable[str]) -> Iterator[None]:
    """On any exception inside the block, undo what adding adapter `name` at `modules` did: layers wrapped in
    the block are unwrapped (the original module objects back), layers adapted before lose `name`'s adapter
    and any basis they gained, and the record forgets `name`, or goes if the block created it."""
    modules = set(modules)
    before = {n: m for n, m in model.named_modules() if n in modules}
    bases_before = {n: dict(m.bases) for n, m in before.items() if isinstance(m, AdaptedLinear)}
    record = model.__dict__.get(ATTR)
    projections_before = dict(record.vera_projections) if record is not None else {}
    try:
        yield
    except BaseException:
        after = model.__dict__.get(ATTR)
        if after is not None:
            after.forget_failed(name, projections_before)
        for module_name, original in before.items():
            unwrap_layer(model, module_name, original)
            if isinstance(original, AdaptedLinear):
                original.take_back(name, bases_before[module_name])
        if record is None:
            release(model)
        raise


def release(model: nn.Module) -> None:
    """Forget lorakit's model-level state (the model is plain again): the record and the `_apply` wrapper."""
    model.__dict__.pop(ATTR, None)
    model.__dict__.pop("_apply", None)
