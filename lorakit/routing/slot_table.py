"""Model-wide slot numbers: every adapter that lives in layers gets one number within its kind.

A kind is what shares one forward path and one stacked layout: "lora", "lora_xs" (attached and packed
alike) and one per VeRA basis ("vera_s<seed>_r<r>", lorakit.methods.vera.vera_key). Slot 0 of every kind is empty, so a row that uses no
adapter of a kind gathers zeros. The numbers are the same in every layer, so a route is resolved into
one index tensor per kind for the whole model (lorakit.routing.resolve), not one per layer; a layer the
adapter does not touch holds zeros at its slot.

Capacity grows in powers of two: per-layer stacks (lorakit.layer.slots) are sized by it, and a compiled
forward sees new shapes, hence recompiles, only when it doubles.
"""

from __future__ import annotations

from lorakit.errors import AdapterExistsError


class SlotTable:
    """name -> (kind, slot); `version` is bumped on every change (stacks and resolved routes check it)."""

    def __init__(self) -> None:
        self._slots: dict[str, dict[str, int]] = {}  # kind -> {name: slot}
        self._kind: dict[str, str] = {}
        self.version = 0
        self._capacity: tuple[int, dict[str, int]] = (-1, {})  # per version: read by every layer and call

    def assign(self, kind: str, name: str) -> int:
        """The smallest free slot (≥ 1) of `kind` for adapter `name`."""
        if name in self._kind:
            raise AdapterExistsError(f"adapter {name!r} already has a slot ({self._kind[name]})")
        taken = set(self._slots.setdefault(kind, {}).values())
        slot = next(i for i in range(1, len(taken) + 2) if i not in taken)
        self._slots[kind][name] = slot
        self._kind[name] = kind
        self.version += 1
        return slot

    def release(self, name: str) -> None:
        kind = self._kind.pop(name, None)
        if kind is not None:
            del self._slots[kind][name]
            self.version += 1

    def kind(self, name: str | None) -> str | None:
        """The kind of adapter `name`, None for the base or an adapter outside the layers (prefix)."""
        return None if name is None else self._kind.get(name)

    def slot(self, name: str | None) -> int:
        kind = self.kind(name)
        return 0 if kind is None else self._slots[kind][name]  # type: ignore[index]

    def kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind, slots in self._slots.items() if slots)

    def names(self, kind: str) -> tuple[str, ...]:
        return tuple(self._slots.get(kind, {}))

    def capacity(self, kind: str) -> int:
        """Slots a stack of `kind` must have: the highest slot + 1, rounded up to a power of two (≥ 2)."""
        if self._capacity[0] != self.version:
            self._capacity = (self.version, {})
        known = self._capacity[1]
        if kind not in known:
            need = max(self._slots.get(kind, {}).values(), default=0) + 1
            known[kind] = max(2, 1 << (need - 1).bit_length())
        return known[kind]
