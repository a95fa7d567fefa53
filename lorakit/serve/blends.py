"""Blended requests: `"adapter_blend": {"pirate": 0.7, "poet": 0.3}` runs 0.7·Δpirate + 0.3·Δpoet for one
request without creating an adapter (lorakit.routing.context.Blend), in the same batch as single-adapter and
base rows (the engine routes per row).

A blend is checked from the parts' adapter_config.json before anything is loaded, so a refused blend loads
and pins nothing: at most the server's `max_parts` parts, each an adapter the server can find, none a
prefix-tuning adapter (it adds attention keys and values, not a weight update to mix), and all recorded for
one base model (`base_model_name_or_path`; a part that records none is not compared). Then every part is
pinned in the store for the request's lifetime, under the name its current version has on the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from lorakit.errors import AdapterNotFoundError, LorakitError
from lorakit.io.prefix import PEFT_TYPE as PREFIX_PEFT_TYPE
from lorakit.routing.context import Blend
from lorakit.serve.adapter_store import AdapterStore, InvalidAdapterNameError

MAX_BLEND_WEIGHT = 10.0  # beyond it a blend is far outside what its adapters were trained for


class BlendRefusedError(LorakitError, ValueError):
    """The request's blend cannot be served; `code` says why in one word (OpenAI's error `code`)."""

    def __init__(self, message: str, code: str = "invalid_blend") -> None:
        super().__init__(message)
        self.code = code


class BlendPartNotFoundError(BlendRefusedError):
    """A part names no adapter the server can find (a 404, as an unknown `model` is)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="adapter_not_found")


def check_blend(store: AdapterStore, weights: Mapping[str, float], max_parts: int) -> None:
    """Refuse `weights` unless the server can blend it (see the module's docstring); reads configs only.
    A source that fails to fetch a part raises its AdapterLoadError (the server's fault, not the blend's)."""
    if not weights:
        raise BlendRefusedError("adapter_blend needs at least one adapter")
    if len(weights) > max_parts:
        raise BlendRefusedError(f"adapter_blend has {len(weights)} adapters; this server blends at most {max_parts}",
                                code="too_many_adapters")
    bases: dict[str, str] = {}
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or not 0 <= weight <= MAX_BLEND_WEIGHT:
            raise BlendRefusedError(f"adapter_blend weight of {name!r} must be a number in [0, {MAX_BLEND_WEIGHT:g}], "
                                    f"got {weight!r}")
        try:
            config = store.adapter_config(name)
        except (AdapterNotFoundError, InvalidAdapterNameError) as exc:
            raise BlendPartNotFoundError(f"adapter_blend: adapter {name!r} not found "
                                         f"({store.client_message(exc)})") from exc
        if config.get("peft_type") == PREFIX_PEFT_TYPE:
            raise BlendRefusedError(f"adapter_blend: {name!r} is a prefix-tuning adapter, which cannot be blended "
                                    "(it adds attention keys and values, not a weight update to mix)",
                                    code="unblendable_adapter")
        base = config.get("base_model_name_or_path")
        if isinstance(base, str) and base:
            bases[name] = base
    if len(set(bases.values())) > 1:
        raise BlendRefusedError(f"adapter_blend mixes adapters trained for different base models: {bases}",
                                code="mixed_base_models")


def pin_blend(store: AdapterStore, weights: Mapping[str, float]) -> Blend:
    """Acquire every part (loading it on first use); the Blend of their attached names, for the engine's row.
    On any failure the parts already pinned are released before the error propagates."""
    parts: list[tuple[str, float]] = []
    try:
        for name, weight in weights.items():
            parts.append((store.acquire(name), float(weight)))
    except BaseException:
        unpin_blend(store, Blend(tuple(parts)))
        raise
    return Blend(tuple(parts))


def unpin_blend(store: AdapterStore, blend: Blend) -> None:
    """Release what pin_blend acquired (each part's attached name)."""
    for name in blend.names:
        store.release(name)
