"""Batched and chunked prefill, and the decode route kept across steps: outputs stay each request's alone."""

from __future__ import annotations

import threading

import pytest
import torch

from lorakit.model.use import current_route
from lorakit.serve.engine import Engine, SamplingParams
from lorakit.serve.prefill import PrefillRow, plan_chunks
from tests.conftest import tiny_llama
from tests.serve.conftest import Gate, greedy_alone, with_adapters

NAMES = ["a0", "a1", "a2", "a3"]


@pytest.fixture(scope="module")
def model():
    return with_adapters(tiny_llama(), NAMES)


class ForwardLog:
    """Records every model forward's input shape (B, T), its past length, the route in force, and whether it
    was a prefill (the engine asks prefills for the last position's logits only)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple[tuple[int, int], int, object]] = []
        self.prefills: list[tuple[tuple[int, int], int]] = []
        self.started = threading.Event()
        registry_id = id(model.lorakit_registry)

        def record(module, args, kwargs):
            cache = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed across transformers releases
            past = cache.get_seq_length() if cache is not None else 0
            self.calls.append((tuple(kwargs["input_ids"].shape), past, current_route(registry_id)))
            kept = kwargs.get("logits_to_keep")
            if isinstance(kept, torch.Tensor) or kept == 1:  # a packed prefill keeps one column per request
                self.prefills.append(self.calls[-1][:2])
            self.started.set()

        self.handle = model.register_forward_pre_hook(record, with_kwargs=True)

    def remove(self) -> None:
        self.handle.remove()


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 101, (n,), generator=gen).tolist() for n in lengths]


def _run(model, jobs, **engine_kwargs):
    """Queue every job before the engine starts (so they are admitted in the same step); their results."""
    engine = Engine(model, **engine_kwargs)
    streams = [engine.submit(p, a, params) for p, a, params in jobs]
    engine.start()
    try:
        return [s.result() for s in streams], engine
    finally:
        engine.close()


def test_newcomers_of_different_lengths_and_adapters_prefill_in_one_forward_as_alone(model):
    prompts = _prompts([3, 11, 1, 7, 15, 5])
    adapters = [None, "a0", "a1", "a2", "a3", "a1"]
    jobs = [(p, a, SamplingParams(max_tokens=10)) for p, a in zip(prompts, adapters)]
    log = ForwardLog(model)
    try:
        results, _ = _run(model, jobs, max_batch=8, pack_prefill=False)  # packed: tests/serve/test_packed_prefill.py
    finally:
        log.remove()
    for (prompt, adapter, _), got in zip(jobs, results):
        assert got.token_ids == greedy_alone(model, prompt, adapter, 10), (prompt, adapter)
    (shape, past, route), = log.calls[:1]
    assert shape == (6, 15) and past == 0  # all six prompts, left-padded to the longest, in the first forward
    assert route.names == tuple(adapters)


@pytest.mark.parametrize("budget", [1, 3, 5, 512])
def test_chunked_prefill_equals_unchunked(model, budget):
    prompts = _prompts([7, 9, 4, 2], seed=1)
    adapters = ["a0", "a1", None, "a3"]
    jobs = [(p, a, SamplingParams(max_tokens=8, ignore_eos=True)) for p, a in zip(prompts, adapters)]
    log = ForwardLog(model)
    try:
        results, engine = _run(model, jobs, max_batch=4, prefill_tokens=budget)
    finally:
        log.remove()
    for (prompt, adapter, _), got in zip(jobs, results):
        assert got.token_ids == greedy_alone(model, prompt, adapter, 8, eos=None), (prompt, adapter, budget)
    assert all(shape[1] <= budget for shape, _ in log.prefills)
    assert engine.stats.prompt_tokens == sum(map(len, prompts))
    if budget < 22:
        assert any(past > 0 for _, past in log.prefills)  # chunks continued a row's own cache
        assert len(log.prefills) >= 22 / budget


def test_running_rows_keep_decoding_while_a_long_prompt_is_chunked(model):
    short, long = _prompts([2, 40], seed=2)
    jobs = [(short, "a1", SamplingParams(max_tokens=20, ignore_eos=True)),
            (long, "a2", SamplingParams(max_tokens=4, ignore_eos=True))]
    log = ForwardLog(model)
    try:
        results, _ = _run(model, jobs, max_batch=4, prefill_tokens=4)
    finally:
        log.remove()
    assert results[0].token_ids == greedy_alone(model, short, "a1", 20, eos=None)
    assert results[1].token_ids == greedy_alone(model, long, "a2", 4, eos=None)
    shapes = [shape for shape, _, _ in log.calls]
    last_chunk = max(i for i, s in enumerate(shapes) if s == (1, 4))
    decodes_meanwhile = [s for s in shapes[:last_chunk] if s == (1, 1)]
    assert len(decodes_meanwhile) >= 8  # the short row decoded between the long prompt's chunks


def test_the_decode_route_is_kept_while_the_rows_adapters_do_not_change(model):
    """One Route object per batch membership: its row groups and picked adapter rows are built once."""
    prompts = _prompts([4, 5, 6], seed=3)
    engine = Engine(model, max_batch=4)
    log = ForwardLog(model)
    try:
        first = [engine.submit(p, a, SamplingParams(max_tokens=12, ignore_eos=True))
                 for p, a in zip(prompts[:2], ["a0", "a1"])]
        engine.start()
        events = iter(first[0])
        for _ in range(3):  # decoding is under way; then a third row joins
            next(events)
        third = engine.submit(prompts[2], "a3", SamplingParams(max_tokens=4, ignore_eos=True))
        results = [s.result() for s in first] + [third.result()]
    finally:
        engine.close()
        log.remove()
    assert [r.token_ids for r in results] == [greedy_alone(model, p, a, n, eos=None)
                                              for p, a, n in zip(prompts, ["a0", "a1", "a3"], [12, 12, 4])]
    decodes = [route for shape, past, route in log.calls if shape[1] == 1 and past > 0]
    assert len(decodes) == 11  # 12 tokens: the first from the prefill, then one per decode step
    for before, after in zip(decodes, decodes[1:]):
        assert (before is after) == (before.names == after.names), (before.names, after.names)
    memberships = [r.names for k, r in enumerate(decodes) if k == 0 or r.names != decodes[k - 1].names]
    assert len({id(r) for r in decodes}) == len(memberships) < len(decodes)
    assert ("a0", "a1", "a3") in memberships  # the third row joined: a new route was built for it


def test_cancel_during_chunked_prefill_frees_the_row(model):
    prompt = _prompts([48], seed=4)[0]
    engine = Engine(model, max_batch=2, prefill_tokens=2)
    log = ForwardLog(model)
    gate = Gate(model, free=1)  # the first chunk runs, the second waits until the request is cancelled
    try:
        stream = engine.submit(prompt, "a0", SamplingParams(max_tokens=5))
        engine.start()
        assert log.started.wait(30)
        stream.cancel()
        gate.open()
        result = stream.result()
        assert engine.call_soon(lambda: engine.running).result(timeout=10) == 0
        chunks = sum(1 for shape, past, _ in log.calls if shape == (1, 2))  # before `after` adds its own
        after = engine.submit([5, 6, 7], "a1", SamplingParams(max_tokens=4)).result()
    finally:
        engine.close()
        gate.remove()
        log.remove()
    assert result.reason == "cancelled" and result.completion_tokens == 0
    assert chunks <= 2  # of 24: the one before the cancel, and at most the one it held
    assert after.token_ids == greedy_alone(model, [5, 6, 7], "a1", 4)


def test_a_row_whose_prefill_fails_fails_alone(model):
    """A model error in a batched prefill is narrowed down: the other newcomers are prefilled without it."""
    def refuse_token_99(module, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1 and bool((ids == 99).any()):
            raise RuntimeError("token 99 refused")

    handle = model.register_forward_pre_hook(refuse_token_99, with_kwargs=True)
    jobs = [([5, 6, 7], "a0", SamplingParams(max_tokens=6)), ([8, 99, 9, 10], "a1", SamplingParams(max_tokens=6)),
            ([11, 12], None, SamplingParams(max_tokens=6))]
    try:
        results, _ = _run(model, jobs, max_batch=4)
    finally:
        handle.remove()
    assert results[1].reason == "error" and "token 99 refused" in results[1].error
    for k in (0, 2):
        prompt, adapter, _ = jobs[k]
        assert results[k].token_ids == greedy_alone(model, prompt, adapter, 6)


def test_plan_chunks_is_first_come_first_served():
    rows = [PrefillRow(list(range(n)), done=d) for n, d in [(10, 4), (3, 0), (50, 0)]]
    assert plan_chunks(rows, 8) == [6, 2, 0]
    assert plan_chunks(rows, 100) == [6, 3, 50]
    assert plan_chunks(rows, 1) == [1, 0, 0]


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_bad_prefill_budget_is_refused(model, bad):
    with pytest.raises(ValueError, match="prefill_tokens"):
        Engine(model, prefill_tokens=bad)


def test_a_prefix_adapter_request_is_refused_and_the_others_are_served():
    """A prefix adapter's cache carries per-call state that the engine's stacked caches do not keep: refused
    at admission with a clear error, while LoRA and base rows admitted with it are served as alone."""
    import lorakit
    from tests.conftest import randomize_adapters

    model = tiny_llama()
    lorakit.attach(model, lorakit.PrefixConfig(num_virtual_tokens=3), "p")
    lorakit.attach(model, lorakit.LoraConfig(r=4), "l")
    randomize_adapters(model, std=0.3)
    jobs = [([5, 6, 7], "p", SamplingParams(max_tokens=5, ignore_eos=True)),
            ([8, 9, 10, 11], "l", SamplingParams(max_tokens=5, ignore_eos=True)),
            ([3, 4], None, SamplingParams(max_tokens=5, ignore_eos=True))]
    results, _ = _run(model, jobs, max_batch=4, prefill_tokens=3)
    assert results[0].reason == "error" and "prefix adapter" in results[0].error
    for k in (1, 2):
        prompt, adapter, _ = jobs[k]
        assert results[k].token_ids == greedy_alone(model, prompt, adapter, 5, eos=None)
