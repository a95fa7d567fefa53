"""Prefix tuning (Li & Liang, 2021): trained keys and values in front of every attention layer's own.

    layer l attends over [P_k(l) ; K(x)] and [P_v(l) ; V(x)]      P: (T virtual tokens) per layer, per kv head
    no linear layer changes; the model's tokens follow the prefix (their positions start at T)

The prefix is stored flat, as PEFT stores it: `embedding` (T, L·2·H·D), entry ((l·2 + kv)·H + h)·D + d
(kv 0 = key, 1 = value; H = key/value heads, so grouped-query models store only their kv heads).
With `prefix_projection`, training goes through a reparameterisation MLP instead,

    flat = W₂·tanh(W₁·E + b₁) + b₂       E: (T, H·D) trained, W₁: (hidden, H·D), W₂: (L·2·H·D, hidden)

which smooths optimisation; its output is all that inference needs, so saving folds it into `flat`.
Injecting the prefixes into a model's attention is lorakit.model.prefix_hook's job; this module is the math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.config import PrefixConfig
from lorakit.errors import PrefixLengthError, PrefixMismatchError, UnsupportedLayerError


@dataclass(frozen=True)
class PrefixShape:
    """The attention geometry a prefix must fit."""

    num_layers: int  # attention layers
    num_kv_heads: int  # key/value heads per layer (fewer than query heads with grouped-query attention)
    head_dim: int  # size of one head's key / value
    max_positions: int | None  # the model's context (max_position_embeddings / n_positions)

    @property
    def token_dim(self) -> int:
        """Width of one virtual token's key (or value) in one layer: H·D."""
        return self.num_kv_heads * self.head_dim

    @property
    def flat_dim(self) -> int:
        """Width of one virtual token over all layers, keys and values: L·2·H·D."""
        return self.num_layers * 2 * self.token_dim

    def describe(self) -> str:
        return f"{self.num_layers} layers, {self.num_kv_heads} key/value heads of size {self.head_dim}"


def _first(config: object, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def prefix_shape(model: nn.Module) -> PrefixShape:
    """Read the attention geometry from a transformers model's config (decoder or encoder)."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedLayerError(f"{type(model).__name__} has no transformers config: prefix tuning needs a "
                                    "transformers attention model (SmolLM2/Llama, GPT-2, BERT/MiniLM...)")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedLayerError(f"{type(model).__name__} is an encoder-decoder model; lorakit's prefix tuning "
                                    "supports decoder-only and encoder-only models")
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(config, "num_attention_heads", "n_head", "num_heads")
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    if layers is None or heads is None or hidden is None:
        raise UnsupportedLayerError(f"cannot read layers/heads/hidden size from {type(config).__name__}")
    kv_heads = _first(config, "num_key_value_heads") or heads
    head_dim = _first(config, "head_dim") or hidden // heads
    return PrefixShape(layers, kv_heads, head_dim, _first(config, "max_position_embeddings", "n_positions"))


def check_fits(config: PrefixConfig, shape: PrefixShape, where: str) -> None:
    """A prefix must leave room in the context for at least one real token."""
    if shape.max_positions is not None and config.num_virtual_tokens >= shape.max_positions:
        raise PrefixLengthError(f"{where}: a prefix of {config.num_virtual_tokens} virtual tokens does not fit the "
                                f"model's context of {shape.max_positions} positions")


def check_same_shape(expected: PrefixShape, found: PrefixShape, where: str) -> None:
    """A prefix adapter for another architecture (layers, heads, head size) is refused, naming what differs."""
    diffs = [f"{label} {a} vs the model's {b}" for label, a, b in (
        ("layers", found.num_layers, expected.num_layers),
        ("key/value heads", found.num_kv_heads, expected.num_kv_heads),
        ("head size", found.head_dim, expected.head_dim)) if a != b]
    if diffs:
        raise PrefixMismatchError(f"{where}: the prefix adapter was made for another architecture: "
                                  f"{'; '.join(diffs)} ({expected.describe()} expected)")


class PrefixAdapter(nn.Module):
    """One prefix adapter: `embedding` (T, L·2·H·D), or (projection) `embedding` (T, H·D) + `transform` MLP."""

    method = "prefix"

    def __init__(self, config: PrefixConfig, shape: PrefixShape, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.shape = shape
        self.num_virtual_tokens = config.num_virtual_tokens
        where = {"dtype": dtype, "device": device}  # the caller's (lorakit.config.adapter_dtype of the base)
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or shape.token_dim
            self.embedding = nn.Embedding(config.num_virtual_tokens, shape.token_dim, **where)
            self.transform = nn.Sequential(nn.Linear(shape.token_dim, hidden, **where), nn.Tanh(),
                                           nn.Linear(hidden, shape.flat_dim, **where))
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, shape.flat_dim, **where)  # N(0, 1), as PEFT
            self.transform = None

    def flat(self) -> torch.Tensor:
        """(T, L·2·H·D): the prefix as PEFT stores it (the MLP's output when reparameterised)."""
        e = self.embedding.weight  # (T, H·D) or (T, L·2·H·D)
        return self.transform(e) if self.transform is not None else e

    def key_values(self) -> torch.Tensor:
        """(L, 2, H, T, D): per layer, the keys (index 0) and values (index 1) in the cache's layout."""
        s = self.shape
        flat = self.flat().view(self.num_virtual_tokens, s.num_layers, 2, s.num_kv_heads, s.head_dim)
        return flat.permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def fold_(self) -> None:
        """Replace the MLP by its output: same prefix, no MLP at inference (what saving writes)."""
        if self.transform is None:
            return
        flat = self.flat().detach().clone()  # (T, L·2·H·D)
        trainable = self.embedding.weight.requires_grad
        self.embedding = nn.Embedding(self.num_virtual_tokens, self.shape.flat_dim,
                                      dtype=flat.dtype, device=flat.device)
        self.embedding.weight.copy_(flat)
        self.embedding.weight.requires_grad_(trainable)
        self.transform = None

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())
