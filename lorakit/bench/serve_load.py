"""`lorakit bench serve`: a load test of `lorakit serve` over HTTP, base only and 1/16/128 distinct adapters.

The base alone, then 1, 16 and 128 distinct adapters of each method (LoRA-XS and LoRA) in one run,
against the engine's own decode-step bound.

The server runs as its own process (`lorakit serve --preload`), exactly as a user starts it, holding every
adapter of the run; this process is only the clients (lorakit.bench.serve_traffic). Scenarios are
interleaved round by round, so machine noise spreads evenly over them and their ratios are fair. After
the server stops, the decode-step bound is measured in this process (lorakit.bench.decode_bound), and the
report (lorakit.bench.serve_report) gives every figure, the ratios and issue 14's goals.

    lorakit bench serve                                     # SmolLM2-135M on the CPU, both methods
    lorakit bench serve --base scripts/configs/tinyllama-1.1b.json --device cuda --dtype bfloat16
    lorakit bench serve --quick --out /tmp/bs               # seconds: a tiny random Llama, small load
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lorakit.bench.serve_report import BASE, Scenario, add_ratios, evaluate_goals, machine, write_report
from lorakit.bench.serve_traffic import BASE_ID, idle_probes, run_load

METHODS = ("lora_xs", "lora")
QUICK = {"base": "tiny-llama-random", "adapters": [0, 1, 3], "max_batch": 4, "requests": 8, "max_tokens": 4,
         "rounds": 1, "probes": 2, "prompt_chars": 40, "threads": 1}


def default_adapter_counts(device: str) -> list[int]:
    """0 (the base alone), 1, 16 and 128 distinct adapters; on cuda also 32, the scenario of the 32-LoRA goal."""
    return [0, 1, 16, 128] + ([32] if device.startswith("cuda") else [])


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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: Any, adapters: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "lorakit", "serve", "--base", args.base, "--adapters", str(adapters),
           "--port", str(port), "--preload", "--max-batch", str(args.max_batch), "--base-name", BASE_ID,
           "--device", args.device, "--dtype", args.dtype, "--prefill-tokens", str(args.prefill_tokens),
           "--max-tokens-limit", str(max(args.max_tokens, 512))]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 900) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"lorakit serve exited with {process.returncode}: {process.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"lorakit serve did not answer {url}/health within {timeout:.0f} s")


def scenario_keys(args: Any) -> list[tuple[str, int]]:
    """(BASE, 0) when 0 is among the counts, then (method, n) for every method and positive count."""
    counts = sorted(set(args.adapters))
    keys = [(BASE, 0)] if 0 in counts else []
    return keys + [(m, n) for m in args.methods for n in counts if n > 0]


def model_of(key: tuple[str, int]):
    """Request i's `model` in scenario `key`: the base, or adapter i mod n of the method."""
    from lorakit.bench.serve_adapters import adapter_name

    method, n = key
    return (lambda i: BASE_ID) if method == BASE else (lambda i: adapter_name(method, i % n))


def run(args: Any) -> dict:
    """The load test the options of `lorakit bench serve` (lorakit.cli.bench_serve) describe; writes the report."""
    from tqdm import tqdm

    from lorakit.bench.decode_bound import decode_step_bound
    from lorakit.bench.serve_adapters import write_adapters

    keys = scenario_keys(args)
    most = max((n for _, n in keys), default=0)
    texts = prompts(chars=args.prompt_chars)
    scenarios = {key: Scenario(*key) for key in keys}
    prompt_tokens: list[int] = []
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-serve-") as tmp:
        directory = Path(tmp) / "adapters"
        directory.mkdir()
        print(f"writing {most} adapters of {', '.join(args.methods)} ...", file=sys.stderr)
        adapter_bytes = write_adapters(directory, list(args.methods) if most else [], most, args.base,
                                       args.device, args.dtype)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(args, directory, port)
        try:
            wait_ready(url, server)
            for key in keys:  # warm-up: every scenario's code path once (kernels, allocator, routes)
                asyncio.run(run_load(url, model_of(key), texts, args.max_batch, args.max_batch, 2, probes=False))
            bar = tqdm(total=args.rounds * len(keys), desc="bench serve", unit="scenario")
            for _ in range(args.rounds):
                for key in keys:  # interleaved: every round visits every scenario
                    bar.set_postfix_str(f"{key[0]} {key[1]}")
                    s = scenarios[key]
                    s.ttft_idle_s += asyncio.run(idle_probes(url, model_of(key), texts, args.probes))
                    load = asyncio.run(run_load(url, model_of(key), texts, args.requests, args.clients,
                                                args.max_tokens, counters=True))
                    s.engine.append(load.engine)
                    s.tokens_per_s.append(load.tokens_per_s)
                    s.tokens.append(load.tokens)
                    s.latencies_s += load.latencies_s
                    s.ttft_load_s += load.ttft_s
                    prompt_tokens += load.prompt_tokens
                    bar.update(1)
            bar.close()
        finally:
            server.terminate()
            server.wait(60)
    bound = None
    if not args.no_bound:
        print("measuring the decode-step bound ...", file=sys.stderr)
        _match_server_threads(args)
        bound = decode_step_bound(args.base, args.device, args.dtype, args.max_batch,
                                  int(statistics.median(prompt_tokens)), args.max_tokens, runs=args.rounds)
    summaries = [scenarios[key].summary() for key in keys]
    add_ratios(summaries)
    goals = evaluate_goals(summaries, bound, args.device.split(":")[0])
    meta = {"base": args.base, "device": args.device, "dtype": args.dtype, "methods": list(args.methods),
            "adapters_per_method": most, "adapter_bytes": adapter_bytes, "max_batch": args.max_batch,
            "prefill_tokens": args.prefill_tokens, "clients": args.clients, "requests": args.requests,
            "max_tokens": args.max_tokens, "rounds": args.rounds, "probes": args.probes, "threads": args.threads,
            "machine": machine()}
    text = write_report(summaries, goals, bound, meta, Path(args.out), "lorakit bench serve " + " ".join(args.argv))
    print(text)
    return {"scenarios": summaries, "goals": goals, "decode_bound": bound, "meta": meta}


def _match_server_threads(args: Any) -> None:
    """This process decodes as the server did: its thread count and (CPU) its malloc setting."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        from lorakit.perf import keep_freed_memory

        keep_freed_memory()  # `lorakit serve` does this by default (--malloc keep)
