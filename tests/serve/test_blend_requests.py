"""Requests with `adapter_blend`: the server's answer is the library's `use_adapter(model, blend)` output,
alone or batched with single-adapter and base rows; bad blends get 400 naming the field, and leave no pin
and no load behind."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
import openai
import pytest

import lorakit
from lorakit import PrefixConfig
from lorakit.io import save_adapter
from lorakit.serve.app import BackgroundServer, ServeConfig, create_app, make_server
from tests.serve.conftest import Gate, greedy_alone, saved_adapters, tiny_chat_llama, wait_until, with_adapters

NAMES = ["pirate", "robot", "poet", "sage"]  # LoRA-XS, LoRA, LoRA-XS, LoRA (conftest.with_adapters)
MAX_PARTS = 3


@pytest.fixture(scope="module")
def source(tokenizer):
    return with_adapters(tiny_chat_llama(len(tokenizer)), NAMES)


def _save_for_base(tokenizer, name: str, base: str, root) -> None:
    """An adapter whose files say it was trained on base model `base`."""
    model = with_adapters(tiny_chat_llama(len(tokenizer)), [name], seed=5)
    model.name_or_path = model.config._name_or_path = base
    save_adapter(model, name, root / name)
    assert json.loads((root / name / "adapter_config.json").read_text())["base_model_name_or_path"] == base


@pytest.fixture(scope="module")
def adapter_dir(source, tokenizer, tmp_path_factory):
    root = saved_adapters(source, NAMES, tmp_path_factory.mktemp("blends"))
    _save_for_base(tokenizer, "base_a", "acme/base-a", root)
    _save_for_base(tokenizer, "base_b", "acme/base-b", root)
    prefixed = tiny_chat_llama(len(tokenizer))
    lorakit.attach(prefixed, PrefixConfig(num_virtual_tokens=4), "prefixed")
    save_adapter(prefixed, "prefixed", root / "prefixed")
    save_adapter(source, "robot", root / "broken")  # a readable config over weights that are not safetensors
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    return root


@pytest.fixture(scope="module")
def served(tokenizer, adapter_dir):
    server = make_server(tiny_chat_llama(len(tokenizer)), tokenizer, adapter_dir, max_batch=8,
                         config=ServeConfig(base_name="tiny", max_tokens_limit=64, max_blend_parts=MAX_PARTS))
    with BackgroundServer(create_app(server)) as url:
        yield url, server


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("blend", [{"pirate": 0.7, "robot": 0.3},  # LoRA-XS + LoRA
                                   {"poet": 0.25, "pirate": 0.5}])  # two LoRA-XS (one kind, two columns)
def test_a_blend_answers_what_the_library_blend_generates_alone(client, source, tokenizer, blend):
    prompt = "The sea was calm and"
    ids = tokenizer(prompt).input_ids
    want = greedy_alone(source, ids, blend, 12)
    assert want != greedy_alone(source, ids, next(iter(blend)), 12)  # the blend is not its first adapter
    model = next(iter(blend))
    out = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"adapter_blend": blend})
    assert out.choices[0].text == _text(tokenizer, want)
    assert out.model == model  # the response echoes what was asked
    pieces = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            extra_body={"adapter_blend": blend}))
    assert "".join(p.choices[0].text for p in pieces) == _text(tokenizer, want)
    assert {p.model for p in pieces} == {"tiny"}


def test_chat_with_a_blend(client, source, tokenizer):
    messages = [{"role": "user", "content": "Who are you?"}]
    blend = {"robot": 0.5, "sage": 0.5}
    want = _text(tokenizer, greedy_alone(source, _chat_ids(tokenizer, messages), blend, 10))
    out = client.chat.completions.create(model="robot", messages=messages, max_tokens=10, temperature=0,
                                         extra_body={"adapter_blend": blend})
    assert out.choices[0].message.content == want and out.model == "robot"


def test_a_batch_mixing_blends_single_adapters_and_the_base_equals_each_alone(served, source, tokenizer):
    """Five requests held until all are queued, so they are prefilled and decoded as one batch (the two that
    share a blend prefill packed in one forward row: lorakit.serve.packed_prefill); each part
    is pinned while its request runs and released after, and vLLM's gauge counts a blend under each part."""
    url, server = served
    rows = [("tiny", None), ("robot", None), ("pirate", {"pirate": 0.6, "poet": 0.4}),
            ("tiny", {"poet": 0.5, "robot": 0.5}), ("poet", {"pirate": 0.6, "poet": 0.4})]  # 2 and 4: one route
    prompts = [f"Row {k} says" for k in range(len(rows))]
    for name in ("pirate", "poet", "robot"):  # resident first: pinning then needs no engine step
        assert httpx.post(url + "/v1/adapters", json={"name": name}, timeout=30).status_code == 200
    batch_sizes: list[int] = []
    hook = server.engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    hold, gate = threading.Event(), None
    server.engine.call_soon(lambda: hold.wait(60))  # the engine thread waits here: requests queue up

    def post(k: int) -> str:
        model, blend = rows[k]
        body = {"model": model, "prompt": prompts[k], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        if blend is not None:
            body["adapter_blend"] = blend
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    try:
        with ThreadPoolExecutor(len(rows)) as pool:
            futures = [pool.submit(post, k) for k in range(len(rows))]
            assert wait_until(lambda: server.engine.waiting == len(rows))
            assert [server.store.in_use(n) for n in ("pirate", "poet", "robot")] == [2, 3, 2]
            gate = Gate(server.engine.model, free=0)  # the rows' prefill waits: they are all running
            hold.set()
            assert wait_until(lambda: server.engine.running == len(rows))
            assert server.engine.row_adapters()[0] == {"robot": 2, "pirate": 2, "poet": 3}  # a blend: each part
            info = httpx.get(url + "/metrics", timeout=30).text.split('running_lora_adapters="')[1].split('"')[0]
            assert sorted(info.split(",")) == ["pirate", "poet", "robot"]
            gate.open()
            got = [f.result() for f in futures]
    finally:
        hold.set()
        hook.remove()
        if gate is not None:
            gate.remove()
    # one prefill (4 rows where rows 2 and 4 are packed, 5 where packing does not pay), then a decode step of 5
    assert batch_sizes[0] in (len(rows) - 1, len(rows)) and batch_sizes[1] == len(rows)
    for k, (model, blend) in enumerate(rows):
        adapter = blend if blend is not None else (None if model == "tiny" else model)
        assert got[k] == _text(tokenizer, greedy_alone(source, tokenizer(prompts[k]).input_ids, adapter, 8, eos=None))
    assert wait_until(lambda: all(server.store.in_use(n) == 0 for n in NAMES))


def _post(url: str, body: dict | str, path: str = "/v1/completions") -> httpx.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(url + path, content=data, headers={"Content-Type": "application/json"}, timeout=30)


BAD = [  # (adapter_blend as JSON text, status, what the message says, the error's code)
    ('{"pirate": 0.5, "nobody": 0.5}', 404, "nobody", "adapter_not_found"),  # 404, as an unknown `model`
    ('{"../pirate": 1.0}', 404, "not found", "adapter_not_found"),
    ('{"pirate": -0.5, "robot": 1.5}', 400, "greater than or equal to 0", "invalid_value"),
    ('{"pirate": 1e999}', 400, "pirate", "invalid_value"),  # JSON's 1e999 is inf
    ('{"pirate": NaN}', 400, "pirate", "invalid_value"),
    ('{"pirate": 11}', 400, "less than or equal to 10", "invalid_value"),
    ('{"pirate": "0.5"}', 400, "number", "invalid_value"),
    ('{"pirate": true}', 400, "number", "invalid_value"),
    ('{}', 400, "at least 1", "invalid_value"),
    ('["pirate", "robot"]', 400, "dictionary", "invalid_value"),
    ('{"pirate": 0.25, "robot": 0.25, "poet": 0.25, "sage": 0.25}', 400, f"at most {MAX_PARTS}", "too_many_adapters"),
    ('{"base_a": 0.5, "base_b": 0.5}', 400, "acme/base-b", "mixed_base_models"),
    ('{"pirate": 0.5, "prefixed": 0.5}', 400, "prefix-tuning", "unblendable_adapter"),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("blend, status, needle, code", BAD)
def test_bad_blends_are_refused_naming_the_field_and_load_nothing(served, path, blend, status, needle, code):
    url, server = served
    resident = set(server.store.resident())
    payload = ('"prompt": "hi"' if path == "/v1/completions" else '"messages": [{"role": "user", "content": "hi"}]')
    r = _post(url, f'{{"model": "tiny", {payload}, "max_tokens": 4, "adapter_blend": {blend}}}', path)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == "adapter_blend" and error["code"] == code, error
    assert needle in error["message"], error
    assert set(server.store.resident()) == resident  # refused before anything was loaded
    assert all(server.store.in_use(n) == 0 for n in server.store.available())


def test_model_must_be_the_base_or_a_part(served):
    url, server = served
    r = _post(url, {"model": "sage", "prompt": "hi", "adapter_blend": {"pirate": 0.5, "robot": 0.5}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    assert "pirate" in r.json()["error"]["message"] and "tiny" in r.json()["error"]["message"]


def test_a_part_that_fails_to_load_releases_the_parts_pinned_before_it(served):
    url, server = served
    r = _post(url, {"model": "tiny", "prompt": "hi", "max_tokens": 4, "adapter_blend": {"sage": 0.5, "broken": 0.5}})
    assert r.status_code == 500 and r.json()["error"]["code"] == "adapter_load_failed", r.text
    assert "sage" in server.store.resident()  # it loaded and was pinned before "broken" failed
    assert server.store.in_use("sage") == 0 and server.store.in_use("broken") == 0


def test_openapi_documents_the_field_and_metrics_count_blends(served, client):
    url, server = served
    doc = httpx.get(url + "/openapi.json", timeout=30).json()
    for body in ("CompletionBody", "ChatBody"):
        field = doc["components"]["schemas"][body]["properties"]["adapter_blend"]
        assert "model" in field["description"]
        blend = next(s for s in field["anyOf"] if s.get("type") == "object")
        assert blend["minProperties"] == 1 and blend["maxProperties"] == MAX_PARTS  # this server's limit
        assert blend["additionalProperties"]["minimum"] == 0

    def blends_counted() -> float:
        text = httpx.get(url + "/metrics", timeout=30).text
        return float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("lorakit_blend_requests_total")))

    before = blends_counted()
    client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"adapter_blend": {"poet": 1.0}})
    client.completions.create(model="poet", prompt="hi", max_tokens=2)
    assert blends_counted() == before + 1


