"""Reading a safetensors file of many small float tensors with one buffer and views into it.

`safetensors.torch.load` builds every tensor on its own: 7 ms for a LoRA-XS file of 210 modules (an
r×r core and a fingerprint each), more than the rest of loading it into a live model. When a file holds
only float tensors of one dtype, packed back to back as the format prescribes, this reads them as one
tensor and views into it. Anything else (several dtypes, a gap or overlap, a bad header) returns None
and the library parses the file, so its checks and error messages stay the authority.
"""

from __future__ import annotations

import json
import math

import torch

_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_float_tensors(data: bytes) -> dict[str, torch.Tensor] | None:
    """name -> tensor (views of one writable buffer), or None when the file is not plainly that."""
    if len(data) < 8:
        return None
    header_len = int.from_bytes(data[:8], "little")
    if 8 + header_len > len(data):
        return None
    try:
        header = json.loads(data[8:8 + header_len])
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                return None  # the library judges odd metadata
            continue
        try:
            dtype = _FLOATS[info["dtype"]]
            shape = [int(n) for n in info["shape"]]
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            return None
        entries.append((begin, end, name, dtype, shape))
    if not entries or len({e[3] for e in entries}) != 1:
        return None
    dtype = entries[0][3]
    size = torch.empty((), dtype=dtype).element_size()
    entries.sort(key=lambda e: e[0])
    at = 0
    for begin, end, _, _, shape in entries:  # back to back from 0, each exactly its shape's bytes
        if begin != at or end - begin != math.prod(shape) * size or any(n < 0 for n in shape):
            return None
        at = end
    body = bytearray(data[8 + header_len:])
    if at != len(body):
        return None
    flat = torch.frombuffer(body, dtype=dtype) if body else torch.empty(0, dtype=dtype)
    return {name: flat[begin // size:end // size].view(shape) for begin, end, name, _, shape in entries}
