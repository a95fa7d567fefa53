"""Engine invariants: a request's greedy output is its adapter's alone, whatever else shares the batch."""

from __future__ import annotations


import pytest
import torch

from lorakit.serve.engine import Delta, Engine, EngineError, Finished, SamplingParams
from tests.conftest import tiny_llama
from tests.serve.conftest import Gate, greedy_alone, with_adapters

NAMES = ["a0", "a1", "a2", "a3"]


@pytest.fixture(scope="module")
def model():
    return with_adapters(tiny_llama(), NAMES)


def _requests(n: int, seed: int = 3) -> list[tuple[list[int], str | None]]:
    gen = torch.Generator().manual_seed(seed)
    choices = [None] + NAMES
    out = []
    for k in range(n):
        length = int(torch.randint(1, 14, (1,), generator=gen))
        out.append((torch.randint(3, 101, (length,), generator=gen).tolist(), choices[k % len(choices)]))
    return out


def test_mixed_adapters_in_one_running_batch_match_each_alone(model):
    requests = _requests(15)
    expected = [greedy_alone(model, p, a, 12) for p, a in requests]
    engine = Engine(model, max_batch=6)
    streams = [engine.submit(p, a, SamplingParams(max_tokens=12)) for p, a in requests[:4]]  # start together
    engine.start()
    try:
        first = {}
        for k, (prompt, adapter) in enumerate(requests[4:], start=4):  # rows join while others decode:
            if k % 3 == 0:  # wait for the newest row's first event before the next ones come
                first[k - 1] = next(iter(streams[-1]))
            streams.append(engine.submit(prompt, adapter, SamplingParams(max_tokens=12)))
        results = [first[k] if isinstance(first.get(k), Finished) else s.result() for k, s in enumerate(streams)]
    finally:
        engine.close()
    for (prompt, adapter), want, got in zip(requests, expected, results):
        assert got.token_ids == want, (prompt, adapter)
        assert got.reason == ("length" if len(want) == 12 else "stop")
    assert engine.stats.max_running > 1  # requests really shared decode steps
    assert len({tuple(r.token_ids) for r in results}) > 1


def test_rows_join_and_leave_mid_flight(model):
    """Long and short requests interleave: short ones leave, new ones join, the long ones are unharmed."""
    long = [(p, a) for p, a in _requests(3, seed=5)]
    short = [(p, a) for p, a in _requests(8, seed=6)]
    engine = Engine(model, max_batch=8).start()
    try:
        long_streams = [engine.submit(p, a, SamplingParams(max_tokens=40, ignore_eos=True)) for p, a in long]
        short_results = []
        for p, a in short:
            short_results.append(engine.submit(p, a, SamplingParams(max_tokens=3)).result())
        long_results = [s.result() for s in long_streams]
    finally:
        engine.close()
    for (p, a), got in zip(long, long_results):
        assert got.token_ids == greedy_alone(model, p, a, 40, eos=None)
    for (p, a), got in zip(short, short_results):
        assert got.token_ids == greedy_alone(model, p, a, 3)
    assert engine.stats.max_running >= 4


def test_cancelled_row_leaves_and_others_continue(model):
    engine = Engine(model, max_batch=4).start()
    try:
        (p1, a1), (p2, a2) = _requests(2, seed=9)
        doomed = engine.submit(p1, a1, SamplingParams(max_tokens=50, ignore_eos=True))
        other = engine.submit(p2, a2, SamplingParams(max_tokens=30, ignore_eos=True))
        first = next(iter(doomed))
        assert isinstance(first, Delta)
        doomed.cancel()
        events = list(doomed)
        assert isinstance(events[-1], Finished) and events[-1].reason == "cancelled"
        assert events[-1].completion_tokens < 50
        assert other.result().token_ids == greedy_alone(model, p2, a2, 30, eos=None)
    finally:
        engine.close()
    assert engine.running == 0


def test_seeded_sampling_is_reproducible_and_independent_of_batch(model):
    engine = Engine(model, max_batch=8).start()
    try:
        prompt = [5, 6, 7]
        params = SamplingParams(max_tokens=15, temperature=1.5, top_p=0.9, seed=123, ignore_eos=True)
        alone = engine.submit(prompt, "a1", params).result().token_ids
        crowd = [engine.submit([9, 9, k], "a2", SamplingParams(max_tokens=15, temperature=1.0, seed=k))
                 for k in range(5)]
        again = engine.submit(prompt, "a1", params)
        assert again.result().token_ids == alone
        [s.result() for s in crowd]
        other_seed = engine.submit(prompt, "a1", SamplingParams(max_tokens=15, temperature=1.5, seed=7,
                                                                ignore_eos=True)).result().token_ids
        assert other_seed != alone
    finally:
        engine.close()


def test_tiny_top_p_is_greedy(model):
    engine = Engine(model).start()
    try:
        sampled = engine.submit([4, 5], "a0", SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6,
                                                             seed=1)).result()
    finally:
        engine.close()
    assert sampled.token_ids == greedy_alone(model, [4, 5], "a0", 8)


