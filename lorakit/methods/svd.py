"""Top-r singular triplets of many matrices at once, exact to float64 rounding and much cheaper than SVDs.

    W (out, in), m = min(out, in).  The m×m Gram matrix of the smaller side carries the same spectrum:
      out ≤ in:  G = W·Wᵀ = U Σ² Uᵀ   ->  U_r from eigh(G);  Σ_r V_rᵀ = U_rᵀ·W      (no division)
      in < out:  G = Wᵀ·W = V Σ² Vᵀ   ->  V_r from eigh(G);  U_r = W·V_r / Σ_r

Why not torch.linalg.svd: a full SVD computes all m triplets of the big side; LoRA-XS needs r of them.
Squaring W squares its condition number, so G and eigh run in float64: the top-r vectors then carry
errors of about 1e-16·s₁²/(s_r² − s_{r+1}²), far below the float32 SVD they replace. Matrices of one
shape are stacked and go through one batched matmul and one batched eigh, on the weights' own device.
"""

from __future__ import annotations

import torch

# Largest float64 stack (bytes) built at once: a 1.1B model's 22 gate projections are 2 GB in float64.
CHUNK_BYTES = 1 << 30


def top_singular(weights: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, out, in) -> u (B, out, r), s (B, r), vh (B, r, in): the top r triplets, float64, s descending.

    Signs are canonical: the largest-magnitude entry of each column of u is positive (ties: first).
    """
    if weights.dim() != 3:
        raise ValueError(f"top_singular expects a (B, out, in) stack, got shape {tuple(weights.shape)}")
    b, out_f, in_f = weights.shape
    if not 1 <= r <= min(out_f, in_f):
        raise ValueError(f"rank r={r} must be in 1..min(out, in)={min(out_f, in_f)}")
    per = max(1, CHUNK_BYTES // max(1, out_f * in_f * 8))
    parts = [_top_singular_chunk(weights[i:i + per], r) for i in range(0, b, per)]
    u, s, vh = (torch.cat(p) for p in zip(*parts))
    return canonical_signs(u, s, vh)


def _top_singular_chunk(weights: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = weights.detach().to(torch.float64)  # (B, out, in)
    if w.shape[1] <= w.shape[2]:
        _, vecs = torch.linalg.eigh(w @ w.mT)  # (B, out, out), eigenvalues ascending
        u = vecs[..., -r:].flip(-1)  # (B, out, r)
        vh_scaled = u.mT @ w  # Σ_r·V_rᵀ, (B, r, in)
        s = vh_scaled.norm(dim=-1)  # (B, r)
        vh = vh_scaled / s.clamp_min(torch.finfo(torch.float64).tiny)[..., None]
    else:
        _, vecs = torch.linalg.eigh(w.mT @ w)  # (B, in, in)
        v = vecs[..., -r:].flip(-1)  # (B, in, r)
        u_scaled = w @ v  # U_r·Σ_r, (B, out, r)
        s = u_scaled.norm(dim=-2)  # (B, r)
        u = u_scaled / s.clamp_min(torch.finfo(torch.float64).tiny)[..., None, :]
        vh = v.mT
    # eigh orders by σ² computed from G; re-sort by the directly measured σ (they agree except in ties)
    order = s.argsort(dim=-1, descending=True)  # (B, r)
    s = s.gather(-1, order)
    u = u.gather(-1, order[:, None, :].expand_as(u))
    vh = vh.gather(-2, order[:, :, None].expand_as(vh))
    return u, s, vh


def canonical_signs(u: torch.Tensor, s: torch.Tensor,
                    vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flip each (u_i, v_i) pair so that u_i's largest-magnitude entry is positive: a basis recomputed
    anywhere, by any method, is then the same one."""
    pivot = u.abs().argmax(dim=-2, keepdim=True)  # (B, 1, r)
    signs = torch.sign(u.gather(-2, pivot))  # (B, 1, r)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, s, vh * signs.mT
