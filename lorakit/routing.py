"""Which adapter applies to a call: chosen per call, per thread and per async task, never globally.

A `Route` lives in a `ContextVar`, keyed by the model's registry so two models in one context keep
their own routes. Threads and asyncio tasks each see their own context, so eight threads may run
eight adapters through one model at once. Setting a route touches no layer: it costs microseconds.

    with use_adapter(model, "french"):          # every row uses "french"
    with use_adapter(model, ["a", None, "b"]):  # row i uses names[i]; None = the base model
    with disable_adapters(model):               # base model only (merged adapters are subtracted)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping, Union

from lorakit.errors import AdapterNotFoundError, RoutingError

if TYPE_CHECKING:
    from torch import nn

    from lorakit.registry import AdapterRegistry

RowNames = Union[str, None, tuple[Union[str, None], ...]]


@dataclass(frozen=True)
class Route:
    """`names`: one adapter name for all rows, None for the base, or a tuple with one entry per row."""

    names: RowNames
    # Work derived from the names (row groups, slot tensors), done once per call rather than once per
    # layer. It lives and dies with this route, so it is never shared between calls.
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def per_row(self) -> bool:
        return isinstance(self.names, tuple)


_ROUTES: ContextVar[Mapping[int, Route]] = ContextVar("lorakit_routes", default=MappingProxyType({}))


def current_route(registry_id: int) -> Route | None:
    """The route set for this registry in the current context, or None when none was set."""
    return _ROUTES.get().get(registry_id)


@contextmanager
def route_for(registry: "AdapterRegistry", names: RowNames) -> Iterator[Route]:
    """Set a route for one registry for the duration of the block (validated first)."""
    if isinstance(names, list):
        names = tuple(names)
    wanted = names if isinstance(names, tuple) else (names,)
    if isinstance(names, tuple) and not names:
        raise RoutingError("per-row adapter names must not be empty")
    unknown = sorted({n for n in wanted if n is not None and n not in registry.configs})
    if unknown:
        raise AdapterNotFoundError(
            f"adapter(s) {unknown} not attached; attached: {sorted(registry.configs) or 'none'}")
    bad = [n for n in wanted if n is not None and not isinstance(n, str)]
    if bad:
        raise RoutingError(f"adapter names must be str or None, got {bad[:3]!r}")
    with _installed(registry, Route(names)) as route:
        yield route


@contextmanager
def _installed(registry: "AdapterRegistry", route: Route) -> Iterator[Route]:
    """Make `route` the current one for `registry` in this context, restoring the previous on exit."""
    routes = dict(_ROUTES.get())
    routes[id(registry)] = route
    token = _ROUTES.set(MappingProxyType(routes))
    try:
        yield route
    finally:
        _ROUTES.reset(token)


@contextmanager
def use_route(model: "nn.Module", route: Route) -> Iterator[Route]:
    """Re-enter an existing route: a serving loop that decodes step after step for the same rows
    keeps one Route, so per-route work (gathered adapter weights, row groups) is done once."""
    from lorakit.registry import get_registry

    registry = get_registry(model)
    with route_for(registry, route.names):  # validates the names against the model
        pass
    with _installed(registry, route):
        yield route


def use_adapter(model: "nn.Module", names: str | None | Sequence[str | None]):
    """Context manager: run `model` with adapter `names` (one name, or one per batch row)."""
    from lorakit.registry import get_registry

    return route_for(get_registry(model), names if isinstance(names, (str, type(None))) else tuple(names))


def disable_adapters(model: "nn.Module"):
    """Context manager: run `model` as the base model (merged adapters are subtracted on the fly)."""
    from lorakit.registry import get_registry

    return route_for(get_registry(model), None)
