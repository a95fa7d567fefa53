"""LoRA-XS (Bałazy et al., 2024): train only an r×r matrix between frozen SVD factors of W.

    W = U Σ Vᵀ  (W as stored, out×in)       A = Σ_r V_rᵀ (r×in, frozen)    B = U_r (out×r, frozen)
    y = W x + (α/r)·B(R(A x))               R (r×r) is the only trained tensor, initialised near zero

A and B belong to the base model: one `Basis` per layer serves every LoRA-XS adapter of rank ≤ r_max.
Singular vectors are defined up to sign; `svd_basis` fixes it (largest-magnitude entry of each u_i
positive) so a basis recomputed on another machine is the same, and a fingerprint checks that it is.
The triplets come from lorakit.methods.svd (float64 Gram + eigh, batched over same-shape weights).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lorakit.config import LoraXSConfig
from lorakit.methods.basis import Basis, probe_vector
from lorakit.methods.svd import top_singular


def svd_basis(weight: torch.Tensor, r: int) -> Basis:
    """The rank-r LoRA-XS basis of `weight` (out, in), with canonical signs and a fingerprint."""
    return lora_xs_bases([weight], r)[0]


def lora_xs_bases(weights: list[torch.Tensor], r: int) -> list[Basis]:
    """The rank-r bases of many weights (out, in): one batched top-r SVD per (shape, device, dtype) group,
    computed on the weights' device (lorakit.methods.svd); each basis keeps its weight's dtype."""
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault((tuple(w.shape), w.device, w.dtype), []).append(i)
    bases: list[Basis | None] = [None] * len(weights)
    for (_, _, dtype), members in groups.items():
        u, s, vh = top_singular(torch.stack([weights[i].detach() for i in members]), r)  # float64
        for j, i in enumerate(members):
            bases[i] = basis_from_triplets(u[j], s[j], vh[j], dtype)
    return bases  # type: ignore[return-value]


def basis_from_triplets(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, dtype: torch.dtype) -> Basis:
    """A = Σ_r V_rᵀ (r, in), B = U_r (out, r) in `dtype`; fingerprint (2r,) float32 = [s, probe·U_r]."""
    down = (s[:, None] * vh).to(dtype).contiguous()  # (r, in)
    up = u.to(dtype).contiguous()  # (out, r)
    probe = probe_vector(u.shape[0], 1, device=u.device, dtype=u.dtype)  # (out,)
    fingerprint = torch.cat([s, probe @ u]).float()  # singular values + signed projections
    return Basis(down, up, fingerprint)


def basis_residuals(weight: torch.Tensor, basis: Basis) -> tuple[float, float]:
    """How far `basis` is from singular triplets of `weight`, relative to σ₁: W·downᵀ vs up·Σ² and
    upᵀ·W vs down (two thin matmuls: a cheap check that a stored basis belongs to this weight)."""
    w = weight.detach().float()  # (out, in)
    down, up = basis.down.to(w), basis.up.to(w)
    s = basis.fingerprint[: basis.rank].to(w)
    top = s[0].clamp_min(1e-12)
    err_right = ((w @ down.T - up * s**2).abs().max() / top**2).item()  # W·V·Σ = U·Σ²
    err_left = ((up.T @ w - down).abs().max() / top).item()  # Uᵀ·W = Σ·Vᵀ
    return err_right, err_left


def basis_fingerprint(basis: Basis, r: int) -> torch.Tensor:
    """The part of the basis fingerprint that an adapter of rank r depends on: (2r,)."""
    full = basis.fingerprint
    k = basis.rank
    return torch.cat([full[:r], full[k : k + r]])


class LoraXSAdapter(nn.Module):
    """One layer's LoRA-XS state: `lora_R` (r, r); A and B come from the layer's shared basis."""

    method = "lora_xs"
    slot_kind = "lora_xs"
    basis_key = "lora_xs"

    def __init__(self, config: LoraXSConfig, dtype: torch.dtype, device: torch.device | None = None) -> None:
        super().__init__()
        self.r = config.r
        self.scaling = config.scaling
        self.lora_R = nn.Parameter(torch.randn(config.r, config.r, dtype=dtype, device=device) * config.init_std)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor, basis: Basis) -> torch.Tensor:
        """(..., in) -> (..., out): (α/r)·B(R(A·dropout(x)))."""
        down, up = basis.sliced(self.r)
        h = F.linear(self.dropout(x), down.to(x.dtype))  # (..., r)
        return F.linear(F.linear(h, self.lora_R.to(x.dtype)), up.to(x.dtype)) * self.scaling

    @staticmethod
    def slot_shapes(in_features: int, out_features: int, r: int) -> dict[str, tuple[int, ...]]:
        """One slot of a layer's LoRA-XS stack (lorakit.layer.slots): the r×r core, whatever the layer's width."""
        return {"core": (r, r)}

    def slot_views(self, slot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"lora_R": slot["core"][: self.r, : self.r]}

    def factors(self, basis: Basis) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW = up @ down: up = (α/r)·B·R (out, r), down = A (r, in); up in float32 at least (R may be wider than B)."""
        down, up = basis.sliced(self.r)
        wide = torch.promote_types(torch.promote_types(up.dtype, self.lora_R.dtype), torch.float32)
        return (up.to(wide) @ self.lora_R.to(wide)) * self.scaling, down

    def delta_weight(self, basis: Basis) -> torch.Tensor:
        up, down = self.factors(basis)
        return up.float() @ down.float()

    def num_trainable(self) -> int:
        return self.lora_R.numel()
