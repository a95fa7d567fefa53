"""LoRA (Hu et al., 2021): a trainable low-rank update beside a frozen weight.

    x ──► W ──────────────► (+) ──► y        y = W x + (α/r)·B(A x)
    └──► A (r×in) ─► B (out×r) ─┘           A random, B zero: training starts at the base model

B·A is never formed in the forward pass; `delta_weight` forms it once, for merging. A and B may be kept in a
wider dtype than the activations (float32 on a bf16 base): each call casts them (r-wide, cheap) to x's dtype,
and autograd casts their gradients back.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lorakit.config import LoraConfig


class LoraAdapter(nn.Module):
    """One layer's LoRA state: `lora_A` (r, in) and `lora_B` (out, r)."""

    method = "lora"
    basis_key: str | None = None  # LoRA needs no shared basis

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, dtype: torch.dtype,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.r = config.r
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor, basis: None = None) -> torch.Tensor:
        """(..., in) -> (..., out): (α/r)·B(A·dropout(x))."""
        return F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scaling

    @staticmethod
    def slot_shapes(in_features: int, out_features: int, r: int) -> dict[str, tuple[int, ...]]:
        """One slot of a layer's LoRA stack (lorakit.layer.slots): A (r, in) as nn.Linear holds it (so one adapter's
        GEMM rounds as PEFT's does) and Bᵀ (r, out), the layout CPU baddbmm reads 2.5× faster at decode."""
        return {"a": (r, in_features), "b": (r, out_features)}

    def slot_views(self, slot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Where this adapter's parameters live in one slot (ranks below the stack's are zero-padded)."""
        return {"lora_A": slot["a"][: self.r], "lora_B": slot["b"][: self.r].T}

    def factors(self, basis: None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW = up @ down with up (out, r) and down (r, in): merging never needs a dense ΔW."""
        return self.lora_B * self.scaling, self.lora_A

    def delta_weight(self, basis: None = None) -> torch.Tensor:
        """(out, in): the dense update."""
        up, down = self.factors()
        return up.float() @ down.float()

    def num_trainable(self) -> int:
        return self.lora_A.numel() + self.lora_B.numel()


def add_lora_rows_(out: torch.Tensor, x: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor,
                   coef: torch.Tensor | float) -> None:
    """out += coef_i·(x_i·A_iᵀ)·B_iᵀ for every group i of rows, in place.

    a_rows (n, r, in) and b_rows (n, r, out) are each group's A and Bᵀ (gathered from a slot stack, zero for a
    group without an adapter); `coef` (n,) scales each group (α/r, −1 to take a merged adapter back out, 0
    for nothing), or is one float for all. The batch is split into n equal groups of rows: n = 1 runs one
    adapter over the whole batch (two GEMMs), n = batch rows gives every row its own (bmm). One path."""
    n, dtype = a_rows.shape[0], x.dtype
    x3 = x.reshape(n, -1, x.shape[-1])  # (n, tokens per group, in)
    a_rows, b_rows = a_rows.to(dtype), b_rows.to(dtype)
    if n == 1:  # plain GEMMs (a shape, so fixed for a compiled graph), A applied as PEFT's nn.Linear applies
        # it (F.linear over an (r, in) weight): BLAS then rounds the sums the same way
        h = F.linear(x3[0], a_rows[0])  # (T, r)
        b_rows = b_rows[0]
        out = out.view(-1, out.shape[-1]) if out.is_contiguous() else out
    else:
        h = torch.bmm(x3, a_rows.transpose(1, 2))  # (n, T, r)
    alpha = 1.0
    if isinstance(coef, torch.Tensor):  # per group; r-wide, so cheaper on h than on the output
        h = h.mul_(coef.to(dtype).view(-1, *([1] * (h.dim() - 1))))
    else:  # one adapter for the batch: scaled after the product, as PEFT rounds it
        alpha = coef
    if n == 1 and out.dim() == 2:  # out += h·Bᵀ, fused, no output-sized temporary
        out.addmm_(h, b_rows, alpha=alpha)
    elif out.is_contiguous():  # the same, group by group
        out.view(n, -1, out.shape[-1]).baddbmm_(h, b_rows, alpha=alpha)
    else:
        out.add_(torch.matmul(h, b_rows).reshape(out.shape), alpha=alpha)
