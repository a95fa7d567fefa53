"""The optimiser table: `optimizer = "adamw"` (torch) or `"adamw8bit"` (bitsandbytes' 8-bit AdamW).

Both take the same hyper-parameters (lr, betas, weight_decay). bitsandbytes keeps 8-bit moments only for
tensors of at least `min_8bit_size` numbers (4096 by default) and 32-bit ones below it: a LoRA factor of
rank 16 over a 4096-wide layer (65,536 numbers) is stored in 8 bits, the tiny test adapters in 32.

`checkpoint_state(optimizer)` is the state as plain tensors for lorakit's safetensors checkpoints:
bitsandbytes' own `state_dict()` hides its quantisation maps in a nested dict (for FSDP1's gathering),
which a safetensors file cannot hold, so the flat torch form is used; its `load_state_dict` reads both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lorakit.train.errors import TrainConfigError

Factory = Callable[[Sequence[torch.nn.Parameter], float, tuple[float, float], float], torch.optim.Optimizer]


def _adamw(params: Sequence[torch.nn.Parameter], lr: float, betas: tuple[float, float],
           weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(params), lr=lr, betas=betas, weight_decay=weight_decay)


def _adamw8bit(params: Sequence[torch.nn.Parameter], lr: float, betas: tuple[float, float],
               weight_decay: float) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise TrainConfigError(f"optimizer 'adamw8bit' needs bitsandbytes, which does not import here: {exc}") \
            from None
    return bnb.optim.AdamW8bit(list(params), lr=lr, betas=betas, weight_decay=weight_decay)


OPTIMIZER_FACTORIES: dict[str, Factory] = {"adamw": _adamw, "adamw8bit": _adamw8bit}


def make_optimizer(kind: str, params: Sequence[torch.nn.Parameter], lr: float, betas: tuple[float, float],
                   weight_decay: float) -> torch.optim.Optimizer:
    if kind not in OPTIMIZER_FACTORIES:
        raise TrainConfigError(f"optimizer must be one of {sorted(OPTIMIZER_FACTORIES)}, got {kind!r}")
    return OPTIMIZER_FACTORIES[kind](params, lr, betas, weight_decay)


def checkpoint_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"state": {index: {key: tensor | scalar}}, "param_groups": [...]}, with no nested dicts in a slot."""
    return torch.optim.Optimizer.state_dict(optimizer)
