"""`lorakit serve` wiring: arguments → a working app over a local model directory."""

from __future__ import annotations

import httpx
import pytest

from lorakit.cli.common import UsageError
from lorakit.io import save_adapter
from lorakit.serve.app import BackgroundServer
from lorakit.cli.serve import build_app, build_parser
from tests.serve.conftest import tiny_chat_llama, with_adapters


def test_serve_arguments_build_a_working_server(tokenizer, tmp_path):
    base = tmp_path / "tiny-base"
    model = tiny_chat_llama(len(tokenizer))
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    with_adapters(model, ["pirate"])
    save_adapter(model, "pirate", tmp_path / "adapters" / "pirate")
    args = build_parser().parse_args(["--base", str(base), "--adapters", str(tmp_path / "adapters"),
                                      "--budget-mb", "1", "--max-batch", "4", "--api-key", "k", "--preload"])
    app, server = build_app(args)
    assert server.config.base_name == "tiny-base" and server.store.budget_bytes == 1024 * 1024
    assert server.engine.max_batch == 4 and server.store.resident() == ["pirate"]
    with BackgroundServer(app) as url:
        auth = {"Authorization": "Bearer k"}
        ids = [m["id"] for m in httpx.get(url + "/v1/models", headers=auth).json()["data"]]
        assert ids == ["tiny-base", "pirate"]
        r = httpx.post(url + "/v1/completions", headers=auth, timeout=30,
                       json={"model": "pirate", "prompt": "hi", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_missing_adapter_directory_is_an_error(tmp_path):
    args = build_parser().parse_args(["--adapters", str(tmp_path / "nope")])
    with pytest.raises(UsageError, match="not a directory"):  # `lorakit serve` exits 2 with this message
        build_app(args)


def test_sigterm_exits_0_after_draining(tokenizer, tmp_path):
    """Issue 11.6: `lorakit serve` on SIGTERM drains (at most --drain-timeout) and exits 0; uvicorn re-raised
    the signal after its shutdown, so the process died of it (exit -15)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    base = tmp_path / "tiny-base"
    tiny_chat_llama(len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli.serve", "--base", str(base), "--port", str(port),
                             "--drain-timeout", "2", "--malloc", "default"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, (code, proc.stderr.read().decode()[-2000:])


def test_drain_timeout_argument(tokenizer):
    assert build_parser().parse_args([]).drain_timeout == 30.0
    with pytest.raises(UsageError, match="drain-timeout"):
        build_app(build_parser().parse_args(["--drain-timeout", "-1"]))
    for flags, words in ((["--budget-mb", "-1"], "budget-mb"), (["--max-tokens-limit", "0"], "max-tokens-limit"),
                         (["--max-batch", "0"], "max-batch")):
        with pytest.raises(UsageError, match=words):
            build_app(build_parser().parse_args(flags))


def test_serve_input_errors_exit_2_without_a_traceback(tmp_path, capsys):
    from lorakit.cli.main import main

    assert main(["serve", "--adapters", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and "Traceback" not in err


CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[2] / "scripts" / "configs"


def test_a_llama_config_base_is_served_with_random_weights_on_the_asked_dtype():
    """--base CONFIG.json: random weights (no download), a one-token-per-character tokenizer, --dtype and
    --prefill-tokens reach the model and the engine."""
    import torch

    args = build_parser().parse_args(["--base", str(CONFIGS / "tiny-llama.json"), "--dtype", "bfloat16",
                                      "--prefill-tokens", "7", "--max-batch", "3"])
    app, server = build_app(args)
    assert server.config.base_name == "tiny-llama"
    assert next(server.engine.model.parameters()).dtype == torch.bfloat16
    assert server.engine.prefill_tokens == 7 and server.engine.max_batch == 3
    assert server.engine.compile_decode is False
    with BackgroundServer(app) as url:
        r = httpx.post(url + "/v1/completions", timeout=30,
                       json={"model": "tiny-llama", "prompt": "a prompt of 27 characters..", "max_tokens": 6,
                             "temperature": 0})
    usage = r.json()["usage"]
    assert r.status_code == 200 and usage == {"prompt_tokens": 28, "completion_tokens": 6, "total_tokens": 34}
    assert len(r.json()["choices"][0]["text"]) <= 6  # one character per token (none for the 3 special ids)


@pytest.mark.parametrize("flags, words", [
    (["--prefill-tokens", "0"], "prefill-tokens must be >= 1"),
    (["--compile-mode", "reduce-overhead"], "--compile-mode needs --compile"),
    (["--device", "meta"], "runs on cpu or cuda"),
    (["--device", "nonsense"], "not a device name"),
])
def test_engine_flags_are_checked_before_the_model_loads(flags, words):
    with pytest.raises(UsageError, match=words):
        build_app(build_parser().parse_args(flags))


def test_cuda_without_a_gpu_is_a_usage_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UsageError, match="no CUDA device"):
        build_app(build_parser().parse_args(["--device", "cuda"]))


def test_compile_on_the_cpu_without_a_cpp_compiler_is_refused_before_the_model_loads(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UsageError, match="needs a C\\+\\+ compiler"):
        build_app(build_parser().parse_args(["--compile"]))
