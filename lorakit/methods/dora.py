"""DoRA (Liu et al., 2024): LoRA's update for the direction, plus a trained magnitude per output row.

    W' = W + s·B·A                  the direction: LoRA as usual (A random, B zero, s = α/r)
    g  = m / ‖W'‖_row               (out,): m trained, initialised to ‖W‖_row, so g = 1 at the start
    y  = g ⊙ (W x + s·B(A x)) + b
       = base(x) + (g − 1) ⊙ (base(x) − b) + g ⊙ s·B(A x)        B·A is never formed on the hot path

‖W'‖ is a constant for gradients (the paper's §4.3, as PEFT does): m gets the gradient of the scale, A and B
only that of the direction. The norm needs the dense W' once per forward in training; in inference g is a
function of frozen weights, which the layer keeps per slot (lorakit.layer.deltas). Dropout applies to the LoRA
input only: the rescaled base term sees x itself. DoRA's merge is not W + s·B·A but diag(g)·(W + s·B·A).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lorakit.config import LoraConfig


def row_norm(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """(out,) float32, no gradient: ‖W + up·down‖₂ of each output row; W (out, in), up (out, r), down (r, in)."""
    with torch.no_grad():
        dense = weight.detach().float() + up.detach().float() @ down.detach().float()  # (out, in)
        return torch.linalg.vector_norm(dense, dim=1).clamp_min(torch.finfo(torch.float32).tiny)


def gain_minus_one(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   magnitude: torch.Tensor) -> torch.Tensor:
    """(out,) float32: g − 1 = m / ‖W + up·down‖ − 1 (0 at the start); differentiable in m."""
    return magnitude.float() / row_norm(weight, up, down) - 1.0


class DoraAdapter(nn.Module):
    """One layer's DoRA state: `lora_A` (r, in), `lora_B` (out, r) and `lora_magnitude_vector` (out,)."""

    method = "dora"
    basis_key: str | None = None  # no shared basis
    slot_kind = "dora"  # its own slot stacks: LoRA's fields plus the magnitude (lorakit.layer.slots)

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, weight: torch.Tensor,
                 dtype: torch.dtype, device: torch.device | None = None) -> None:
        """`weight` (out, in): the layer's base weight, dense and unmerged; m starts at ‖W + s·B·A‖ = ‖W‖."""
        super().__init__()
        self.r = config.r
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as LoRA
        up, down = self.factors()
        self.lora_magnitude_vector = nn.Parameter(row_norm(weight.to(device), up, down).to(dtype))
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out): what DoRA adds to base(x), (g − 1) ⊙ W x + g ⊙ s·B(A·dropout(x)); the
        reference the routed path (lorakit.layer.deltas) is tested against. `weight` (out, in) as in __init__."""
        g = (gain_minus_one(weight, *self.factors(), self.lora_magnitude_vector) + 1).to(x.dtype)
        lora = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scaling
        return (g - 1) * F.linear(x, weight.to(x.dtype)) + g * lora

    @staticmethod
    def slot_shapes(in_features: int, out_features: int, r: int) -> dict[str, tuple[int, ...]]:
        """One slot of a layer's DoRA stack: LoRA's A (r, in) and Bᵀ (r, out), and the magnitude (out,)."""
        return {"a": (r, in_features), "b": (r, out_features), "m": (out_features,)}

    def slot_views(self, slot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"lora_A": slot["a"][: self.r], "lora_B": slot["b"][: self.r].T, "lora_magnitude_vector": slot["m"]}

    def factors(self, basis: None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The direction's low-rank update s·B·A as up (out, r) @ down (r, in); DoRA's whole update is not
        low-rank (merged_weight)."""
        return self.lora_B * self.scaling, self.lora_A

    def gain(self, weight: torch.Tensor) -> torch.Tensor:
        """(out,) float32: g = m / ‖W + s·B·A‖ for the base `weight` (out, in)."""
        return gain_minus_one(weight, *self.factors(), self.lora_magnitude_vector) + 1

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """(out, in) float32: diag(g)·(W + s·B·A), what merging puts in place of `weight` (out, in)."""
        up, down = self.factors()
        with torch.no_grad():
            dense = weight.float() + up.detach().float() @ down.detach().float()
            return self.gain(weight).detach()[:, None] * dense

    def num_trainable(self) -> int:
        return self.lora_A.numel() + self.lora_B.numel() + self.lora_magnitude_vector.numel()
