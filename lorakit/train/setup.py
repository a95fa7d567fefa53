"""Getting a run's model and processes ready: device, process group, 4-bit base, checkpointing, DDP / FSDP2.

The order matters and is kept here in one place:
    load (dtype) -> move to device -> quantize (4-bit base) -> attach adapter (LoRA-XS bases from the
    whole weight) -> gradient checkpointing -> FSDP2 shard, or DDP wrap when there are several processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn

from lorakit.model.quantize import quantize
from lorakit.train.config import TrainConfig
from lorakit.train.errors import TrainConfigError
from lorakit.train.fsdp import shard


def init_distributed(config: TrainConfig) -> tuple[int, int]:
    """(rank, world); initialises the process group when launched by torchrun with >1 process
    (gloo on the CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if config.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if config.device == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run_device(config: TrainConfig) -> torch.device:
    """The device this process trains on: cpu, or cuda:LOCAL_RANK."""
    if config.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainConfigError("device = 'cuda' but torch sees no CUDA device here (torch "
                               f"{torch.__version__}, CUDA build: {torch.version.cuda}); use device = 'cpu'")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def refuse_unsupported(config: TrainConfig, world: int) -> None:
    """Combinations that cannot work, refused before the model is loaded, each saying why."""
    if config.fsdp and world < 2:
        raise TrainConfigError("fsdp = true shards the base over processes: launch with torchrun "
                               "--nproc-per-node N (N >= 2); one process trains unsharded without it")
    if config.fsdp and config.quantize:
        raise TrainConfigError(
            f"quantize = {config.quantize!r} with fsdp: FSDP2's fully_shard turns bitsandbytes' 4-bit weights "
            "(Params4bit) into plain uint8 DTensor shards, because bitsandbytes 0.50 defines no FSDP2 all-gather "
            "hooks (fsdp_pre_all_gather / fsdp_post_all_gather); the gathered weight has lost its quant_state and "
            "the first forward fails ('Parameter' object has no attribute 'quant_state'), on CPU and CUDA alike. "
            "Train QLoRA in one process, or under torchrun without --fsdp (DDP: each process holds the whole "
            "4-bit base, about 0.52 bytes per weight)")
    if config.fsdp and config.optimizer == "adamw8bit":
        raise TrainConfigError("optimizer = 'adamw8bit' with fsdp: bitsandbytes' 8-bit AdamW kernels take plain "
                               "tensors, not the DTensor shards FSDP2 trains (its optimizer_update_8bit_blockwise "
                               "fails on 'mixed torch.Tensor and DTensor'); use optimizer = 'adamw' (an adapter's "
                               "AdamW state is small), or DDP (torchrun without --fsdp) for the 8-bit optimiser")


def prepare_model(model: nn.Module, config: TrainConfig, device: torch.device,
                  attach: Callable[[nn.Module], None]) -> nn.Module:
    """Move, quantize, attach (`attach(model)`), enable checkpointing: everything before wrapping."""
    model.to(device)
    if config.quantize:
        compute = getattr(torch, config.dtype)
        quantize(model, config.quantize, compute_dtype=compute)
        model.to(device)  # bitsandbytes packs on the device the weight is on
    attach(model)
    if config.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise TrainConfigError(f"gradient_checkpointing: {type(model).__name__} does not support it "
                                   "(transformers' supports_gradient_checkpointing is false)")
        kwargs = {"use_reentrant": False}  # reentrant checkpointing needs inputs that require grad
        if hasattr(model, "activation_checkpointing_enable"):  # the name transformers 5 prefers
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False  # a cache is useless in training and clashes with recomputation
    return model


def wrap(model: nn.Module, config: TrainConfig, world: int, device: torch.device) -> nn.Module:
    """What the training forward runs: the model, FSDP2-sharded in place, or a DDP wrapper."""
    if config.fsdp:
        return shard(model)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


@contextmanager
def gradient_sync(runner: nn.Module, sync: bool) -> Iterator[None]:
    """Reduce gradients over processes on this backward only when `sync` (the last micro-batch of a step)."""
    if isinstance(runner, nn.parallel.DistributedDataParallel):
        with runner.no_sync() if not sync else nullcontext():
            yield
        return
    if hasattr(runner, "set_requires_gradient_sync"):  # an FSDP2 module
        runner.set_requires_gradient_sync(sync)
    yield
