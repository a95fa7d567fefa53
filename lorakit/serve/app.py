"""The HTTP API: OpenAI-shaped completions and chat completions (streamed as server-sent events), the
adapter named in `model`, adapter load/unload, health, Prometheus metrics and the chat page.

    GET  /                      the character-chat page (lorakit.serve.page)
    GET  /health                {"status": "ok", ...}
    GET  /metrics               Prometheus text
    GET  /v1/models             the base model and every adapter in the directory
    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
                                 "adapter_blend"}
    POST /v1/chat/completions   {"model", "messages", ...the same}
    GET  /v1/adapters           available and resident adapters
    POST /v1/adapters           {"name"}: load now
    DELETE /v1/adapters/{name}  unload (deferred until its running requests finish)
    POST /v1/load_lora_adapter  vLLM's: {"lora_name", "lora_path", "load_inplace"} (lorakit.serve.vllm_routes)
    POST /v1/unload_lora_adapter vLLM's: {"lora_name"}

Every status a route answers is declared in /openapi.json; a 405 names the allowed methods in `Allow`.

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and OpenAI's statuses (400 for
an invalid parameter), so the `openai` client raises its usual exceptions. A client that disconnects
frees its row within one decode step, streamed or not; on shutdown the server drains running requests
for at most `drain_timeout` seconds, then finishes the rest with finish_reason "shutdown".

`adapter_blend` (OpenAI clients: `extra_body={"adapter_blend": {...}}`) runs a weighted mix of adapters for
one request, {"pirate": 0.7, "poet": 0.3} (lorakit.serve.blends); `model` must then be the base model id or
one of the blend's adapters, and the response's `model` echoes it. A refused blend answers 400 (404 for an
adapter the server cannot find) with `param` "adapter_blend".
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import uvicorn
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from lorakit.errors import AdapterNotFoundError
from lorakit.routing.context import Blend, RowName
from lorakit.serve.engine import Delta, Engine, EngineBusyError, EngineClosedError, EngineError, Finished, SamplingParams
from lorakit.serve.adapter_paths import AllowedRoots, PathAdapters
from lorakit.serve.adapter_store import (VERSION_MARK, AdapterLoadError, AdapterSource, AdapterStore,
                                         InvalidAdapterNameError)
from lorakit.serve.blends import (MAX_BLEND_WEIGHT, BlendPartNotFoundError, BlendRefusedError, check_blend, pin_blend,
                                  unpin_blend)
from lorakit.serve.schema_types import integer
from lorakit.serve.vllm_metrics import vllm_metric_lines
from lorakit.serve.vllm_routes import LoadLoraAdapterBody, UnloadLoraAdapterBody, VllmAdapters, VllmError


@dataclass(frozen=True)
class ServeConfig:
    """Limits and names of one server."""

    base_name: str = "base"  # the `model` id that means "no adapter"
    api_key: str | None = None  # when set, /v1/* and /metrics need "Authorization: Bearer <key>"
    max_tokens_limit: int = 512  # the largest max_tokens a request may ask for
    default_max_tokens: int = 64  # when a request gives none (capped by what the context leaves)
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_waiting: int = 256  # requests queued beyond the running batch; more get 503
    title: str = "lorakit"  # shown on the page
    drain_timeout: float = 30.0  # on shutdown, seconds running requests may take before they are cut off
    adapter_roots: tuple[str, ...] = ()  # directories POST /v1/load_lora_adapter may load from (none: off)
    max_blend_parts: int = 4  # the most adapters one request's adapter_blend may mix

    def __post_init__(self) -> None:
        if not isinstance(self.drain_timeout, (int, float)) or not 0 <= self.drain_timeout < float("inf"):
            raise ValueError(f"ServeConfig.drain_timeout must be a finite number >= 0, got {self.drain_timeout!r}")
        for name in ("max_tokens_limit", "default_max_tokens", "max_body_bytes", "max_waiting", "max_blend_parts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServeConfig.{name} must be a positive integer, got {value!r}")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


# -- request bodies ----------------------------------------------------------------------------------

StopText = Annotated[str, Field(min_length=1, max_length=256)]
PromptText = Annotated[str, Field(min_length=1)]
BlendName = Annotated[str, Field(min_length=1, max_length=256)]
BlendWeight = Annotated[float, Field(ge=0.0, le=MAX_BLEND_WEIGHT, allow_inf_nan=False)]
BLEND_FIELD = "adapter_blend"


class _Sampling(BaseModel):
    """Strict (no "1" for 1, no 1 for true) and with the handlers' limits in the schema, so /openapi.json
    says what the server accepts."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1, max_length=256)
    max_tokens: integer(ge=1) | None = None
    max_completion_tokens: integer(ge=1) | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Union[StopText, Annotated[list[StopText], Field(max_length=4)], None] = None
    seed: integer(ge=-(2**53), le=2**53) | None = None  # JSON's exact integers (and a float's)
    stream: bool = False
    n: integer(ge=1, le=1) = 1
    logprobs: Literal[False, 0, None] = None  # not supported (0: none, as the completions API counts them)
    ignore_eos: bool = False  # vLLM's extension: decode max_tokens tokens whatever the model says (load tests)
    adapter_blend: Annotated[dict[BlendName, BlendWeight], Field(min_length=1)] | None = Field(
        default=None, description="lorakit's extension: a weighted mix of adapters for this request, "
        "{\"pirate\": 0.7, \"poet\": 0.3} runs 0.7·Δpirate + 0.3·Δpoet without creating an adapter. `model` must "
        "be the base model id or one of these adapters (the response echoes it). Weights are finite numbers in "
        f"[0, {MAX_BLEND_WEIGHT:g}]; the server limits the number of adapters (--max-blend-parts, default 4); "
        "prefix-tuning adapters and adapters of different base models cannot be blended.")


