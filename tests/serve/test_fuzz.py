"""Issue 11.6: property-based fuzzing of the HTTP API against the real app (uvicorn, a tiny model, a real
tokenizer and adapter directory): generated malformed JSON, wrong types and any unicode (lone surrogates
included) sent to every endpoint never get a 5xx, errors always have OpenAI's shape, and the server
still answers a valid request afterwards. Bounded: a fixed number of examples, about 30-60 s on CPU."""

from __future__ import annotations

import json
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.io import save_adapter
from lorakit.serve.app import BackgroundServer, ServeConfig, create_app, make_server
from tests.serve.conftest import tiny_chat_llama, with_adapters

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    source = with_adapters(tiny_chat_llama(len(tokenizer)), ["pirate", "robot"])
    for name in ("pirate", "robot"):
        save_adapter(source, name, root / name)
    config = ServeConfig(base_name="tiny", api_key=KEY, max_tokens_limit=4, default_max_tokens=2,
                         max_body_bytes=16 * 1024)
    server = make_server(tiny_chat_llama(len(tokenizer)), tokenizer, root, max_batch=4, config=config)
    with BackgroundServer(create_app(server)) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http


# -- what is sent -----------------------------------------------------------------------------------

any_text = st.text(st.characters(blacklist_categories=()), max_size=40)  # surrogates, controls, anything
# Values known to break things are drawn often: lone surrogates, vanishing temperatures, huge numbers.
tricky = st.sampled_from(["tiny", "pirate", "robot", "v1.2", "../pirate", "pirate\n", "user", "text", "", "\ud800",
                          "a\udfffb", "\x00", 1e-38, 5e-324, -0.0, 1e308, 2**63, -(2**63) - 1, 0, 1, 2, True])
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | any_text | tricky | tricky)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(any_text | st.sampled_from(["type", "text", "role", "content"]),
                                             inner, max_size=4), max_leaves=12)

weird_text = any_text | st.tuples(any_text, st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), any_text).map(
    "".join)  # a lone surrogate somewhere
content_part = st.fixed_dictionaries({"type": st.sampled_from(["text", "text", "image_url"]) | json_values},
                                     optional={"text": weird_text | json_values, "image_url": json_values})
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "tool"]),
                                 "content": weird_text | st.lists(content_part, max_size=3) | json_values})
# Per field: values of the right type and range but odd (most bugs hide past validation); "any" values and
# removals (in wild bodies) cover the invalid ones.
TYPED = {
    "model": st.sampled_from(["tiny", "pirate", "robot"]) | tricky | weird_text,
    "prompt": weird_text | st.lists(weird_text, min_size=1, max_size=1),
    "messages": st.lists(message, min_size=1, max_size=3),
    "max_tokens": st.integers(1, 4), "max_completion_tokens": st.integers(1, 4),
    "temperature": st.floats(0, 2) | st.sampled_from([0.0, 1e-38, 5e-324, 1e-300, 2.0]),
    "top_p": st.floats(5e-324, 1) | st.sampled_from([1e-38, 5e-324, 1.0]),
    "stop": weird_text | st.lists(weird_text, max_size=4),
    "seed": st.integers(-(2**63), 2**63 - 1), "stream": st.booleans(), "n": st.just(1),
    "logprobs": st.sampled_from([None, False]), "ignore_eos": st.booleans(), "name": weird_text | tricky,
}
FIELDS = {"/v1/completions": ["model", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                              "stop", "seed", "stream", "n", "logprobs", "ignore_eos"],
          "/v1/adapters": ["name"]}
FIELDS["/v1/chat/completions"] = [f if f != "prompt" else "messages" for f in FIELDS["/v1/completions"]]


