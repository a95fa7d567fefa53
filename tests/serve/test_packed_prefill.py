"""Packed prefill: prompts of one route end to end in one forward row compute exactly what each computes alone."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from lorakit.model.prefix_hook import cache_argument
from lorakit.serve.engine import Engine, SamplingParams
from lorakit.serve.packed_prefill import (group_requests, is_padded, layout_cost, packed_inputs, packing_plan,
                                          packing_supported, pairs_per_token, request_logits, split_evenly,
                                          take_packed)
from lorakit.serve.prefill import PrefillRow, prefill_inputs, take_rows
from tests.conftest import tiny_llama
from tests.serve.conftest import greedy_alone, with_adapters
from tests.serve.test_batched_prefill import ForwardLog, _prompts, _run

NAMES = ["a0", "a1"]
CACHE = cache_argument(inspect.signature(LlamaForCausalLM.forward).parameters)  # renamed across transformers


@pytest.fixture(scope="module")
def model():
    return with_adapters(tiny_llama(), NAMES)


def _rows_with_pasts(model, lengths: list[int], done: list[int], adapters: list) -> list[PrefillRow]:
    """Rows whose first `done[i]` tokens are already prefilled (each alone, through the padded path)."""
    engine = Engine(model, pack_prefill=False)
    rows = []
    for prompt, d, adapter in zip(_prompts(lengths, seed=5), done, adapters):
        row = PrefillRow(prompt)
        if d:
            with engine._route_context(adapter), torch.no_grad():  # noqa: SLF001 (the engine's own routing)
                inputs = prefill_inputs([row], [d], torch.device("cpu"))
                out = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                            position_ids=inputs.position_ids, use_cache=True, **{CACHE: DynamicCache()})
            take_rows([row], [d], inputs, [layer.keys for layer in out.past_key_values.layers],
                      [layer.values for layer in out.past_key_values.layers])
        rows.append(row)
    return rows


def _logged_run(model, jobs, **engine_kwargs):
    """_run with every forward recorded: (results, engine, log)."""
    log = ForwardLog(model)
    try:
        results, engine = _run(model, jobs, **engine_kwargs)
    finally:
        log.remove()
    return results, engine, log


def test_requests_group_by_route_in_order_of_first_appearance():
    assert group_requests([None, "a", None, "b", "a", "a"]) == [[0, 2], [1, 4, 5], [3]]


def test_the_mask_lets_each_token_see_its_own_past_and_chunk_causally_and_nothing_else(model):
    rows = _rows_with_pasts(model, [6, 9, 4], [2, 0, 3], [None, None, "a0"])
    sizes = [4, 5, 1]
    inputs = packed_inputs(rows, sizes, [None, None, "a0"], torch.device("cpu"), torch.float32)
    assert inputs.input_ids.shape == (2, 9) and inputs.past_width == 3 and inputs.chunk_width == 9
    seen = inputs.attention_mask[:, 0] == 0  # (G, T, P + T)
    for row, size, place in zip(rows, sizes, inputs.places):
        for k in range(size):
            q = place.chunk_start + k
            expected = torch.zeros(inputs.past_width + inputs.chunk_width, dtype=torch.bool)
            expected[place.past_start:place.past_start + row.done] = True
            expected[inputs.past_width + place.chunk_start:inputs.past_width + q + 1] = True
            assert torch.equal(seen[place.group, q], expected), (place, k)
            assert inputs.position_ids[place.group, q] == row.done + k
            assert inputs.input_ids[place.group, q] == row.prompt[row.done + k]
    real = sum(sizes[i] for i in (0, 1)), sizes[2]
    for g, used in enumerate(real):  # padding queries see only themselves
        for q in range(inputs.chunk_width - used):
            assert seen[g, q].nonzero().flatten().tolist() == [inputs.past_width + q]


@pytest.mark.parametrize("layout", [None, [[0], [2], [1, 3], [4]]], ids=["a row per route", "a route in two rows"])
def test_a_packed_forward_equals_the_padded_one_logits_and_caches(model, layout):
    adapters = [None, "a1", None, "a1", "a0"]
    padded = _rows_with_pasts(model, [7, 5, 9, 3, 6], [3, 0, 4, 1, 0], adapters)
    packed = _rows_with_pasts(model, [7, 5, 9, 3, 6], [3, 0, 4, 1, 0], adapters)
    sizes = [4, 5, 5, 2, 6]
    engine = Engine(model, pack_prefill=False)
    with torch.no_grad():
        inputs = prefill_inputs(padded, sizes, torch.device("cpu"))
        cache = DynamicCache(ddp_cache_data=inputs.past)
        with engine._route_context(tuple(adapters)):  # noqa: SLF001
            out = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                        position_ids=inputs.position_ids, use_cache=True, logits_to_keep=1, **{CACHE: cache})
        take_rows(padded, sizes, inputs, [la.keys for la in out.past_key_values.layers],
                  [la.values for la in out.past_key_values.layers])
        expected = out.logits[:, -1]
        pack = packed_inputs(packed, sizes, adapters, torch.device("cpu"), torch.float32, layout)
        with engine._route_context(tuple(pack.group_keys)):  # noqa: SLF001
            out = model(input_ids=pack.input_ids, attention_mask=pack.attention_mask, position_ids=pack.position_ids,
                        use_cache=True, logits_to_keep=pack.logit_columns,
                        **{CACHE: DynamicCache(ddp_cache_data=pack.past)})
        take_packed(packed, sizes, pack, [la.keys for la in out.past_key_values.layers],
                    [la.values for la in out.past_key_values.layers])
        got = request_logits(out.logits, pack)
    assert pack.input_ids.shape[0] == (3 if layout is None else 4)  # None, a1, a0 (None split in two)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    for a, b in zip(padded, packed):
        assert a.done == b.done
        for ka, kb in zip(a.keys + a.values, b.keys + b.values):
            torch.testing.assert_close(kb, ka, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("budget", [1, 4, 13, 512])
def test_the_engine_packs_shared_routes_and_every_request_equals_itself_alone(model, budget):
    prompts = _prompts([3, 11, 1, 7, 15, 5, 9], seed=6)
    adapters = [None, "a0", "a1", "a0", None, "a1", "a0"]
    jobs = [(p, a, SamplingParams(max_tokens=6, ignore_eos=True)) for p, a in zip(prompts, adapters)]
    results, engine, log = _logged_run(model, jobs, max_batch=8, prefill_tokens=budget)
    assert engine.pack_prefill
    for (prompt, adapter, _), got in zip(jobs, results):
        assert got.token_ids == greedy_alone(model, prompt, adapter, 6, eos=None), (prompt, adapter, budget)
    assert engine.stats.prompt_tokens == sum(map(len, prompts))
    if budget == 512:  # one forward, in the plan's rows: each of one route, its prompts end to end
        (shape, past), = log.prefills[:1]
        layout = packing_plan([PrefillRow(p) for p in prompts], list(map(len, prompts)), adapters,
                              pairs_per_token(model))
        assert not is_padded(layout) and past == 0
        assert shape == (len(layout), max(sum(len(prompts[i]) for i in row) for row in layout))


@pytest.mark.parametrize("lengths, shape", [([4, 9, 2, 6], (2, 11)), ([5, 1], (1, 6))])
def test_a_route_fills_the_rows_of_the_cheapest_layout(model, lengths, shape):
    # pairs_per_token is 144 here: rows of 9 + 2 and 6 + 4 beat one row of 21 (its attention), and 4 rows of 9
    prompts = _prompts(lengths, seed=7)
    jobs = [(p, None, SamplingParams(max_tokens=3, ignore_eos=True)) for p in prompts]
    results, _, log = _logged_run(model, jobs, max_batch=4)
    assert log.prefills[0] == (shape, 0)
    assert [r.token_ids for r in results] == [greedy_alone(model, p, None, 3, eos=None) for p in prompts]


def test_a_forward_row_carries_one_route():
    rows = [PrefillRow([1, 2, 3]), PrefillRow([4, 5])]
    with pytest.raises(ValueError, match="only one route"):
        packed_inputs(rows, [3, 2], [None, "a0"], torch.device("cpu"), torch.float32, [[0, 1]])


def test_models_whose_attention_cannot_take_the_mask_prefill_padded(model):
    assert packing_supported(model)
    flash = tiny_llama()
    flash.config._attn_implementation = "flash_attention_2"  # noqa: SLF001 (the attribute transformers reads)
    assert not packing_supported(flash)
    windowed = tiny_llama()
    windowed.config.sliding_window = 8
    assert not packing_supported(windowed) and not Engine(windowed).pack_prefill
    assert not packing_supported(torch.nn.Linear(2, 2))


def test_packed_prefill_on_every_device_and_dtype(device, dtype):
    model = with_adapters(tiny_llama(), NAMES).to(device=device, dtype=dtype)
    prompts = _prompts([5, 8, 3, 6], seed=8)
    adapters = ["a0", "a0", None, None]
    outcomes = {}
    for pack in (True, False):
        jobs = [(p, a, SamplingParams(max_tokens=1)) for p, a in zip(prompts, adapters)]
        engine = Engine(model, max_batch=4, pack_prefill=pack)
        logits = []
        original = engine._prefill_forward  # noqa: SLF001 (observe the prefill logits of both layouts)

        def record(now, original=original, logits=logits):
            out = original(now)
            logits.append(out)
            return out

        engine._prefill_forward = record  # noqa: SLF001
        log = ForwardLog(model)
        streams = [engine.submit(p, a, params) for p, a, params in jobs]
        engine.start()
        try:
            assert all(s.result().reason == "length" for s in streams)
        finally:
            engine.close()
            log.remove()
        assert log.prefills[0][0] == ((2, 13) if pack else (4, 8))  # a0: 5 + 8 tokens, the base: 3 + 6
        outcomes[pack] = torch.cat(logits)
    assert outcomes[True].dtype == dtype and outcomes[True].device.type == device.type
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(outcomes[True].float(), outcomes[False].float(), atol=tol, rtol=tol)


def test_pairs_per_token_follows_the_config():
    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                          num_hidden_layers=30, vocab_size=49152)
    assert pairs_per_token(LlamaForCausalLM(LlamaConfig(**{**smollm2.to_dict(), "num_hidden_layers": 1}))) == 3072
    assert pairs_per_token(torch.nn.Linear(2, 2)) is None


def test_packing_is_chosen_only_where_it_saves_flops():
    ragged = [PrefillRow(list(range(n))) for n in (3, 40, 5, 38)]
    equal = [PrefillRow(list(range(20))) for _ in range(4)]
    assert packing_plan(ragged, [3, 40, 5, 38], [None] * 4, pairs=3072) == [[0, 1], [2, 3]]  # 43 and 43 wide
    assert is_padded(packing_plan(equal, [20] * 4, [None] * 4, pairs=3072))  # no padding to save, wider attention
    two = [PrefillRow(list(range(n))) for n in (40, 38)]
    assert packing_plan(two, [40, 38], [None] * 2, pairs=3072) == [[0, 1]]  # 78 positions, not 80
    assert is_padded(packing_plan(two, [40, 38], [None] * 2, pairs=10))  # attention-heavy: 78 x 78 costs more


def test_the_plan_splits_a_long_route_into_rows_of_even_width():
    sizes = [25, 50, 31, 44, 38, 27, 35, 49, 30, 41, 33, 46, 28, 36, 39]  # 552 tokens of one route
    rows, keys = [PrefillRow(list(range(n))) for n in sizes], [None] * len(sizes)
    layout = packing_plan(rows, sizes, keys, pairs=3072)
    assert sorted(i for row in layout for i in row) == list(range(len(sizes)))  # each request once
    widths = [sum(sizes[i] for i in row) for row in layout]
    assert 1 < len(layout) < len(sizes) and max(widths) - min(widths) <= max(sizes)
    cost = layout_cost(rows, sizes, layout, 3072)
    assert cost < layout_cost(rows, sizes, [list(range(len(sizes)))], 3072)  # one row: attention over 552
    assert cost < layout_cost(rows, sizes, [[i] for i in range(len(sizes))], 3072)  # padded to 50
    mixed = packing_plan(rows, sizes, ["a", None] * 7 + ["a"], pairs=3072)
    assert all(len({("a", None)[i % 2] for i in row}) == 1 for row in mixed)  # a row never mixes routes


def test_split_evenly_fills_the_lightest_row_largest_first():
    assert split_evenly([0, 1, 2, 3], [9, 6, 4, 2], 2) == [[0, 3], [1, 2]]  # 9 + 2 and 6 + 4
    assert split_evenly([0, 1], [5, 5], 3) == [[0], [1]]  # no empty rows


def test_equal_prompts_prefill_padded(model):
    prompts = _prompts([6, 6, 6, 6], seed=9)
    jobs = [(p, None, SamplingParams(max_tokens=2, ignore_eos=True)) for p in prompts]
    results, engine, log = _logged_run(model, jobs, max_batch=4)
    assert engine.pack_prefill and log.prefills[0] == ((4, 6), 0)  # packing would widen attention, save nothing
    assert [r.token_ids for r in results] == [greedy_alone(model, p, None, 2, eos=None) for p in prompts]


def test_blend_routes_pack_too(model):
    from lorakit.routing.context import blend_of

    mix, other = blend_of({"a0": 0.7, "a1": 0.3}), blend_of({"a0": 0.2, "a1": 0.8})
    prompts = _prompts([2, 14, 3, 13], seed=10)
    adapters = [mix, other, other, mix]  # two routes of 15 and 17 tokens: packing drops the padding
    jobs = [(p, a, SamplingParams(max_tokens=3, ignore_eos=True)) for p, a in zip(prompts, adapters)]
    results, _, log = _logged_run(model, jobs, max_batch=4)
    assert log.prefills[0] == ((2, 17), 0)
    for (prompt, adapter, _), got in zip(jobs, results):
        assert got.token_ids == greedy_alone(model, prompt, adapter, 3, eos=None)
