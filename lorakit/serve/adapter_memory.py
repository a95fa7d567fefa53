"""Adapters on the serving device: how their tensors get there, and how many bytes they hold there.

A file is read into ordinary (pageable) host memory. A copy from pageable memory to a GPU is synchronous
and goes through a driver staging buffer; from pinned (page-locked) memory it is one DMA that the copying
thread need not wait for. So on CUDA the tensors are pinned, then copied with non_blocking=True on the
current stream: the attach that uses them later is queued after the copies on the same stream, and the
host allocator keeps each pinned buffer until its copy is done.

The store's byte budget counts what an adapter holds on the device, not its file: a LoRA-XS file carries
basis fingerprints that stay on the host, and a packed LoRA-XS adapter takes a whole slot of the bank
(every bank layer, padded to the bank's rank), in the dtype adapters get on this base.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.model.manage import adapter_parameters
from lorakit.model.bank import get_bank
from lorakit.io.native import FINGERPRINT
from lorakit.layer.linear import adapted_layers

HOST_ONLY_SUFFIX = f".{FINGERPRINT}"  # compared with host tensors when loading; never needed on the device


def stage(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """`tensors` (host tensors read from a file) on `device`, fingerprints left on the host.

    CUDA: through pinned memory, copies queued non-blocking on the current stream. CPU: the tensors
    themselves (no copy). Any other device: a plain `.to(device)`."""
    device = torch.device(device)
    if device.type == "cpu":
        return dict(tensors)
    pinned = device.type == "cuda"
    out = {}
    for key, tensor in tensors.items():
        if key.endswith(HOST_ONLY_SUFFIX):
            out[key] = tensor
        elif pinned:
            out[key] = tensor.pin_memory().to(device, non_blocking=True)
        else:
            out[key] = tensor.to(device)
    return out


def adapter_device_bytes(model: nn.Module, name: str) -> int:
    """Bytes adapter `name` holds on the model's device: its slot of the packed bank (L × r × r of the bank's
    dtype), or the parameters and buffers of its modules on every adapted layer."""
    bank = get_bank(model)
    if bank is not None and name in bank.slots:
        slot = bank.cores[:, bank.slots[name]]  # (L, r, r)
        return slot.numel() * slot.element_size()
    tensors = {id(p): p for p in adapter_parameters(model, name)}
    for layer in adapted_layers(model).values():
        if name in layer.adapters:
            tensors.update({id(b): b for b in layer.adapters[name].buffers()})
    return sum(t.numel() * t.element_size() for t in tensors.values())
