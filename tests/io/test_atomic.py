"""Atomic files and directories: all-or-nothing, old content kept on failure, foreign dirs refused."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lorakit.io.atomic import atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_safetensors, \
    write_directory


def test_file_writes_replace_and_leave_no_temp(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    atomic_write_safetensors(tmp_path / "t.safetensors", {"x": torch.arange(3.0)})
    assert torch.equal(load_file(tmp_path / "t.safetensors")["x"], torch.arange(3.0))
    assert sorted(os.listdir(tmp_path)) == ["f.json", "t.safetensors"]


def test_directory_is_published_whole_and_replaces_old(tmp_path):
    target = tmp_path / "adapter"
    write_directory(target, {"adapter_config.json": b"{}", "adapter_model.safetensors": b"old"})
    write_directory(target, {"adapter_config.json": b"{\"v\": 2}"})
    assert sorted(os.listdir(target)) == ["adapter_config.json"]  # the old directory is gone, not merged
    assert (target / "adapter_config.json").read_bytes() == b"{\"v\": 2}"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_failure_keeps_old_directory(tmp_path):
    target = tmp_path / "adapter"
    write_directory(target, {"adapter_config.json": b"old"})
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "adapter_config.json").write_bytes(b"new")
            raise RuntimeError("disk full")
    assert (target / "adapter_config.json").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_refuses_to_replace_foreign_directory_or_file(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "optimizer.pt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="optimizer.pt"):
        write_directory(tmp_path / "ckpt", {"adapter_config.json": b"{}"})
    atomic_write_bytes(tmp_path / "file", b"x")
    with pytest.raises(FileExistsError, match="not a directory"):
        write_directory(tmp_path / "file", {"adapter_config.json": b"{}"})
    assert (tmp_path / "ckpt" / "optimizer.pt").exists()
