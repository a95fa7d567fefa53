"""The engine hands a step's events to an asyncio loop in one wake-up (lorakit.serve.engine.Mailbox), not one
per row per token, and every event still arrives, in order, for every row."""

from __future__ import annotations

import asyncio

import torch

from lorakit.serve.engine import Delta, Engine, Finished, Mailbox, SamplingParams
from tests.conftest import tiny_llama


def test_mailbox_holds_then_wakes_once():
    loop = asyncio.new_event_loop()
    try:
        box = Mailbox(loop)
        queues = [asyncio.Queue() for _ in range(3)]
        wakes = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda fn, *a: (wakes.append(fn), real(fn, *a))  # type: ignore[method-assign]
        box.holding = True
        for i, q in enumerate(queues):
            box.post(q, Delta(f"t{i}", [i]))
        assert wakes == [] and all(q.empty() for q in queues)
        box.release()
        assert len(wakes) == 1
        loop.run_until_complete(asyncio.sleep(0))
        assert [q.get_nowait().text for q in queues] == ["t0", "t1", "t2"]
        box.post(queues[0], Delta("now", []))  # outside a hold: handed over at once
        assert len(wakes) == 2
        loop.run_until_complete(asyncio.sleep(0))
        assert queues[0].get_nowait().text == "now"
    finally:
        loop.close()


def test_a_decode_step_wakes_the_loop_once_for_all_rows():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    rows, tokens = 6, 5

    async def main() -> tuple[list[list], int]:
        loop = asyncio.get_running_loop()
        wakes = [0]
        real = loop.call_soon_threadsafe

        def counting(fn, *args):
            wakes[0] += 1
            return real(fn, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        engine = Engine(model, None, max_batch=rows, eos_token_ids=[])
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        streams = [await engine.submit_async([5 + i, 6, 7], None, params) for i in range(rows)]
        engine.start()  # every row queued first: one prefill, then decode steps of all rows
        try:
            events = [[e async for e in s] for s in streams]
        finally:
            engine.close()
        return events, wakes[0], engine.stats.steps

    events, wakes, steps = asyncio.run(main())
    for row in events:
        assert [type(e) for e in row] == [Delta] * (tokens - 1) + [Finished]
        assert row[-1].completion_tokens == tokens
    delivered = sum(len(row) for row in events)
    assert delivered == rows * tokens
    assert wakes <= steps + 2 < delivered  # about one per step (+ the prefill's), not one per event
