"""Continuous batching over one model: requests join and leave the running batch between decode steps.

Every row carries its own adapter, a blend of adapters (lorakit.routing.context.Blend) or none (routed per
row by `lorakit.use_adapter(model, names)`), so one decode step serves any mix of them. The batch keeps
one left-padded KV cache, in buffers that decode steps write in place (lorakit.serve.kv_cache):

    keys[l]: (B, H, W, D)      row i's real entries are the last len_i columns; mask[i] marks them
    mask:    (B, W)            1 = real token, 0 = left padding (never attended to)
    pos:     [B]               each row's next position id (its own token count, padding excluded)

    prefill: the newcomers of a step are prefilled together in one forward (lorakit.serve.prefill: each
            row left-padded, masked, its own positions and adapter; or, where newcomers share an adapter,
            lorakit.serve.packed_prefill: their prompts end to end in one row, no padding computed), at
            most `prefill_tokens` prompt tokens per step: a long prompt is prefilled in chunks over several
            steps, each chunk continuing the row's own cache, while the running rows keep decoding
    join:   a row whose prompt is done samples its first token; its cache is left-padded to W (or the
            batch's to the newcomer's length) and written into the next free rows
    step:   forward the B last tokens with the cache and mask → B next tokens (decode_forward)
    leave:  drop the row, then drop leading columns that are padding for every remaining row

A request therefore computes what `model.generate` does alone (its prompt, then one token per step);
in a batch only the padding differs, which the mask removes. Decode steps re-enter one lorakit Route
while the rows' adapters are unchanged, so what the route derives (row groups, picked adapter rows) is
built once, not per step. All model work runs on the engine's thread; other threads hand it work with
`call_soon` (adapter attach/detach happens between steps, never during one).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from lorakit.model.compiled import CompiledForward
from lorakit.config import PrefixConfig
from lorakit.errors import LorakitError
from lorakit.model.prefix_hook import cache_argument
from lorakit.routing.context import RowName, row_parts
from lorakit.model.use import Route, use_adapter, use_route
from lorakit.serve.kv_cache import BatchCache
from lorakit.serve.packed_prefill import (is_padded, packed_inputs, packing_plan, packing_supported, pairs_per_token,
                                          request_logits, take_packed)
from lorakit.serve.prefill import PrefillRow, plan_chunks, prefill_inputs, take_rows

log = logging.getLogger("lorakit.serve")


class EngineError(LorakitError):
    """The engine refused or failed a request (closed engine, bad parameters, model error)."""


class EngineClosedError(EngineError):
    """The engine has shut down (or is draining to shut down): a state of the server, not bad input."""


class EngineBusyError(EngineError):
    """As many requests wait as the queue limit allows (`max_waiting`): retry later, not bad input."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes; temperature 0 is greedy."""

    max_tokens: int = 16  # new tokens at most
    temperature: float = 0.0  # 0 = greedy (argmax); else logits / temperature before sampling
    top_p: float = 1.0  # nucleus: sample from the smallest set of tokens whose probability reaches top_p
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first one, which is not returned
    seed: int | None = None  # seeds this request's own torch.Generator (None: a random seed)
    ignore_eos: bool = False  # keep going past the end-of-sequence token

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")


@dataclass
class Delta:
    """New output of a request: tokens and the text they complete (text may lag tokens at stop-string
    prefixes and partial UTF-8 characters)."""

    text: str
    token_ids: list[int]