def test_stop_strings_and_streamed_text(tokenizer):
    from tests.serve.conftest import tiny_chat_llama

    model = with_adapters(tiny_chat_llama(len(tokenizer)), ["x"])
    engine = Engine(model, tokenizer).start()
    try:
        prompt = tokenizer("Once upon a time").input_ids
        full = engine.submit(prompt, "x", SamplingParams(max_tokens=20, ignore_eos=True)).result()
        assert full.text == tokenizer.decode(full.token_ids, skip_special_tokens=True)
        stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
        assert stop.strip()
        stream = engine.submit(prompt, "x", SamplingParams(max_tokens=20, stop=(stop,), ignore_eos=True))
        events = list(stream)
        streamed = "".join(e.text for e in events if isinstance(e, Delta))
        done = events[-1]
        assert done.reason == "stop"
        assert done.text == full.text[: full.text.find(stop)] == streamed
        assert stop not in streamed
    finally:
        engine.close()


def test_bad_requests_are_refused(model):
    engine = Engine(model, max_context=32)
    with pytest.raises(EngineError, match="context"):
        engine.submit(list(range(3, 30)), None, SamplingParams(max_tokens=10))
    with pytest.raises(EngineError, match="empty"):
        engine.submit([], None)
    for bad in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
                dict(temperature=float("nan")), dict(stop=("",))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_unknown_adapter_fails_only_that_request(model):
    engine = Engine(model).start()
    try:
        bad = engine.submit([3, 4], "nope", SamplingParams(max_tokens=4))
        good = engine.submit([3, 4], "a0", SamplingParams(max_tokens=4))
        result = bad.result()
        assert result.reason == "error" and "nope" in result.error
        assert good.result().token_ids == greedy_alone(model, [3, 4], "a0", 4)
    finally:
        engine.close()


def test_nan_logits_in_one_row_fail_that_row_only(model):
    """Issue 11.4: torch.multinomial's "probability tensor contains inf/nan" used to fail every row of the step."""
    engine = Engine(model, max_batch=4)
    sampled = SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    good = engine.submit([5, 6, 7], "a1", sampled)
    bad = engine.submit([8, 9], "a2", sampled)  # queued before start: both rows join the same batch

    def poison_second_row(module, args, output):  # (B, T, V): decode steps of the two-row batch only
        if output.shape[0] == 2:
            output[1] = float("nan")
        return output

    handle = model.lm_head.register_forward_hook(poison_second_row)
    try:
        engine.start()
        good_result, bad_result = good.result(), bad.result()
    finally:
        engine.close()
        handle.remove()
    assert bad_result.reason == "error" and "not finite" in bad_result.error
    assert good_result.reason == "length" and good_result.completion_tokens == 10


@pytest.mark.parametrize("temperature", [1e-38, 5e-324])
def test_a_vanishing_temperature_samples_greedily(model, temperature):
    """Issue 11.4: temperature 1e-38 overflowed logits / T to inf, and softmax gave NaN."""
    prompt = [11, 12, 13, 14]
    engine = Engine(model).start()
    try:
        got = engine.submit(prompt, "a0", SamplingParams(max_tokens=8, temperature=temperature, seed=1)).result()
    finally:
        engine.close()
    assert got.reason != "error", got.error
    assert got.token_ids == greedy_alone(model, prompt, "a0", 8)


def test_cancel_all_finishes_every_request_with_the_reason_and_keeps_serving(model):
    engine = Engine(model, max_batch=2)
    long = SamplingParams(max_tokens=60, ignore_eos=True)
    streams = [engine.submit([3 + k, 4], None, long) for k in range(3)]  # 2 running, 1 waiting
    gate = Gate(model, free=1)  # the two rows' prefill runs; their first decode step waits for the gate
    engine.start()
    try:
        next(iter(streams[0]))  # decoding has begun
        cancelling = engine.cancel_all("shutdown", "drain time is up")  # queued before the step ends
        gate.open()
        cancelled = cancelling.result(timeout=30)
        results = [s.result() for s in streams]
        after = engine.submit([5, 6], None, SamplingParams(max_tokens=3)).result()
    finally:
        engine.close()
        gate.remove()
    assert [r.reason for r in results] == ["shutdown"] * 3, results
    assert cancelled == 3
    assert all(r.error == "drain time is up" and r.completion_tokens < 60 for r in results)
    assert after.reason in ("length", "stop")


@pytest.mark.parametrize("prefill_tokens", [3, 512])
def test_max_batch_counts_rows_still_prefilling(model, prefill_tokens):
    """A row being prefilled (in chunks) holds a cache: it counts against max_batch like a decoding row."""
    rows_seen = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: rows_seen.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    engine = Engine(model, max_batch=2, prefill_tokens=prefill_tokens)
    requests = _requests(5, seed=11)
    streams = [engine.submit(p + p, a, SamplingParams(max_tokens=20, ignore_eos=True)) for p, a in requests]
    engine.start()
    try:
        results = [s.result() for s in streams]
    finally:
        engine.close()
        handle.remove()
    assert max(rows_seen) == 2
    for (p, a), got in zip(requests, results):
        assert got.token_ids == greedy_alone(model, p + p, a, 20, eos=None)


