"""A DoRA adapter served by the HTTP app gives the tokens the library gives it alone, beside a LoRA adapter in
the same batches."""

from __future__ import annotations

import threading

import httpx
import pytest

import lorakit
from lorakit.serve.app import BackgroundServer, ServeConfig, create_app, make_server
from tests.methods.test_dora import randomize_dora
from tests.serve.conftest import greedy_alone, saved_adapters, tiny_chat_llama, with_adapters

NAMES = ["dora", "plain"]


@pytest.fixture(scope="module")
def source(tokenizer):
    model = with_adapters(tiny_chat_llama(len(tokenizer)), ["plain", "x"])
    lorakit.attach(model, lorakit.LoraConfig(r=4, lora_alpha=8, use_dora=True), "dora")
    randomize_dora(model, "dora", strength=8.0)
    return model


@pytest.fixture(scope="module")
def url(source, tokenizer, tmp_path_factory):
    root = saved_adapters(source, NAMES, tmp_path_factory.mktemp("dora_served"))
    server = make_server(tiny_chat_llama(len(tokenizer)), tokenizer, root, max_batch=4, budget_bytes=None,
                         config=ServeConfig(base_name="tiny", max_tokens_limit=32))
    with BackgroundServer(create_app(server)) as url:
        yield url


def complete(url: str, model: str, prompt: str) -> str:
    response = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 10,
                                                         "temperature": 0}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_dora_served_equals_the_library(url, source, tokenizer):
    prompts = {"dora": "The sea was calm and", "plain": "Once upon a time"}
    want = {m: tokenizer.decode(greedy_alone(source, tokenizer(p).input_ids, m, 10), skip_special_tokens=True)
            for m, p in prompts.items()}
    base = tokenizer.decode(greedy_alone(source, tokenizer(prompts["dora"]).input_ids, None, 10),
                            skip_special_tokens=True)
    assert want["dora"] != base  # the adapter changes the output: the comparison below can fail
    assert complete(url, "dora", prompts["dora"]) == want["dora"]
    got: dict[str, str] = {}
    threads = [threading.Thread(target=lambda m=m: got.__setitem__(m, complete(url, m, prompts[m])))
               for m in prompts for _ in range(2)]  # concurrent: DoRA and LoRA rows share decode steps
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want
