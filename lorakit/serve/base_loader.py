"""What `lorakit serve --base` names, on the device and in the dtype asked for.

    an embedded name or a Hugging Face directory      lorakit.base_models.load.load_base, then moved to the device
    a Llama config (a .json file or a preset name)    random weights built on the device (no download), with a
                                                      CodepointTokenizer (lorakit.serve.codepoint_tokenizer)

The config form lets a GPU machine without network serve (and benchmark) a model of a real size: the
shape decides the cost, the weights do not.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.base_models.llama_config import build_llama, is_config_spec, read_config
from lorakit.errors import LorakitError
from lorakit.serve.codepoint_tokenizer import CodepointTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceUnavailableError(LorakitError, RuntimeError):
    """The device asked for does not exist on this machine (no CUDA, or an index past the last GPU)."""


def serving_device(name: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N`, checked against this machine."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceUnavailableError(f"device {name!r} is not a device name (cpu, cuda, cuda:N)") from exc
    if device.type not in ("cpu", "cuda"):
        raise DeviceUnavailableError(f"device {name!r}: lorakit serve runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"device {name!r}: no CUDA device is available on this machine "
                                         "(torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def load_serving_base(spec: str, device: torch.device | str = "cpu",
                      dtype: torch.dtype | str = torch.float32) -> tuple[nn.Module, Any]:
    """(model in eval mode on `device` in `dtype`, a DTYPES name or a torch dtype; tokenizer) for `spec`."""
    device = torch.device(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if is_config_spec(spec):
        model = build_llama(read_config(spec), device, dtype)
        return model, CodepointTokenizer(model.config.vocab_size)
    from lorakit.base_models.load import load_base

    model, tokenizer = load_base(spec, dtype=dtype)
    return model.to(device), tokenizer
