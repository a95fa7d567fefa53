"""LoRA on an embedding table: a low-rank update of the rows the ids pick.

    ids ──► E (V×D) ─────────────────────► (+) ──► y      y = E[ids] + (α/r)·Aᵀ[ids]·Bᵀ
    └──► Aᵀ (V×r), its rows for ids ─► Bᵀ (r×D) ─┘        A zero, B normal: training starts at the base

The same factors as a linear LoRA read with a one-hot input of width V: `lora_A` (r, V) and `lora_B` (D, r),
the shapes PEFT stores as `lora_embedding_A` / `lora_embedding_B`, so slot stacks, merging (ΔEᵀ = B·A) and
files treat it as a LoRA adapter of a V -> D layer. Only the init differs (PEFT's for embeddings: A zeros,
B standard normal), and there is no dropout (PEFT applies none to embedding targets).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lorakit.config import LoraConfig
from lorakit.methods.lora import LoraAdapter


class EmbeddingLoraAdapter(LoraAdapter):
    """One embedding table's LoRA state: `lora_A` (r, num_embeddings) and `lora_B` (embedding_dim, r)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, config: LoraConfig, dtype: torch.dtype,
                 device: torch.device | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, config, dtype, device)
        with torch.no_grad():
            self.lora_A.zero_()
            self.lora_B.normal_()
        self.dropout = nn.Identity()

    def delta(self, x: torch.Tensor, basis: None = None) -> torch.Tensor:
        """(...) long ids -> (..., D): (α/r)·Aᵀ[ids]·Bᵀ."""
        h = F.embedding(x, self.lora_A.T)  # (..., r)
        return (h @ self.lora_B.T) * self.scaling
