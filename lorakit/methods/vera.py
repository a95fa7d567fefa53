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


def vera_basis(shared: tuple[torch.Tensor, torch.Tensor], in_features: int, out_features: int,
               dtype: torch.dtype) -> Basis:
    """One layer's view of the shared projections."""
    down, up = shared
    down = down[:, :in_features].to(dtype)  # (r, in)
    up = up[:out_features].to(dtype)  # (out, r)
    fingerprint = torch.stack([probe_vector(down.shape[1], 2) @ down.float().T.sum(1),
                               probe_vector(up.shape[0], 3) @ up.float().sum(1)])
    return Basis(down, up, fingerprint)


def vera_basis_key(config: VeraConfig) -> str:
    return f"vera_s{config.projection_seed}_r{config.r}"


class VeraAdapter(nn.Module):
    """One layer's VeRA state: `vera_lambda_d` (r,) and `vera_lambda_b` (out,)."""

    method = "vera"

    def __init__(self, out_features: int, config: VeraConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.r = config.r
        self.basis_key = vera_basis_key(config)
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), config.d_initial, dtype=dtype))
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features, dtype=dtype))
        self.dropout = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor, basis: Basis) -> torch.Tensor:
        """(..., in) -> (..., out): b ⊙ B(d ⊙ A·dropout(x))."""
        h = F.linear(self.dropout(x), basis.down) * self.vera_lambda_d  # (..., r)
        return F.linear(h, basis.up) * self.vera_lambda_b

    def add_delta_(self, out: torch.Tensor, x: torch.Tensor, basis: Basis, sign: float = 1.0) -> None:
        """out += sign·Δ(x) in place; b is folded into B (out×r) and d into the r-wide activations.
        A negative sign undoes a merge (rows not routed to a merged adapter): exact, so never dropped."""
        h = F.linear(self.dropout(x) if sign > 0 else x, basis.down) * self.vera_lambda_d  # (..., r)
        up_b = basis.up * self.vera_lambda_b[:, None]  # (out, r)
        out.view(-1, out.shape[-1]).addmm_(h.view(-1, self.r), up_b.T, alpha=sign)

    def factors(self, basis: Basis) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW = up @ down: up = Λ_b·B (out, r), down = Λ_d·A (r, in)."""
        return basis.up * self.vera_lambda_b[:, None], basis.down * self.vera_lambda_d[:, None]

    def delta_weight(self, basis: Basis) -> torch.Tensor:
        up, down = self.factors(basis)
        return up.float() @ down.float()

    def num_trainable(self) -> int:
        return self.vera_lambda_d.numel() + self.vera_lambda_b.numel()
