"""The one atomic file write (lorakit.atomic_write), and that io and the LoRA-XS bases cache both go through it."""

from __future__ import annotations

import os

import pytest
import torch

import lorakit.atomic_write as atomic_write
from lorakit.atomic_write import is_temp_name, replace_file, temp_path
from lorakit.model.bases_cache import BasesCache
from lorakit.errors import WriteError
from lorakit.io.atomic import atomic_write_bytes
from lorakit.methods.basis import Basis


def half_then_fail(path, data):
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    raise OSError(28, "No space left on device")


def test_replace_file_swaps_whole_files_and_names_its_temporaries(tmp_path):
    target = tmp_path / "f.bin"
    replace_file(target, b"old")
    replace_file(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]
    assert is_temp_name(temp_path(target).name) and is_temp_name(temp_path(target, "old").name)
    assert not is_temp_name("f.bin") and not is_temp_name(".f.bin.tmp-nothex!")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    replace_file(target, b"old")
    monkeypatch.setattr(atomic_write, "write_durable", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        replace_file(target, b"new contents")
    with pytest.raises(WriteError, match="f.bin"):  # io's writer: the same steps, its own error
        atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_bases_cache_writes_through_the_shared_primitive(tmp_path, monkeypatch):
    """A full disk under the bases cache: a warning, no file and no temporary, as for io's writes."""
    cache = BasesCache(tmp_path / "bases")
    weight = torch.randn(6, 5)
    basis = Basis(torch.randn(2, 5), torch.randn(6, 2), torch.randn(4))
    monkeypatch.setattr(atomic_write, "write_durable", half_then_fail)
    with pytest.warns(UserWarning, match="could not write LoRA-XS bases cache"):
        cache.put(weight, basis, key="k")
    assert os.listdir(tmp_path / "bases") == []
    monkeypatch.undo()
    cache.put(weight, basis, key="k")
    assert os.listdir(tmp_path / "bases") == ["k.safetensors"]
