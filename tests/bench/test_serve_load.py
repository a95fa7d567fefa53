"""`lorakit bench serve`: the report's figures and goals, and a real run end to end (a `lorakit serve` process
over a Llama config with random weights, concurrent HTTP clients, TTFT probes, the decode-step bound)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.cli.bench_serve import main as bench_serve
from lorakit.bench.serve_report import BASE, add_ratios, evaluate_goals, prefill_ceiling, quantile, render

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

CONFIG = Path(__file__).resolve().parents[2] / "scripts" / "configs" / "tiny-llama.json"


def test_quantile_interpolates():
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.99) == pytest.approx(3.97)
    assert quantile([5.0], 0.99) == 5.0
    assert quantile([], 0.5) is None


def _summaries(tps: dict[tuple[str, int], float]) -> list[dict]:
    out = [{"method": m, "adapters": n, "tokens_per_s": v, "p50_s": 1.0, "p99_s": 2.0, "ttft_idle_p50_s": 0.1,
            "ttft_idle_count": 4, "ttft_load_p50_s": None, "ttft_load_count": 0, "requests": 64}
           for (m, n), v in tps.items()]
    add_ratios(out)
    return out


def test_goals_are_computed_from_the_figures_and_scoped_to_their_device():
    tps = {(BASE, 0): 100.0, ("lora_xs", 1): 95.0, ("lora_xs", 128): 89.0, ("lora", 1): 80.0, ("lora", 32): 76.0}
    bound = {"tokens_per_s": 125.0}
    cpu = {g["goal"]: g for g in evaluate_goals(_summaries(tps), bound, "cpu")}
    assert cpu["CPU: 1 LoRA-XS adapter vs base only"]["figure"] == pytest.approx(0.95)
    assert cpu["CPU: 1 LoRA-XS adapter vs base only"]["met"] is True
    assert cpu["CPU: 1 LoRA adapter vs base only"]["met"] is False  # 0.80 < 0.90
    assert cpu["128 distinct LoRA-XS vs 1 LoRA-XS adapter"]["figure"] == pytest.approx(89 / 95)
    assert cpu["128 distinct LoRA-XS vs 1 LoRA-XS adapter"]["met"] is False  # 0.937 < 0.95
    assert cpu["base only vs the engine's decode-step bound"]["figure"] == pytest.approx(0.8)
    assert cpu["base only vs the engine's decode-step bound"]["met"] is True
    gpu_goal = cpu["GPU: 128 distinct LoRA-XS vs base only"]
    assert gpu_goal["met"] is None and gpu_goal["figure"] == pytest.approx(0.89) and "this run is on cpu" in gpu_goal["note"]
    gpu = {g["goal"]: g for g in evaluate_goals(_summaries(tps), bound, "cuda")}
    assert gpu["GPU: 128 distinct LoRA-XS vs base only"]["met"] is True
    assert gpu["GPU: 32 distinct LoRA vs base only"]["met"] is True
    assert gpu["CPU: 1 LoRA adapter vs base only"]["met"] is None
    no_bound = {g["goal"]: g for g in evaluate_goals(_summaries({(BASE, 0): 1.0}), None, "cpu")}
    assert "decode-step bound not in this run" in no_bound["base only vs the engine's decode-step bound"]["note"]


def test_the_prefill_inclusive_ceiling_prices_the_loads_prompt_tokens_at_the_bounds_prefill_cost():
    bound = {"tokens_per_s": 100.0, "prefill_s_per_token": 0.002}
    base = {"method": BASE, "adapters": 0, "tokens_per_s": 50.0, "completion_tokens": [1000, 1000, 1200],
            "engine_time": {"prompt_tokens": 1500.0}}
    # 1000 tokens decode in 10 s at the bound; 1500 prompt tokens prefill in 3 s: 1000 / 13 s = 10/13 of the bound
    assert prefill_ceiling(base, bound) == pytest.approx(10 / 13)
    assert prefill_ceiling(base | {"engine_time": {"prompt_tokens": 0.0}}, bound) == pytest.approx(1.0)
    assert prefill_ceiling(base, {"tokens_per_s": 100.0}) is None  # a bound without its prefill figure
    assert prefill_ceiling(base | {"engine_time": None}, bound) is None
    add_ratios([base])
    goal = {g["goal"]: g for g in evaluate_goals([base], bound, "cpu")}["base only vs the engine's decode-step bound"]
    assert goal["figure"] == pytest.approx(0.5) and goal["met"] is False
    assert goal["ceiling"] == pytest.approx(10 / 13) and "prefill-inclusive ceiling 0.77×" in goal["note"]


def test_the_rendered_report_says_met_or_not_met_from_the_figures():
    summaries = _summaries({(BASE, 0): 100.0, ("lora_xs", 1): 95.0, ("lora_xs", 128): 96.0})
    goals = evaluate_goals(summaries, {"tokens_per_s": 200.0}, "cpu")
    meta = {"max_batch": 32, "prefill_tokens": 512, "device": "cpu", "dtype": "float32", "base": "b",
            "adapters_per_method": 128, "adapter_bytes": {"lora_xs": 300000}, "clients": 32, "requests": 64,
            "max_tokens": 32, "rounds": 2, "probes": 4, "machine": "m"}
    text = render(summaries, goals, None, meta, "lorakit bench serve")
    assert "| CPU: 1 LoRA-XS adapter vs base only | 0.95× | ≥ 0.90× | **met** |" in text
    assert "| 128 distinct LoRA-XS vs 1 LoRA-XS adapter | 1.01× | ≥ 0.95× | **met** |" in text
    assert "| base only vs the engine's decode-step bound | 0.50× | ≥ 0.70× | **not met** |" in text
    assert "| 128 distinct lora_xs | 96.0 | 0.96× | 1.01× |" in text


def test_a_quick_run_against_a_served_llama_config(tmp_path):
    out = tmp_path / "report"
    assert bench_serve(["--quick", "--base", str(CONFIG), "--out", str(out)]) == 0
    report = json.loads((out / "bench_serve.json").read_text())
    scenarios = {(s["method"], s["adapters"]): s for s in report["scenarios"]}
    assert sorted(scenarios) == sorted([(BASE, 0), ("lora_xs", 1), ("lora_xs", 3), ("lora", 1), ("lora", 3)])
    for s in scenarios.values():
        assert s["requests"] == 8
        assert s["completion_tokens"] == [8 * 4]  # ignore_eos: every load request decodes exactly max_tokens
        assert s["tokens_per_s"] > 0 and s["p99_s"] >= s["p50_s"] > 0
        assert s["ttft_idle_count"] == 2 and s["ttft_idle_p50_s"] > 0  # --probes 2, one round
        assert s["ttft_load_count"] >= 1 and s["ttft_load_p50_s"] > 0
        t = s["engine_time"]  # the server's own counters over the load: its steps fit inside the read window
        assert t["decode_steps"] >= 3 and t["prefill_steps"] >= 1  # 4 tokens each: 3 decode steps after prefill
        assert 0 < t["decode_s"] and 0 < t["prefill_s"] and t["decode_s"] + t["prefill_s"] < t["window_s"]
        assert t["window_s"] > t["wall_s"] > 0
    assert scenarios[("lora", 3)]["vs_one_adapter"] == pytest.approx(
        scenarios[("lora", 3)]["tokens_per_s"] / scenarios[("lora", 1)]["tokens_per_s"])
    assert scenarios[("lora_xs", 1)]["vs_base"] == pytest.approx(
        scenarios[("lora_xs", 1)]["tokens_per_s"] / scenarios[(BASE, 0)]["tokens_per_s"])
    bound = report["decode_bound"]
    assert bound["rows"] == 4 and bound["steps"] >= 3 and bound["tokens_per_s"] == pytest.approx(4 / bound["step_s"])
    assert bound["prefill_s_per_token"] > 0
    base_time = scenarios[(BASE, 0)]["engine_time"]
    assert base_time["prompt_tokens"] >= 8 * 10  # the server's counter: 8 load prompts of over 13 characters
    goals = {g["goal"]: g for g in report["goals"]}
    assert goals["base only vs the engine's decode-step bound"]["figure"] == pytest.approx(
        scenarios[(BASE, 0)]["tokens_per_s"] / bound["tokens_per_s"])
    assert 0 < goals["base only vs the engine's decode-step bound"]["ceiling"] < 1
    assert isinstance(goals["CPU: 1 LoRA adapter vs base only"]["met"], bool)
    assert goals["GPU: 32 distinct LoRA vs base only"]["met"] is None
    text = (out / "bench_serve.md").read_text()
    assert "| base only | " in text.split("Where a load's wall time went")[1]
    assert "| 3 distinct lora_xs |" in text and "Goals (issue 14)" in text and "Decode-step bound" in text
    assert (out / "bench_serve.png").stat().st_size > 1000
    assert report["meta"]["base"] == str(CONFIG) and report["meta"]["methods"] == ["lora_xs", "lora"]