class CompletionBody(_Sampling):
    prompt: Union[PromptText, Annotated[list[PromptText], Field(min_length=1, max_length=1)]]  # one prompt


class ContentPart(BaseModel):
    """One OpenAI content part; only "text" parts are used, and their `text` must be a string."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: str
    text: str = ""  # a "text" part without text counts as ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[ContentPart], None] = None


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)


class AdapterBody(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str = Field(min_length=1, max_length=256)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None  # lorakit's routes: a string code; vLLM's: the status


class ErrorBody(BaseModel):
    """OpenAI's (and vLLM's) error body."""

    error: ErrorDetail


_WHY = {400: "invalid request", 401: "missing or wrong API key", 403: "not allowed", 404: "no such model or adapter",
        413: "request body too large", 500: "the adapter failed to load, or generation failed",
        503: "busy or shutting down: retry later"}


def declared(*statuses: int) -> dict:
    """The `responses=` of a route that may answer `statuses` (every route may answer 401 when a key is set)."""
    return {s: {"model": ErrorBody, "description": _WHY[s]} for s in sorted({401, *statuses})}


TEXT = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}


# -- the server ----------------------------------------------------------------------------------------

class Server:
    """Engine + store + tokenizer behind the routes; one per served model."""

    def __init__(self, engine: Engine, store: AdapterStore, tokenizer: Any, config: ServeConfig,
                 paths: PathAdapters | None = None) -> None:
        self.engine, self.store, self.tokenizer, self.config = engine, store, tokenizer, config
        engine.limit_waiting(config.max_waiting)  # enforced where requests are queued, so bursts cannot pass it
        self.vllm = VllmAdapters(store, paths or PathAdapters(), AllowedRoots(config.adapter_roots), config.base_name)
        self.started = int(time.time())
        self.http_requests: dict[tuple[str, int], int] = {}
        self.blend_requests = 0  # requests queued with an adapter_blend

    def _pin(self, adapter: str | None | Mapping[str, float]) -> RowName:
        """Acquire the request's adapter(s) in the store: the route the engine's row runs."""
        if adapter is None:
            return None
        if isinstance(adapter, Mapping):
            return pin_blend(self.store, adapter)
        return self.store.acquire(adapter)

    def _unpin(self, attached: RowName) -> None:
        if isinstance(attached, Blend):
            unpin_blend(self.store, attached)
        elif attached is not None:
            self.store.release(attached)

    # -- building requests -------------------------------------------------------------------------
    def adapter_for(self, model: str) -> str | None:
        if model == self.config.base_name:
            return None
        try:
            self.store.path_for(model)
        except InvalidAdapterNameError as exc:
            raise ApiError(404, f"model {model!r} not found ({self.store.client_message(exc)}); available: "
                           f"{self.model_ids()}", code="model_not_found", param="model") from exc
        except AdapterNotFoundError as exc:
            raise ApiError(404, f"model {model!r} not found; available: {self.model_ids()}",
                           code="model_not_found", param="model") from exc
        except AdapterLoadError as exc:  # a source that could not fetch it (lorakit.serve.object_store)
            raise ApiError(500, self.store.client_message(exc), type_="server_error",
                           code="adapter_load_failed") from exc
        return model

    async def route_for_async(self, body: _Sampling) -> str | None | dict[str, float]:
        """The request's adapter: the one `model` names, None for the base, or its checked adapter_blend
        (whose adapters are pinned by `start`)."""
        from starlette.concurrency import run_in_threadpool

        blend = body.adapter_blend
        if blend is None:
            return await self.adapter_for_async(body.model)
        try:  # unknown parts answer 404, as an unknown `model` does: the schema cannot know which names exist
            await run_in_threadpool(check_blend, self.store, blend, self.config.max_blend_parts)
        except BlendRefusedError as exc:
            status = 404 if isinstance(exc, BlendPartNotFoundError) else 400
            raise ApiError(status, str(exc), code=exc.code, param=BLEND_FIELD) from exc
        except AdapterLoadError as exc:  # a source that could not fetch a part
            raise ApiError(500, self.store.client_message(exc), type_="server_error",
                           code="adapter_load_failed") from exc
        if body.model != self.config.base_name and body.model not in blend:
            raise ApiError(400, f"model {body.model!r} with {BLEND_FIELD}: model must be the base model id "
                           f"({self.config.base_name!r}) or one of the blend's adapters {sorted(blend)}",
                           param="model")
        return dict(blend)

    async def adapter_for_async(self, model: str) -> str | None:
        """adapter_for off the event loop (a source may download the adapter on first use)."""
        from starlette.concurrency import run_in_threadpool

        if model == self.config.base_name:
            return None
        return await run_in_threadpool(self.adapter_for, model)

    def model_ids(self) -> list[str]:
        return [self.config.base_name] + self.store.available()

    def params(self, body: _Sampling, prompt_len: int) -> SamplingParams:
        context = self.engine.max_context
        if prompt_len >= context:
            raise ApiError(400, f"the prompt is {prompt_len} tokens; this model's context is {context} tokens",
                           code="context_length_exceeded", param="messages" if isinstance(body, ChatBody) else "prompt")
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > self.config.max_tokens_limit:
            raise ApiError(400, f"max_tokens={asked} is above this server's limit {self.config.max_tokens_limit}",
                           param="max_tokens")
        if asked is not None and prompt_len + asked > context:
            raise ApiError(400, f"prompt ({prompt_len} tokens) + max_tokens ({asked}) exceeds the context length "
                           f"{context}", code="context_length_exceeded", param="max_tokens")
        max_tokens = asked or min(self.config.default_max_tokens, context - prompt_len)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s or len(s) > 256 for s in stop):
            raise ApiError(400, "stop takes at most 4 non-empty strings of up to 256 characters", param="stop")
        for s in stop:
            check_text(s, "stop")
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  stop=tuple(stop), seed=body.seed, ignore_eos=body.ignore_eos)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc

    def encode_prompt(self, prompt: str | list[str]) -> list[int]:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt must be one string (batches of prompts are not supported)", param="prompt")
            prompt = prompt[0]
        if len(prompt) > self.config.max_body_bytes:
            raise ApiError(413, "prompt too long", param="prompt")
        check_text(prompt, "prompt")
        ids = self.tokenizer(prompt).input_ids
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return ids

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        turns = []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                content = "".join(part.text for part in content if part.type == "text")
            check_text(content or "", f"messages.{i}.content")
            turns.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    async def start(self, prompt_ids: list[int], adapter: str | None | Mapping[str, float], params: SamplingParams):
        """Pin the adapter, or every adapter of a blend (loading them without blocking the event loop), and
        queue the request; they are released when it finishes."""
        from starlette.concurrency import run_in_threadpool

        if self.engine.waiting >= self.config.max_waiting:
            raise ApiError(503, "the server is busy; retry later", type_="server_error", code="overloaded")
        blended = isinstance(adapter, Mapping)
        try:  # the names their current versions have on the model (a replaced adapter's differs)
            attached = await run_in_threadpool(self._pin, adapter)
        except (AdapterNotFoundError, InvalidAdapterNameError) as exc:  # a blend's part removed since its check
            if blended:
                raise ApiError(404, f"{BLEND_FIELD}: {self.store.client_message(exc)}", code="adapter_not_found",
                               param=BLEND_FIELD) from exc
            raise ApiError(404, self.store.client_message(exc), code="model_not_found", param="model") from exc
        except AdapterLoadError as exc:
            raise ApiError(500, self.store.client_message(exc), type_="server_error",
                           code="adapter_load_failed") from exc
        release = (lambda: self._unpin(attached)) if attached is not None else None
        try:
            stream = await self.engine.submit_async(prompt_ids, attached, params, on_finish=release)
            if blended:
                self.blend_requests += 1
            return stream
        except EngineError as exc:
            if release:
                release()
            if isinstance(exc, EngineBusyError):
                raise ApiError(503, "the server is busy; retry later", type_="server_error", code="overloaded") from exc
            if isinstance(exc, EngineClosedError):  # shutting down: retry elsewhere, not the client's fault
                raise ApiError(503, "the server is shutting down; retry later", type_="server_error",
                               code="shutting_down") from exc
            raise ApiError(400, str(exc)) from exc


def check_text(text: str, param: str) -> None:
    """400 for text that is not valid Unicode (a lone UTF-16 surrogate, "a\\ud800b", which JSON allows
    and the tokenizer cannot take)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{param} is not valid Unicode: a lone surrogate {text[exc.start]!r} at character "
                       f"{exc.start}", param=param) from None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def field_path(loc) -> str:
    """A validation error's field as "messages.0.content", without pydantic's union-member tags
    ("constrained-str", "list[ContentPart]", "function-before[...]", "str")."""
    return ".".join(str(p) for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS))


