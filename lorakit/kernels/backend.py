"""The kernel backend, chosen once when lorakit is imported: the layers call `KERNELS.<kind>_rows`.

Chosen by the environment variable LORAKIT_KERNELS (default "torch", the reference): a process-wide choice,
fixed before any model is built, so a compiled graph and an eager call always run the same kernels.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorakit.errors import LorakitError
from lorakit.kernels import reference

ENV = "LORAKIT_KERNELS"


@dataclass(frozen=True)
class RowKernels:
    """One backend's routed deltas; each adds into `out` in place (signatures: lorakit.kernels.reference)."""

    name: str
    lora_rows: Callable[..., None]
    core_rows: Callable[..., None]
    vera_rows: Callable[..., None]
    embedding_rows: Callable[..., None]
    rescale_rows: Callable[..., torch.Tensor]  # returns the output: in place only where asked


def _torch_reference() -> RowKernels:
    return RowKernels("torch", reference.add_lora_rows_, reference.add_core_rows_, reference.add_vera_rows_,
                      reference.add_embedding_rows_, reference.rescale_rows)


# name -> a builder (a fused backend imports its compiler only when chosen)
BACKENDS: dict[str, Callable[[], RowKernels]] = {"torch": _torch_reference}


def choose(name: str | None = None) -> RowKernels:
    """The backend called `name` (default: $LORAKIT_KERNELS, else "torch")."""
    name = name or os.environ.get(ENV) or "torch"
    if name not in BACKENDS:
        raise LorakitError(f"{ENV}={name!r} names no kernel backend; known: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]()


KERNELS = choose()
