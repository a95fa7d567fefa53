"""VeRA (Kopiczko et al., 2024): shared random projections, trained per-layer scaling vectors.

    ΔW = Λ_b · B · Λ_d · A      A (r×in), B (out×r): random from a seed, shared by all layers, frozen
                                d (r,) starts at d_initial, b (out,) at zero: training starts at the base

Every layer slices one pair of matrices generated at the model's largest in/out sizes, so the
projections depend only on (seed, r, sizes) and an adapter file needs just d, b and the seed.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lorakit.config import VeraConfig
from lorakit.methods.basis import Basis, probe_vector


def vera_projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared A (r, max_in) and B (max_out, r), Kaiming-uniform from a CPU generator (reproducible)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bound_a = math.sqrt(6.0 / max_in) / math.sqrt(2.0)  # kaiming_uniform with a=1 on fan_in
    bound_b = math.sqrt(6.0 / r) / math.sqrt(2.0)
    down = (torch.rand(r, max_in, generator=gen) * 2 - 1) * bound_a
    up = (torch.rand(max_out, r, generator=gen) * 2 - 1) * bound_b
    return down, up


def vera_fingerprint(shared: tuple[torch.Tensor, torch.Tensor], in_features: int, out_features: int) -> torch.Tensor:
    """(2,) float32 numbers a file checks, from the float32 projections (so they do not depend on the model's
    dtype), on the projections' device."""
    down, up = shared[0][:, :in_features].float(), shared[1][:out_features].float()  # (r, in), (out, r)
    probe_d = probe_vector(in_features, 2).to(down.device)
    probe_u = probe_vector(out_features, 3).to(up.device)
    return torch.stack([probe_d @ down.T.sum(1), probe_u @ up.sum(1)])


def vera_basis(shared: tuple[torch.Tensor, torch.Tensor], in_features: int, out_features: int,
               dtype: torch.dtype, fingerprint: torch.Tensor | None = None) -> Basis:
    """One layer's view of the shared projections: slices of them (no copy) when they are already in
    `dtype`, so every layer of a model shares one pair. `fingerprint` defaults to the one of `shared`
    (pass the float32 one when `shared` is held in a lower precision)."""
    down = shared[0][:, :in_features].to(dtype)  # (r, in)
    up = shared[1][:out_features].to(dtype)  # (out, r)
    if fingerprint is None:
        fingerprint = vera_fingerprint(shared, in_features, out_features)
    return Basis(down, up, fingerprint.to(down.device))


def vera_key(seed: int, r: int) -> str:
    """Where a layer keeps the basis of projections (seed, r)."""
    return f"vera_s{seed}_r{r}"


def vera_basis_key(config: VeraConfig) -> str:
    return vera_key(config.projection_seed, config.r)


class VeraAdapter(nn.Module):
    """One layer's VeRA state: `vera_lambda_d` (r,) and `vera_lambda_b` (out,)."""

    method = "vera"
    scaling = 1.0  # the trained vectors carry the scale

    def __init__(self, out_features: int, config: VeraConfig, dtype: torch.dtype,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.r = config.r
        self.basis_key = vera_basis_key(config)
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), config.d_initial, dtype=dtype, device=device))
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        self.dropout = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()

    @property
    def slot_kind(self) -> str:
        """One kind per shared basis: adapters of other projection seeds or ranks cannot share a stack."""
        return self.basis_key

    def delta(self, x: torch.Tensor, basis: Basis) -> torch.Tensor:
        """(..., in) -> (..., out): b ⊙ B(d ⊙ A·dropout(x))."""
        h = F.linear(self.dropout(x), basis.down.to(x.dtype)) * self.vera_lambda_d.to(x.dtype)  # (..., r)
        return F.linear(h, basis.up.to(x.dtype)) * self.vera_lambda_b.to(x.dtype)

    @staticmethod
    def slot_shapes(in_features: int, out_features: int, r: int) -> dict[str, tuple[int, ...]]:
        """One slot of a layer's VeRA stack (lorakit.layer.slots): the two scaling vectors."""
        return {"d": (r,), "b": (out_features,)}

    def slot_views(self, slot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"vera_lambda_d": slot["d"][: self.r], "vera_lambda_b": slot["b"]}

    def factors(self, basis: Basis) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW = up @ down: up = Λ_b·B (out, r), down = Λ_d·A (r, in), in float32 (d, b may be wider than A, B)."""
        wide = torch.promote_types(torch.promote_types(basis.up.dtype, self.vera_lambda_b.dtype), torch.float32)
        return (basis.up.to(wide) * self.vera_lambda_b.to(wide)[:, None],
                basis.down.to(wide) * self.vera_lambda_d.to(wide)[:, None])

    def delta_weight(self, basis: Basis) -> torch.Tensor:
        up, down = self.factors(basis)
        return up.float() @ down.float()

    def num_trainable(self) -> int:
        return self.vera_lambda_d.numel() + self.vera_lambda_b.numel()
