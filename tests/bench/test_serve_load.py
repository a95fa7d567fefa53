"""`lorakit bench serve` end to end: a real `lorakit serve` process, concurrent HTTP clients, the report."""

import json

import pytest

from lorakit.bench import serve_load

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


def test_quantile_interpolates():
    assert serve_load._quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert serve_load._quantile([1.0, 2.0, 3.0, 4.0], 0.99) == pytest.approx(3.97)
    assert serve_load._quantile([5.0], 0.99) == 5.0


def test_load_test_against_a_served_tiny_model(tmp_path):
    from tests.train.conftest import save_tiny_llama

    base = save_tiny_llama(tmp_path / "base")
    out = tmp_path / "docs"
    assert serve_load.main(["--base", str(base), "--adapters", "0", "1", "3", "--clients", "4", "--requests", "8",
                            "--max-tokens", "5", "--rounds", "1", "--threads", "1", "--prompt-chars", "40",
                            "--out", str(out)]) == 0
    report = json.loads((out / "bench_serve.json").read_text())
    scenarios = {s["adapters"]: s for s in report["scenarios"]}
    assert sorted(scenarios) == [0, 1, 3]
    for s in scenarios.values():
        assert s["requests"] == 8
        assert s["completion_tokens"] == [8 * 5]  # ignore_eos: every request decodes exactly max_tokens
        assert s["tokens_per_s"] > 0 and s["p99_s"] >= s["p50_s"] > 0
    assert scenarios[3]["vs_one_adapter"] == pytest.approx(scenarios[3]["tokens_per_s"] / scenarios[1]["tokens_per_s"])
    assert "| 3 |" in (out / "bench_serve.md").read_text()
    assert (out / "bench_serve.png").stat().st_size > 1000
