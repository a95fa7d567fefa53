"""Frozen projections that belong to the base model and are shared by every adapter of a method.

LoRA-XS's U_r, Σ_r·V_rᵀ (from W's SVD) and VeRA's seeded random matrices are not trained and not
saved with adapters: each layer keeps one `Basis` per kind, and adapters of any rank up to the basis's
rank slice it. Buffers are non-persistent so the base model's state dict is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class Basis(nn.Module):
    """A frozen pair of projections: `down` (r_max, in) and `up` (out, r_max)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, fingerprint: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("down", down, persistent=False)  # (r_max, in)
        self.register_buffer("up", up, persistent=False)  # (out, r_max)
        self.register_buffer("fingerprint", fingerprint, persistent=False)  # (k,) numbers a file checks

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def sliced(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first r directions: top-r singular vectors are a prefix of the top-r_max ones."""
        return self.down[:r], self.up[:, :r]


def probe_vector(n: int, salt: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fixed, machine-independent vector (no RNG) used to fingerprint matrices, made on `device` so it
    multiplies the singular vectors where they are (built in float64, then cast)."""
    i = torch.arange(n, dtype=torch.float64, device=device)
    return torch.cos(0.618 * i * (salt + 1) + 0.5).to(dtype)


def fingerprints_match(expected: torch.Tensor, actual: torch.Tensor, rtol: float = 1e-3) -> bool:
    """Fingerprints are floats from an SVD: equal up to BLAS rounding, never up to a sign flip."""
    if expected.shape != actual.shape:
        return False
    scale = expected.abs().max().clamp_min(1e-12)
    return bool(((expected.float() - actual.float()).abs() <= rtol * scale).all())
