"""BatchCache: the live region always equals the left-padded, concatenated cache the engine used to build,
decode steps write in place (no reallocation while there is room), and stale values never leak into a row."""

from __future__ import annotations

import itertools

import torch
from transformers import DynamicCache

from lorakit.serve.kv_cache import BatchCache
from lorakit.serve.prefill import left_pad
from tests.conftest import tiny_llama

H, D, LAYERS = 2, 3, 2


def _row(n: int, gen: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return ([torch.randn(1, H, n, D, generator=gen) for _ in range(LAYERS)],
            [torch.randn(1, H, n, D, generator=gen) for _ in range(LAYERS)])


class Reference:
    """The engine's former cache: each row's real columns, stacked left-padded to the longest."""

    def __init__(self) -> None:
        self.rows: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def stacked(self, which: int, layer: int) -> torch.Tensor:
        width = max(r[which][layer].shape[2] for r in self.rows)
        return torch.cat([left_pad(r[which][layer], width - r[which][layer].shape[2]) for r in self.rows])

    def mask(self) -> torch.Tensor:
        width = max(r[0][0].shape[2] for r in self.rows)
        return torch.stack([(torch.arange(width) >= width - r[0][0].shape[2]).long() for r in self.rows])


def _check(cache: BatchCache, ref: Reference) -> None:
    assert cache.rows == len(ref.rows)
    span = slice(cache.start, cache.end)
    assert torch.equal(cache.live_mask(), ref.mask())
    for layer in range(LAYERS):
        assert torch.equal(cache.keys[layer][: cache.rows, :, span], ref.stacked(0, layer))
        assert torch.equal(cache.values[layer][: cache.rows, :, span], ref.stacked(1, layer))


def _decode(cache: BatchCache, ref: Reference, gen: torch.Generator) -> None:
    """One step: every layer gets one new column per row, as the model's attention would write it."""
    kv, mask = cache.decode_cache()
    assert mask.shape == (cache.rows, cache.width + 1)
    for layer in range(LAYERS):
        k = torch.randn(cache.rows, H, 1, D, generator=gen)
        v = torch.randn(cache.rows, H, 1, D, generator=gen)
        kv.update(k, v, layer)
        for i, row in enumerate(ref.rows):
            row[0][layer] = torch.cat([row[0][layer], k[i: i + 1]], dim=2)
            row[1][layer] = torch.cat([row[1][layer], v[i: i + 1]], dim=2)
    cache.advance()


def test_joins_leaves_and_steps_match_the_concatenated_cache():
    gen = torch.Generator().manual_seed(0)
    cache, ref = BatchCache(max_rows=8), Reference()
    script = [("join", [3, 5]), ("step", 4), ("join", [2]), ("step", 1), ("keep", [0, 2]), ("step", 3),
              ("join", [30, 1, 4]), ("step", 2), ("keep", [1, 3]), ("step", 5),
              ("join", [20]), ("step", 1),  # longer than the batch after the 30-long row left: widens in place
              ("keep", [1, 2]), ("step", 40), ("join", [2, 2, 2, 2, 2, 2]), ("step", 2), ("keep", [0, 3, 7]),
              ("step", 1), ("keep", []), ("join", [6]), ("step", 3)]
    for op, arg in script:
        if op == "join":
            rows = [_row(n, gen) for n in arg]
            cache.join(rows)
            ref.rows += [([k for k in keys], [v for v in values]) for keys, values in rows]
        elif op == "keep":
            cache.keep(arg)
            ref.rows = [ref.rows[i] for i in arg]
        else:
            for _ in range(arg):
                _decode(cache, ref, gen)
        if ref.rows:
            _check(cache, ref)
        else:
            assert cache.rows == 0 and cache.mask is None  # an empty batch holds no memory


def test_decode_steps_write_in_place_and_reallocate_geometrically():
    gen = torch.Generator().manual_seed(1)
    cache, ref = BatchCache(max_rows=4), Reference()
    rows = [_row(4, gen) for _ in range(4)]
    cache.join(rows)
    ref.rows = [([k for k in keys], [v for v in values]) for keys, values in rows]
    pointers = [cache.keys[0].data_ptr()]
    for _ in range(200):
        _decode(cache, ref, gen)
        pointers.append(cache.keys[0].data_ptr())
    _check(cache, ref)
    changes = sum(a != b for a, b in itertools.pairwise(pointers))
    assert changes == cache.reallocations - 1  # the first allocation was the join's
    assert changes <= 6  # 10 → 204 columns: doubling needs 5 regrowths, not 200 copies


def test_a_row_slot_reused_after_a_nan_row_left_gets_clean_padding():
    gen = torch.Generator().manual_seed(2)
    cache = BatchCache(max_rows=4)
    bad = ([torch.full((1, H, 9, D), float("nan")) for _ in range(LAYERS)],
           [torch.full((1, H, 9, D), float("nan")) for _ in range(LAYERS)])
    cache.join([_row(3, gen), bad, _row(9, gen)])
    cache.keep([0, 2])  # the NaN row leaves; the 9-long row moves into its slot
    cache.join([_row(2, gen)])  # reuses row 2, whose old columns held the moved row's data
    span = slice(cache.start, cache.end)
    for layer in range(LAYERS):
        assert torch.isfinite(cache.keys[layer][: cache.rows, :, span]).all()
    assert cache.live_mask()[2].tolist() == [0] * 7 + [1, 1]


def test_model_decode_through_the_buffer_equals_a_dynamic_cache():
    """Greedy decoding of a padded two-row batch: identical logits whether the cache is concatenated
    (DynamicCache) or written in place (BatchCache)."""
    model = tiny_llama()
    prompts = [torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[11, 12]])]
    rows = []
    with torch.no_grad():
        for ids in prompts:
            out = model(input_ids=ids, use_cache=True)
            layers = out.past_key_values.layers
            rows.append(([l.keys for l in layers], [l.values for l in layers], int(out.logits[0, -1].argmax())))
    cache = BatchCache(max_rows=2)
    cache.join([(k, v) for k, v, _ in rows])
    width = cache.width
    dynamic = DynamicCache(ddp_cache_data=[
        (torch.cat([left_pad(r[0][l], width - r[0][l].shape[2]) for r in rows]),
         torch.cat([left_pad(r[1][l], width - r[1][l].shape[2]) for r in rows])) for l in range(2)])
    dyn_mask = cache.live_mask().clone()
    tokens = torch.tensor([[r[2]] for r in rows])
    positions = torch.tensor([[5], [2]])
    with torch.no_grad():
        for _ in range(6):
            kv, mask = cache.decode_cache()
            ours = model(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=kv,
                         use_cache=True).logits[:, -1]
            cache.advance()
            dyn_mask = torch.cat([dyn_mask, dyn_mask.new_ones(2, 1)], dim=1)
            theirs = model(input_ids=tokens, attention_mask=dyn_mask, position_ids=positions,
                           past_key_values=dynamic, use_cache=True).logits[:, -1]
            assert torch.equal(ours, theirs)
            tokens, positions = ours.argmax(-1, keepdim=True), positions + 1
