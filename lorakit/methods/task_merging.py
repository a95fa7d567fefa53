"""Task-vector merging: how several adapters' tensors become one (TIES, DARE, magnitude pruning, plain sums).

Each function takes the adapters' tensors of one kind (every adapter's lora_A of a layer, say), all of one
shape, and one weight per adapter, and returns the combined tensor:

    linear            Σ wᵢ·tᵢ
    magnitude_prune   Σ wᵢ·top_k(|tᵢ|)                 keep the `density` fraction of largest entries
    ties              mean over agreeing signs of wᵢ·top_k(tᵢ), the sign elected from the pruned tᵢ
    dare_linear       Σ wᵢ·(mᵢ⊙tᵢ)/density             mᵢ ~ Bernoulli(density), drawn from torch's generator
    dare_ties         the TIES sign election over the DARE-pruned tensors

The meanings (and the order random masks are drawn in: adapter by adapter, each one full-shaped draw) are
PEFT's `add_weighted_adapter`'s, so a seeded DARE combination gives the same masks in both.
"""

from __future__ import annotations

from typing import Callable

import torch

SIGN_METHODS = ("total", "frequency")  # how TIES elects a sign: by summed value, or by count of signs


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(n, ...) tensors times one weight each."""
    return stacked * weights.to(stacked).view(-1, *([1] * (stacked.dim() - 1)))


def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` with all but its int(density·numel) largest-magnitude entries set to zero."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=keep, largest=True).indices] = 1
    return (flat * mask).reshape(tensor.shape)


def keep_random(tensor: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE's drop-and-rescale: each entry kept with probability `density`, the kept ones divided by it. The
    mask is drawn on `generator`'s device (torch's default generator when None), in the tensor's dtype."""
    if density >= 1:
        return tensor
    device = generator.device if generator is not None else tensor.device
    odds = torch.full(tensor.shape, density, dtype=tensor.dtype, device=device)
    mask = torch.bernoulli(odds, generator=generator).to(tensor.device)
    return tensor * mask / density


def elect_and_average(stacked: torch.Tensor, weighted: torch.Tensor, sign_method: str) -> torch.Tensor:
    """TIES' disjoint merge: per entry, the mean of the weighted values whose sign agrees with the elected one
    (elected from the unweighted `stacked` values: their sum, or the count of each sign)."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked)
    agree = signs == elected  # (n, ...)
    total = (weighted * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1).to(total)


Gen = torch.Generator | None


def linear(tensors: list[torch.Tensor], weights: torch.Tensor, density: float, sign_method: str,
           generator: Gen = None) -> torch.Tensor:
    return _weighted(torch.stack(tensors), weights).sum(dim=0)


def magnitude_prune(tensors: list[torch.Tensor], weights: torch.Tensor, density: float, sign_method: str,
                    generator: Gen = None) -> torch.Tensor:
    return linear([keep_largest(t, density) for t in tensors], weights, density, sign_method)


def ties(tensors: list[torch.Tensor], weights: torch.Tensor, density: float, sign_method: str,
         generator: Gen = None) -> torch.Tensor:
    stacked = torch.stack([keep_largest(t, density) for t in tensors])
    return elect_and_average(stacked, _weighted(stacked, weights), sign_method)


def dare_linear(tensors: list[torch.Tensor], weights: torch.Tensor, density: float, sign_method: str,
                generator: Gen = None) -> torch.Tensor:
    return linear([keep_random(t, density, generator) for t in tensors], weights, density, sign_method)


def dare_ties(tensors: list[torch.Tensor], weights: torch.Tensor, density: float, sign_method: str,
              generator: Gen = None) -> torch.Tensor:
    stacked = torch.stack([keep_random(t, density, generator) for t in tensors])
    return elect_and_average(stacked, _weighted(stacked, weights), sign_method)


Merger = Callable[[list[torch.Tensor], torch.Tensor, float, str, Gen], torch.Tensor]

# The one table of element-wise combinations; the `_svd` forms of lorakit.combine apply these to dense ΔWs.
MERGERS: dict[str, Merger] = {
    "linear": linear,
    "magnitude_prune": magnitude_prune,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
}
NEEDS_DENSITY = frozenset({"magnitude_prune", "ties", "dare_linear", "dare_ties"})


def low_rank(delta: torch.Tensor, rank: int, clamp: float | None = None, full_matrices: bool = True,
             driver: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-`rank` factorisation of `delta` (out, in) from its SVD: up (out, rank) = U·Σ, down (rank, in) = Vᵀ.
    `clamp` (a quantile in (0, 1]) bounds both factors' entries by that quantile of all of them."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    up = u[:, :rank] * s[:rank]  # (out, rank)
    down = vh[:rank]  # (rank, in)
    if clamp is not None:
        bound = torch.quantile(torch.cat([up.reshape(-1), down.reshape(-1)]), clamp)
        up, down = up.clamp(-bound, bound), down.clamp(-bound, bound)
    return up, down
