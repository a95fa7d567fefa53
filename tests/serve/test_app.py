"""The HTTP API through the real `openai` client against uvicorn on 127.0.0.1: outputs equal each
adapter's greedy output alone, streaming equals non-streaming, bad input gets clean errors."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from lorakit.serve.app import BackgroundServer, ServeConfig, create_app, make_server
from tests.serve.conftest import greedy_alone, saved_adapters, tiny_chat_llama, wait_until, with_adapters

NAMES = ["pirate", "robot", "poet", "lora4"] + [f"c{i:02d}" for i in range(12)]  # 16 adapters


@pytest.fixture(scope="module")
def source(tokenizer):
    return with_adapters(tiny_chat_llama(len(tokenizer)), NAMES)


@pytest.fixture(scope="module")
def adapter_dir(source, tmp_path_factory):
    return saved_adapters(source, NAMES, tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def served(tokenizer, adapter_dir):
    """(url, server): a fresh copy of the base with adapters loaded from the directory on first use."""
    model = tiny_chat_llama(len(tokenizer))
    server = make_server(model, tokenizer, adapter_dir, max_batch=8, budget_bytes=None,
                         config=ServeConfig(base_name="tiny", max_tokens_limit=64, max_body_bytes=64 * 1024))
    with BackgroundServer(create_app(server)) as url:
        yield url, server


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def expected_text(source, tokenizer, prompt_ids, adapter, n) -> str:
    return tokenizer.decode(greedy_alone(source, prompt_ids, adapter, n), skip_special_tokens=True)


def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny"] + sorted(NAMES)


@pytest.mark.parametrize("model", ["tiny", "pirate", "lora4"])
def test_completion_matches_the_adapter_alone_streamed_or_not(client, source, tokenizer, model):
    prompt = "The sea was calm and"
    want = expected_text(source, tokenizer, tokenizer(prompt).input_ids, None if model == "tiny" else model, 12)
    out = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == want
    assert out.usage.prompt_tokens == len(tokenizer(prompt).input_ids)
    assert out.choices[0].finish_reason in ("length", "stop")
    pieces = list(client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == want
    assert pieces[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_chat_completion_matches_streamed_or_not(client, source, tokenizer):
    messages = [{"role": "system", "content": "You are a robot."}, {"role": "user", "content": "Hello there"}]
    want = expected_text(source, tokenizer, chat_ids(tokenizer, messages), "robot", 10)
    out = client.chat.completions.create(model="robot", messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want
    chunks = list(client.chat.completions.create(model="robot", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


def test_seeded_sampling_repeats(client):
    kwargs = dict(model="poet", prompt="Roses are", max_tokens=10, temperature=1.0, top_p=0.9, seed=42)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_stop_string(client, source, tokenizer):
    prompt = "Once upon a time"
    full = expected_text(source, tokenizer, tokenizer(prompt).input_ids, "poet", 16)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    out = client.completions.create(model="poet", prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert out.choices[0].text == full[: full.find(stop)] and out.choices[0].finish_reason == "stop"


def _post(url, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=data, headers={"Content-Type": "application/json", **kw.pop("headers", {})},
                      timeout=30, **kw)


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "JSON"),
    ({"prompt": "hi"}, 400, "model"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "nope", "prompt": "hi"}, 404, "pirate"),
    ({"model": "../pirate", "prompt": "hi"}, 404, "not found"),
    ({"model": "/etc/passwd", "prompt": "hi"}, 404, "not found"),
    ({"model": "tiny", "prompt": "hi", "temperature": 5}, 400, "temperature"),
    ({"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 10**9}, 400, "limit"),
    ({"model": "tiny", "prompt": "hi", "n": 3}, 400, "n"),
    ({"model": "tiny", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "prompt": "hi " * 400}, 400, "context"),
    ({"model": "tiny", "prompt": "hi", "stop": [""]}, 400, "stop"),
    ({"model": "tiny", "prompt": "x" * 70000}, 413, "body"),
])
def test_bad_completion_requests_get_clean_errors(served, body, status, needle):
    r = _post(served[0], "/v1/completions", body)
    assert r.status_code == status, r.text
    assert needle.lower() in r.json()["error"]["message"].lower()


def test_bad_chat_requests(served):
    url = served[0]
    assert _post(url, "/v1/chat/completions", {"model": "tiny", "messages": []}).status_code == 400
    assert _post(url, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}
                 ).status_code == 400
    long = [{"role": "user", "content": "word " * 300}]
    r = _post(url, "/v1/chat/completions", {"model": "robot", "messages": long})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_openai_client_raises_its_usual_errors(client):
    with pytest.raises(openai.NotFoundError, match="pirate"):
        client.completions.create(model="nobody", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", max_tokens=100000)


def test_client_disconnect_mid_stream_removes_its_row(served):
    url, server = served
    before = server.engine.stats.requests_finished.get("cancelled", 0)
    body = {"model": "pirate", "prompt": "Tell me a long story", "max_tokens": 64, "temperature": 0.7, "seed": 1,
            "stream": True}
    server.engine.eos_token_ids = frozenset()  # nothing ends early, so the row is surely still running
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            for _ in r.iter_lines():
                break  # read one event, then hang up
        assert wait_until(lambda: server.engine.stats.requests_finished.get("cancelled", 0) > before)
    finally:
        server.engine.eos_token_ids = frozenset({2})
    assert server.engine.stats.requests_finished.get("cancelled", 0) == before + 1
    assert server.engine.running == 0  # the engine publishes a finish only once the row has left the batch


def test_adapter_load_unload_api(served):
    url, server = served
    r = _post(url, "/v1/adapters", {"name": "poet"})
    assert r.status_code == 200 and "poet" in r.json()["resident"] and r.json()["bytes"] > 0
    assert httpx.delete(url + "/v1/adapters/poet").json()["unloaded"] is True
    assert "poet" not in server.store.resident()
    assert httpx.delete(url + "/v1/adapters/poet").status_code == 404
    assert _post(url, "/v1/adapters", {"name": "../etc"}).status_code == 404
    assert _post(url, "/v1/adapters", {"name": "ghost"}).status_code == 404
    assert _post(url, "/v1/adapters", {}).status_code == 400


def test_health_and_metrics(served, client):
    url, _ = served
    client.completions.create(model="robot", prompt="hi", max_tokens=3, temperature=0)
    assert httpx.get(url + "/health").json()["status"] == "ok"
    text = httpx.get(url + "/metrics").text
    for name in ("lorakit_http_requests_total", "lorakit_completion_tokens_total", "lorakit_request_latency_seconds_sum",
                 "lorakit_adapters_resident", "lorakit_adapter_evictions_total", "lorakit_time_to_first_token_seconds_count",
                 "lorakit_prefill_steps_total", "lorakit_prefill_seconds_total", "lorakit_decode_step_seconds_total"):
        assert name in text
    assert 'lorakit_requests_finished_total{reason="length"}' in text


def test_api_key(tokenizer, adapter_dir):
    server = make_server(tiny_chat_llama(len(tokenizer)), tokenizer, adapter_dir,
                         config=ServeConfig(base_name="tiny", api_key="s3cret"))
    with BackgroundServer(create_app(server)) as url:
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url + "/health").status_code == 200
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def test_many_concurrent_clients_get_their_adapters_output_while_adapters_come_and_go(tokenizer, source,
                                                                                       adapter_dir):
    """64 clients over the 16 adapters and the base (streaming and not) while a churner loads and unloads
    adapters and a budget of one LoRA adapter forces evictions: every client gets exactly its adapter's
    greedy output."""
    one = max(sum(t.numel() * t.element_size() for t in _tensors(adapter_dir / n)) for n in NAMES)
    server = make_server(tiny_chat_llama(len(tokenizer)), tokenizer, adapter_dir, max_batch=16, budget_bytes=one,
                         config=ServeConfig(base_name="tiny"))
    models = ["tiny"] + NAMES
    prompts = [f"Question {k}: what is {k} plus {k}?" for k in range(64)]
    jobs = [(prompts[k], models[k % len(models)], k % 2 == 0) for k in range(64)]
    want = {k: expected_text(source, tokenizer, tokenizer(p).input_ids, None if m == "tiny" else m, 8)
            for k, (p, m, _) in enumerate(jobs)}

    async def run(url: str):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)

        async def one_client(k: int):
            prompt, model, stream = jobs[k]
            if stream:
                text = ""
                async for chunk in await client.completions.create(model=model, prompt=prompt, max_tokens=8,
                                                                   temperature=0, stream=True):
                    text += chunk.choices[0].text
                return text
            return (await client.completions.create(model=model, prompt=prompt, max_tokens=8,
                                                    temperature=0)).choices[0].text

        stop = asyncio.Event()

        async def churn():
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                k = 0
                while not stop.is_set():
                    name = NAMES[k % len(NAMES)]
                    await http.post("/v1/adapters", json={"name": name})
                    await asyncio.sleep(0.01)
                    await http.delete(f"/v1/adapters/{NAMES[(k + 2) % len(NAMES)]}")
                    k += 1

        churner = asyncio.create_task(churn())
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(k) for k in range(len(jobs))))
        elapsed = time.perf_counter() - start
        stop.set()
        await churner
        return results, elapsed

    with BackgroundServer(create_app(server)) as url:
        results, elapsed = asyncio.run(run(url))
    for k, got in enumerate(results):
        assert got == want[k], (k, jobs[k][1])
    stats = server.engine.stats
    assert stats.max_running > 4
    assert server.store.stats.unloads + server.store.stats.evictions > 0  # adapters really came and went
    print(f"\n64 clients: {elapsed:.2f}s, {stats.completion_tokens / elapsed:.0f} tok/s, max batch {stats.max_running}, "
          f"loads {server.store.stats.loads}, evictions {server.store.stats.evictions}, "
          f"unloads {server.store.stats.unloads}")


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors")).values()
