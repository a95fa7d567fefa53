"""Issue 11: the server under bad input and faults. Each test fails on the code before its fix."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time

import httpx
import pytest

from lorakit.io import save_adapter
from lorakit.serve.app import BackgroundServer, ServeConfig, create_app, make_server
from tests.serve.conftest import tiny_chat_llama, wait_until, with_adapters

LONG = {"model": "tiny", "prompt": "Tell me a long story", "max_tokens": 200, "ignore_eos": True}


def _slow_model(vocab_size: int, seconds: float = 0.02):
    """A tiny model whose every forward takes `seconds`: requests stay running long enough to interrupt."""
    model = tiny_chat_llama(vocab_size)
    model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))
    return model


@pytest.fixture(scope="module")
def adapter_dir(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("failure-modes")
    source = with_adapters(tiny_chat_llama(len(tokenizer)), ["pirate"])
    save_adapter(source, "pirate", root / "pirate")
    shutil.copytree(root / "pirate", root / "v1.2")  # issue 13: a name the rule refuses
    return root


@pytest.fixture(scope="module")
def served(tokenizer, adapter_dir):
    server = make_server(_slow_model(len(tokenizer)), tokenizer, adapter_dir, max_batch=8,
                         config=ServeConfig(base_name="tiny", max_tokens_limit=200, max_body_bytes=64 * 1024,
                                            api_key="s3cret"))
    with BackgroundServer(create_app(server)) as url:
        yield url, server


AUTH = {"Authorization": "Bearer s3cret"}


def _post(url: str, path: str, body, headers: dict | None = None, **kw) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=data, headers={"Content-Type": "application/json", **AUTH,
                                                         **(headers or {})}, timeout=30, **kw)


def _assert_error_shape(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    return error


def test_a_disconnected_non_streaming_request_frees_its_row(served):
    """11.1: a non-streaming request kept generating to max_tokens after its client left."""
    url, server = served
    stats = server.engine.stats
    before = stats.requests_finished.get("cancelled", 0)
    with pytest.raises(httpx.TimeoutException):  # the client gives up after 0.5 s and closes the connection
        httpx.post(url + "/v1/completions", json=LONG, headers=AUTH, timeout=0.5)
    assert wait_until(lambda: stats.requests_finished.get("cancelled", 0) == before + 1)
    assert wait_until(lambda: server.engine.running == 0)  # freed, not run to its 200 tokens ("length")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"model": "tiny", "prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a\udfffb"]}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stop": ["\ud800"]}, "stop"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a\ud800b"}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "x\udc00"}]}]}, "messages.0.content"),
])
def test_a_lone_surrogate_is_a_400(served, path, body, param):
    """11.2: "a\\ud800b" reached the tokenizer (TypeError -> 500 in plain text)."""
    error = _assert_error_shape(_post(served[0], path, json.dumps(body)), 400)  # json.dumps writes \\ud800
    assert error["param"] == param and "surrogate" in error["message"]


@pytest.mark.parametrize("text", [123, None, ["a"], {"t": 1}])
def test_a_content_part_whose_text_is_not_a_string_is_a_400(served, text):
    """11.3: app.py's "".join raised TypeError -> 500."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
    error = _assert_error_shape(_post(served[0], "/v1/chat/completions", body), 400)
    assert error["param"] == "messages.0.content.0.text"


def test_a_vanishing_temperature_answers(served):
    """11.4: temperature 1e-38 -> 500 "probability tensor contains inf/nan"."""
    for temperature in (1e-38, 5e-324):
        r = _post(served[0], "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 3,
                                                 "temperature": temperature})
        assert r.status_code == 200, r.text


def test_an_adapter_directory_named_against_the_rule_is_not_listed_and_says_why(served):
    """Issue 13: `v1.2` was listed by /v1/models, then answered 500."""
    url, _ = served
    ids = [m["id"] for m in httpx.get(url + "/v1/models", headers=AUTH).json()["data"]]
    assert ids == ["tiny", "pirate"]
    error = _assert_error_shape(_post(url, "/v1/completions", {"model": "v1.2", "prompt": "hi", "max_tokens": 2}),
                                404)
    assert "letters, digits" in error["message"]
    assert "letters, digits" in _assert_error_shape(_post(url, "/v1/adapters", {"name": "v1.2"}), 404)["message"]


def test_auth_scheme_is_case_insensitive_and_the_schema_is_behind_the_key(served):
    """Minor: "bearer KEY" was refused; /openapi.json was public with a key set."""
    url, _ = served
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"{scheme} s3cret"}).status_code == 200
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Basic s3cret"}).status_code == 401
    _assert_error_shape(httpx.get(url + "/openapi.json"), 401)
    assert httpx.get(url + "/openapi.json", headers=AUTH).status_code == 200


def test_an_oversized_chunked_body_gets_413(served):
    """Minor: a body sent chunked (no content-length) over the limit got 400."""
    def chunks():
        for _ in range(200):  # 200 x 1 KiB > the 64 KiB limit
            yield b"x" * 1024

    r = httpx.post(served[0] + "/v1/completions", content=chunks(), headers={**AUTH, "Content-Type": "application/json"},
                   timeout=30)
    _assert_error_shape(r, 413)


def test_sigterm_drains_for_at_most_the_drain_timeout_then_cuts_off_with_a_reason(tokenizer):
    """11.6: with long streams running, SIGTERM kept the process up for minutes (no drain limit)."""
    server = make_server(_slow_model(len(tokenizer), 0.05), tokenizer, None, max_batch=8,
                         config=ServeConfig(base_name="tiny", max_tokens_limit=200, drain_timeout=1.0))
    background = BackgroundServer(create_app(server))
    results: dict[int, list[dict]] = {}

    def stream(k: int, url: str) -> None:
        events = []
        with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
        results[k] = events

    with background as url:
        threads = [threading.Thread(target=stream, args=(k, url)) for k in range(4)]
        [t.start() for t in threads]
        assert wait_until(lambda: server.engine.running == 4)
        start = time.time()
        background.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        background.thread.join(15)
        stopped = time.time() - start
        [t.join(5) for t in threads]
    print(f"\nSIGTERM to exit: {stopped:.2f}s (drain timeout 1 s)")
    assert not background.thread.is_alive()
    # our cut-off ended the streams (not uvicorn's backstop, which would leave no cut_off_at and no "shutdown")
    assert background.server.cut_off_at is not None and background.server.cut_off_at - start >= 1.0
    assert sorted(results) == [0, 1, 2, 3]
    for events in results.values():
        assert events[-1]["choices"][0]["finish_reason"] == "shutdown"
        assert len(events) < 200
    assert server.engine.stats.requests_finished.get("shutdown") == 4


def test_a_closed_engine_answers_503_not_a_client_error(tokenizer):
    """A request that reaches a closed (shut down or draining) engine is the server's state: 503, retry later."""
    server = make_server(tiny_chat_llama(len(tokenizer)), tokenizer, None, config=ServeConfig(base_name="tiny"))
    with BackgroundServer(create_app(server)) as url:
        server.engine.close()
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=30)
    _assert_error_shape(r, 503)
    assert r.json()["error"]["code"] == "shutting_down"
