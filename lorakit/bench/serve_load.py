"""`lorakit bench serve`: a load test of `lorakit serve` over HTTP with 1, 16 and 128 distinct adapters.

The server runs as its own process (`lorakit serve --preload`, SmolLM2-135M, adapters on every linear
layer), exactly as a user starts it; this process is only the clients: `--clients` concurrent
connections send `--requests` completion requests per scenario, request i naming adapter i mod n.
Every request decodes exactly `--max-tokens` tokens (greedy, `ignore_eos`), so scenarios do the same
work and differ only in how many distinct adapters share each decode step. Scenarios are interleaved
round by round; throughput is the median over rounds, latencies are pooled over rounds.

    throughput   completion tokens / wall time from the first request sent to the last answer received
    latency      per request, sent to answered (p50, p99); time to first token from a streamed request
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lorakit.io.atomic import atomic_write_bytes, atomic_write_json

BASE_ID = "base"


@dataclass
class Scenario:
    adapters: int  # distinct adapters in the traffic (0: the base model, no adapter)
    tokens_per_s: list[float]  # one per round
    latencies_s: list[float]  # every request of every round
    ttft_s: list[float]  # time to first token, streamed probes
    tokens: list[int]  # completion tokens answered, one per round

    def summary(self) -> dict:
        lat = sorted(self.latencies_s)
        return {"adapters": self.adapters, "tokens_per_s": statistics.median(self.tokens_per_s),
                "rounds": [round(x, 1) for x in self.tokens_per_s], "p50_s": _quantile(lat, 0.50),
                "p99_s": _quantile(lat, 0.99), "ttft_p50_s": _quantile(sorted(self.ttft_s), 0.5) if self.ttft_s else None,
                "requests": len(lat), "completion_tokens": self.tokens}


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    position = q * (len(sorted_values) - 1)
    lo = int(position)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (position - lo)


def prompts(count: int = 64, chars: int = 160) -> list[str]:
    """Short real prompts: first sentences of the language reference in pydoc_data.topics."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        sentence = " ".join(topics[name].split())[:chars].rsplit(" ", 1)[0]
        if len(sentence) > chars // 3:
            out.append(f"Explain briefly: {sentence}")
        if len(out) == count:
            break
    return out


def write_adapters(directory: Path, count: int, method: str, base: str, seed: int = 0) -> int:
    """`count` adapters of `method` (r=16, random non-trivial weights) under directory/a000...; returns bytes of one."""
    import torch

    import lorakit
    from lorakit.io import save_adapter
    from lorakit.models import load_base

    model, _ = load_base(base)
    config = lorakit.LoraXSConfig(r=16) if method == "lora_xs" else lorakit.LoraConfig(r=16, lora_alpha=32)
    gen = torch.Generator().manual_seed(seed)
    lorakit.attach(model, config, "keep")  # holds the shared LoRA-XS bases while the others come and go
    size = 0
    for i in range(count):
        name = f"a{i:03d}"
        lorakit.attach(model, config, name)
        with torch.no_grad():
            for p in lorakit.adapter_parameters(model, name):
                p.copy_(torch.randn(p.shape, generator=gen) * (1e-3 if method == "lora_xs" else 1e-2))
        path = save_adapter(model, name, directory / name)
        size = sum(f.stat().st_size for f in path.iterdir())
        lorakit.delete_adapter(model, name)
    return size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: str, adapters: Path, port: int, max_batch: int, threads: int | None) -> subprocess.Popen:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "lorakit", "serve", "--base", base, "--adapters", str(adapters), "--port", str(port),
           "--preload", "--max-batch", str(max_batch), "--base-name", BASE_ID]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"lorakit serve exited with {process.returncode}: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"lorakit serve did not answer {url}/health within {timeout:.0f} s")


