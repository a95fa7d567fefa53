"""`generate`: greedy decoding with a per-row route, eager or through one compiled decode step.

    tokens = lorakit.generate(model, ids, ["fr", None, "de"], max_new_tokens=32, compile=True)

The KV cache is transformers' StaticCache, so every decode step has the same shapes: with compile=True
the step is traced once (lorakit.CompiledForward) and, on a GPU with mode="reduce-overhead", captured in
a CUDA graph and replayed. Prompts are equal-length rows (no padding); the server's engine handles
ragged batches.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from lorakit.model.compiled import CompiledForward
from lorakit.model.record import adapters_of
from lorakit.model.prefix_hook import cache_argument
from lorakit.routing.context import Route, route_for


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, adapters: str | None | Sequence[str | None],
             max_new_tokens: int, *, compile: bool = False, step: CompiledForward | None = None,
             backend: str = "inductor", mode: str | None = None) -> torch.Tensor:
    """(B, T) prompt ids -> (B, max_new_tokens) greedy tokens, row i under adapters[i] (or one name for all).
    Pass `step` (a CompiledForward) to reuse one compiled step across calls."""
    from transformers import StaticCache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rows, length = input_ids.shape
    names = adapters if isinstance(adapters, (str, type(None))) else tuple(adapters)
    route = Route(names)
    if compile and step is None:
        step = CompiledForward(model, backend=backend, mode=mode)
    cache = StaticCache(config=model.config, max_cache_len=length + max_new_tokens)
    device = input_ids.device
    cache_arg = cache_argument(inspect.signature(model.forward).parameters)
    with route_for(adapters_of(model), names):
        logits = model(input_ids=input_ids, cache_position=torch.arange(length, device=device), use_cache=True,
                       **{cache_arg: cache}).logits[:, -1]
    tokens = [logits.argmax(-1, keepdim=True)]
    for t in range(length, length + max_new_tokens - 1):
        kwargs = {"input_ids": tokens[-1], cache_arg: cache, "use_cache": True,
                  "cache_position": torch.tensor([t], device=device)}
        if step is not None:
            logits = step(route, **kwargs).logits[:, -1]
        else:
            with route_for(adapters_of(model), names):
                logits = model(**kwargs).logits[:, -1]
        tokens.append(logits.argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)
