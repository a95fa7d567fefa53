"""scripts/gpu_check.py: pytest output parsed (even cut short), parts time-limited, the summary and JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

CUT_SHORT = """\
collecting ... collected 6 items / 2 deselected / 4 selected
tests/layer/test_linear.py::test_forward[cuda-bfloat16] PASSED                  [ 25%]
tests/layer/test_linear.py::test_forward[cuda-float16] FAILED                   [ 50%]
tests/methods/test_lora_xs.py::test_mixed[cuda-bfloat16] SKIPPED (no bnb) [ 75%]
tests/methods/test_lora_xs.py::test_pack[cuda-float32] ERROR             [ 80%]
ERROR tests/serve/test_api.py - ModuleNotFoundError: No module named 'fastapi'
tests/methods/test_lora_xs.py::test_pack[cuda-float16] """


def test_parse_pytest_counts_a_run_cut_short():
    parsed = gpu_check.parse_pytest(CUT_SHORT)
    assert (parsed["passed"], parsed["failed"], parsed["skipped"], parsed["error"]) == (1, 1, 1, 1)
    assert parsed["failed_ids"] == ["tests/layer/test_linear.py::test_forward[cuda-float16]",
                                    "tests/methods/test_lora_xs.py::test_pack[cuda-float32]"]
    assert parsed["collection_errors"] == ["tests/serve/test_api.py - ModuleNotFoundError: No module named 'fastapi'"]


def test_settings_default_to_the_gpu_and_to_a_dry_run_on_cpu():
    gpu = gpu_check.settings({})
    assert (gpu["device"], gpu["tests_k"], gpu["quick"]) == ("cuda", "cuda", False)
    assert gpu["model"].endswith("tinyllama-1.1b.json") and (ROOT / gpu["model"]).is_file()
    # every part's limit and kill grace fit inside the shell script's own limit (480 s, under 8 minutes)
    limit = int(re.search(r"CHECK_TIMEOUT:-(\d+)", (ROOT / "scripts" / "gpu_check.sh").read_text())[1])
    parts = gpu_check.PROBE_TIMEOUT + gpu["tests_timeout"] + gpu["bench_timeout"] + 2 * gpu_check.KILL_GRACE
    assert parts < limit <= 8 * 60
    cpu = gpu_check.settings({"DEVICE": "cpu", "OUT": "/x", "BENCH_ARGS": "--only bases training"})
    assert cpu["quick"] and cpu["model"].endswith("tiny-llama.json") and cpu["out"] == "/x"
    assert cpu["bench_args"] == ["--only", "bases", "training"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_part_past_its_limit_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    part = gpu_check.run_part(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; sleep 60"], tmp_path / "slow.log",
                              timeout=1)
    assert part["timed_out"] and part["rc"] != 0
    assert (tmp_path / "slow.log").read_text().startswith("$ bash")
    child = int(pid_file.read_text())
    for _ in range(50):  # the kill is sent; give the kernel a moment to reap the orphan
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child), "the part's background child outlived the part"


def test_summary_lists_failures_and_goals():
    check = {"settings": {"device": "cuda", "tests_k": "cuda"}, "environment": {"gpu": "H100"}, "seconds": 400,
             "ok": False,
             "tests": {**gpu_check.parse_pytest(CUT_SHORT), "seconds": 100, "timed_out": True},
             "bench": {"command": "lorakit bench speed", "seconds": 200, "rc": 0, "timed_out": False,
                       "results": [{"scenario": "training", "measure": "step", "unit": "s", "ours": 0.2, "base": None,
                                    "peft": 0.25, "goal": "≤ 0.9× PEFT", "met": True}],
                       "failures": [{"scenario": "decode-xs", "error": "RuntimeError: boom"}]}}
    text = gpu_check.summary(check)
    assert "**timed out**" in text and "failed: tests/layer/test_linear.py::test_forward[cuda-float16]" in text
    assert "| training | step | 0.2 s | — | 0.25 | — | 0.800× | ≤ 0.9× PEFT | yes |" in text
    assert "scenario failed: decode-xs: RuntimeError: boom" in text and "Goals met: 1 of 1" in text


@pytest.mark.slow
def test_dry_run_writes_json_and_summary(tmp_path):
    """The whole script on the CPU: a two-test file (one fails) and one benchmark scenario."""
    tests = tmp_path / "test_sample.py"
    tests.write_text("def test_ok_cpu():\n    pass\n\ndef test_bad_cpu():\n    assert False\n")
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(tmp_path / "out"), "TESTS": str(tests), "TESTS_K": "cpu",
           "BENCH_ARGS": "--only bases", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr  # one test failed
    check = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert (check["tests"]["passed"], check["tests"]["failed"]) == (1, 1)
    assert [r["scenario"] for r in check["bench"]["results"]] == ["bases"] and check["bench"]["rc"] == 0
    assert (tmp_path / "out" / "gpu_check.md").read_text().startswith("# GPU check (cpu")
