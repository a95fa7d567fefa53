"""The per-call route state every adapted layer reads: which adapter applies to this call.

A `Route` lives in a `ContextVar`, keyed by the id of the model's adapter record
(lorakit.model.record) so two models in one context keep their own routes. Threads and asyncio tasks
each see their own context. This module sits below the layers: it knows no model, only a record's
adapter names; the model-level API (`use_adapter`, `disable_adapters`, `use_route`) is lorakit.model.use.

Gradient checkpointing recomputes a layer during backward(), usually after the `with` block has closed.
The routes current at forward time must hold then too: `RouteCarrier` wraps a checkpoint function so
the function it checkpoints re-installs them, and `attach` installs it on transformers' checkpointed
layers. Plain torch.utils.checkpoint users call `checkpoint_with_route` (or `context_fn=route_context`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
import contextvars
import math
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Union

from torch.utils.checkpoint import checkpoint

from lorakit import walk
from lorakit.errors import AdapterNotFoundError, RoutingError

if TYPE_CHECKING:
    from torch import nn


class AttachedConfigs(Protocol):
    """What routing reads of a model's adapter record (lorakit.model.record.ModelAdapters): the names."""

    configs: Mapping[str, Any]


@dataclass(frozen=True)
class Blend:
    """A weighted mix of adapters for one call or row, without creating an adapter: Σ wᵢ·Δᵢ.

    Hashable (routes are cache keys) and canonical: parts in the order given, weights as floats."""

    parts: tuple[tuple[str, float], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.parts)

    def weight(self, name: str) -> float:
        """The weight of adapter `name` in this blend (0 when it is not a part)."""
        return sum(w for n, w in self.parts if n == name)


