"""The one format table (lorakit.io.formats): what save_adapter writes is what format_of reads back, unknown
formats are refused by name, and the server's store goes by the same rows."""

from __future__ import annotations

import json

import pytest

import lorakit as lk
from lorakit.errors import CorruptAdapterError, UnsupportedAdapterError
from lorakit.io import load_adapter, save_adapter
from lorakit.io.files import CONFIG_NAME, read_adapter_dir
from lorakit.io.formats import FORMATS, format_for, format_of
from lorakit.serve.adapter_store import AdapterLoadError, AdapterStore
from tests.conftest import tiny_llama
from tests.io.util import adapted, assert_unchanged, snapshot

SAVED_AS = {"lora": "peft-lora", "lora_xs": "native", "vera": "native", "prefix": "peft-prefix"}


def saved(method: str, path):
    if method == "prefix":
        model = tiny_llama()
        lk.attach(model, lk.PrefixConfig(num_virtual_tokens=3), "a")
    else:
        model = adapted("llama", method)
    return model, save_adapter(model, "a", path)


@pytest.mark.parametrize("method", sorted(SAVED_AS))
def test_the_format_a_method_saves_in_is_the_one_its_files_are_read_as(method, tmp_path):
    model, path = saved(method, tmp_path / method)
    config = lk.adapter_config(model, "a")
    files = read_adapter_dir(path)
    assert format_for(config).name == format_of(files.config, path / CONFIG_NAME).name == SAVED_AS[method]
    assert [row.name for row in FORMATS if row.sniff(files.config)] == [SAVED_AS[method]]  # exactly one row
    fresh = tiny_llama()
    assert load_adapter(fresh, path, "b") == "b" and lk.adapter_config(fresh, "b") == config


def test_formats_the_table_lacks_are_refused_by_name(tmp_path):
    where = tmp_path / CONFIG_NAME
    with pytest.raises(UnsupportedAdapterError, match="'ADALORA' is not supported"):
        format_of({"peft_type": "ADALORA"}, where)
    with pytest.raises(CorruptAdapterError, match="not an adapter config"):
        format_of({"r": 4}, where)


@pytest.mark.parametrize("method, what", [("lora", "PEFT LoRA"), ("prefix", "PEFT prefix-tuning"),
                                          ("vera", "vera")])
def test_only_lora_xs_loads_packed_and_the_refusal_names_the_format(method, what, tmp_path):
    _, path = saved(method, tmp_path / method)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(UnsupportedAdapterError, match=f"loaded packed.*{what}"):
        load_adapter(model, path, packed=True)
    assert_unchanged(model, before)


def test_the_store_takes_formats_from_the_table(tmp_path):
    """LoRA-XS into the bank (the row packs it), LoRA as modules, prefix refused before anything loads."""
    root = tmp_path / "adapters"
    saved("lora_xs", root / "xs")
    saved("lora", root / "lora")
    saved("prefix", root / "prefix")
    model = tiny_llama()
    store = AdapterStore(model, root)
    store.load("xs")
    store.load("lora")
    registry = model.lorakit_registry
    assert registry.packed == {"xs"} and set(registry.configs) == {"xs", "lora"}
    with pytest.raises(AdapterLoadError, match="peft-prefix adapter, which the serving engine does not serve"):
        store.load("prefix")
    assert set(registry.configs) == {"xs", "lora"} and store.stats.load_failures == 1
    assert json.loads((root / "prefix" / CONFIG_NAME).read_text())["peft_type"] == "PREFIX_TUNING"
