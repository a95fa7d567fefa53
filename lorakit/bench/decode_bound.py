"""The decode-step bound of `lorakit bench serve`: how fast the engine's model decodes a full batch, no server.

A server decoding `rows` rows can never beat rows / (time of one decode step): every token of every row
comes out of one. The bound runs the engine itself in this process (same model, device, dtype, cache and
decode_forward; no HTTP, no tokenizer, no adapters): `rows` requests of `prompt_tokens` random tokens are
queued before it starts, prefilled in one step, then decode together; every decode_forward at `rows` rows
is timed (CUDA-synchronised on a GPU). The first run warms up; the median over the others is the step time.

The same runs time the engine's prefill steps (the rows' prompts in one forward, first tokens sampled): their
seconds per prompt token price the prefill a load cannot skip, for the prefill-inclusive ceiling of
lorakit.bench.serve_report.
"""

from __future__ import annotations

import statistics
import time

import torch

from lorakit.serve.base_loader import load_serving_base
from lorakit.serve.engine import Engine, SamplingParams


class _TimedEngine(Engine):
    """An engine whose decode steps at `rows` rows are timed."""

    def __init__(self, *args, rows: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rows = rows
        self.step_times: list[float] = []

    def decode_forward(self, input_ids, attention_mask, position_ids, cache):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        logits = super().decode_forward(input_ids, attention_mask, position_ids, cache)
        sync()
        if input_ids.shape[0] == self.rows:
            self.step_times.append(time.perf_counter() - start)
        return logits


def _run(model: torch.nn.Module, rows: int, prompt_tokens: int, new_tokens: int, seed: int) -> _TimedEngine:
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    engine = _TimedEngine(model, None, max_batch=rows, prefill_tokens=rows * prompt_tokens, eos_token_ids=[],
                          rows=rows)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    streams = [engine.submit(torch.randint(3, vocab, (prompt_tokens,), generator=gen).tolist(), None, params)
               for _ in range(rows)]
    engine.start()  # queued first: all rows are admitted and prefilled in the same step
    try:
        results = [s.result() for s in streams]
    finally:
        engine.close()
    bad = [r for r in results if r.reason != "length"]
    if bad:
        raise RuntimeError(f"decode-step bound: a request ended with {bad[0].reason}: {bad[0].error}")
    return engine


def decode_step_bound(base: str, device: str, dtype: str, rows: int, prompt_tokens: int, new_tokens: int,
                      runs: int = 2) -> dict:
    """{rows, prompt_tokens, steps, step_s (median decode_forward), tokens_per_s (rows / step_s),
    engine_step_s (mean whole engine step, sampling included), prefill_s_per_token (the timed runs' prefill
    step seconds over their prompt tokens)}."""
    model, _ = load_serving_base(base, device, dtype)
    _run(model, rows, prompt_tokens, min(new_tokens, 4), seed=0)  # warm-up: allocator, kernels, caches
    times, engine_steps, prefill_s, prefilled = [], [], 0.0, 0
    for run in range(max(1, runs)):
        engine = _run(model, rows, prompt_tokens, new_tokens, seed=1 + run)
        times += engine.step_times
        engine_steps.append(engine.stats.step_seconds / max(1, engine.stats.steps))
        prefill_s += engine.stats.prefill_seconds
        prefilled += engine.stats.prompt_tokens
    if not times:
        raise RuntimeError(f"decode-step bound: no decode step ran at {rows} rows (new_tokens={new_tokens})")
    step = statistics.median(times)
    return {"rows": rows, "prompt_tokens": prompt_tokens, "steps": len(times), "step_s": step,
            "tokens_per_s": rows / step, "engine_step_s": statistics.mean(engine_steps),
            "prefill_s_per_token": prefill_s / prefilled}