def test_a_blend_on_each_device_and_dtype_decodes_the_library_blend_greedily(tokenizer, adapter_dir, device, dtype):
    """The engine and store alone (the HTTP layer does not depend on the dtype): each token a blended row
    picks, batched with a base row, is the library's greedy choice under the blend for that prefix, up to
    the dtype's rounding (exactly the library's tokens in float32)."""
    from lorakit.io import load_adapter
    from lorakit.serve.adapter_store import AdapterStore
    from lorakit.serve.blends import pin_blend, unpin_blend
    from lorakit.serve.engine import Engine, SamplingParams
    from tests.conftest import TOLERANCES

    weights = {"robot": 0.6, "sage": 0.4}  # LoRA: the LoRA-XS files here fingerprint a float32 base's SVD
    reference = tiny_chat_llama(len(tokenizer)).to(device=device, dtype=dtype)
    for name in weights:
        load_adapter(reference, adapter_dir / name, name)
    model = tiny_chat_llama(len(tokenizer)).to(device=device, dtype=dtype)
    engine = Engine(model, tokenizer, max_batch=4)
    store = AdapterStore(model, adapter_dir, engine=engine)
    prompt, n = tokenizer("The sea was calm and").input_ids, 8
    engine.start()
    try:
        blend = pin_blend(store, weights)
        assert [store.in_use(name) for name in weights] == [1, 1]
        params = SamplingParams(max_tokens=n, ignore_eos=True)
        streams = [engine.submit(prompt, blend, params, on_finish=lambda: unpin_blend(store, blend)),
                   engine.submit(tokenizer("Another row").input_ids, None, params)]
        out = [s.result() for s in streams][0]
    finally:
        engine.close()
    assert out.reason == "length", out.error
    assert [store.in_use(name) for name in weights] == [0, 0]
    ids = torch.tensor([prompt + out.token_ids], device=device)
    with lorakit.use_adapter(reference, weights), torch.no_grad():
        logits = reference(ids).logits[0, len(prompt) - 1: -1].float()  # (n, V): the logits each token came from
    picked = logits.gather(1, torch.tensor(out.token_ids, device=device)[:, None]).squeeze(1)  # (n,)
    best = logits.max(-1).values  # (n,)
    assert torch.all(picked >= best - TOLERANCES[dtype] * best.abs().clamp(min=1)), (picked, best)
    if dtype == torch.float32:
        assert out.token_ids == greedy_alone(reference.cpu(), prompt, weights, n, eos=None)