@dataclass
class Finished:
    """The request left the batch. reason: "stop" (eos or a stop string), "length", "cancelled" (the client
    left), "error" (this row failed: a model error, non-finite logits), "shutdown" (the server's drain
    time ran out)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    text: str  # the whole completion
    token_ids: list[int]
    error: str | None = None


class Mailbox:
    """Events bound for one asyncio loop, handed over in one `call_soon_threadsafe` per batch: while
    `holding`, posts only collect (a decode step posts one token per row), `release` wakes the loop once.
    Outside a hold every post is handed over at once. One wake-up per step, not one per row: each wake-up
    is a write to the loop's self-pipe and a turn of the loop, taken from the cores the forward runs on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Delta | Finished]] = []
        self._scheduled = False
        self.holding = False  # set and cleared by the engine thread only

    def post(self, target: asyncio.Queue, event: Delta | Finished) -> None:
        with self._lock:
            self._items.append((target, event))
            if self.holding or self._scheduled:
                return
            self._scheduled = True
        self._wake()

    def release(self) -> None:
        self.holding = False
        with self._lock:
            if self._scheduled or not self._items:
                return
            self._scheduled = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens any more
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:  # on the loop
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for target, event in items:
            target.put_nowait(event)


class Stream:
    """A request's events (Delta..., then one Finished), readable from a thread or from asyncio (through
    its loop's Mailbox)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, mailbox: Mailbox | None = None) -> None:
        self._loop = loop
        self._mailbox = mailbox if mailbox is not None or loop is None else Mailbox(loop)
        self._queue: asyncio.Queue | queue.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self.cancelled = threading.Event()

    def put(self, event: Delta | Finished) -> None:  # called on the engine thread
        if self._mailbox is not None:
            self._mailbox.post(self._queue, event)
        else:
            self._queue.put(event)

    def cancel(self) -> None:
        """Leave the batch before the next step (e.g. the client disconnected)."""
        self.cancelled.set()

    def __iter__(self):
        while True:
            event = self._queue.get()
            yield event
            if isinstance(event, Finished):
                return

    async def __aiter__(self):
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, Finished):
                return

    def result(self) -> Finished:
        """Block until the request finishes (thread use only)."""
        for event in self:
            if isinstance(event, Finished):
                return event
        raise EngineError("stream ended without a result")  # pragma: no cover


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: RowName  # an adapter's attached name, a Blend of them, or None for the base
    params: SamplingParams
    stream: Stream
    on_finish: Callable[[], None] | None = None
    id: int = 0
    generator: torch.Generator | None = None
    out_ids: list[int] = field(default_factory=list)
    sent_chars: int = 0  # characters of the completion already sent
    text: str = ""
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None


@dataclass
class EngineStats:
    """Counters for /metrics (written on the engine thread, read anywhere)."""

    requests_finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0
    max_running: int = 0  # the largest batch a step has run
    step_seconds: float = 0.0  # in decode steps
    prefill_steps: int = 0
    prefill_seconds: float = 0.0  # in prefill steps (their forwards, first tokens and bookkeeping)
    latencies: list[float] = field(default_factory=list)  # seconds from submit to finish, last 1000
    latency_sum: float = 0.0  # over every finished request
    first_token_sum: float = 0.0
    first_token_count: int = 0
    first_token_latencies: list[float] = field(default_factory=list)  # submit to first token, last 1000


class _Batch:
    """The running rows, their positions and their KV cache (lorakit.serve.kv_cache: written in place)."""

    def __init__(self, max_rows: int = 1) -> None:
        self.rows: list[Request] = []
        self.cache = BatchCache(max_rows)
        self.pos: list[int] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, joining: list[tuple[Request, PrefillRow]]) -> None:
        """Write the rows whose prompts are done (each with its own unpadded cache) into the batch's buffers."""
        if not joining:
            return
        self.cache.join([(row.keys, row.values) for _, row in joining])
        self.rows += [request for request, _ in joining]
        self.pos += [row.done for _, row in joining]

    def keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.pos = [self.pos[i] for i in keep]
        self.cache.keep(keep)


