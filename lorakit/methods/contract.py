"""What every method over linear (and embedding) layers implements: all that the slot stacks, the routed deltas,
merging and io ask of one layer's adapter state. Nothing here knows a method; lorakit.methods.table lists them."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch


class LinearMethod(Protocol):
    """One adapter's state on one layer (an nn.Module holding its trained tensors as parameters)."""

    method: ClassVar[str]  # the config's `method`, and `lorakit_method` in native files
    r: int
    scaling: float  # the factor slot stacks keep per slot (α/r; 1 where the method's vectors carry the scale)

    @property
    def slot_kind(self) -> str:
        """Adapters of one kind share a layer's slot stack and one routed-delta path: the method's name, or
        `<name>_<basis>` for a method with one kind per shared basis (VeRA: per projection seed and rank)."""
        ...

    @staticmethod
    def slot_shapes(in_features: int, out_features: int, r: int) -> dict[str, tuple[int, ...]]:
        """The fields of one slot of the kind's stack (lorakit.layer.slots), for a stack of rank `r`."""
        ...

    def slot_views(self, slot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{parameter name: the view of one slot it lives in}."""
        ...

    def factors(self, basis: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(up (out, r), down (r, in)) with ΔW = up @ down: what merging adds to W."""
        ...

    def delta(self, x: torch.Tensor, basis: Any) -> torch.Tensor:
        """(..., in) -> (..., out): the method's own definition of its delta, one adapter alone; every kernel
        backend is tested equal to it (tests/kernels)."""
        ...

    def num_trainable(self) -> int:
        ...
