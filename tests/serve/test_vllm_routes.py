"""vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter on the real app (a tiny model, adapters saved in
the test): vLLM's answers and statuses, loading only under --allow-adapter-root, load_inplace swapping only
after the new files loaded; and vLLM's metric names in /metrics, read with prometheus_client's parser."""

from __future__ import annotations

import os

import httpx
import pytest
import torch

from lorakit.io import save_adapter
from lorakit.serve.app import BackgroundServer, ServeConfig, create_app, make_server
from tests.serve.conftest import tiny_chat_llama, with_adapters


@pytest.fixture(scope="module")
def roots(tmp_path_factory, tokenizer):
    base = tmp_path_factory.mktemp("vllm")
    allowed, outside = base / "allowed", base / "outside"
    source = with_adapters(tiny_chat_llama(len(tokenizer)), ["a0", "a1"], seed=3)
    other = with_adapters(tiny_chat_llama(len(tokenizer)), ["a0", "a1"], seed=9)  # other weights, same base
    for name in ("a0", "a1"):
        save_adapter(source, name, allowed / name)
        save_adapter(other, name, allowed / f"{name}_v2")
        save_adapter(source, name, outside / name)
    (allowed / "broken").mkdir()
    (allowed / "broken" / "adapter_config.json").write_text("{not json")
    os.symlink(outside / "a0", allowed / "escape")  # inside the root by name, outside by real path
    return allowed, outside


@pytest.fixture()
def client(tokenizer, roots):
    allowed, _ = roots
    model = tiny_chat_llama(len(tokenizer))
    config = ServeConfig(base_name="tiny", max_tokens_limit=4, default_max_tokens=2, adapter_roots=(str(allowed),))
    server = make_server(model, tokenizer, None, max_batch=4, config=config)
    with BackgroundServer(create_app(server)) as url, httpx.Client(base_url=url, timeout=60) as http:
        http.server = server
        yield http


def load(http, name, path, **extra):
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path), **extra})


def vllm_error(response, status: int, type_: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["type"] == type_ and error["param"] is None
    return error["message"]


def test_load_use_and_unload(client, roots):
    allowed, _ = roots
    r = load(client, "a0", allowed / "a0")
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a0' added successfully.", r.text
    assert "a0" in client.get("/v1/adapters").json()["resident"]
    assert "a0" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    done = client.post("/v1/completions", json={"model": "a0", "prompt": "hi", "max_tokens": 2})
    assert done.status_code == 200
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "a0"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a0' removed successfully."
    assert "a0" not in client.get("/v1/adapters").json()["resident"]
    assert client.post("/v1/completions", json={"model": "a0", "prompt": "hi"}).status_code == 404
    message = vllm_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "a0"}), 404, "NotFoundError")
    assert message == "The lora adapter 'a0' cannot be found."


def test_already_loaded_needs_load_inplace(client, roots):
    allowed, _ = roots
    assert load(client, "a1", allowed / "a1").status_code == 200
    message = vllm_error(load(client, "a1", allowed / "a1"), 400, "InvalidUserInput")
    assert "has already been loaded" in message and "load_inplace" in message


def test_load_inplace_replaces_the_weights(client, roots, tokenizer):
    allowed, _ = roots
    assert load(client, "a1", allowed / "a1").status_code == 200
    model = client.server.store.model
    before = {k: v.clone() for k, v in _adapter_tensors(model, "a1").items()}
    assert load(client, "a1", allowed / "a1_v2", load_inplace=True).status_code == 200
    after = _adapter_tensors(model, "a1")
    assert after.keys() == before.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert [n for n in client.server.store.resident()] == ["a1"]  # no probe left behind
    from lorakit.model.manage import adapter_names
    assert adapter_names(model) == ["a1"]


def test_load_inplace_failure_keeps_the_old_copy(client, roots):
    allowed, _ = roots
    assert load(client, "a1", allowed / "a1").status_code == 200
    model = client.server.store.model
    before = {k: v.clone() for k, v in _adapter_tensors(model, "a1").items()}
    vllm_error(load(client, "a1", allowed / "broken", load_inplace=True), 400, "BadRequestError")
    after = _adapter_tensors(model, "a1")
    assert all(torch.equal(before[k], after[k]) for k in before)
    done = client.post("/v1/completions", json={"model": "a1", "prompt": "hi", "max_tokens": 2})
    assert done.status_code == 200  # still served, from the old path


def _adapter_tensors(model, name):
    from lorakit.model.manage import adapter_state_dict

    return adapter_state_dict(model, name)


@pytest.mark.parametrize("path, status", [
    ("relative/a0", 403), ("/x/../a0", 403), ("outside", 403), ("escape", 403), ("/etc/passwd", 403),
    ("missing", 404), ("broken", 400)])
def test_paths_refused(client, roots, path, status, monkeypatch):
    allowed, outside = roots
    full = {"outside": outside / "a0", "escape": allowed / "escape", "missing": allowed / "nothing_here",
            "broken": allowed / "broken"}.get(path, path)
    opened: list[str] = []
    real_open = os.open

    def spy(file, *args, **kwargs):
        opened.append(os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)  # lorakit.io.files reads adapters through os.open
    response = load(client, "a0", full)
    assert response.status_code == status, response.text
    if status == 403 or status == 400 and path != "broken":
        assert not any(str(outside) in f or f.startswith("/etc") for f in opened)
        assert not any("a0" in f for f in opened)
    assert "a0" not in client.get("/v1/adapters").json()["resident"]


