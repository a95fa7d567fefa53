"""`trainable_token_indices`: new values for a few rows of an embedding (new or retrained tokens), per adapter.

    embed_tokens                          TokenLayer: embed_tokens.weight stays the base's key, frozen
    embed_tokens.trainable_tokens_delta   {adapter: (n_tokens, dim)}, the rows' new values (PEFT's name:
                                          "delta" holds the values themselves, initialised to the current rows)
    embed_tokens.token_indices            {adapter: (n_tokens,)} the token ids, non-persistent

    embedding:  out[t] = values[ids[t]] where ids[t] is one of the adapter's tokens, else W[ids[t]]
    tied head:  logits[..., id] = x · values[id]ᵀ for the adapter's ids (the head shares W with the embedding)

When the output head is tied to the input embedding, the head is wrapped too and reads the embedding's rows,
so the new tokens are scored with their new vectors (what PEFT does). Merging writes the rows into W and
records the rows it overwrote; unmerging writes them back. Routes pick the adapter per call or per row.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.config import TokenIndices, adapter_dtype
from lorakit.errors import AdapterConfigError, MergeStateError, NonFiniteAdapterError, TargetNotFoundError
from lorakit.routing.context import AS_STORED
from lorakit.layer.surgery import matches, replace_module
from lorakit.layer.wrapped import WholeModuleWrapper, by_rows, route_names, row_keys

Rows = list[tuple[torch.Tensor, torch.Tensor]]  # (ids (n,), values (n, dim)) written in order, later ones win


class TokenLayer(WholeModuleWrapper):
    """An nn.Embedding (or the linear output head tied to it) with per-adapter replacement rows."""

    def __init__(self, original: nn.Module, module_name: str, registry: Any, source: "TokenLayer | None" = None):
        """`source`: for a tied output head, the embedding's TokenLayer, whose rows it reads."""
        super().__init__(original, reserved=("trainable_tokens_delta", "token_indices", "merged_rows"))
        self.module_name = module_name
        self.is_head = source is not None
        if source is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.token_indices = nn.Module()  # buffers: they move with .to()
            self.merged_rows = nn.Module()  # what merging overwrote, per adapter
        object.__setattr__(self, "source", source if source is not None else self)
        object.__setattr__(self, "registry", registry)

    def extra_repr(self) -> str:
        return f"tied_head={self.is_head}, adapters={list(self.source.trainable_tokens_delta)}"

    # -- the rows --------------------------------------------------------------------------------
    def add(self, name: str, ids: tuple[int, ...], dtype: torch.dtype) -> None:
        weight = self.weight
        index = torch.tensor(ids, dtype=torch.long, device=weight.device)
        self.token_indices.register_buffer(name, index, persistent=False)
        self.trainable_tokens_delta[name] = nn.Parameter(weight.detach()[index].to(dtype).clone())  # (n, dim)

    def remove(self, name: str) -> None:
        del self.trainable_tokens_delta[name]
        self.token_indices._buffers.pop(name)

    def names(self) -> list[str]:
        return list(self.source.trainable_tokens_delta)

    def ids(self, name: str) -> torch.Tensor:
        return self.source.token_indices._buffers[name]

    def rows_for(self, key: str | None) -> Rows:
        """The rows that differ from W as stored for a call routed to `key`: merged adapters' old rows back
        (unless `key` is the merged one), then `key`'s own values."""
        source, rows = self.source, []
        for merged in self.registry.merged:
            if merged != key and merged in source.merged_rows._buffers:
                rows.append((source.ids(merged), source.merged_rows._buffers[merged]))
        if key is not None and key not in self.registry.merged:
            rows.append((source.ids(key), source.trainable_tokens_delta[key]))
        return rows

    # -- forward ---------------------------------------------------------------------------------
    def key_of(self, name: str | None) -> str | None:
        return name if name is not None and name in self.source.trainable_tokens_delta else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.original_module(x)
        keys = row_keys(route_names(self.registry, self.module_name), self.key_of, self.module_name, "trainable tokens")
        if keys is AS_STORED:
            return out
        if not isinstance(keys, tuple):
            return self.replaced(keys, x, out)
        rows = torch.arange(x.shape[0], device=x.device)  # embedding ids (B, T) or head input (B, T, dim)
        return by_rows(keys, rows, lambda key, r: self.replaced(key, x[r], out[r]), self.module_name)

    def replaced(self, key: str | None, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for ids, values in self.rows_for(key):
            values = values.to(out.dtype)
            if self.is_head:  # x (..., dim) -> the ids' logits recomputed with their rows
                out = out.index_copy(-1, ids, x.to(out.dtype) @ values.T)  # (..., n) into (..., vocab)
            else:  # x: token ids (...)
                lookup = torch.full((self.weight.shape[0],), -1, dtype=torch.long, device=x.device)
                lookup[ids] = torch.arange(ids.numel(), device=x.device)
                at = lookup[x]  # (...): position in `ids`, -1 for other tokens
                out = torch.where((at >= 0)[..., None], values[at.clamp(min=0)], out)
        return out

    # -- merging -----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W[ids] = values, remembering the rows overwritten (the head shares W: nothing to do there)."""
        if self.is_head:
            return
        ids, weight = self.ids(name), self.weight
        self.merged_rows.register_buffer(name, weight[ids].clone(), persistent=False)
        weight.index_copy_(0, ids, self.trainable_tokens_delta[name].detach().to(weight.dtype))

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if self.is_head:
            return
        self.weight.index_copy_(0, self.ids(name), self.merged_rows._buffers.pop(name))


# -------------------------------------------------------------------------- attach / delete / unload

def token_layers(model: nn.Module) -> dict[str, TokenLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TokenLayer)}


