"""FSDP2 for `lorakit train --fsdp`: the base sharded per decoder layer; the adapter saved without gathering the base.

    shard(model)          fully_shard(layer) per decoder layer, its adapters included, then
                          fully_shard(model) for what is left (embeddings, head, prefix store)
    full_tensors(params)  adapter (+ head) tensors gathered whole on every rank: r-wide, cheap
    plain_parameters(...) rank 0 swaps those whole tensors in for the sharded ones while it saves

FSDP2 asks one dtype of a group's *trainable* parameters only: a bf16 base with float32 adapters
shards as one group per layer, and the optimiser steps on float32 shards. Adapters are attached, and
LoRA-XS bases computed from the whole weight, before sharding: a basis is a buffer, which FSDP2 never
shards, so each rank holds it whole.

Checkpoints stay one format for 1 process, DDP and FSDP: whole tensors. `ShardedTarget` and
`WholeOptimizerState` let lorakit.train.checkpoint restore whole tensors into the shards (every rank
reads the same file and keeps its own chunk: no communication).

Every forward of a sharded model must run with autograd on (the trainer's eval passes autograd=True to
lorakit.train.metrics.mean_loss): a no-grad forward lets lorakit adopt the unsharded adapter parameters
into a slot stack, and later unshards would fill FSDP's buffers while the layers read the stale stack.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from lorakit.train.errors import TrainConfigError


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, by transformers' `_no_split_modules` class names (LlamaDecoderLayer...)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not layers:
        raise TrainConfigError(f"--fsdp: cannot find the decoder layers of {type(model).__name__}: it names no "
                               f"block class in _no_split_modules ({sorted(names)}), so there is nothing to "
                               "shard per layer")
    return layers


def shard(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Shard `model` in place over the default process group (FSDP2); kwargs go to every fully_shard call.

    A layer's adapters shard with it: their parameters are read inside the layer's forward (lorakit's
    slot stacks), never through a forward of their own, so only the layer's unshard hook can reach them.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                # after a forward the adapter's parameters are views into their layer's slot stack
                # (lorakit.layer.slots), often strided ones, which FSDP2 cannot shard; own storage again, and the
                # stack is rebuilt from the unsharded parameters at the next forward (it notices they moved)
                param.data = param.data.clone(memory_format=torch.contiguous_format)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly sharded) tensor, detached; a collective for a DTensor."""
    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_tensors(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """name -> whole tensor; every rank must call it (each DTensor gathers)."""
    return {name: whole(p) for name, p in params.items()}


@contextmanager
def plain_parameters(model: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, parameters named in `values` are plain Parameters holding them (for saving)."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for name, value in values.items():
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            swapped.append((owner, attr, owner._parameters[attr]))
            owner._parameters[attr] = nn.Parameter(value.clone(), requires_grad=False)
        yield
    finally:
        for owner, attr, original in reversed(swapped):
            owner._parameters[attr] = original


def local_chunk(value: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's shard of whole tensor `value`, laid out as `like` (no communication)."""
    value = value.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None).to_local()


class ShardedTarget:
    """A sharded parameter seen as a whole one by checkpoint.restore: `.shape` and `.copy_(whole value)`."""

    def __init__(self, param: DTensor) -> None:
        self.param = param

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    def copy_(self, value: torch.Tensor) -> None:
        self.param.to_local().copy_(local_chunk(value, self.param))


def restore_targets(params: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {n: ShardedTarget(p) if isinstance(p, DTensor) else p for n, p in params.items()}


class WholeOptimizerState:
    """An optimiser seen through whole tensors, for checkpoints: `gather` (collective under FSDP) then
    state_dict(); load_state_dict() hands each rank its shards. Plain (unsharded) runs pass straight through.

    A state tensor shaped like its sharded parameter (AdamW's moments) is sharded like it; others (step) not.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, gathered: dict[str, Any] | None = None) -> None:
        self.optimizer = optimizer
        self.gathered = gathered

    @classmethod
    def gather(cls, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> "WholeOptimizerState":
        """Gather `state` (the optimiser's checkpoint_state) on every rank; rank 0 then saves it."""
        slots = {i: {k: whole(v) if torch.is_tensor(v) else v for k, v in slot.items()}
                 for i, slot in state["state"].items()}
        return cls(optimizer, {"state": slots, "param_groups": state["param_groups"]})

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def state_dict(self) -> dict[str, Any]:
        if self.gathered is None:
            raise RuntimeError("WholeOptimizerState.state_dict before gather()")
        return self.gathered

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        slots = {}
        for index, slot in state["state"].items():
            param = params[int(index)]
            slots[index] = {k: local_dtensor(v, param) if torch.is_tensor(v) and isinstance(param, DTensor)
                            and v.shape == param.shape else v for k, v in slot.items()}
        self.optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})


def local_dtensor(value: torch.Tensor, like: DTensor) -> DTensor:
    """Whole tensor `value` as a DTensor laid out as `like` (no communication)."""
    return DTensor.from_local(local_chunk(value, like), like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride())