def test_missing_fields_and_no_roots(client, tokenizer):
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "a0"}).status_code == 400
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "", "lora_path": "/x"}).status_code == 400
    assert client.post("/v1/unload_lora_adapter", json={}).status_code == 400
    vllm_error(load(client, "tiny", "/x"), 400, "InvalidUserInput")  # the base's own name
    server = make_server(tiny_chat_llama(len(tokenizer)), tokenizer, None, config=ServeConfig(base_name="tiny"))
    with BackgroundServer(create_app(server)) as url, httpx.Client(base_url=url, timeout=60) as http:
        message = vllm_error(load(http, "a0", "/tmp/a0"), 403, "PermissionDenied")
        assert "--allow-adapter-root" in message


def test_vllm_metrics_parse(client, roots):
    from prometheus_client.parser import text_string_to_metric_families

    allowed, _ = roots
    assert load(client, "a0", allowed / "a0").status_code == 200
    for _ in range(2):
        assert client.post("/v1/completions", json={"model": "a0", "prompt": "hi", "max_tokens": 2,
                                                     "ignore_eos": True}).status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    info = families["vllm:lora_requests_info"]
    assert info.type == "gauge"
    (sample,) = info.samples
    assert set(sample.labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
    assert sample.labels["max_lora"] == "4" and sample.labels["running_lora_adapters"] == ""
    assert sample.value > 1e9  # the time it was set, as vLLM's set_to_current_time
    samples = {s.name: s for f in families.values() for s in f.samples}
    assert samples["vllm:num_requests_running"].labels == {"model_name": "tiny"}
    assert samples["vllm:num_requests_running"].value == 0
    assert samples["vllm:num_requests_waiting"].value == 0
    assert samples["vllm:generation_tokens_total"].value == 4
    assert samples["vllm:prompt_tokens_total"].value == samples["lorakit_prompt_tokens_total"].value > 0
    assert families["vllm:generation_tokens"].type == "counter"
    success = [s for s in families["vllm:request_success"].samples if s.name.endswith("_total")]
    assert [(s.labels["finished_reason"], s.value) for s in success] == [("length", 2)]


def test_running_and_waiting_adapters_in_the_gauge(tokenizer, roots):
    """Rows held by a paused engine show under running/waiting by adapter name, as vLLM's scheduler stats."""
    from lorakit.serve.engine import SamplingParams
    from lorakit.serve.app import render_metrics
    from prometheus_client.parser import text_string_to_metric_families

    allowed, _ = roots
    model = tiny_chat_llama(len(tokenizer))
    server = make_server(model, tokenizer, allowed, max_batch=1, config=ServeConfig(base_name="tiny"))
    server.store.load("a0")
    server.store.load("a1")
    engine = server.engine
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    engine.submit([5, 6], "a0", params)
    engine.submit([5, 6], "a1", params)
    engine._admit()  # the engine thread is not started: admit by hand; one row fits (max_batch=1)
    assert engine.row_adapters() == ({"a0": 1}, {"a1": 1})
    text = render_metrics(server)
    (sample,) = next(f for f in text_string_to_metric_families(text) if f.name == "vllm:lora_requests_info").samples
    assert sample.labels == {"max_lora": "1", "running_lora_adapters": "a0", "waiting_lora_adapters": "a1"}


def test_openapi_declares_every_status_and_405_names_allowed_methods(client):
    doc = client.get("/openapi.json").json()
    declared = {(method.upper(), path): set(op["responses"]) for path, ops in doc["paths"].items()
                for method, op in ops.items()}
    assert declared[("POST", "/v1/completions")] >= {"200", "400", "401", "404", "413", "500", "503"}
    assert declared[("POST", "/v1/load_lora_adapter")] == {"200", "400", "401", "403", "404", "413"}
    assert declared[("POST", "/v1/unload_lora_adapter")] == {"200", "400", "401", "404", "413"}
    assert declared[("DELETE", "/v1/adapters/{name}")] == {"200", "401", "404"}
    assert all("422" not in statuses for statuses in declared.values())  # validation errors are 400 here
    ops = doc["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert set(ops) == {"application/json", "text/event-stream"}
    r = client.put("/v1/adapters")
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    r = client.get("/v1/load_lora_adapter")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = client.post("/v1/adapters/x")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE"


def test_request_bodies_are_strict(client):
    """What the schema calls invalid is refused (400), not coerced: "2" for 2, 1 for true."""
    for bad in ({"max_tokens": "2"}, {"stream": 1}, {"temperature": "0.5"}, {"stop": ["a"] * 5}, {"logprobs": True},
                {"seed": 2**53 + 1}, {"prompt": ["a", "b"]}, {"prompt": ""}):
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, **bad}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400, (bad, r.text)
    ok = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2.0, "n": 1.0})
    assert ok.status_code == 200, ok.text  # JSON Schema's integers include 2.0
