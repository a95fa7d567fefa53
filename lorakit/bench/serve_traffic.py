"""The HTTP traffic of `lorakit bench serve`: the load, and the probes that measure time to first token.

    load         `clients` connections send `requests` completions (request i names adapter i mod n), each
                 decoding exactly `max_tokens` tokens (greedy, ignore_eos), not streamed
    idle probe   one streamed 1-token request sent when the server has nothing running or waiting
    load probe   streamed 1-token requests sent one after another while the load runs

A probe's TTFT is the time from sending it to its first streamed chunk (a 1-token request's token comes
in its first chunk). Probes decode one token only, so they barely change the load they measure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

BASE_ID = "base"  # the server's --base-name


@dataclass
class LoadResult:
    tokens: int  # completion tokens of the load requests
    wall_s: float  # first request sent → last answer received
    latencies_s: list[float]  # per load request, sent → answered
    prompt_tokens: list[int]  # per load request
    ttft_s: list[float] = field(default_factory=list)  # load probes
    engine: dict[str, float] | None = None  # counters=True: the server's time counters over the load (window_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


def completion_body(model: str, prompt: str, max_tokens: int, stream: bool = False) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}


async def probe(http: httpx.AsyncClient, model: str, prompt: str) -> float:
    """Seconds from sending a streamed 1-token completion to its first chunk."""
    sent = time.perf_counter()
    first = None
    async with http.stream("POST", "/v1/completions", json=completion_body(model, prompt, 1, stream=True)) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                if '"error"' in line:
                    raise RuntimeError(f"probe of {model} failed: {line[:300]}")
                if first is None:
                    first = time.perf_counter() - sent
    if first is None:
        raise RuntimeError(f"probe of {model}: the stream ended without a chunk")
    return first


async def wait_idle(http: httpx.AsyncClient, timeout: float = 120.0) -> None:
    """Until /health reports no running and no waiting request."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        health = (await http.get("/health")).json()
        if health["running"] == 0 and health["waiting"] == 0:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"the server was still busy after {timeout:.0f} s: {health}")


async def idle_probes(url: str, models: Callable[[int], str], texts: list[str], count: int) -> list[float]:
    """`count` probes, each sent alone to an idle server."""
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for i in range(count):
            await wait_idle(http)
            out.append(await probe(http, models(i), texts[(i * 7 + 3) % len(texts)]))
    return out


async def run_load(url: str, models: Callable[[int], str], texts: list[str], requests: int, clients: int,
                   max_tokens: int, probes: bool = True, counters: bool = False) -> LoadResult:
    """The load, and (probes=True) load probes one after another until its last answer.

    counters=True reads the engine's time counters just before the first request and right after the last
    answer (before waiting for a trailing probe), over a window `window_s` that holds every counted step."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    latencies: list[float] = []
    prompt_tokens: list[int] = []
    ttft: list[float] = []
    tokens = 0
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        async def client() -> None:
            nonlocal tokens
            while not queue.empty():
                i = queue.get_nowait()
                sent = time.perf_counter()
                response = await http.post("/v1/completions",
                                           json=completion_body(models(i), texts[i % len(texts)], max_tokens))
                response.raise_for_status()
                latencies.append(time.perf_counter() - sent)
                usage = response.json()["usage"]
                tokens += usage["completion_tokens"]
                prompt_tokens.append(usage["prompt_tokens"])

        async def prober() -> None:
            k = 0
            while not done.is_set():
                ttft.append(await probe(http, models(requests + k), texts[(requests + k) % len(texts)]))
                k += 1

        wall = 0.0
        engine: dict[str, float] | None = None

        async def clients_then_done() -> None:
            nonlocal wall, engine
            try:
                await asyncio.gather(*(client() for _ in range(clients)))
            finally:
                wall = time.perf_counter() - start
                done.set()  # the prober sends no more (its last probe was sent while the load ran)
            if counters:
                after = await read_counters(http)
                engine = {"wall_s": wall, "window_s": time.perf_counter() - opened}
                engine |= {key: after[key] - before[key] for key in after}

        opened = time.perf_counter()
        before = await read_counters(http) if counters else {}
        start = time.perf_counter()
        await asyncio.gather(clients_then_done(), *([prober()] if probes else []))
    return LoadResult(tokens, wall, latencies, prompt_tokens, ttft, engine)


ENGINE_COUNTERS = {"decode_s": "lorakit_decode_step_seconds_total", "decode_steps": "lorakit_decode_steps_total",
                   "prefill_s": "lorakit_prefill_seconds_total", "prefill_steps": "lorakit_prefill_steps_total",
                   "prompt_tokens": "lorakit_prompt_tokens_total"}


async def read_counters(http: httpx.AsyncClient) -> dict[str, float]:
    """The engine's counters from the server's /metrics: where a load's wall time went (decode steps, prefill
    steps, and by difference everything outside the engine's forwards), and the prompt tokens it prefilled."""
    response = await http.get("/metrics")
    response.raise_for_status()
    text = response.text
    values = {}
    for line in text.splitlines():  # these counters carry no labels: "name value"
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#"):
            values[parts[0]] = float(parts[1])
    wanted = {}
    for key, name in ENGINE_COUNTERS.items():
        value = values.get(name)
        if value is None:
            raise RuntimeError(f"{http.base_url}metrics has no {name}: is this server a lorakit serve?")
        wanted[key] = value
    return wanted

