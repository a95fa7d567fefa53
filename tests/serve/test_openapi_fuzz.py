"""schemathesis over every route of the real app with `--checks all` (scripts/fuzz_openapi.py): 0 failures.
Slow (about a minute at 20 examples per operation and phase on 2 busy cores)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("schemathesis") is None, reason="schemathesis is not installed")
def test_schemathesis_all_checks_pass(tmp_path):
    out = tmp_path / "fuzz.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz_openapi.py"), "--max-examples", "20",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    result = json.loads(out.read_text())
    assert done.returncode == 0 and result["junit"].get("failures") == 0, done.stdout[-6000:]
    assert result["junit"]["tests"] >= 11  # every operation was tested