def valid_body(path: str) -> dict:
    if path == "/v1/chat/completions":
        return {"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    if path == "/v1/adapters":
        return {"name": "robot"}
    return {"model": "tiny", "prompt": "hi", "max_tokens": 2}


@st.composite
def mutated_bodies(draw, path: str) -> dict:
    """A valid body with fields changed: mostly to odd values of the right type (which get past validation
    to the tokenizer, the engine and the registry), sometimes to anything or removed."""
    body = valid_body(path)
    wild = draw(st.integers(0, 3)) == 0  # a quarter of bodies
    actions = ["keep", "typed", "typed", "any", "delete"] if wild else ["keep", "typed"]
    for field in FIELDS.get(path, list(TYPED)):
        action = draw(st.sampled_from(actions))
        if action == "delete":
            body.pop(field, None)
        elif action != "keep":
            body[field] = draw(TYPED[field] if action == "typed" else tricky | json_values)
    return body


def encode(value) -> bytes:
    text = json.dumps(value, allow_nan=True)  # NaN/Infinity are not JSON: the server must refuse them cleanly
    return text.encode("utf-8")


ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/adapters"),
          ("DELETE", None), ("GET", "/v1/models"), ("GET", "/v1/adapters"), ("GET", "/health"),
          ("GET", "/metrics"), ("GET", "/")]


@st.composite
def requests(draw):
    method, path = draw(st.sampled_from(ROUTES[:4] * 3 + ROUTES[4:]))  # bodies are where the bugs were
    if path is None:  # DELETE /v1/adapters/{name}: any name, URL-quoted by httpx
        name = draw(any_text.filter(lambda s: s not in ("", ".", "..") and "/" not in s) | st.sampled_from(
            ["pirate", "v1.2", "..%2f..", "%00"]))
        path = "/v1/adapters/" + quote(name.encode("utf-8", "surrogatepass"), safe="")
    kind = draw(st.sampled_from(["mutated"] * 5 + ["json", "bytes", "text"]))
    if kind == "mutated":
        body = encode(draw(mutated_bodies(path)))
    elif kind == "json":
        body = encode(draw(json_values))
    elif kind == "bytes":
        body = draw(st.binary(max_size=64))
    else:
        body = draw(any_text).encode("utf-8", "surrogatepass")  # invalid UTF-8 for lone surrogates
    headers = dict(AUTH)
    headers["Content-Type"] = draw(st.sampled_from(["application/json", "application/json; charset=utf-8",
                                                    "text/plain", "application/x-www-form-urlencoded"]))
    auth = draw(st.sampled_from(["ok", "ok", "ok", "lower", "missing", "wrong"]))
    if auth == "lower":
        headers["Authorization"] = f"bearer {KEY}"
    elif auth == "missing":
        del headers["Authorization"]
    elif auth == "wrong":
        headers["Authorization"] = draw(st.sampled_from(["Bearer", "Bearer x", "Basic a2V5", "\u00e9".encode(), KEY]))
    return method, path, body, headers


def check_response(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    assert r.status_code != 422, r.text[:500]  # invalid parameters answer 400, as OpenAI does
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str)
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events, r.text[:500]
        assert events[-1] == "[DONE]" or "error" in json.loads(events[-1]), events[-1]
        for event in events[:-1]:
            json.loads(event)


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(request=requests())
def test_malformed_requests_never_get_a_5xx_and_the_server_keeps_answering(served, request):
    method, path, body, headers = request
    if method == "GET":
        r = served.get(path, headers=headers)
    else:
        r = served.request(method, path, content=body, headers=headers)
    check_response(r)
    ok = served.post("/v1/completions", json={"model": "robot", "prompt": "hello", "max_tokens": 1}, headers=AUTH)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 1, ok.text


def test_the_fuzzer_reaches_the_decoder(served):
    """The response check itself accepts a valid stream (so the property above is not vacuous for 200s)."""
    r = served.post("/v1/chat/completions", headers=AUTH, json={**valid_body("/v1/chat/completions"), "stream": True})
    check_response(r)
    assert r.status_code == 200