async def run_load(url: str, n_adapters: int, requests: int, clients: int, max_tokens: int,
                   texts: list[str]) -> tuple[int, float, list[float], float]:
    """(completion tokens, their rate per second, per-request latencies, time to first token of a streamed probe)."""
    import httpx

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    latencies: list[float] = []
    tokens = 0

    def body(i: int, stream: bool = False) -> dict:
        model = BASE_ID if n_adapters == 0 else f"a{i % n_adapters:03d}"
        return {"model": model, "prompt": texts[i % len(texts)], "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": stream}

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients + 2)) as http:
        async def client() -> None:
            nonlocal tokens
            while not queue.empty():
                i = queue.get_nowait()
                sent = time.perf_counter()
                response = await http.post("/v1/completions", json=body(i))
                response.raise_for_status()
                latencies.append(time.perf_counter() - sent)
                tokens += response.json()["usage"]["completion_tokens"]

        async def probe() -> float:  # one streamed request inside the load: its time to first token
            await asyncio.sleep(0.5)
            sent = time.perf_counter()
            async with http.stream("POST", "/v1/completions", json=body(requests, stream=True)) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data:") and "text" in line:
                        return time.perf_counter() - sent
            return float("nan")

        start = time.perf_counter()
        results = await asyncio.gather(probe(), *(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return tokens, tokens / wall, latencies, results[0]


def run(args: argparse.Namespace) -> list[dict]:
    from tqdm import tqdm

    counts = sorted(set(args.adapters))
    texts = prompts(chars=args.prompt_chars)
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-serve-") as tmp:
        directory = Path(tmp) / "adapters"
        directory.mkdir()
        print(f"writing {max(counts)} {args.method} adapters ...", file=sys.stderr)
        one = write_adapters(directory, max(counts), args.method, args.base)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(args.base, directory, port, args.clients, args.threads)
        try:
            wait_ready(url, server)
            asyncio.run(run_load(url, 1, args.clients, args.clients, 4, texts))  # warm-up
            scenarios = {n: Scenario(n, [], [], [], []) for n in counts}
            bar = tqdm(total=args.rounds * len(counts), desc="bench serve", unit="scenario")
            for _ in range(args.rounds):
                for n in counts:  # interleaved: every round visits every scenario
                    bar.set_postfix_str(f"{n} adapters")
                    tokens, tps, latencies, ttft = asyncio.run(run_load(url, n, args.requests, args.clients,
                                                                args.max_tokens, texts))
                    scenarios[n].tokens_per_s.append(tps)
                    scenarios[n].latencies_s += latencies
                    scenarios[n].ttft_s.append(ttft)
                    scenarios[n].tokens.append(tokens)
                    bar.update(1)
            bar.close()
        finally:
            server.terminate()
            server.wait(30)
    summaries = [scenarios[n].summary() for n in counts]
    reference = next((s for s in summaries if s["adapters"] == 1), summaries[0])
    for s in summaries:
        s["vs_one_adapter"] = s["tokens_per_s"] / reference["tokens_per_s"]
    meta = {"method": args.method, "adapter_bytes": one, "clients": args.clients, "requests": args.requests,
            "max_tokens": args.max_tokens, "rounds": args.rounds, "base": args.base}
    write_report(summaries, meta, Path(args.out), "lorakit bench serve " + " ".join(args.argv))
    return summaries


def render(summaries: list[dict], meta: dict, command: str) -> str:
    lines = [f"Command: `{command}`. Server: `lorakit serve --preload --max-batch {meta['clients']}` in its own "
             f"process, {meta['base']}, {meta['method']} r=16 adapters on every linear layer "
             f"({meta['adapter_bytes'] / 1e3:.0f} KB each). Load: {meta['clients']} concurrent clients, "
             f"{meta['requests']} requests per scenario, {meta['max_tokens']} tokens each (greedy, ignore_eos), "
             f"{meta['rounds']} interleaved rounds.", "",
             "| distinct adapters | tokens/s (median) | vs 1 adapter | p50 latency s | p99 latency s | TTFT p50 s | "
             "requests |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        label = "base only" if s["adapters"] == 0 else str(s["adapters"])
        ttft = f"{s['ttft_p50_s']:.2f}" if s["ttft_p50_s"] is not None else "-"
        lines.append(f"| {label} | {s['tokens_per_s']:.1f} | {s['vs_one_adapter']:.2f}× | {s['p50_s']:.2f} | "
                     f"{s['p99_s']:.2f} | {ttft} | {s['requests']} |")
    return "\n".join(lines) + "\n"


def write_report(summaries: list[dict], meta: dict, out: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench_serve.json", {"scenarios": summaries, "meta": meta,
                                                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"})
    text = render(summaries, meta, command)
    atomic_write_bytes(out / "bench_serve.md", text.encode("utf-8"))
    print(text)
    with_adapters = [s for s in summaries if s["adapters"] > 0]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([s["adapters"] for s in with_adapters], [s["tokens_per_s"] for s in with_adapters], "o-",
            label=f"{meta['method']} adapters")
    base = next((s for s in summaries if s["adapters"] == 0), None)
    if base:
        ax.axhline(base["tokens_per_s"], color="gray", ls="--", label="base model, no adapter")
    ax.set_xscale("log")
    ax.set_xlabel("distinct adapters in the traffic (log scale)")
    ax.set_ylabel("completion tokens / s")
    ax.set_title(f"lorakit serve, {meta['clients']} concurrent clients")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bench_serve.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorakit bench serve", description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--method", choices=["lora_xs", "lora"], default="lora_xs")
    parser.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 16, 128],
                        help="distinct-adapter counts to test (0 = the base model alone)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (also the server's --max-batch)")
    parser.add_argument("--requests", type=int, default=64, help="requests per scenario and round")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-chars", type=int, default=160, help="prompt length in characters, at most")
    parser.add_argument("--threads", type=int, default=None, help="OMP threads of the server process")
    parser.add_argument("--out", default="docs", help="where bench_serve.md/.json/.png go")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if min(args.adapters) < 0 or min(args.clients, args.requests, args.rounds, args.max_tokens, args.prompt_chars) < 1 \
            or (args.threads is not None and args.threads < 1):
        parser.error("--adapters must be >= 0; --clients, --requests, --rounds, --max-tokens, --prompt-chars and "
                     "--threads >= 1")
    run(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