def telling_error(errors: list[dict]) -> dict:
    """The error that says most: a union's members each fail; prefer a broken constraint (too long, bad
    Unicode) over "not a string", then the deepest field."""
    if not errors:
        return {}
    return min(errors, key=lambda e: (str(e.get("type", "")).endswith("_type"), -len(e.get("loc", ()))))


def _error_response(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                    param: str | None = None):
    from fastapi.responses import Response

    # json.dumps escapes to ASCII, so a message quoting a lone surrogate still encodes
    body = json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})
    return Response(body, status_code=status, media_type="application/json")


class _BodyLimit:
    """ASGI middleware: 413 for bodies over `limit` bytes, whether announced by content-length or sent
    chunked. The body is read here (at most `limit` bytes are kept) and replayed to the app, which then
    receives the connection's later messages (a disconnect) as usual."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = _error_response(413, f"request body over {self.limit} bytes", code="request_too_large")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_large(scope, receive, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                return await too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(server: Server):
    """The FastAPI app over `server`; the engine thread starts with the app and stops with it."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from lorakit.serve.page import render_page

    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.close()

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    config = server.config

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error_response(exc.status, exc.message, exc.type, exc.code, exc.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):  # 400, as OpenAI answers (not 422)
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error_response(400, "the request body is not valid JSON", code="invalid_json")
        first = telling_error(errors)
        where = field_path(first.get("loc", ())[1:]) or None
        loc = first.get("loc", ())
        if len(loc) > 1 and loc[1] == BLEND_FIELD:  # what follows is an adapter's name, not a field
            part = f" ({loc[2]!r})" if len(loc) > 2 and isinstance(loc[2], str) else ""
            return _error_response(400, f"invalid request: {BLEND_FIELD}{part}: {first.get('msg', 'invalid')}",
                                   param=BLEND_FIELD, code="invalid_value")
        if first.get("type") == "string_unicode":  # a lone surrogate: JSON allows it, UTF-8 cannot hold it
            field = field_path(p for p in first["loc"][1:] if not isinstance(p, int))  # "prompt", as check_text
            return _error_response(400, f"{field} is not valid Unicode (a lone surrogate)", param=field,
                                   code="invalid_value")
        return _error_response(400, f"invalid request: {where}: {first.get('msg', 'invalid')}", param=where,
                               code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        response = _error_response(exc.status_code, str(exc.detail))
        if exc.status_code == 405:  # RFC 9110: name the methods of every route on this path
            response.headers["Allow"] = ", ".join(allowed_methods(app, request.scope))
        return response

    @app.exception_handler(VllmError)
    async def vllm_error(request: Request, exc: VllmError):
        from fastapi.responses import Response

        return Response(exc.body(), status_code=exc.status, media_type="application/json")

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        path = request.url.path
        if config.api_key and (path.startswith("/v1/") or path in ("/metrics", app.openapi_url)):
            scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                                     config.api_key.encode("utf-8", "replace")):
                return _error_response(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                       code="invalid_api_key")
        response = await call_next(request)
        route = request.scope.get("route")
        key = (getattr(route, "path", "unmatched"), response.status_code)
        server.http_requests[key] = server.http_requests.get(key, 0) + 1
        return response

    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return render_page(config.title, config.base_name, bool(config.api_key))

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": server.engine.running, "waiting": server.engine.waiting,
                "adapters_resident": len(server.store.resident())}

    @app.get("/v1/models", responses=declared())
    async def models():
        resident = set(server.store.resident())
        data = [{"id": m, "object": "model", "created": server.started, "owned_by": "lorakit",
                 "root": config.base_name, "parent": None if m == config.base_name else config.base_name,
                 "resident": m == config.base_name or m in resident} for m in server.model_ids()]
        return {"object": "list", "data": data}

    @app.get("/v1/adapters", responses=declared())
    async def adapters():
        return {"available": server.store.available(), "resident": server.store.resident(),
                "resident_bytes": server.store.resident_bytes(), "budget_bytes": server.store.budget_bytes}

    @app.post("/v1/adapters", responses=declared(400, 404, 413, 500))
    async def load_adapter(body: AdapterBody):
        from starlette.concurrency import run_in_threadpool

        try:
            nbytes = await run_in_threadpool(server.store.load, body.name)
        except (AdapterNotFoundError, InvalidAdapterNameError) as exc:
            raise ApiError(404, server.store.client_message(exc), code="adapter_not_found", param="name") from exc
        except AdapterLoadError as exc:
            raise ApiError(500, server.store.client_message(exc), type_="server_error",
                           code="adapter_load_failed") from exc
        return {"name": body.name, "bytes": nbytes, "resident": server.store.resident()}

    @app.delete("/v1/adapters/{name}", responses=declared(404))
    async def unload_adapter(name: str):
        try:
            now = server.store.unload(name)
        except AdapterNotFoundError as exc:
            raise ApiError(404, f"{exc}", code="adapter_not_found", param="name") from exc
        return {"name": name, "unloaded": True if now else "after running requests finish"}

    generation = {**declared(400, 404, 413, 500, 503),
                  200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                        "description": "the completion (JSON), or its chunks as server-sent events (stream: true)"}}

    @app.post("/v1/completions", responses=generation)
    async def completions(body: CompletionBody, request: Request):
        adapter = await server.route_for_async(body)
        prompt_ids = server.encode_prompt(body.prompt)
        params = server.params(body, len(prompt_ids))
        stream = await server.start(prompt_ids, adapter, params)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            return _sse(stream, request, lambda d: chunk(d.text, None), lambda f: chunk("", _reason(f)))
        done = await _wait(stream, request)
        out = chunk(done.text, _reason(done))
        out["usage"] = _usage(done)
        return out

    @app.post("/v1/chat/completions", responses=generation)
    async def chat_completions(body: ChatBody, request: Request):
        adapter = await server.route_for_async(body)
        prompt_ids = server.encode_chat(body.messages)
        params = server.params(body, len(prompt_ids))
        stream = await server.start(prompt_ids, adapter, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            return _sse(stream, request, lambda d: chunk({"content": d.text}, None),
                        lambda f: chunk({}, _reason(f)), first=chunk({"role": "assistant", "content": ""}, None))
        done = await _wait(stream, request)
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                             "logprobs": None, "finish_reason": _reason(done)}],
                "usage": _usage(done)}

    @app.post("/v1/load_lora_adapter", responses={**declared(400, 403, 404, 413), **TEXT})
    async def load_lora_adapter(body: LoadLoraAdapterBody):
        return PlainTextResponse(await server.vllm.load(body))

    @app.post("/v1/unload_lora_adapter", responses={**declared(400, 404, 413), **TEXT})
    async def unload_lora_adapter(body: UnloadLoraAdapterBody):
        return PlainTextResponse(await server.vllm.unload(body))

    @app.get("/metrics", response_class=PlainTextResponse, responses=declared())
    async def metrics():
        return PlainTextResponse(render_metrics(server), media_type="text/plain; version=0.0.4")

    def _sse(stream, request: Request, on_delta, on_finish, first: dict | None = None):
        async def events() -> AsyncIterator[str]:
            try:
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                async for event in stream:
                    if isinstance(event, Delta):
                        if event.text:
                            yield f"data: {json.dumps(on_delta(event))}\n\n"
                    else:
                        if event.reason in ("error", "cancelled"):  # "shutdown" ends like any finish
                            err = {"error": {"message": event.error or event.reason, "type": "server_error",
                                             "param": None, "code": event.reason}}
                            yield f"data: {json.dumps(err)}\n\n"
                            return
                        yield f"data: {json.dumps(on_finish(event))}\n\n"
                        yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): its row leaves the batch
                stream.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def openapi() -> dict:
        """FastAPI's document without its 422 answers: validation errors are 400 here, as OpenAI answers."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for operations in doc.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                doc.get("components", {}).get("schemas", {}).pop(unused, None)
            limit_blends(doc, config.max_blend_parts)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
    return app


def limit_blends(doc: dict, max_parts: int) -> None:
    """State this server's --max-blend-parts in the document's request bodies (maxProperties), so a blend the
    schema calls valid is one the server takes."""
    for schema in doc.get("components", {}).get("schemas", {}).values():
        field = schema.get("properties", {}).get(BLEND_FIELD)
        for option in (field or {}).get("anyOf", []):
            if option.get("type") == "object":
                option["maxProperties"] = max_parts


def allowed_methods(app, scope) -> list[str]:
    """The methods of every route whose path matches `scope`'s (a 405's Allow header)."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in app.router.routes:
        if getattr(route, "methods", None) and route.matches(scope)[0] != Match.NONE:
            methods |= set(route.methods)
    return sorted(methods)


