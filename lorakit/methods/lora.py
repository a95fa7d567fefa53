"""LoRA (Hu et al., 2021): a trainable low-rank update beside a frozen weight.

    x ──► W ──────────────► (+) ──► y        y = W x + (α/r)·B(A x)
    └──► A (r×in) ─► B (out×r) ─┘           A random, B zero: training starts at the base model

B·A is never formed in the forward pass, nor by merging: a merge adds up·down from `factors` ((α/r)·B and A)
into W with one fused addmm (lorakit.layer.linear), so no dense ΔW is ever allocated; `delta_weight` forms the dense
update only for callers that want to look at it. A and B may be kept in a wider dtype than the activations
(float32 on a bf16 base): each call casts them (r-wide, cheap) to x's dtype, and autograd casts their
gradients back.
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
    slot_kind = "lora"
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
        GEMM rounds as PEFT's does) and Bᵀ (r, out), so that CPU baddbmm reads each row of it contiguously."""
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
