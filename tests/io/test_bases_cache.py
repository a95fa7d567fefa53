"""The LoRA-XS bases cache: a fresh base loads an adapter without any SVD; a bad cache file is never trusted."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit import io
from lorakit.model import bases as basis_setup
from lorakit.model.bases_cache import ENABLE_ENV, ROOT_ENV, BasesCache, default_cache, weight_key
from lorakit.methods import lora_xs
from tests.conftest import MODEL_FACTORIES, model_output


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private cache that takes even the tiny models' weights (normally only weights ≥ 2^16 numbers)."""
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(ENABLE_ENV, raising=False)
    monkeypatch.setattr(basis_setup, "MIN_NUMEL", 0)
    return tmp_path / "cache" / "bases"


@pytest.fixture
def svd_calls(monkeypatch):
    """The weights (B, out, in) of every top-r SVD computed."""
    calls = []
    real = lora_xs.top_singular
    monkeypatch.setattr(lora_xs, "top_singular", lambda w, r: calls.append(w.shape[0]) or real(w, r))
    return calls


def test_fresh_base_loads_adapter_without_any_svd(cache_dir, svd_calls, ids, tmp_path):
    model = MODEL_FACTORIES["llama"](0)
    lk.attach(model, lk.LoraXSConfig(r=4, init_std=0.05), "a")
    n_modules = len(lk.adapted_layers(model))
    assert sum(svd_calls) == n_modules and len(list(cache_dir.iterdir())) == n_modules
    io.save_adapter(model, "a", tmp_path / "ad")
    svd_calls.clear()
    for _ in range(2):  # a fresh base each time: nothing computed, the output is the trained model's
        fresh = MODEL_FACTORIES["llama"](0)
        io.load_adapter(fresh, tmp_path / "ad", "a")
        assert svd_calls == []
        with lk.use_adapter(fresh, "a"):  # (the route names adapter "a" on both models)
            torch.testing.assert_close(model_output(fresh, ids), model_output(model, ids), rtol=0, atol=1e-6)
    lk.attach(MODEL_FACTORIES["llama"](0), lk.LoraXSConfig(r=3), "b")  # smaller rank: a cached prefix
    assert svd_calls == []
    lk.attach(MODEL_FACTORIES["llama"](0), lk.LoraXSConfig(r=6), "c")  # larger rank: computed, re-cached
    assert sum(svd_calls) == n_modules
    svd_calls.clear()
    lk.attach(MODEL_FACTORIES["llama"](0), lk.LoraXSConfig(r=5), "d")
    assert svd_calls == []


def test_another_base_misses_the_cache(cache_dir, svd_calls):
    lk.attach(MODEL_FACTORIES["llama"](0), lk.LoraXSConfig(r=4), "a")
    first = sum(svd_calls)
    lk.attach(MODEL_FACTORIES["llama"](1), lk.LoraXSConfig(r=4), "a")  # other weights: other keys
    assert sum(svd_calls) == 2 * first


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_weight"])
def test_bad_cache_file_is_ignored_with_a_warning_and_replaced(cache_dir, svd_calls, damage):
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    model = torch.nn.Sequential(torch.nn.Linear(16, 24))
    with torch.no_grad():
        model[0].weight.copy_(w)
    good = basis_setup.lora_xs_bases_for(model, ["0"], 4)["0"]
    path = BasesCache(cache_dir).path(weight_key(w))
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    else:  # a valid file holding the basis of another weight under this weight's key (a key collision)
        BasesCache(cache_dir).put(w, lora_xs.svd_basis(torch.randn(24, 16), 4))
    svd_calls.clear()
    with pytest.warns(UserWarning, match="ignoring .*LoRA-XS bases cache file"):
        again = basis_setup.lora_xs_bases_for(model, ["0"], 4)["0"]
    assert svd_calls == [1]
    torch.testing.assert_close(again.fingerprint, good.fingerprint, rtol=0, atol=1e-6)
    svd_calls.clear()
    basis_setup.lora_xs_bases_for(model, ["0"], 4)  # the file was rewritten: a clean hit now
    assert svd_calls == []


def test_cache_can_be_turned_off_and_small_weights_skip_it(tmp_path, monkeypatch, svd_calls):
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    monkeypatch.setenv(ENABLE_ENV, "0")
    assert default_cache() is None
    lk.attach(MODEL_FACTORIES["llama"](0), lk.LoraXSConfig(r=4), "a")
    assert not (tmp_path / "bases").exists()
    monkeypatch.delenv(ENABLE_ENV)
    assert default_cache().directory == tmp_path / "bases"
    lk.attach(MODEL_FACTORIES["llama"](0), lk.LoraXSConfig(r=4), "a")  # tiny weights: below MIN_NUMEL
    assert not (tmp_path / "bases").exists()


def test_weight_key_follows_content_shape_and_dtype_not_layout():
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    key = weight_key(w)
    assert weight_key(w.clone()) == key and weight_key(w.T.contiguous().T) == key  # a transposed view
    changed = w.clone()
    changed[-1, -1] += 1.0  # the last entry is always sampled
    assert weight_key(changed) != key
    assert weight_key(w.double()) != key and weight_key(w[:, :29]) != key


def test_unwritable_cache_warns_and_still_gives_bases(tmp_path, monkeypatch):
    monkeypatch.setattr(basis_setup, "MIN_NUMEL", 0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = torch.nn.Sequential(torch.nn.Linear(16, 24))
    with pytest.warns(UserWarning, match="could not write"):
        bases = basis_setup.lora_xs_bases_for(model, ["0"], 4, cache=BasesCache(blocker / "bases"))
    assert bases["0"].rank == 4