async def _wait(stream, request) -> Finished:
    """The request's result; cancels its row as soon as the client disconnects (the body was read, so
    the connection's next message is the disconnect; polling request.is_disconnected() never saw it
    behind the middlewares)."""
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.05)  # not expected (the body is read); never spin
        stream.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async for event in stream:
            if isinstance(event, Finished):
                if event.reason == "error":
                    raise ApiError(500, event.error or "generation failed", type_="server_error")
                return event
    finally:
        watcher.cancel()
    raise ApiError(500, "generation ended without a result", type_="server_error")  # pragma: no cover


def _reason(done: Finished) -> str:
    """OpenAI's finish_reason; "shutdown" when the server's drain time ran out mid-request."""
    return done.reason if done.reason in ("length", "shutdown") else "stop"


def _usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def render_metrics(server: Server) -> str:
    """Prometheus text exposition of the server's counters and gauges."""
    engine, store = server.engine.stats, server.store
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric("lorakit_http_requests_total", "counter", "HTTP requests by route and status",
           [(f'{{route="{route}",status="{status}"}}', n) for (route, status), n in sorted(server.http_requests.items())])
    metric("lorakit_requests_finished_total", "counter", "Generation requests that left the batch, by reason",
           [(f'{{reason="{r}"}}', n) for r, n in sorted(engine.requests_finished.items())])
    metric("lorakit_prompt_tokens_total", "counter", "Prompt tokens prefilled", [("", engine.prompt_tokens)])
    metric("lorakit_completion_tokens_total", "counter", "Tokens generated", [("", engine.completion_tokens)])
    lat = sorted(engine.latencies)
    finished = sum(engine.requests_finished.values())
    quantiles = [(f'{{quantile="{q}"}}', lat[min(len(lat) - 1, int(q * len(lat)))]) for q in (0.5, 0.9, 0.99)] if lat else []
    metric("lorakit_request_latency_seconds", "summary", "Seconds from submission to the last token (quantiles over "
           "the last 1000 requests)", quantiles + [("_sum", engine.latency_sum), ("_count", finished)])
    metric("lorakit_time_to_first_token_seconds", "summary", "Seconds from submission to the first token",
           [("_sum", engine.first_token_sum), ("_count", engine.first_token_count)])
    metric("lorakit_decode_steps_total", "counter", "Batched decode steps", [("", engine.steps)])
    metric("lorakit_decode_step_seconds_total", "counter", "Seconds spent in decode steps", [("", engine.step_seconds)])
    metric("lorakit_prefill_steps_total", "counter", "Prefill steps (one batched forward each)", [("", engine.prefill_steps)])
    metric("lorakit_prefill_seconds_total", "counter", "Seconds spent in prefill steps", [("", engine.prefill_seconds)])
    metric("lorakit_blend_requests_total", "counter", "Requests queued with an adapter_blend",
           [("", server.blend_requests)])
    metric("lorakit_running_requests", "gauge", "Rows in the running batch", [("", server.engine.running)])
    metric("lorakit_waiting_requests", "gauge", "Requests waiting to join the batch", [("", server.engine.waiting)])
    metric("lorakit_adapters_resident", "gauge", "Adapters loaded on the model", [("", len(store.resident()))])
    metric("lorakit_adapter_bytes_resident", "gauge", "Bytes of resident adapters", [("", store.resident_bytes())])
    if store.budget_bytes is not None:
        metric("lorakit_adapter_budget_bytes", "gauge", "Adapter memory budget", [("", store.budget_bytes)])
    stats = store.stats
    metric("lorakit_adapter_loads_total", "counter", "Adapter loads", [("", stats.loads)])
    metric("lorakit_adapter_load_failures_total", "counter", "Adapter loads that failed", [("", stats.load_failures)])
    metric("lorakit_adapter_evictions_total", "counter", "Adapters evicted to stay under the budget",
           [("", stats.evictions)])
    metric("lorakit_adapter_unloads_total", "counter", "Adapters unloaded on request", [("", stats.unloads)])
    running, waiting = (_user_names(counts) for counts in server.engine.row_adapters())
    lines += vllm_metric_lines(server.config.base_name, server.engine.max_batch, running, waiting,
                               server.engine.running, server.engine.waiting, engine.prompt_tokens,
                               engine.completion_tokens, engine.requests_finished)
    return "\n".join(lines) + "\n"  # summaries' "_sum"/"_count" samples come out as name_sum, name_count