def blend_of(value: Mapping[str, float] | Blend) -> Blend:
    """`{"pirate": 0.7, "poet": 0.3}` as a Blend; names must be str, weights finite numbers."""
    if isinstance(value, Blend):
        return value
    if not value:
        raise RoutingError("a blend needs at least one adapter, got {}")
    parts = []
    for name, weight in value.items():
        if not isinstance(name, str):
            raise RoutingError(f"blend adapter names must be str, got {name!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise RoutingError(f"blend weight of {name!r} must be a finite number, got {weight!r}")
        parts.append((name, float(weight)))
    return Blend(tuple(parts))


RowName = Union[str, None, Blend]  # one row's adapter: a name, the base (None), or a blend
RowNames = Union[str, None, Blend, tuple[RowName, ...]]


def row_parts(name: RowName) -> tuple[tuple[str, float], ...]:
    """One row's (adapter, weight) parts: none for the base, one at weight 1 for a name."""
    if name is None:
        return ()
    if isinstance(name, Blend):
        return name.parts
    return ((name, 1.0),)


@dataclass(frozen=True)
class Route:
    """`names`: one adapter name for all rows, None for the base, or a tuple with one entry per row."""

    names: RowNames  # one name, None, a Blend, or a tuple with one of those per row
    # Work derived from the names (row groups, slot tensors), done once per call rather than once per
    # layer. It lives and dies with this route, so it is never shared between calls.
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def per_row(self) -> bool:
        return isinstance(self.names, tuple)


_ROUTES: ContextVar[Mapping[int, Route]] = ContextVar("lorakit_routes", default=MappingProxyType({}))


class _AsStored:
    """Marker: run the stored (possibly merged) weights, adding nothing and subtracting nothing."""

    def __repr__(self) -> str:
        return "AS_STORED"


AS_STORED = _AsStored()  # what a call without a route runs when adapters are merged (ModelAdapters.default_names)


def current_route(registry_id: int) -> Route | None:
    """The route set for this record (by id) in the current context, or None when none was set."""
    return _ROUTES.get().get(registry_id)


def normalised_names(names: object) -> RowNames:
    """A route's names as the layers read them: lists as tuples, blend dicts as Blends, checked for type."""
    if isinstance(names, (list, tuple)):
        if not names:
            raise RoutingError("per-row adapter names must not be empty")
        return tuple(normalised_names(n) if not isinstance(n, (list, tuple)) else _bad_name(n) for n in names)
    if isinstance(names, Mapping) or isinstance(names, Blend):
        return blend_of(names)  # type: ignore[arg-type]
    if names is not None and not isinstance(names, str):  # an int is not a name (and a set may not even hash)
        return _bad_name(names)
    return names  # type: ignore[return-value]


def _bad_name(name: object) -> RowNames:
    raise RoutingError(f"adapter names must be str or None (or a {{name: weight}} blend), got {name!r}")


@contextmanager
def route_for(registry: AttachedConfigs, names: object) -> Iterator[Route]:
    """Set a route for one adapter record for the duration of the block (validated first)."""
    names = normalised_names(names)
    wanted = names if isinstance(names, tuple) else (names,)
    used = [n for row in wanted for n, _ in row_parts(row)]
    unknown = sorted({n for n in used if n not in registry.configs})
    if unknown:
        raise AdapterNotFoundError(
            f"adapter(s) {unknown} not attached; attached: {sorted(registry.configs) or 'none'}")
    blended = {n for row in wanted if isinstance(row, Blend) for n in row.names}
    outside = sorted(n for n in blended if getattr(registry.configs[n], "method", None) == "prefix")
    if outside:
        raise RoutingError(f"prefix adapter(s) {outside} cannot be blended: a prefix adds attention keys and "
                           "values, not a weight update to mix")
    with installed(registry, Route(names)) as route:
        yield route


@contextmanager
def installed(registry: AttachedConfigs, route: Route) -> Iterator[Route]:
    """Make `route` the current one for `registry` in this context, restoring the previous on exit."""
    routes = dict(_ROUTES.get())
    routes[id(registry)] = route
    token = _ROUTES.set(MappingProxyType(routes))
    try:
        yield route
    finally:
        _ROUTES.reset(token)


# -- gradient checkpointing: the forward's routes hold for the recomputation -----------------------------
RouteSnapshot = Mapping[int, Route]


def current_routes() -> RouteSnapshot:
    """Every route set in this context (all models), as an immutable snapshot to re-install later."""
    return _ROUTES.get()


@contextmanager
def routes_installed(snapshot: RouteSnapshot) -> Iterator[None]:
    """Make `snapshot` (from `current_routes`) the routes of this context for the block. The Route objects
    themselves are re-entered, so their caches (row groups, gathered slots) are reused, not rebuilt."""
    token = _ROUTES.set(snapshot)
    try:
        yield
    finally:
        _ROUTES.reset(token)


def with_routes(function: Callable[..., Any], snapshot: RouteSnapshot | None = None) -> Callable[..., Any]:
    """`function`, run under the routes current now (or `snapshot`) wherever and whenever it is called.

    Without a snapshot the whole context travels (contextvars.copy_context): the routes, and any other
    per-call state set around the forward, such as the prefix cache of lorakit.model.prefix_hook, which a
    checkpointed layer needs again when it is recomputed during backward()."""
    if snapshot is None:
        context = contextvars.copy_context()

        def run_in_context(*args: Any, **kwargs: Any) -> Any:
            return context.copy().run(function, *args, **kwargs)  # a fresh copy per run: re-entry is allowed

        return run_in_context

    def run(*args: Any, **kwargs: Any) -> Any:
        with routes_installed(snapshot):
            return function(*args, **kwargs)

    return run


class RouteCarrier:
    """Wraps a checkpoint function `inner(function, *args, **kwargs)` (transformers' per-layer
    `_gradient_checkpointing_func`): the routes current at each call travel with `function`, so
    torch.utils.checkpoint's recomputation during backward() sees the forward's routes, per-row included."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.inner(with_routes(function), *args, **kwargs)

    def __repr__(self) -> str:
        return f"RouteCarrier({self.inner!r})"


def checkpoint_with_route(function: Callable[..., Any], *args: Any, use_reentrant: bool = False,
                          **kwargs: Any) -> Any:
    """torch.utils.checkpoint.checkpoint(function, *args) whose recomputation runs under the routes of
    this call, so backward() may run after the `use_adapter` block has closed."""
    return checkpoint(with_routes(function), *args, use_reentrant=use_reentrant, **kwargs)


def route_context() -> tuple[AbstractContextManager, AbstractContextManager]:
    """A `context_fn` for non-reentrant torch.utils.checkpoint: the recomputation runs under the routes
    current at forward time. `checkpoint(f, x, use_reentrant=False, context_fn=lorakit.route_context)`."""
    return nullcontext(), routes_installed(current_routes())


CHECKPOINT_FUNC_ATTR = "_gradient_checkpointing_func"  # transformers' per-module checkpoint function
CHECKPOINTED_ATTR = "lorakit_checkpointed"  # on a hooked module: the checkpointable modules at or below it


def _wrap_checkpoint_funcs(module: "nn.Module", args: tuple) -> None:
    """Forward pre-hook: make the checkpoint functions at or below `module` RouteCarriers before they are used.
    Checked per call, since gradient_checkpointing_enable() may set new functions at any time."""
    for target in getattr(module, CHECKPOINTED_ATTR, ()):
        func = getattr(target, CHECKPOINT_FUNC_ATTR, None)
        if func is not None and not isinstance(func, RouteCarrier):
            setattr(target, CHECKPOINT_FUNC_ATTR, RouteCarrier(func))


def carry_routes_through_checkpointing(model: "nn.Module") -> None:
    """Hook the modules transformers may checkpoint (those with a `gradient_checkpointing` flag:
    GradientCheckpointingLayer blocks, older-style backbones) so that model.gradient_checkpointing_enable()
    works with `use_adapter` around the forward only.

    transformers 5.24 checkpoints a block's `forward`, after its pre-hooks; 4.56-5.17 checkpoint
    `super().__call__` from `__call__`, before them. So the model itself is hooked too, and each hook wraps
    every checkpointable module at or below it: the outermost module called wraps them all in time.
    Idempotent (re-run by every attach); costs a few attribute reads per block and call."""
    for module in walk.modules(model):  # adapted layers hold no block: not walked into
        if module is not model and not hasattr(module, "gradient_checkpointing"):
            continue
        below = tuple(m for m in walk.modules(module) if hasattr(m, "gradient_checkpointing"))
        first = CHECKPOINTED_ATTR not in module.__dict__
        module.__dict__[CHECKPOINTED_ATTR] = below  # a plain tuple, not registered as submodules
        if first:
            module.register_forward_pre_hook(_wrap_checkpoint_funcs)
