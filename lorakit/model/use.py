"""Which adapter applies to a call: chosen per call, per thread and per async task, never globally.

A `Route` lives in a `ContextVar`, keyed by the model's adapter record so two models in one context keep
their own routes. Threads and asyncio tasks each see their own context, so eight threads may run
eight adapters through one model at once. Setting a route touches no layer: it costs microseconds.

    with use_adapter(model, "french"):          # every row uses "french"
    with use_adapter(model, ["a", None, "b"]):  # row i uses names[i]; None = the base model
    with use_adapter(model, {"a": 0.7, "b": 0.3}):   # a blend: 0.7·Δa + 0.3·Δb, per call or per row
    with disable_adapters(model):               # base model only (merged adapters are subtracted)

Gradient checkpointing recomputes a layer during backward(), usually after the `with` block has closed
(lorakit's trainer and HF-Trainer-style loops call backward() outside it). The routes current at forward
time must hold then too: `RouteCarrier` wraps a checkpoint function so the function it checkpoints
re-installs them, and `attach` installs it on transformers' checkpointed layers. Plain
torch.utils.checkpoint users call `checkpoint_with_route` (or pass `context_fn=route_context`).

The route state itself lives in lorakit.routing.context, below the layers that read it; this module adds the
model-level API (it finds the model's record, lorakit.model.record) and re-exports the rest.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from torch import nn

from lorakit.errors import RoutingError
from lorakit.model.record import adapters_of
from lorakit.routing.context import (AS_STORED, Blend, Route, RowNames, checkpoint_with_route, current_route, current_routes,
                                     installed, route_context, route_for, routes_installed, with_routes)

__all__ = ["AS_STORED", "Blend", "Route", "RowNames", "checkpoint_with_route", "current_route", "current_routes",
           "disable_adapters", "route_context", "route_for", "routes_installed", "use_adapter", "use_route",
           "with_routes"]


@contextmanager
def use_route(model: nn.Module, route: Route) -> Iterator[Route]:
    """Re-enter an existing route: a serving loop that decodes step after step for the same rows
    keeps one Route, so per-route work (gathered adapter weights, row groups) is done once."""
    registry = adapters_of(model)
    if not isinstance(route, Route) or isinstance(route.names, list):
        raise RoutingError(f"use_route takes a lorakit.Route whose per-row names are a tuple, got {route!r}")
    with route_for(registry, route.names):  # validates the names against the model
        pass
    with installed(registry, route):
        yield route


def use_adapter(model: nn.Module, names: str | None | Mapping[str, float] | Sequence[str | None | Mapping[str, float]]):
    """Context manager: run `model` with adapter `names`: one name, a blend `{"pirate": 0.7, "poet": 0.3}`
    (Σ wᵢ·Δᵢ, no adapter created), or one of those per batch row."""
    if not isinstance(names, (str, type(None), Mapping, Blend, list, tuple)):
        names = tuple(names)
    return route_for(adapters_of(model), names)


def disable_adapters(model: nn.Module):
    """Context manager: run `model` as the base model (merged adapters are subtracted on the fly)."""
    return route_for(adapters_of(model), None)