def _cache_tensors(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(getattr(layer, "is_sliding", False) for layer in layers):
        raise EngineError(f"unsupported KV cache {type(cache).__name__}: the engine needs a plain DynamicCache "
                          "(no sliding-window layers)")
    return [layer.keys for layer in layers], [layer.values for layer in layers]


class Engine:
    """Continuous batching for one causal LM with per-row adapters, on a background thread.

        engine = Engine(model, tokenizer, max_batch=16).start()
        stream = engine.submit(prompt_ids, adapter="pirate", params=SamplingParams(max_tokens=32))
        for event in stream: ...             # or: async for event in await engine.submit_async(...)
    """

    # Decode steps can run through lorakit.CompiledForward (compile_decode=True): the rows' route is an input
    # of the compiled step, so rows joining and leaving change tensors, not code.
    compiled_decode_available: bool = True

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, max_batch: int = 16,
                 max_context: int | None = None, eos_token_ids: Sequence[int] | None = None,
                 prefill_tokens: int = 512, compile_decode: bool = False, compile_backend: str = "inductor",
                 compile_mode: str | None = None, max_waiting: int | None = None, pack_prefill: bool = True) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch!r}")
        if not isinstance(prefill_tokens, int) or isinstance(prefill_tokens, bool) or prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be a positive integer, got {prefill_tokens!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens  # prompt tokens prefilled per step, over all newcomers
        if compile_decode and not self.compiled_decode_available:
            raise EngineError("compile_decode=True: this engine has no compiled decode step yet; its decode steps "
                              "run eagerly through Engine.decode_forward (serve without --compile)")
        self.compile_decode = compile_decode  # decode steps through a compiled decode_forward
        # the KV cache and the context grow step by step: dynamic shapes, and graph breaks allowed in the cache's
        # code (the adapted layers themselves trace without one, tests/model/test_compiled.py)
        self._compiled = (CompiledForward(model, backend=compile_backend, mode=compile_mode, dynamic=True,
                                          fullgraph=False) if compile_decode else None)
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        forward_params = inspect.signature(model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in forward_params
        self._cache_arg = cache_argument(forward_params)  # `cache` on newer transformers, `past_key_values` before
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self._dtype = getattr(getattr(embeddings, "weight", None), "dtype", torch.float32)  # the hidden states'
        self._pairs_per_token = pairs_per_token(model)
        if pack_prefill and not (self._logits_to_keep and packing_supported(model) and self._pairs_per_token):
            pack_prefill = False  # this model's attention cannot take the packed mask as given
        self.pack_prefill = pack_prefill  # prompts sharing a route prefill end to end in one row, unpadded
        config = getattr(model, "config", None)
        self.max_context = max_context or getattr(config, "max_position_embeddings", None) or 2048
        if eos_token_ids is None:
            eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            if eos is None and tokenizer is not None:
                eos = tokenizer.eos_token_id
            eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.eos_token_ids = frozenset(eos_token_ids)
        self.stats = EngineStats()
        self._max_waiting: int | None = None
        self.limit_waiting(max_waiting)
        self._admission = threading.Lock()  # a request is counted waiting in the inbox or in _pending, never neither
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._batch = _Batch(self.max_batch)
        self._prefilling: list[tuple[Request, PrefillRow]] = []  # admitted, prompt not (fully) prefilled yet
        self._pending: list[Request] = []
        self._decode_route: Route | None = None  # re-entered while the running rows' adapters are unchanged
        self._ids = itertools.count(1)
        self._mailboxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}  # one per client loop (usually one)
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- public API ------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> int:
        """Admitted rows: decoding, or having their prompt prefilled."""
        return len(self._batch) + len(self._prefilling)

    @property
    def waiting(self) -> int:
        with self._admission:
            return len(self._pending) + self._inbox.qsize()

    @property
    def max_waiting(self) -> int | None:
        return self._max_waiting

    def limit_waiting(self, max_waiting: int | None) -> None:
        """At most `max_waiting` requests wait beyond the running batch (None: no limit); submit refuses more
        with EngineBusyError, checked and queued in one step so no burst gets past it."""
        if max_waiting is not None and (not isinstance(max_waiting, int) or isinstance(max_waiting, bool)
                                        or max_waiting < 1):
            raise ValueError(f"max_waiting must be a positive integer or None, got {max_waiting!r}")
        self._max_waiting = max_waiting

    def submit(self, prompt_ids: Sequence[int], adapter: RowName = None,
               params: SamplingParams | None = None, *, on_finish: Callable[[], None] | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> Stream:
        """Queue a request; it joins the running batch before the next decode step."""
        if self._closed:
            raise EngineClosedError("the engine is closed")
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise EngineError("the prompt is empty")
        if len(prompt) + params.max_tokens > self.max_context:
            raise EngineError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                              f"context length {self.max_context}")
        stream = Stream(loop, self._mailbox(loop) if loop is not None else None)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        request = Request(prompt, adapter, params, stream, on_finish, next(self._ids),
                          torch.Generator().manual_seed(seed))
        with self._admission:
            if self._max_waiting is not None and len(self._pending) + self._inbox.qsize() >= self._max_waiting:
                raise EngineBusyError(f"{self._max_waiting} requests are already waiting (the queue limit); "
                                      "retry later")
            self._inbox.put(request)
        self._wake.set()
        return stream

    async def submit_async(self, prompt_ids: Sequence[int], adapter: RowName = None,
                           params: SamplingParams | None = None, **kwargs) -> Stream:
        return self.submit(prompt_ids, adapter, params, loop=asyncio.get_running_loop(), **kwargs)

    def _mailbox(self, loop: asyncio.AbstractEventLoop) -> Mailbox:
        box = self._mailboxes.get(loop)
        if box is None:
            self._mailboxes = {lp: b for lp, b in self._mailboxes.items() if not lp.is_closed()}
            box = self._mailboxes.setdefault(loop, Mailbox(loop))
        return box

    @contextlib.contextmanager
    def _holding_mail(self):
        """Collect the events a step posts and hand them to each loop in one wake-up at its end."""
        boxes = list(self._mailboxes.values())
        for box in boxes:
            box.holding = True
        try:
            yield
        finally:
            for box in boxes:
                box.release()

    def row_adapters(self) -> tuple[dict[str, int], dict[str, int]]:
        """(running, waiting): requests per adapter name among the admitted rows and the queue (a snapshot
        read off the engine thread, for metrics; requests still in the inbox are not counted by name). A
        blended request counts once for each of its adapters."""
        def count(requests) -> dict[str, int]:
            out: dict[str, int] = {}
            for request in requests:
                for name, _ in row_parts(request.adapter):
                    out[name] = out.get(name, 0) + 1
            return out

        running = list(self._batch.rows) + [request for request, _ in list(self._prefilling)]
        return count(running), count(list(self._pending))

    def cancel_all(self, reason: str = "shutdown", error: str | None = None) -> Future:
        """Finish every running, waiting and queued request now with `reason` (a drain that ran out of
        time); the engine stays open. Returns a Future of how many requests it finished."""
        def finish_everything() -> int:
            self._admit_inbox()
            rows = self._batch.rows + [request for request, _ in self._prefilling] + self._pending
            self._batch, self._prefilling, self._pending = _Batch(self.max_batch), [], []
            for request in rows:
                self._finish(request, reason, error=error)
            return len(rows)

        return self.call_soon(finish_everything)

    def call_soon(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between two steps (never during one); returns its Future."""
        future: Future = Future()
        if self._thread is None or not self._thread.is_alive():  # no loop running: nothing can race
            _run_into(fn, future)
            return future
        self._calls.put((fn, future))
        self._wake.set()
        return future

    # -- the loop ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed:
            self._run_calls()
            self._admit()
            if not self._batch and not self._prefilling:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            if self._prefilling:
                try:
                    with self._holding_mail():  # the first tokens reach the loop in one wake-up
                        self._prefill_step()  # a model error fails its own rows only, never the running ones
                except Exception as exc:  # a bug here must not stop the engine thread (clients would hang)
                    log.exception("prefill step failed")
                    failed, self._prefilling = self._prefilling, []
                    self._finish_all([(request, "error", f"{type(exc).__name__}: {exc}") for request, _ in failed])
            if not self._batch:
                continue
            try:
                with self._holding_mail():  # every row's token in one wake-up of the loop
                    self._step()
            except Exception as exc:  # a model error fails the rows of this step, never the server
                log.exception("decode step failed")
                failed, self._batch = self._batch.rows, _Batch(self.max_batch)
                self._finish_all([(request, "error", f"{type(exc).__name__}: {exc}") for request in failed])
        self._run_calls()
        rows = self._batch.rows + [request for request, _ in self._prefilling] + self._pending
        self._batch, self._prefilling, self._pending = _Batch(self.max_batch), [], []
        self._finish_all([(request, "cancelled", None) for request in rows])
        while not self._inbox.empty():
            self._finish(self._inbox.get(), "cancelled")

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            self._decode_route = None  # adapters may change: the next step builds a fresh route
            _run_into(fn, future)

    def _admit_inbox(self) -> None:
        with self._admission:
            while True:
                try:
                    self._pending.append(self._inbox.get_nowait())
                except queue.Empty:
                    return

    def _admit(self) -> None:
        """Move waiting requests into prefill while the batch has room (prefilling rows count)."""
        self._admit_inbox()
        while self._pending and self.running < self.max_batch:
            request = self._pending.pop(0)
            if request.stream.cancelled.is_set():
                self._finish(request, "cancelled")
                continue
            try:  # an unknown adapter fails its request here, not the batched forward of the others
                self._check_adapter(request.adapter)
            except Exception as exc:
                log.warning("request %d refused: %s", request.id, exc)
                self._finish(request, "error", error=f"{type(exc).__name__}: {exc}")
                continue
            self._prefilling.append((request, PrefillRow(request.prompt_ids)))

    def _prefill_step(self) -> None:
        """Prefill the next chunks of the admitted prompts together (`prefill_tokens` at most); rows whose
        prompt is done sample their first token and join the running batch."""
        live, leaving = [], []  # leaving: (request, reason, error), finished once off the prefill list
        for request, row in self._prefilling:
            if request.stream.cancelled.is_set():
                leaving.append((request, "cancelled", None))  # its partial cache goes with it
            else:
                live.append((request, row))
        self._prefilling = live
        self._finish_all(leaving)
        sizes = plan_chunks([row for _, row in live], self.prefill_tokens)
        now = [(entry, size) for entry, size in zip(live, sizes) if size]
        if not now:
            return
        start = time.perf_counter()
        leaving = []
        try:
            leaving = self._prefill_chunks(now)
        finally:  # counted before any request of this step finishes: a client that saw its answer sees the step
            self.stats.prefill_steps += 1
            self.stats.prefill_seconds += time.perf_counter() - start
            self._finish_all(leaving)

    def _prefill_chunks(self, now: list[tuple[tuple[Request, PrefillRow], int]]
                        ) -> list[tuple[Request, str, str | None]]:
        """Prefill these rows' chunks; the finished prompts sample their first token and join the batch.
        → the requests that leave instead (request, reason, error), for the caller to finish."""
        try:
            logits = self._prefill_forward(now)
            results = [(entry, logits[i]) for i, (entry, _) in enumerate(now)]
        except Exception as exc:  # find the culprit: each row alone, so only a failing row fails
            if len(now) == 1:
                results = [(now[0][0], exc)]
            else:
                log.warning("batched prefill failed (%s): prefilling its %d rows one by one", exc, len(now))
                results = []
                for entry, size in now:
                    try:
                        results.append((entry, self._prefill_forward([(entry, size)])[0]))
                    except Exception as one:
                        results.append((entry, one))
        joining, leaving = [], []
        for (request, row), outcome in results:
            if isinstance(outcome, Exception):
                log.warning("prefill failed for request %d: %s", request.id, outcome)
                leaving.append((request, "error", f"{type(outcome).__name__}: {outcome}"))
                continue
            if row.remaining:
                continue  # more chunks next step
            try:
                token = self._sample(request, outcome)
            except Exception as exc:
                log.warning("sampling failed for request %d: %s", request.id, exc)
                leaving.append((request, "error", f"{type(exc).__name__}: {exc}"))
                continue
            reason = self._emit(request, token)
            if reason is None:
                joining.append((request, row))
            else:
                leaving.append((request, reason, None))
        gone = {request.id for request, _ in joining} | {request.id for request, _, _ in leaving}
        self._prefilling = [(request, row) for request, row in self._prefilling if request.id not in gone]
        self._batch.add(joining)
        return leaving

    @torch.no_grad()
    def _prefill_forward(self, now: list[tuple[tuple[Request, PrefillRow], int]]) -> torch.Tensor:
        """One forward over the rows' next chunks; each row's cache grows by its chunk. → (B, V) last logits."""
        adapters = [request.adapter for (request, _), _ in now]
        rows, sizes = [row for (_, row), _ in now], [size for _, size in now]
        if self.pack_prefill and len(set(adapters)) < len(adapters):  # some share a route: packing may pay
            layout = packing_plan(rows, sizes, adapters, self._pairs_per_token)
            if not is_padded(layout):
                return self._packed_prefill_forward(now, adapters, layout)
        inputs = prefill_inputs(rows, sizes, self.device)
        cache = DynamicCache(ddp_cache_data=inputs.past) if inputs.past is not None else DynamicCache()
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        with self._route_context(self._route_names([request.adapter for (request, _), _ in now])):
            out = self.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                             position_ids=inputs.position_ids, use_cache=True, **{self._cache_arg: cache}, **extra)
        keys, values = _cache_tensors(out.past_key_values)
        take_rows(rows, sizes, inputs, keys, values)
        self.stats.prompt_tokens += sum(sizes)
        return out.logits[:, -1]

    def _packed_prefill_forward(self, now: list[tuple[tuple[Request, PrefillRow], int]], adapters: list,
                                layout: list[list[int]]) -> torch.Tensor:
        """The prefill forward with each forward row's requests end to end (lorakit.serve.packed_prefill)."""
        rows, sizes = [row for (_, row), _ in now], [size for _, size in now]
        inputs = packed_inputs(rows, sizes, adapters, self.device, self._dtype, layout)
        cache = DynamicCache(ddp_cache_data=inputs.past) if inputs.past is not None else DynamicCache()
        with self._route_context(self._route_names(inputs.group_keys)):
            out = self.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                             position_ids=inputs.position_ids, use_cache=True, **{self._cache_arg: cache},
                             logits_to_keep=inputs.logit_columns)
        keys, values = _cache_tensors(out.past_key_values)
        take_packed(rows, sizes, inputs, keys, values)
        self.stats.prompt_tokens += sum(sizes)
        return request_logits(out.logits, inputs)

    @torch.no_grad()
    def _step(self) -> None:
        batch = self._batch
        start = time.perf_counter()
        device = batch.cache.mask.device
        ids = torch.tensor([[r.out_ids[-1]] for r in batch.rows], device=device)  # (B, 1)
        positions = torch.tensor(batch.pos, device=device).unsqueeze(1)  # (B, 1)
        cache, mask = batch.cache.decode_cache()  # mask (B, W + 1); the cache writes column W in place
        names = self._route_names([r.adapter for r in batch.rows])
        if self._decode_route is None or self._decode_route.names != names:
            self._decode_route = Route(names)  # rows joined or left: their adapters changed
        with self._route_context(self._decode_route):
            logits = self.decode_forward(ids, mask, positions, cache).float()  # (B, V)
        batch.cache.advance()
        batch.pos = [p + 1 for p in batch.pos]
        top, greedy_ids = logits.max(-1)  # (B,), (B,): one pass; max propagates NaN, so NaN and +inf show in top
        checked = torch.stack([(~torch.isfinite(top)).to(greedy_ids.dtype), greedy_ids])  # (2, B): one transfer
        bad, greedy = checked.tolist()
        keep, leaving = [], []  # leaving: (request, reason, error), finished once out of the batch
        for i, request in enumerate(batch.rows):
            if request.stream.cancelled.is_set():
                leaving.append((request, "cancelled", None))
                continue
            try:  # one row's bad state (NaN logits from its adapter, ...) fails that row only
                if bad[i] or request.params.temperature != 0.0:
                    token = self._sample(request, logits[i])
                else:
                    token = greedy[i]
            except Exception as exc:
                log.warning("sampling failed for request %d: %s", request.id, exc)
                leaving.append((request, "error", f"{type(exc).__name__}: {exc}"))
                continue
            reason = self._emit(request, token)
            if reason is None:
                keep.append(i)
            else:
                leaving.append((request, reason, None))
        rows = len(batch)
        batch.keep(keep)
        self.stats.steps += 1  # counted before the step's finished requests are: see _prefill_step
        self.stats.max_running = max(self.stats.max_running, rows)
        self.stats.step_seconds += time.perf_counter() - start
        self._finish_all(leaving)

    def _compilable(self, route: Route) -> bool:
        """Whether the compiled step can run `route`: not a prefix adapter (its hook is not carried)."""
        registry = self._compiled.registry
        names = route.names if isinstance(route.names, tuple) else (route.names,)
        configs = registry.configs if registry is not None else {}
        return not any(isinstance(configs.get(n), PrefixConfig) for n in names if n is not None)

    def decode_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                       cache: Any) -> torch.Tensor:
        """One decode step of the model, called under the rows' route: (B, 1) tokens → (B, V) logits.

        The one place a decode step calls the model, so a compiled (or CUDA-graph captured) step can replace
        it without touching the batching around it; `compile_decode` asks for that replacement."""
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, **{self._cache_arg: cache})
        route = self._decode_route
        if self._compiled is not None and route is not None and self._compilable(route):
            out = self._compiled(route, **kwargs)
        else:
            out = self.model(**kwargs)
        return out.logits[:, -1]

    def _check_adapter(self, name: RowName) -> None:
        """Refuse a request whose adapter is unknown, or a prefix adapter: its cache carries per-call state
        (lorakit.model.prefix_hook) that the engine's re-stacked caches do not keep (routing refuses a blend
        with a prefix adapter in it)."""
        with self._route_context(name):
            pass
        registry = getattr(self.model, "lorakit_registry", None)
        config = registry.configs.get(name) if registry is not None and name is not None else None
        if getattr(config, "method", None) == "prefix":
            raise EngineError(f"adapter {name!r} is a prefix adapter: the serving engine does not serve prefix "
                              "adapters (serve a LoRA, LoRA-XS or VeRA adapter, or run model.generate)")

    @staticmethod
    def _route_names(names: list[RowName]) -> RowName | tuple[RowName, ...]:
        """One name when every row shares it (the plain path, as a request alone runs), else one per row."""
        first = names[0]
        return first if all(n == first for n in names) else tuple(names)

    def _route_context(self, route: Route | str | None | tuple[str | None, ...]):
        """Run the model under `route` (a Route is re-entered with its derived work); the model must have
        adapters for any name."""
        names = route.names if isinstance(route, Route) else route
        if getattr(self.model, "lorakit_registry", None) is None:
            wanted = names if isinstance(names, tuple) else (names,)
            if any(n is not None for n in wanted):
                raise EngineError(f"adapter {next(n for n in wanted if n)!r} requested but the model has none")
            return contextlib.nullcontext()
        if isinstance(route, Route):
            return use_route(self.model, route)
        return use_adapter(self.model, names)

    # -- tokens → text -------------------------------------------------------------------------------
    def _sample(self, request: Request, logits: torch.Tensor) -> int:
        """The next token from one row's logits (V,); EngineError when they hold NaN or +inf."""
        params = request.params
        logits = logits.float()
        top = logits.max()
        if not torch.isfinite(top) or bool(torch.isnan(logits).any()):
            raise EngineError(f"the model's logits for this request are not finite (max {top.item()}): "
                              "a broken adapter or an overflow")
        if params.temperature == 0.0:
            return int(logits.argmax())
        # Shift first: the top logit becomes 0, so dividing by a tiny temperature (1e-38) gives 0 and -inf,
        # never inf - inf; the result tends to greedy as the temperature tends to 0. In float64 so that a
        # temperature like 5e-324 is not flushed to 0 (0 / 0 = NaN).
        probs = torch.softmax((logits - top).double() / params.temperature, dim=-1)  # (V,)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
            sorted_probs[before >= params.top_p] = 0.0  # the top token always survives (before = 0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=request.generator))

    def _emit(self, request: Request, token: int) -> str | None:
        """Record one new token and stream what it completes; the finish reason when the request is done
        (the caller finishes it once the row has left the batch, so no one sees it counted twice)."""
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        params = request.params
        if token in self.eos_token_ids and not params.ignore_eos:
            return "stop"
        request.out_ids.append(token)
        self.stats.completion_tokens += 1
        text = self._decode(request.out_ids)
        request.text = text
        for stop in params.stop:
            at = text.find(stop)
            if at >= 0:
                request.text = text[:at]
                return "stop"
        if len(request.out_ids) >= params.max_tokens:
            return "length"
        self._send(request, text, token)
        return None

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _send(self, request: Request, text: str, token: int) -> None:
        """Stream the new token and the text that is safe to show: not an incomplete UTF-8 character,
        not a tail that may turn out to begin a stop string."""
        safe = len(text.rstrip("\ufffd"))
        for stop in request.params.stop:
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:k]):
                    safe -= k
                    break
        chunk = text[request.sent_chars:safe] if safe > request.sent_chars else ""
        request.sent_chars = max(request.sent_chars, safe)
        request.stream.put(Delta(chunk, [token]))

    def _finish_all(self, leaving: Sequence[tuple[Request, str, str | None]]) -> None:
        """Finish requests that have already left the batch and the prefill list: a finish is published
        (counters, the Finished event, on_finish) only once `running` no longer counts its row."""
        for request, reason, error in leaving:
            self._finish(request, reason, error=error)

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        if reason in ("stop", "length") and request.sent_chars < len(request.text):  # what was held back
            request.stream.put(Delta(request.text[request.sent_chars:], []))
            request.sent_chars = len(request.text)
        now = time.perf_counter()
        stats = self.stats
        stats.requests_finished[reason] = stats.requests_finished.get(reason, 0) + 1
        stats.latencies = (stats.latencies + [now - request.submitted])[-1000:]
        stats.latency_sum += now - request.submitted
        if request.first_token_at is not None:
            stats.first_token_sum += request.first_token_at - request.submitted
            stats.first_token_count += 1
            stats.first_token_latencies = (stats.first_token_latencies +
                                           [request.first_token_at - request.submitted])[-1000:]
        request.stream.put(Finished(reason, len(request.prompt_ids), len(request.out_ids), request.text,
                                    list(request.out_ids), error))
        if request.on_finish is not None:
            try:
                request.on_finish()
            except Exception:  # pragma: no cover - a callback bug must not stop the engine
                log.exception("on_finish callback failed")
            request.on_finish = None


def _run_into(fn: Callable[[], Any], future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as exc:  # handed to the caller
        future.set_exception(exc)
