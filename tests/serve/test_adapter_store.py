"""lorakit.serve.adapter_store: load on first use, LRU eviction under a byte budget, pins, path safety."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest

from lorakit.errors import AdapterNotFoundError
from lorakit.io import save_adapter
from lorakit.serve.engine import Engine, SamplingParams
from lorakit.serve.adapter_store import AdapterLoadError, InvalidAdapterNameError, AdapterStore
from tests.conftest import tiny_llama
from tests.serve.conftest import greedy_alone, saved_adapters, with_adapters

NAMES = ["xs0", "lora1", "xs2", "lora3"]


@pytest.fixture(scope="module")
def source():
    """The model the adapters were trained on (attached directly): the reference for every output."""
    return with_adapters(tiny_llama(), NAMES)


@pytest.fixture(scope="module")
def adapter_dir(source, tmp_path_factory):
    return saved_adapters(source, NAMES, tmp_path_factory.mktemp("adapters"))


def test_loads_on_first_use_and_matches_the_directly_attached_adapter(source, adapter_dir):
    model = tiny_llama()
    store = AdapterStore(model, adapter_dir)
    assert store.available() == sorted(NAMES)
    assert store.resident() == []
    engine = Engine(model).start()
    store.engine = engine
    try:
        for name in NAMES:
            store.acquire(name)
            got = engine.submit([5, 6, 7], name, SamplingParams(max_tokens=8)).result().token_ids
            store.release(name)
            assert got == greedy_alone(source, [5, 6, 7], name, 8), name
    finally:
        engine.close()
    assert sorted(store.resident()) == sorted(NAMES)
    assert store.stats.loads == 4


@pytest.mark.parametrize("name", ["../x", "/etc", "a/b", "..", ".hidden", "", "x" * 200, "a\\b", "xs0\n", "v1.2"])
def test_names_that_could_leave_the_directory_are_refused(adapter_dir, name):
    store = AdapterStore(tiny_llama(), adapter_dir)
    with pytest.raises(InvalidAdapterNameError):
        store.acquire(name)


def test_symlink_out_of_the_directory_is_refused(adapter_dir, tmp_path):
    outside = tmp_path / "outside"
    os.symlink(adapter_dir / "xs0", outside)  # a real adapter, but outside the served directory
    served = tmp_path / "served"
    served.mkdir()
    os.symlink(outside, served / "sneaky")
    store = AdapterStore(tiny_llama(), served)
    with pytest.raises(InvalidAdapterNameError):
        store.acquire("sneaky")
    assert store.available() == []


def test_unknown_adapter_lists_what_exists(adapter_dir):
    store = AdapterStore(tiny_llama(), adapter_dir)
    with pytest.raises(AdapterNotFoundError, match="xs0"):
        store.acquire("nope")


def test_lru_eviction_under_the_byte_budget_spares_pinned_adapters(adapter_dir):
    model = tiny_llama()
    probe = AdapterStore(model, adapter_dir)
    sizes = {n: probe.load(n) for n in NAMES}
    for n in NAMES:
        probe.unload(n)
    store = AdapterStore(model, adapter_dir, budget_bytes=sizes["lora1"] + sizes["lora3"])
    store.acquire("lora1")  # pinned: a running request uses it
    store.load("xs0")
    store.load("lora3")  # over budget: evicts xs0 (least recent unpinned), never lora1
    assert store.resident() == ["lora1", "lora3"]
    assert store.stats.evictions == 1
    assert "xs0" not in model.lorakit_registry.configs  # really detached
    store.release("lora1")
    store.load("xs0")  # now lora1 is the least recently used
    assert "lora1" not in store.resident() and store.resident_bytes() <= store.budget_bytes


def test_adapter_larger_than_the_budget_is_refused(adapter_dir):
    store = AdapterStore(tiny_llama(), adapter_dir, budget_bytes=10)
    with pytest.raises(AdapterLoadError, match="budget"):
        store.load("lora1")


def test_unload_waits_for_running_requests(adapter_dir):
    model = tiny_llama()
    store = AdapterStore(model, adapter_dir)
    store.acquire("xs2")
    assert store.unload("xs2") is False  # deferred
    assert "xs2" in model.lorakit_registry.configs
    store.release("xs2")
    assert store.resident() == [] and "xs2" not in model.lorakit_registry.configs
    with pytest.raises(AdapterNotFoundError):
        store.unload("xs2")


def test_a_corrupt_adapter_fails_alone(source, adapter_dir, tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    save_adapter(source, "xs0", root / "good")
    (root / "bad").mkdir()
    (root / "bad" / "adapter_config.json").write_text((adapter_dir / "xs0" / "adapter_config.json").read_text())
    (root / "bad" / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    model = tiny_llama()
    store = AdapterStore(model, root)
    with pytest.raises(AdapterLoadError, match="bad"):
        store.load("bad")
    assert store.stats.load_failures == 1
    store.load("good")
    assert store.resident() == ["good"]


def test_concurrent_first_use_loads_once(adapter_dir):
    store = AdapterStore(tiny_llama(), adapter_dir)
    errors = []

    def use():
        try:
            store.acquire("lora3")
            store.release("lora3")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and store.stats.loads == 1


def test_lora_xs_bases_are_computed_off_the_engine_thread(adapter_dir, monkeypatch):
    """The SVDs of a first LoRA-XS load run on the loading thread; the engine thread only attaches."""
    import lorakit.methods.lora_xs as lora_xs

    engine_threads = []
    real_svd = lora_xs.top_singular  # every LoRA-XS basis computation goes through it

    def watched_svd(*args, **kwargs):
        import threading as th

        engine_threads.append(th.current_thread().name)
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(lora_xs, "top_singular", watched_svd)
    model = tiny_llama()
    engine = Engine(model).start()
    try:
        store = AdapterStore(model, adapter_dir, engine=engine)
        store.load("xs0")
        assert engine.submit([3, 4], "xs0", SamplingParams(max_tokens=2)).result().reason in ("length", "stop")
    finally:
        engine.close()
    assert engine_threads and "lorakit-engine" not in engine_threads


def test_a_directory_whose_name_breaks_the_rule_is_not_listed_and_asking_says_why(adapter_dir, tmp_path, caplog):
    """Issue 13: `v1.2` was listed by /v1/models, then answered 500 (attach refuses the '.')."""
    root = tmp_path / "dotted"
    shutil.copytree(adapter_dir / "lora1", root / "v1.2")
    shutil.copytree(adapter_dir / "lora1", root / "ok")
    store = AdapterStore(tiny_llama(), root)
    with caplog.at_level("WARNING", logger="lorakit.serve"):
        assert store.available() == ["ok"]
        assert store.available() == ["ok"]
    assert [r.getMessage() for r in caplog.records].count(
        next(r.getMessage() for r in caplog.records if "v1.2" in r.getMessage())) == 1  # logged once
    with pytest.raises(InvalidAdapterNameError, match="letters, digits"):
        store.acquire("v1.2")
    assert store.stats.load_failures == 0


def _with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config["config"].update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))


def test_a_huge_rank_is_refused_before_any_svd(adapter_dir, tmp_path, monkeypatch):
    """Issue 11.5: `r: 100000` cost ~100 s of SVDs before the rank was checked."""
    import lorakit.methods.lora_xs as lora_xs

    svds = []

    def counted_svd(*args, **kwargs):
        svds.append(args)
        raise AssertionError("an SVD ran before the config was validated")

    monkeypatch.setattr(lora_xs, "top_singular", counted_svd)  # every LoRA-XS basis computation goes through it
    _with_config(adapter_dir / "xs0", tmp_path / "big" / "big", r=100000)
    store = AdapterStore(tiny_llama(), tmp_path / "big")
    with pytest.raises(AdapterLoadError, match="rank-100000"):
        store.load("big")
    assert svds == []


def test_a_failed_load_is_remembered_until_its_files_change(adapter_dir, tmp_path, monkeypatch):
    import lorakit.io.files as files_module
    import lorakit.serve.adapter_store as store_module

    reads = []
    real_read = files_module.read_adapter_dir

    def counted_read(path):
        reads.append(path)
        return real_read(path)

    monkeypatch.setattr(files_module, "read_adapter_dir", counted_read)
    if hasattr(store_module, "read_adapter_dir"):
        monkeypatch.setattr(store_module, "read_adapter_dir", counted_read)
    _with_config(adapter_dir / "xs0", tmp_path / "d" / "bad", r=100000)
    store = AdapterStore(tiny_llama(), tmp_path / "d")
    for _ in range(3):
        with pytest.raises(AdapterLoadError, match="rank-100000"):
            store.load("bad")
    assert len(reads) == 1 and store.stats.load_failures == 1  # the files were read once
    config_file = tmp_path / "d" / "bad" / "adapter_config.json"
    config_file.write_text(config_file.read_text().replace("100000", "4"))  # fixed: retried, and loads
    store.load("bad")
    assert len(reads) == 2 and store.resident() == ["bad"]


def test_a_pending_unload_stays_pending_when_a_new_request_uses_the_adapter(adapter_dir):
    """Issue 11 (minor): acquiring an adapter with a pending unload silently cancelled the unload."""
    model = tiny_llama()
    store = AdapterStore(model, adapter_dir)
    store.acquire("lora1")
    assert store.unload("lora1") is False
    store.acquire("lora1")  # a request arrives meanwhile: it runs, the unload still waits
    store.release("lora1")
    assert store.resident() == ["lora1"]
    store.release("lora1")
    assert store.resident() == [] and "lora1" not in model.lorakit_registry.configs


def test_load_errors_name_paths_relative_to_the_adapter_directory(adapter_dir, tmp_path):
    _with_config(adapter_dir / "xs0", tmp_path / "rel" / "wide", r=100000)
    store = AdapterStore(tiny_llama(), tmp_path / "rel")
    with pytest.raises(AdapterLoadError) as info:
        store.load("wide")
    assert str(tmp_path) not in str(info.value) and "wide/adapter_model.safetensors" in str(info.value)
