"""The one-buffer reader returns exactly what safetensors returns, and declines anything unusual."""

import json

import pytest
import torch
from safetensors.torch import load, save

from lorakit.io.fast_safetensors import read_float_tensors


def _tensors(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return {"a.lora_R": torch.randn(4, 4, generator=gen).to(dtype), "b.fp": torch.randn(8, generator=gen).to(dtype),
            "scalar": torch.tensor(1.5, dtype=dtype), "empty": torch.zeros(0, 3, dtype=dtype),
            "c": torch.randn(2, 3, 5, generator=gen).to(dtype)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_same_tensors_as_safetensors(dtype):
    data = save(_tensors(dtype), metadata={"format": "pt"})
    fast, reference = read_float_tensors(data), load(data)
    assert fast is not None and fast.keys() == reference.keys()
    for name, tensor in reference.items():
        assert fast[name].dtype == tensor.dtype and torch.equal(fast[name], tensor), name
    fast["c"].add_(1)  # writable, and the caller's bytes are untouched
    assert torch.equal(load(data)["c"], reference["c"])


def _with_header(data: bytes, edit) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


def test_declines_what_it_does_not_plainly_understand():
    data = save(_tensors())
    mixed = save({"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float16)})
    ints = save({"a": torch.zeros(2, dtype=torch.int64)})

    def overlap(h):
        h["c"]["data_offsets"] = [0, h["c"]["data_offsets"][1] - h["c"]["data_offsets"][0]]

    def wrong_shape(h):
        h["c"]["shape"] = [2, 3, 4]

    for bad in (data[:-4], data[:6], b"\xff" * 20, mixed, ints, _with_header(data, overlap),
                _with_header(data, wrong_shape), data + b"\0\0\0\0"):
        assert read_float_tensors(bad) is None


def test_odd_metadata_goes_to_the_library():
    data = save({"a": torch.zeros(2)}, metadata={"format": "pt"})
    assert read_float_tensors(_with_header(data, lambda h: h.update(__metadata__=[1]))) is None