def _user_names(counts: dict[str, int]) -> dict[str, int]:
    """Requests per adapter as clients name it: a replaced adapter's new version (NAME--lorakit-vN) counts as NAME."""
    out: dict[str, int] = {}
    for attached, n in counts.items():
        name = attached.split(VERSION_MARK, 1)[0]
        out[name] = out.get(name, 0) + n
    return out


def make_server(model: Any, tokenizer: Any, adapter_dir: Any = None, *, config: ServeConfig | None = None,
                budget_bytes: int | None = None, max_batch: int = 16, max_context: int | None = None,
                prefill_tokens: int = 512, compile_decode: bool = False, compile_mode: str | None = None,
                sources: tuple[AdapterSource, ...] = ()) -> Server:
    """Engine + store + config for one model (the engine thread starts with the app). Adapters are found by
    name in: paths registered through /v1/load_lora_adapter, then `sources` (an object store), then
    `adapter_dir`."""
    engine = Engine(model, tokenizer, max_batch=max_batch, max_context=max_context, prefill_tokens=prefill_tokens,
                    compile_decode=compile_decode, compile_mode=compile_mode)
    paths = PathAdapters()
    store = AdapterStore(model, adapter_dir, engine=engine, budget_bytes=budget_bytes, sources=(paths, *sources))
    return Server(engine, store, tokenizer, config or ServeConfig(), paths)


