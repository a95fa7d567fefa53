"""`AdaptedEmbedding`: a frozen nn.Embedding plus named LoRA adapters, routed per call like AdaptedLinear.

An embedding lookup is a linear layer over a one-hot input of width V = num_embeddings, so this layer is an
AdaptedLinear of a V -> D layer whose weight is stored transposed (the table E is (V, D), Conv1D's
(in, out) layout): slot numbers, slot stacks, merge records, `model.to(...)`, saving and deleting are the
linear layer's own. What differs is the input (long ids, never cast) and the delta, which gathers the
picked columns of A instead of multiplying by one-hot rows (lorakit.methods.lora_embedding). The base
table keeps its key (`model.embed_tokens.weight`), and a tied output head keeps sharing it.

Only plain nn.Embedding tables with LoRA: max_norm renormalises the table in place during the lookup,
sparse and scale_grad_by_freq change its gradients, and subclasses (scaled embeddings) change the forward;
each is refused by name rather than half-supported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lorakit.layer.deltas import routed_source, uses_parameters
from lorakit.config import AdapterConfig, LoraConfig
from lorakit.kernels.backend import KERNELS
from lorakit.errors import UnsupportedLayerError
from lorakit.layer.linear import AdaptedLinear
from lorakit.routing.resolve import RouteSlots


class AdaptedEmbedding(AdaptedLinear):
    """An embedding table whose lookups add the routed LoRA adapters' deltas."""

    wraps_linear = False

    def __init__(self, base: nn.Embedding, module_name: str, registry: Any) -> None:
        check_embedding(base, module_name)
        super().__init__(base, module_name, registry)
        self.fan_in_fan_out = True  # E is (V, D): (in, out) of the one-hot view, so merges add ΔWᵀ
        self.in_features, self.out_features = base.weight.shape
        self.padding_idx = base.padding_idx

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.in_features}, embedding_dim={self.out_features}, "
                f"adapters={list(self.adapters)}, merged={self.merged_names()}")

    def base_forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)

    def delta(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Δ_name(ids) alone, (..., D)."""
        out = self.weight.new_zeros(*ids.shape, self.out_features)
        if self.has(name):
            out = self.add_deltas(ids, out, self.resolved(name, {}, ids.device, merged=()), {})
        return out

    def add_deltas(self, ids: torch.Tensor, out: torch.Tensor, route: RouteSlots,
                   cache: dict | None) -> torch.Tensor:
        """out + the route's LoRA deltas for these ids, and merged adapters taken back out of rows not
        routed to them; the same sources as the linear layers (slot stacks, or parameters when training)."""
        per_call = uses_parameters(self, cache)
        if per_call and out._base is not None:  # autograd forbids in-place adds through a view
            out = out.clone()
        for rows in route.kinds.get("lora", ()):  # attach refuses every other kind on an embedding
            if cache is not None and route.groups == 1 and rows.lead not in self.adapters:
                continue  # one adapter for the batch, and it does not touch this table
            source = routed_source(self, "lora", rows, per_call, cache, out)
            if source is None:
                continue
            fields, scales, index, _ = source  # no dropout on embeddings (as PEFT)
            if cache is not None and route.groups == 1:  # one adapter for the batch: a float scale, as PEFT
                coef: torch.Tensor | float = self.adapters[rows.lead].scaling * rows.lead_weight
            else:
                coef = scales.index_select(0, index)
                if rows.weights is not None:
                    coef = coef * rows.weights.to(coef)
            KERNELS.embedding_rows(out, ids, fields["a"], fields["b"], index, coef, self.padding_idx)
        for name, coef in route.merged.items():  # rows not routed to a merged adapter must not see it
            recorded = self.merged_factors(name)
            if recorded is not None:
                up, down = recorded  # (D, r) scaled, (r, V)
                zero = torch.zeros(coef.shape[0], dtype=torch.long, device=ids.device)
                KERNELS.embedding_rows(out, ids, down[None], up.T[None], zero, coef)
        return out

    def to_plain(self, full_precision: bool = False) -> nn.Module:
        """A plain nn.Embedding holding this table's (possibly merged) weight: the same Parameter, so a tie
        to the output head survives."""
        plain = nn.Embedding(self.in_features, self.out_features, padding_idx=self.padding_idx, device="meta")
        plain.weight = self.weight
        return plain


def is_embedding(module: nn.Module) -> bool:
    """An embedding table adapters can be put on (checked further by `check_embedding`)."""
    return isinstance(module, (nn.Embedding, AdaptedEmbedding))


def check_embedding(module: nn.Module, name: str, config: AdapterConfig | None = None) -> None:
    """Raise UnsupportedLayerError unless `module` is an embedding table lorakit can adapt with `config`."""
    if isinstance(module, AdaptedEmbedding):
        table = module
    else:
        if type(module) is not nn.Embedding:
            raise UnsupportedLayerError(f"cannot adapt {name} ({type(module).__name__}): only plain nn.Embedding "
                                        "tables are supported (a subclass may change the lookup)")
        refused = [f for f in ("max_norm", "sparse", "scale_grad_by_freq") if getattr(module, f)]
        if refused:
            raise UnsupportedLayerError(f"cannot adapt embedding {name}: it sets {refused}, which LoRA on "
                                        "embeddings does not support")
        table = None
    if config is not None and not isinstance(config, LoraConfig):
        raise UnsupportedLayerError(f"cannot put a {config.method} adapter on embedding {name}"
                                    f"{' (already adapted)' if table is not None else ''}: only LoRA adapts "
                                    "embedding tables")


def adapted_layer(module: nn.Module, name: str, registry: Any) -> AdaptedLinear:
    """The adapted layer that takes over `module`: AdaptedEmbedding for a table, else AdaptedLinear."""
    if isinstance(module, nn.Embedding):
        return AdaptedEmbedding(module, name, registry)
    return AdaptedLinear(module, name, registry)
