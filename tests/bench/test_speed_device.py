"""`lorakit bench speed --device/--dtype/--model CONFIG`: random Llama from a config, the device scenarios, failures kept."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.bench import device_speed
from lorakit.cli.bench_speed import main as bench_speed
from lorakit.base_models.llama_config import PRESETS, ModelConfigError, build_llama, is_config_spec, read_config

ONE_LAYER = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 128}


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "one-layer.json"
    path.write_text(json.dumps(ONE_LAYER))
    return path


def test_config_file_builds_the_shape_it_names(config_file):
    config = read_config(str(config_file))
    model = build_llama(config, "cpu", torch.bfloat16)
    assert model.dtype == torch.bfloat16 and len(model.model.layers) == 1
    assert model.model.layers[0].mlp.up_proj.weight.shape == (64, 32)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)  # 2 kv heads × 8
    again = build_llama(config, "cpu", torch.bfloat16)  # same seed: lorakit's and PEFT's copies are equal
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)


def test_tinyllama_preset_has_154_projections():
    config = read_config("tinyllama-1.1b-random")
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (2048, 5632, 22)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (32, 4, 32000)
    assert is_config_spec("tinyllama-1.1b-random") and is_config_spec("x.json") and not is_config_spec("smollm2-135m")
    assert set(PRESETS) == {"tinyllama-1.1b-random", "tiny-llama-random"}


@pytest.mark.parametrize("text, words", [(None, "cannot read"), ("{not json", "not JSON"), ("[1, 2]", "JSON object"),
                                          ('{"model_type": "bert"}', "only 'llama'"),
                                          ('{"hidden_size": 30, "num_attention_heads": 4}', "multiple")])
def test_bad_config_file_names_the_file(tmp_path, text, words):
    path = tmp_path / "model.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ModelConfigError, match=words) as err:
        read_config(str(path))
    assert str(path) in str(err.value)


def test_device_bench_runs_scenarios_and_keeps_going_after_a_failure(config_file, tmp_path, monkeypatch, device):
    """A scenario that raises is recorded with its error; the scenarios after it still report figures."""
    def broken(bench):
        raise RuntimeError("core bug on this device")

    monkeypatch.setitem(device_speed.STEPS, "prefill", broken)
    out = tmp_path / "out"
    bench_speed(["--device", device.type, "--dtype", "bfloat16", "--model", str(config_file), "--quick",
                "--repeats", "1", "--out", str(out), "--only", "agreement", "prefill", "prefill-xs", "training"])
    report = json.loads((out / "bench_speed_device.json").read_text())
    assert report["device"] == device.type and report["dtype"] == "bfloat16" and report["modules"] == 7
    assert [f["scenario"] for f in report["failures"]] == ["prefill"]
    assert "core bug on this device" in report["failures"][0]["error"]
    by = {r["scenario"]: r for r in report["results"]}
    assert set(by) == {"agreement", "prefill-xs", "training"}
    agreement = by["agreement"]
    assert agreement["peft"] > 0 and agreement["ours"] < 0.5  # same weights: close, and bf16 is not exact
    assert by["prefill-xs"]["ours"] > 0 and by["prefill-xs"]["base"] > 0
    assert by["training"]["ours"] > 0 and by["training"]["peft"] > 0
    assert "scenario failed: prefill" in (out / "bench_speed_device.md").read_text()


def test_synced_waits_only_on_cuda():
    calls = []
    fn = lambda: calls.append(1)  # noqa: E731
    assert device_speed.synced(fn, torch.device("cpu")) is fn
    wrapped = device_speed.synced(fn, torch.device("cuda"))
    assert wrapped is not fn
    if torch.cuda.is_available():
        wrapped()
        assert calls == [1]


def test_xs_check_finds_mixed_rows_equal_to_each_alone(config_file, tmp_path, device):
    out = tmp_path / "out"
    bench_speed(["--device", device.type, "--dtype", "float32", "--model", str(config_file), "--quick",
                "--out", str(out), "--only", "xs-check"])
    report = json.loads((out / "bench_speed_device.json").read_text())
    assert report["failures"] == []
    check, load = report["results"]
    assert check["met"] is True and check["ours"] <= 1e-4 and load["unit"] == "ms" and load["ours"] > 0
    assert float(check["note"].rsplit(" ", 1)[1]) > 1e-3  # the adapter changed the logits: the check can fail