class DrainingServer(uvicorn.Server):
    """uvicorn with a bounded drain: on SIGTERM (or SIGINT) it stops accepting connections and lets running
    requests finish for at most `drain_timeout` seconds, then finishes what remains with reason "shutdown"
    (clients get a last chunk or response saying so) and exits. Plain uvicorn waited for every stream."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.drain_timeout = engine, drain_timeout
        self.cut_off_at: float | None = None  # when the remaining requests were cut off (for tests, logs)
        self._timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if self._timer is None:
            self._timer = threading.Timer(self.drain_timeout, self._cut_off)
            self._timer.daemon = True
            self._timer.start()

    def _cut_off(self) -> None:
        self.cut_off_at = time.time()
        self.engine.cancel_all("shutdown", f"the server is shutting down: its drain time ({self.drain_timeout:g} s) "
                                           "ran out")


def uvicorn_server(app, server: Server, **config: Any) -> DrainingServer:
    """A DrainingServer for `app`; uvicorn itself cancels connections 5 s after the drain as a backstop."""
    drain = server.config.drain_timeout
    return DrainingServer(uvicorn.Config(app, timeout_graceful_shutdown=int(drain) + 5, **config), server.engine,
                          drain)


class BackgroundServer:
    """uvicorn serving `app` on a thread (tests, the demo): `with BackgroundServer(app) as url: ...`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        server = getattr(getattr(app, "state", None), "server", None)
        self.server = (uvicorn_server(app, server, log_level="warning", lifespan="on") if isinstance(server, Server)
                       else uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on")))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
