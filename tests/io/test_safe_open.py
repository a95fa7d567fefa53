"""Broken adapter files: every entry point (load_adapter, read_adapter_info, `lorakit inspect`, the server's
store) answers each with the same specific error naming the file, at once: nothing hangs, nothing reads
without bound, nothing is loaded half-checked."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit.cli.main import main
from lorakit.config import LoraConfig, LoraXSConfig
from lorakit.errors import CorruptAdapterError, LorakitError
from lorakit.io import load_adapter, read_adapter_info, save_adapter
from lorakit.serve.adapter_store import AdapterLoadError, AdapterStore
from tests.broken_files import answer_without_blocking, make_dev_zero, make_fifo, make_symlink_loop
from tests.conftest import tiny_llama

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _header_bytes(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw




def _dangling(path: Path) -> None:
    path.unlink()
    os.symlink("nowhere.safetensors", path)


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _longer_than_header(path: Path) -> None:
    os.truncate(path, 3 << 30)  # sparse: 3 GB that a reader without a bound would try to hold


def _truncated(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 4)


def _header_claims_too_much(path: Path) -> None:
    path.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")


def _duplicate_tensor_name(path: Path) -> None:
    """Two entries under one name in the header (json.loads would keep the second silently)."""
    data = path.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    name = next(k for k in header if k != "__metadata__")
    raw = json.dumps(header).encode()
    entry = json.dumps({name: header[name]})[1:-1].encode()
    raw = raw[:-1] + b", " + entry + b"}"
    body = data[8 + int.from_bytes(data[:8], "little"):]
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


def _edit_config(change: Callable[[str], str]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        path.write_text(change(path.read_text()))
    return apply


def _huge_config(path: Path) -> None:
    config = json.loads(path.read_text())
    config["padding"] = "x" * (2 << 20)
    path.write_text(json.dumps(config))


# (id, file, how to break it, what every entry point's error says)
CASES = [
    ("weights-fifo", WEIGHTS, make_fifo, "FIFO"),
    ("config-fifo", CONFIG, make_fifo, "FIFO"),
    ("weights-dev-zero", WEIGHTS, make_dev_zero, "character device"),
    ("config-dev-zero", CONFIG, make_dev_zero, "character device"),
    ("weights-symlink-loop", WEIGHTS, make_symlink_loop, "symbolic link loop"),
    ("config-symlink-loop", CONFIG, make_symlink_loop, "symbolic link loop"),
    ("weights-dangling-symlink", WEIGHTS, _dangling, "which does not exist"),
    ("weights-directory", WEIGHTS, _directory, "is a directory"),
    ("config-directory", CONFIG, _directory, "is a directory"),
    ("weights-longer-than-header", WEIGHTS, _longer_than_header, "longer than its tensors"),
    ("weights-truncated", WEIGHTS, _truncated, "truncated"),
    ("weights-header-too-long", WEIGHTS, _header_claims_too_much, "header claims"),
    ("weights-duplicate-tensor", WEIGHTS, _duplicate_tensor_name, "appears twice"),
    ("config-duplicate-key", CONFIG, _edit_config(lambda t: t.replace("{", '{"r": 4, ', 1)), "appears twice"),
    ("config-over-1MiB", CONFIG, _huge_config, "more than the 1048576 bytes"),
    ("config-nan-alpha", CONFIG, _edit_config(lambda t: t.replace('"lora_alpha": 8', '"lora_alpha": NaN')), "NaN"),
    ("config-absurd-alpha", CONFIG, _edit_config(lambda t: t.replace('"lora_alpha": 8', '"lora_alpha": -1e39')),
     "lora_alpha must be a finite number"),
    ("config-both-markers", CONFIG, _edit_config(lambda t: t.replace("{", '{"lorakit_method": "lora_xs", ', 1)),
     "carries both"),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(r=4, lora_alpha=8), "good")
    root = tmp_path_factory.mktemp("good")
    save_adapter(model, "good", root / "good")
    assert '"lora_alpha": 8' in (root / "good" / CONFIG).read_text()
    return root / "good"


def _broken(good: Path, tmp_path: Path, file: str, breaker: Callable[[Path], None]) -> Path:
    root = tmp_path / "served"
    root.mkdir()
    shutil.copytree(good, root / "bad")
    breaker(root / "bad" / file)
    return root / "bad"


@pytest.mark.parametrize("case, file, breaker, phrase", CASES, ids=[c[0] for c in CASES])
def test_every_reader_refuses_the_broken_file_alike(good, tmp_path, capsys, case, file, breaker, phrase):
    bad = _broken(good, tmp_path, file, breaker)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    err = answer_without_blocking(lambda: load_adapter(model, bad), bad)
    assert isinstance(err, LorakitError), repr(err)
    assert phrase in str(err) and str(bad) in str(err), str(err)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is as it was

    if case != "config-absurd-alpha":  # inspect shows settings without judging them; every file fault it refuses
        info_err = answer_without_blocking(lambda: read_adapter_info(bad), bad)
        assert isinstance(info_err, LorakitError) and phrase in str(info_err), repr(info_err)
        capsys.readouterr()
        assert answer_without_blocking(lambda: main(["inspect", str(bad)]), bad) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and phrase in lines[0] and str(bad) in lines[0], lines

    store = AdapterStore(tiny_llama(), bad.parent)
    store_err = answer_without_blocking(lambda: store.load("bad"), bad)
    assert isinstance(store_err, AdapterLoadError) and phrase in str(store_err), repr(store_err)
    assert store.resident() == []


def test_a_symlinked_weights_file_that_is_a_regular_file_still_loads(good, tmp_path):
    """Hub caches link adapter files to blobs: a symlink to a regular file is followed, not refused."""
    root = tmp_path / "linked"
    root.mkdir()
    shutil.copy(good / CONFIG, root / CONFIG)
    shutil.copy(good / WEIGHTS, tmp_path / "blob")
    os.symlink(tmp_path / "blob", root / WEIGHTS)
    model = tiny_llama()
    assert load_adapter(model, root, "linked") == "linked"


def test_a_fifo_adapter_does_not_stop_the_store_serving_the_others(good, tmp_path):
    """One bad directory answers its own requests with an error, at once; healthy adapters keep loading."""
    root = tmp_path / "mixed"
    root.mkdir()
    shutil.copytree(good, root / "healthy")
    shutil.copytree(good, root / "piped")
    make_fifo(root / "piped" / WEIGHTS)
    store = AdapterStore(tiny_llama(), root)
    for _ in range(50):  # the old reader blocked each of these forever: 45 used up a server's worker pool
        err = answer_without_blocking(lambda: store.load("piped"), root / "piped")
        assert isinstance(err, AdapterLoadError) and "FIFO" in str(err)
    assert store.load("healthy") > 0 and store.resident() == ["healthy"]


def test_non_finite_alpha_is_refused_by_the_config_itself():
    for alpha in (float("nan"), float("inf"), -1e39, 1e7):
        with pytest.raises(lorakit.errors.AdapterConfigError, match="lora_alpha"):
            LoraConfig(lora_alpha=alpha)
        with pytest.raises(lorakit.errors.AdapterConfigError, match="lora_alpha"):
            LoraXSConfig(lora_alpha=alpha)
    assert LoraConfig(lora_alpha=-16).lora_alpha == -16  # a negative but sane alpha is a real choice


def test_non_finite_alpha_pattern_is_refused(good, tmp_path):
    bad = tmp_path / "pattern"
    shutil.copytree(good, bad)
    config = json.loads((bad / CONFIG).read_text())
    module = sorted(config["target_modules"])[0]
    config["alpha_pattern"] = {module: -1e39}
    (bad / CONFIG).write_text(json.dumps(config))
    with pytest.raises(CorruptAdapterError, match="alpha_pattern for module .*lora_alpha must be a finite number"):
        load_adapter(tiny_llama(), bad)


def test_duplicate_names_in_a_bases_file_are_refused(tmp_path):
    """The same guarded reader serves lorakit's other safetensors files (bases, heads, checkpoints)."""
    file = tmp_path / "bases.safetensors"
    save_file({"a": torch.zeros(2)}, str(file))
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].decode().rstrip()
    entry = header[header.index('"a"'):header.index("}", header.index('"a"')) + 1]
    raw = (header[:-1] + "," + entry + "}").encode()
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(CorruptAdapterError, match="appears twice"):
        lorakit.io.load_bases(tiny_llama(), file)
