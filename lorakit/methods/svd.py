"""Top-r singular triplets of many matrices at once, exact to float64 rounding and much cheaper than SVDs.

    W (out, in), m = min(out, in).  The m×m Gram matrix of the smaller side carries the same spectrum:
      out ≤ in:  G = W·Wᵀ = U Σ² Uᵀ   ->  U_r from eigh(G);  Σ_r V_rᵀ = U_rᵀ·W      (no division)
      in < out:  G = Wᵀ·W = V Σ² Vᵀ   ->  V_r from eigh(G);  U_r = W·V_r / Σ_r

Why not torch.linalg.svd: a full SVD computes all m triplets of the big side; LoRA-XS needs r of them.
On a GPU, large Gram matrices skip the (latency-bound) full eigh: see top_eigenvectors.
Squaring W squares its condition number, so G and eigh run in float64: the top-r vectors then carry
errors of about 1e-16·s₁²/(s_r² − s_{r+1}²), far below the float32 SVD they replace. Matrices of one
shape are stacked and go through one batched matmul and one batched eigh, on the weights' own device.
"""

from __future__ import annotations

import torch

# Largest float64 stack (bytes) built at once: a 1.1B model's 22 gate projections are 2 GB in float64.
CHUNK_BYTES = 1 << 30
# Gram matrices at least this big, on an accelerator, use block subspace iteration first (see
# top_eigenvectors). Not on the CPU: there LAPACK's eigh was 2x faster than iterating (SmolLM2, 1 thread).
ITERATE_MIN_N = 1024
ITERATE_ON_CPU = False
ROUND = 16  # G·Q products between convergence checks
MAX_ROUNDS = 24
RESIDUAL_TOL = 1e-11  # ‖G·x − θ·x‖ / θ₁ of every wanted Ritz pair; eigh reaches ~1e-15


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
        u = top_eigenvectors(w @ w.mT, r)  # (B, out, r)
        vh_scaled = u.mT @ w  # Σ_r·V_rᵀ, (B, r, in)
        s = vh_scaled.norm(dim=-1)  # (B, r)
        vh = vh_scaled / s.clamp_min(torch.finfo(torch.float64).tiny)[..., None]
    else:
        v = top_eigenvectors(w.mT @ w, r)  # (B, in, r)
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


def top_eigenvectors(g: torch.Tensor, r: int) -> torch.Tensor:
    """(B, n, n) symmetric PSD float64 -> its top-r eigenvectors (B, n, r), largest first.

    Small n, or on the CPU: one batched eigh. Large n on a GPU (eigh of a 2048² matrix takes ~28 ms on an
    H100 whatever the batch: it is latency-bound): block subspace iteration on m = 2r+16 columns, orthonormalized by Cholesky-QR
    (matmuls only), with a Rayleigh-Ritz step every ROUND products. A matrix is accepted only when every
    wanted Ritz pair has a residual ≤ RESIDUAL_TOL·θ₁ (so each vector is as exact as eigh's up to
    RESIDUAL_TOL·θ₁/gap); the rest, if any, fall back to eigh.
    """
    n = g.shape[-1]
    m = 2 * r + 16
    if n < ITERATE_MIN_N or 4 * m > n or (g.device.type == "cpu" and not ITERATE_ON_CPU):
        return eigh_top(g, r)
    try:
        return _subspace_iteration(g, r, m)
    except torch.linalg.LinAlgError:  # a block lost rank (W of rank < m): the direct way
        return eigh_top(g, r)


def _subspace_iteration(g: torch.Tensor, r: int, m: int) -> torch.Tensor:
    n = g.shape[-1]
    i = torch.arange(n, dtype=g.dtype, device=g.device)[:, None]
    j = torch.arange(m, dtype=g.dtype, device=g.device)
    q = _orthonormal(g @ torch.cos(0.618 * i * (j + 1) + 0.5))  # (B, n, m), a fixed, deterministic start
    out = torch.empty(*g.shape[:-1], r, dtype=g.dtype, device=g.device)
    todo = torch.arange(g.shape[0], device=g.device)
    active = g
    for _ in range(MAX_ROUNDS):
        for _ in range(ROUND):
            q = _orthonormal(active @ q)
        t = (q.mT @ active @ q).cpu()  # (b, m, m): Rayleigh-Ritz, tiny, on the CPU
        theta, y = torch.linalg.eigh(t)
        theta, y = theta[..., -r:].flip(-1).to(g.device), y[..., -r:].flip(-1).to(g.device)
        x = q @ y  # (b, n, r) Ritz vectors
        residual = (active @ x - x * theta[:, None, :]).norm(dim=-2).amax(-1) / theta[:, 0].clamp_min(1e-300)
        done = residual <= RESIDUAL_TOL  # NaN: not done
        out[todo[done]] = x[done]
        if bool(done.all()):
            return out
        if bool(done.any()):
            todo, q, active = todo[~done], q[~done], active[~done]
    out[todo] = eigh_top(active, r)  # not converged (clustered spectrum)
    return out


def eigh_top(g: torch.Tensor, r: int) -> torch.Tensor:
    """The direct way: a full batched eigh (ascending), its last r vectors, largest first."""
    return torch.linalg.eigh(g)[1][..., -r:].flip(-1)


def _orthonormal(z: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning z (B, n, m) by Cholesky-QR twice (the second pass restores
    orthogonality lost to cond(z)²); matmuls and an m×m Cholesky only."""
    for _ in range(2):
        chol = torch.linalg.cholesky(z.mT @ z)  # (B, m, m)
        z = torch.linalg.solve_triangular(chol, z.mT, upper=False).mT
    return z


def canonical_signs(u: torch.Tensor, s: torch.Tensor,
                    vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flip each (u_i, v_i) pair so that u_i's largest-magnitude entry is positive: a basis recomputed
    anywhere, by any method, is then the same one."""
    pivot = u.abs().argmax(dim=-2, keepdim=True)  # (B, 1, r)
    signs = torch.sign(u.gather(-2, pivot))  # (B, 1, r)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, s, vh * signs.mT
