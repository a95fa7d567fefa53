"""Replicas (scripts/replicas.py): two `lorakit serve` processes on one S3 bucket (moto's server on
127.0.0.1, started by the script) serve an adapter uploaded once after they started, with the same text;
behind nginx, a load test sees no failed request while one replica drains, is down and starts again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_script(tmp_path, *args: str, timeout: float) -> dict:
    out = tmp_path / "replicas.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "replicas.py"), "--out", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    result["returncode"] = done.returncode
    return result


def test_two_replicas_serve_one_upload(tmp_path):
    result = run_script(tmp_path, "--replicas", "2", "--no-nginx", timeout=600)
    assert result["served_by_every_replica"] and result["same_text_on_every_replica"], result
    assert [status for status, _ in result["answers"]] == [200, 200]
    assert result["returncode"] == 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (apt-get install -y nginx)")
def test_no_failed_request_while_a_replica_restarts(tmp_path):
    result = run_script(tmp_path, "--replicas", "2", "--requests", "30", "--concurrency", "4", "--time-limit", "400",
                        timeout=900)
    load = result["load"]
    assert load["bounced"], load  # the replica was stopped, exited, came back, and requests followed
    assert load["failed"] == 0, load
    assert sum(load["by_phase"]["while stopped"].values()) > 0
    assert result["returncode"] == 0
