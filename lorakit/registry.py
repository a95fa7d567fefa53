"""The model-level record of attached adapters: their configs, what is merged, shared projections.

It says which adapters exist, never which one is active (that is the caller's `Route`). It hangs off
the model as the plain attribute `lorakit_registry`, and every adapted layer points to it.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.config import AdapterConfig
from lorakit.errors import LorakitError, RoutingError

REGISTRY_ATTR = "lorakit_registry"


class AdapterRegistry:
    """Adapters attached to one model: name -> config, merged names, VeRA's shared projections."""

    def __init__(self) -> None:
        self.configs: dict[str, AdapterConfig] = {}
        self.merged: list[str] = []
        self.vera_projections: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.packed: set[str] = set()  # adapters held in the packed bank (lorakit.bank), not as modules
        self.bank = None  # the model's CoreBank, once something is packed
        self.version = 0  # bumped when adapters or adapted layers are added or removed
        self._layer_map: tuple[int, dict] = (-1, {})

    def layer_map(self, model: nn.Module) -> dict:
        """Full name -> AdaptedLinear, cached until the next change (a model walk costs milliseconds)."""
        if self._layer_map[0] != self.version:
            from lorakit.attach import adapted_layers

            self._layer_map = (self.version, adapted_layers(model))
        return self._layer_map[1]

    def default_names(self) -> str | None | object:
        """What a call without a route runs: the weights as they stand if anything is merged, else the
        only adapter, else (several attached) an error asking the caller to choose."""
        if self.merged:
            return AS_STORED
        if len(self.configs) == 1:
            return next(iter(self.configs))
        if not self.configs:
            return None
        raise RoutingError(
            f"{len(self.configs)} adapters are attached ({', '.join(sorted(self.configs))}): choose one per "
            "call with `with lorakit.use_adapter(model, name):` or `lorakit.disable_adapters(model)`")


class _AsStored:
    """Marker: run the stored (possibly merged) weights, adding nothing and subtracting nothing."""

    def __repr__(self) -> str:
        return "AS_STORED"


AS_STORED = _AsStored()


def get_registry(model: nn.Module, create: bool = False) -> AdapterRegistry:
    """The model's registry; with create=False a model without adapters is an error."""
    registry = getattr(model, REGISTRY_ATTR, None)
    if registry is None:
        if not create:
            raise LorakitError(f"{type(model).__name__} has no lorakit adapters attached; call lorakit.attach first")
        registry = AdapterRegistry()
        object.__setattr__(model, REGISTRY_ATTR, registry)  # a plain attribute, not a submodule
    return registry
