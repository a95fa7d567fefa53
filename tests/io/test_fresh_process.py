"""LoRA-XS adapters reload in a new process (SVD recomputed there), and shared bases files work."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit import io
from lorakit.errors import AdapterMismatchError
from tests.conftest import MODEL_FACTORIES, model_output
from tests.io.util import adapted, assert_unchanged, snapshot

REPO = Path(__file__).resolve().parents[2]


def test_lora_xs_reload_in_fresh_process(ids, tmp_path):
    model = adapted("llama", "lora_xs")
    io.save_adapter(model, "a", tmp_path / "ad")
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file, save_file
        from lorakit import io
        from tests.conftest import MODEL_FACTORIES, model_output
        model = MODEL_FACTORIES["llama"](0)
        io.load_adapter(model, {str(tmp_path / "ad")!r})
        ids = load_file({str(tmp_path / "ids.safetensors")!r})["ids"]
        save_file({{"out": model_output(model, ids).detach()}}, {str(tmp_path / "out.safetensors")!r})
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = load_file(tmp_path / "out.safetensors")["out"]
    torch.testing.assert_close(out, model_output(model, ids), rtol=0, atol=1e-6)


def test_bases_file_is_reused_by_attach_and_load(ids, tmp_path):
    model = adapted("llama", "lora_xs")  # r=4
    io.save_adapter(model, "a", tmp_path / "ad")
    io.save_bases(model, tmp_path / "bases.safetensors")
    fresh = MODEL_FACTORIES["llama"](0)
    modules = io.load_bases(fresh, tmp_path / "bases.safetensors")
    assert modules == sorted(lk.adapted_layers(model))
    layer = fresh.get_submodule("model.layers.0.mlp.down_proj")
    installed = layer.bases["lora_xs"]
    torch.testing.assert_close(model_output(fresh, ids), model_output(MODEL_FACTORIES["llama"](0), ids),
                               rtol=0, atol=0)  # bases alone change nothing
    io.load_adapter(fresh, tmp_path / "ad", "a")
    lk.attach(fresh, lk.LoraXSConfig(r=3), "smaller")  # rank <= r_max reuses the file's basis too
    assert layer.bases["lora_xs"] is installed
    with lk.use_adapter(fresh, "a"):
        torch.testing.assert_close(model_output(fresh, ids), model_output(model, ids), rtol=0, atol=1e-6)


def test_bases_for_another_model_are_refused(tmp_path):
    io.save_bases(adapted("llama", "lora_xs", seed=4), tmp_path / "bases.safetensors")
    target = MODEL_FACTORIES["llama"](0)
    before = snapshot(target)
    with pytest.raises(AdapterMismatchError, match="not an SVD of this model's weight"):
        io.load_bases(target, tmp_path / "bases.safetensors")
    assert_unchanged(target, before)
    tensors = load_file(tmp_path / "bases.safetensors")
    tensors.pop(next(iter(tensors)))
    save_file(tensors, tmp_path / "partial.safetensors", metadata={"lorakit_bases": "lora_xs"})
    with pytest.raises(lk.CorruptAdapterError, match="missing keys"):
        io.load_bases(target, tmp_path / "partial.safetensors")
    assert_unchanged(target, before)