def test_every_decode_step_goes_through_decode_forward(model):
    """decode_forward is the one place a decode step calls the model: an engine that overrides it (as a
    compiled step will) serves the same tokens, and sees every decode step at the batch's size."""
    class Counting(Engine):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.rows_per_step: list[int] = []

        def decode_forward(self, input_ids, attention_mask, position_ids, cache):
            self.rows_per_step.append(input_ids.shape[0])
            return super().decode_forward(input_ids, attention_mask, position_ids, cache)

    requests = _requests(4, seed=12)
    engine = Counting(model, max_batch=4)
    streams = [engine.submit(p, a, SamplingParams(max_tokens=6, ignore_eos=True)) for p, a in requests]
    engine.start()
    try:
        results = [s.result() for s in streams]
    finally:
        engine.close()
    for (p, a), got in zip(requests, results):
        assert got.token_ids == greedy_alone(model, p, a, 6, eos=None)
    assert len(engine.rows_per_step) == engine.stats.steps  # no decode step bypassed the hook
    assert max(engine.rows_per_step) == 4


def test_time_counters_split_prefill_from_decode(model):
    """stats count prefill steps apart from decode steps (what `lorakit bench serve` reports as the gap to
    the decode-step bound): 4 prompts of 13 tokens at 16 prefill tokens a step need 4 prefill steps."""
    engine = Engine(model, max_batch=4, prefill_tokens=16)
    streams = [engine.submit(list(range(3, 16)), None, SamplingParams(max_tokens=5, ignore_eos=True)) for _ in range(4)]
    engine.start()  # every request is queued before the first step: the prefill plan is fixed
    try:
        assert all(len(s.result().token_ids) == 5 for s in streams)
    finally:
        engine.close()
    stats = engine.stats
    assert stats.prefill_steps == 4 and stats.prompt_tokens == 4 * 13
    assert stats.prefill_seconds > 0 and stats.step_seconds > 0 and stats.steps >= 4


def test_compiled_decode_serves_the_same_tokens_as_eager_across_changing_rows(model):
    """compile_decode=True: decode steps run through lorakit.CompiledForward (aot_eager here: no C compiler
    needed), rows with different adapters joining and leaving mid-flight; tokens equal each row alone."""
    requests = _requests(3, seed=13)
    engine = Engine(model, max_batch=2, compile_decode=True, compile_backend="aot_eager")
    assert engine.compile_decode is True
    calls = []
    compiled = engine._compiled.compiled
    engine._compiled.compiled = lambda *args: calls.append(1) or compiled(*args)
    streams = [engine.submit(p, a, SamplingParams(max_tokens=3 + i, ignore_eos=True))
               for i, (p, a) in enumerate(requests)]
    engine.start()
    try:
        results = [s.result() for s in streams]
    finally:
        engine.close()
    for i, ((p, a), got) in enumerate(zip(requests, results)):
        assert got.token_ids == greedy_alone(model, p, a, 3 + i, eos=None)
    assert len(calls) == engine.stats.steps  # every decode step ran compiled


@pytest.mark.parametrize("how", ["length", "stop", "cancelled mid-decode", "cancelled mid-prefill", "error"])
def test_a_finish_is_published_only_after_its_row_left_the_batch(model, how):
    """Whoever sees a request finished (its counter, its Finished event, on_finish) sees it no longer running:
    the disconnect test read `running == 1` after the cancelled counter had moved."""
    engine = Engine(model, max_batch=2, prefill_tokens=4 if how == "cancelled mid-prefill" else 512)
    seen = []  # engine.running as each finish is published, on the engine thread
    params = {"length": SamplingParams(max_tokens=3), "stop": SamplingParams(max_tokens=50),
              "error": SamplingParams(max_tokens=50, temperature=1.0)}.get(how, SamplingParams(max_tokens=50,
                                                                                              ignore_eos=True))
    (prompt, adapter), = _requests(1, seed=11)
    prompt = prompt * 4 if how == "cancelled mid-prefill" else prompt  # several prefill chunks
    if how == "stop":
        engine.eos_token_ids = frozenset({greedy_alone(model, prompt, adapter, 2, eos=None)[1]})
    if how == "error":
        engine._sample = lambda request, logits: (_ for _ in ()).throw(RuntimeError("sampler broke"))
    stream = engine.submit(prompt, adapter, params, on_finish=lambda: seen.append(engine.running))
    if how == "cancelled mid-prefill":
        engine._admit()
        engine._prefill_step()  # one chunk in: the row is prefilling
        assert engine.running == 1
        stream.cancel()
    engine.start()
    try:
        if how == "cancelled mid-decode":
            next(iter(stream))
            stream.cancel()
        finished = stream.result()
    finally:
        engine.close()
    assert finished.reason == how.split()[0] and seen == [0]
