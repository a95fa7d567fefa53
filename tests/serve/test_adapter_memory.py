"""Adapter tensors on the serving device: staging (pinned on CUDA, fingerprints kept on the host) and the
store's budget counted in device bytes, not file bytes."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.serve.adapter_memory import HOST_ONLY_SUFFIX, adapter_device_bytes, stage
from lorakit.serve.adapter_store import AdapterLoadError, AdapterStore
from lorakit.serve.engine import Engine, SamplingParams
from tests.conftest import tiny_llama
from tests.serve.conftest import greedy_alone, saved_adapters, with_adapters

NAMES = ["xs0", "lora1"]  # with_adapters: even indices LoRA-XS, odd LoRA (r=4)


@pytest.fixture(scope="module")
def source():
    return with_adapters(tiny_llama(), NAMES)


@pytest.fixture(scope="module")
def adapter_dir(source, tmp_path_factory):
    return saved_adapters(source, NAMES, tmp_path_factory.mktemp("adapters"))


def _file_tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_staging_on_the_cpu_copies_nothing_and_elsewhere_keeps_fingerprints_on_the_host():
    tensors = {"m.lora_R": torch.randn(4, 4), f"m{HOST_ONLY_SUFFIX}": torch.randn(8)}
    on_cpu = stage(tensors, torch.device("cpu"))
    assert all(on_cpu[k] is tensors[k] for k in tensors)
    on_meta = stage(tensors, torch.device("meta"))  # an explicit non-CPU device: the plain .to() path
    assert on_meta["m.lora_R"].device.type == "meta"
    assert on_meta[f"m{HOST_ONLY_SUFFIX}"] is tensors[f"m{HOST_ONLY_SUFFIX}"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_staging_on_cuda_goes_through_pinned_memory_and_equals_the_file(monkeypatch):
    pinned = []
    real_pin = torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t.shape) or real_pin(t, *a, **k))
    tensors = {"m.lora_A": torch.randn(4, 32), "m.lora_B": torch.randn(32, 4), f"m{HOST_ONLY_SUFFIX}": torch.randn(8)}
    moved = stage(tensors, torch.device("cuda"))
    torch.cuda.synchronize()
    assert sorted(pinned) == sorted([(4, 32), (32, 4)])  # the fingerprint stays on the host, unpinned
    for key in ("m.lora_A", "m.lora_B"):
        assert moved[key].is_cuda and torch.equal(moved[key].cpu(), tensors[key])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_store_on_cuda_serves_its_adapters_as_the_source_does(source, adapter_dir):
    model = tiny_llama().cuda()
    engine = Engine(model).start()
    store = AdapterStore(model, adapter_dir, engine=engine)
    try:
        for name in NAMES:
            store.acquire(name)
            got = engine.submit([5, 6, 7], name, SamplingParams(max_tokens=6)).result().token_ids
            store.release(name)
            assert got == greedy_alone(source, [5, 6, 7], name, 6), name
    finally:
        engine.close()


def test_the_budget_counts_bytes_on_the_device_not_in_the_file(adapter_dir, tmp_path):
    """A LoRA file saved in float16 takes twice its file bytes as float32 adapter weights; a packed LoRA-XS
    adapter takes one bank slot, while its file also holds basis fingerprints that stay on the host."""
    half = tmp_path / "half"
    shutil.copytree(adapter_dir, half)
    tensors = _file_tensors(half / "lora1")
    save_file({k: v.half() for k, v in tensors.items()}, str(half / "lora1" / "adapter_model.safetensors"))
    model = tiny_llama()
    store = AdapterStore(model, half)
    lora_bytes, xs_bytes = store.load("lora1"), store.load("xs0")
    file_lora = sum(t.numel() * 2 for t in tensors.values())
    assert lora_bytes == adapter_device_bytes(model, "lora1") == 2 * file_lora
    bank = model.lorakit_bank
    assert xs_bytes == bank.cores[:, bank.slots["xs0"]].numel() * bank.cores.element_size()
    file_xs = sum(t.numel() * t.element_size() for t in _file_tensors(half / "xs0").values())
    assert xs_bytes != file_xs  # fingerprints are not counted; the slot is
    assert store.resident_bytes() == lora_bytes + xs_bytes


def test_an_adapter_over_the_budget_on_the_device_is_refused_and_detached(adapter_dir, tmp_path):
    """The file (float16) fits the budget, its float32 weights on the device do not: refused before the
    attach (the reservation counts the device dtype), and the model is left without it."""
    half = tmp_path / "half"
    shutil.copytree(adapter_dir, half)
    tensors = _file_tensors(half / "lora1")
    save_file({k: v.half() for k, v in tensors.items()}, str(half / "lora1" / "adapter_model.safetensors"))
    file_bytes = sum(t.numel() * 2 for t in tensors.values())
    model = tiny_llama()
    store = AdapterStore(model, half, budget_bytes=file_bytes + 1)
    with pytest.raises(AdapterLoadError, match=f"needs about {2 * file_bytes} bytes, more than the whole budget"):
        store.load("lora1")
    assert store.resident() == [] and "lorakit_registry" not in model.__dict__  # never attached