def _plain_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward


def plan_tokens(model: nn.Module, indices: TokenIndices, name: str,
                lora_targets: list[str]) -> list[tuple[str, tuple[int, ...], str | None]]:
    """(embedding, ids, tied head or None) for each module `indices` names, all checked before any change."""
    if indices is None:
        return []
    modules = dict(model.named_modules())
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed_name = next((n for n, m in modules.items() if m is embed), None)
    if isinstance(indices[0], int):
        if embed_name is None:
            raise TargetNotFoundError(f"trainable_token_indices: {type(model).__name__} has no input embedding "
                                      "(get_input_embeddings); give {module name: ids}")
        wanted = [(embed_name, indices)]
    else:
        wanted = []
        for pattern, ids in indices:
            inside = tuple(f"{t}." for t in token_layers(model))
            found = [n for n in modules if n and matches(n, pattern) and not n.startswith(inside)]
            if len(found) != 1:
                raise TargetNotFoundError(f"trainable_token_indices: {pattern!r} names {len(found)} modules of "
                                          f"{type(model).__name__} ({found[:3]}); name one embedding")
            wanted.append((found[0], ids))
    plan = []
    for module_name, ids in wanted:
        module = modules[module_name]
        base = module.original_module if isinstance(module, TokenLayer) else module
        if not _plain_embedding(base):
            raise AdapterConfigError(f"trainable_token_indices: {module_name} is a {type(module).__name__}, not a "
                                     "plain nn.Embedding (LoRA on an embedding and trainable tokens on the same "
                                     "module are not supported together)")
        if max(ids) >= base.num_embeddings:
            raise AdapterConfigError(f"trainable_token_indices: token id {max(ids)} is out of range for "
                                     f"{module_name} ({base.num_embeddings} rows)")
        if module_name in lora_targets:
            raise AdapterConfigError(f"{module_name} is both a LoRA target and has trainable tokens")
        tied = None
        if module is embed and head is not None and getattr(head, "weight", None) is base.weight:
            tied = next(n for n, m in modules.items() if m is head)
            head_base = head.original_module if isinstance(head, TokenLayer) else head
            if type(head_base) is not nn.Linear or head_base.bias is not None or tied in lora_targets:
                raise AdapterConfigError(f"trainable_token_indices: the output head {tied} is tied to {module_name} "
                                         f"but is a {type(head).__name__} (bias: {head_base.bias is not None}, LoRA "
                                         f"target: {tied in lora_targets}); only a plain bias-free nn.Linear head "
                                         "is supported")
        plan.append((module_name, tuple(ids), tied))
    return plan


def install_tokens(model: nn.Module, plan: list[tuple[str, tuple[int, ...], str | None]], name: str,
                   registry: Any, autocast_adapter_dtype: bool) -> None:
    for module_name, ids, tied in plan:
        layer = model.get_submodule(module_name)
        if not isinstance(layer, TokenLayer):
            layer = TokenLayer(layer, module_name, registry)
            replace_module(model, module_name, layer)
        layer.add(name, ids, adapter_dtype(layer.weight.dtype, autocast_adapter_dtype))
        if tied is not None and not isinstance(model.get_submodule(tied), TokenLayer):
            replace_module(model, tied, TokenLayer(model.get_submodule(tied), tied, registry, source=layer))


def delta_parameters(layer: TokenLayer) -> dict[str, list[nn.Parameter]]:
    """Adapter name -> its replacement rows in `layer`; none in a tied head, which reads its embedding's."""
    return {} if layer.is_head else {name: [delta] for name, delta in layer.trainable_tokens_delta.items()}


def token_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """'<embedding>.trainable_tokens_delta' -> (n, dim) and '<embedding>.token_indices' -> (n,)."""
    state = {}
    for n, m in token_layers(model).items():
        if not m.is_head and name in m.trainable_tokens_delta:
            state[f"{n}.trainable_tokens_delta"] = m.trainable_tokens_delta[name].detach()
    return state


def remove_tokens(model: nn.Module, name: str) -> None:
    layers = token_layers(model)
    for n, m in layers.items():
        if not m.is_head and name in m.trainable_tokens_delta:
            m.remove(name)
    for n, m in layers.items():  # heads first see their source emptied
        if not m.source.trainable_tokens_delta:
            replace_module(model, n, m.original_module)


def check_merge_tokens(model: nn.Module, name: str, merged: list[str]) -> None:
    """Merged rows must not overlap (unmerging one would restore rows another wrote) and must be finite."""
    for n, m in token_layers(model).items():
        if m.is_head or name not in m.trainable_tokens_delta:
            continue
        if not torch.isfinite(m.trainable_tokens_delta[name]).all():
            raise NonFiniteAdapterError(f"adapter {name!r} holds NaN/inf token values in {n}; refusing to merge it")
        mine = set(m.ids(name).tolist())
        for other in merged:
            if other in m.trainable_tokens_delta and mine & set(m.ids(other).tolist()):
                raise MergeStateError(f"adapters {name!r} and {other!r} both train tokens "
                                      f"{sorted(mine & set(m.ids(other).tolist()))[:5]} of {n}; unmerge {other!r} first")


def merge_tokens(model: nn.Module, name: str, merge: bool) -> None:
    for m in token_layers(model).values():
        if name in m.names():
            m.merge(name) if merge else m.unmerge(name)


def unwrap_tokens(model: nn.Module) -> None:
    for n, m in token_layers(model).items():
        replace_module(model, n, m.original_module)
