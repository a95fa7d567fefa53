"""Packed prefill: prompts that share a route go end to end in forward rows, so little compute is spent on padding.

Padded prefill (lorakit.serve.prefill) lays each prompt out in its own row and pads every row to the
longest: with prompts of 25 to 50 tokens a third of the forward's linear work is padding. Here the
requests are grouped by their route (the adapter or blend they run under: one forward row can carry
only one), and the requests of a forward row are concatenated. With G rows, P = the largest summed past
and T = the largest summed chunk, forward row g is

    cache columns  [ pad | past of r1 | past of r2 | ... ]   input columns  [ pad | chunk of r1 | chunk of r2 | ... ]

A 4D additive mask (G, 1, T, P + T) lets each real token see its own request's past and the tokens of
its own chunk up to itself, nothing else; a padding token sees only itself (so it stays finite and never
poisons a masked value with NaN). Position ids continue each request's own count, so each request computes
what it computes alone. The logits of each request's last new token are the only ones taken.

Only for models whose attention takes such a mask as given (transformers' eager and SDPA attention) and
have no sliding window (the window would be ours to apply): `packing_supported` says. Packing trades the
padding's linear work for attention over the whole packed row (masked pairs are still computed), so
`packing_plan` chooses how many rows each route's requests fill: the layout of fewest FLOPs, from one row
per request (padded) to one row per route.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.serve.prefill import PrefillRow

MASKED_ATTENTION = ("eager", "sdpa")  # attention implementations that apply a 4D mask as given


def packing_supported(model: nn.Module) -> bool:
    """Whether `model` computes a packed forward exactly: a transformers model with eager or SDPA attention
    and no sliding window (flash-attention kernels take no 4D mask; a window would need ours)."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    implementation = getattr(config, "_attn_implementation", None)
    return implementation in MASKED_ATTENTION and getattr(config, "sliding_window", None) is None


def pairs_per_token(model: nn.Module) -> float | None:
    """How many attention (query, key) pairs cost the FLOPs of one token through a decoder's linear layers,
    from a transformers config (None when it lacks the sizes): linear params per layer / (2 · heads · head_dim)."""
    config = getattr(model, "config", None)
    hidden, inner = getattr(config, "hidden_size", None), getattr(config, "intermediate_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if not all(isinstance(v, int) and v > 0 for v in (hidden, inner, heads)):
        return None
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    linear = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * inner  # q, o; k, v; mlp
    return linear / (2 * heads * head_dim)


def layout_cost(rows: list[PrefillRow], sizes: list[int], layout: list[list[int]], pairs: float) -> float:
    """A prefill forward's FLOPs in token equivalents: its token positions plus its attention rectangle
    (queries x cached and new columns, `pairs` per token). `layout` lists each forward row's requests, end to end;
    every row is as wide as the widest."""
    past = max(sum(rows[i].done for i in members) for members in layout)
    chunk = max(sum(sizes[i] for i in members) for members in layout)
    return len(layout) * chunk * (1 + (past + chunk) / pairs)


def split_evenly(members: list[int], sizes: list[int], parts: int) -> list[list[int]]:
    """`members` in at most `parts` rows of nearly equal summed chunk (largest first into the lightest row),
    each row's requests in their given order."""
    rows: list[list[int]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for i in sorted(members, key=lambda i: -sizes[i]):
        lightest = loads.index(min(loads))
        rows[lightest].append(i)
        loads[lightest] += sizes[i]
    return [sorted(row) for row in rows if row]


def packing_plan(rows: list[PrefillRow], sizes: list[int], keys: Sequence[Hashable], pairs: float
                 ) -> list[list[int]]:
    """The forward rows of the cheapest prefill layout by `layout_cost`, each a list of requests of one route.

    One request per row is the padded layout; one row per route packs each route end to end, paying attention
    over the whole row; in between, a route's requests are split over several rows of a common width, so
    neither padding nor attention dominates. The widths tried are each route's total over 1, 2, ... rows."""
    groups = group_requests(keys)
    best = [[i] for i in range(len(rows))]
    best_cost = layout_cost(rows, sizes, best, pairs)
    totals = [sum(sizes[i] for i in g) for g in groups]
    widths = {-(-total // parts) for total, g in zip(totals, groups) for parts in range(1, len(g) + 1)}
    for width in sorted(widths):
        layout = [row for g, total in zip(groups, totals)
                  for row in split_evenly(g, sizes, min(len(g), -(-total // width)))]
        cost = layout_cost(rows, sizes, layout, pairs)
        if cost < best_cost:
            best, best_cost = layout, cost
    return best


def is_padded(layout: list[list[int]]) -> bool:
    """Whether a plan puts every request in its own row: the padded layout (lorakit.serve.prefill) computes it."""
    return all(len(members) == 1 for members in layout)


@dataclass
class Place:
    """Where one request sits in the packed forward."""

    group: int
    past_start: int  # its past's first cache column
    chunk_start: int  # its chunk's first input column (cache column P + chunk_start)


@dataclass
class PackedInputs:
    """The tensors of one packed prefill forward, and where each request went."""

    input_ids: torch.Tensor  # (G, T)
    attention_mask: torch.Tensor  # (G, 1, T, P + T) additive: 0 = attend, dtype min = masked
    position_ids: torch.Tensor  # (G, T)
    past: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer (G, H, P, D); None when P == 0
    past_width: int  # P
    chunk_width: int  # T
    places: list[Place]  # per request, in the order given
    group_keys: list[Hashable]  # the route of each forward row
    logit_columns: torch.Tensor  # (K,) input columns whose logits the forward keeps (each request's last token)
    logit_index: list[int]  # per request: its position in logit_columns


def group_requests(keys: Sequence[Hashable]) -> list[list[int]]:
    """Request indices grouped by route key, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def packed_inputs(rows: list[PrefillRow], sizes: list[int], keys: Sequence[Hashable], device: torch.device,
                  dtype: torch.dtype, layout: list[list[int]] | None = None) -> PackedInputs:
    """The packed forward's inputs for `rows` adding `sizes[i]` tokens each (all > 0), `keys[i]` its route;
    `layout` lists each forward row's requests (one route per row; default: one row per route)."""
    groups = group_requests(keys) if layout is None else layout
    if any(keys[i] != keys[members[0]] for members in groups for i in members):
        raise ValueError("packed_inputs: a forward row can carry only one route")
    past_sums = [sum(rows[i].done for i in g) for g in groups]
    chunk_sums = [sum(sizes[i] for i in g) for g in groups]
    past_width, chunk_width = max(past_sums), max(chunk_sums)
    width = past_width + chunk_width
    ids = torch.zeros(len(groups), chunk_width, dtype=torch.long)  # padding ids: any valid token, masked
    positions = torch.zeros(len(groups), chunk_width, dtype=torch.long)
    allowed = torch.zeros(len(groups), chunk_width, width, dtype=torch.bool)
    places: list[Place | None] = [None] * len(rows)
    for g, members in enumerate(groups):
        past_col = past_width - past_sums[g]
        col = chunk_width - chunk_sums[g]
        pads = torch.arange(col)
        allowed[g, pads, past_width + pads] = True  # a padding query sees only itself
        for i in members:
            row, size = rows[i], sizes[i]
            ids[g, col:col + size] = torch.tensor(row.prompt[row.done:row.done + size])
            positions[g, col:col + size] = torch.arange(row.done, row.done + size)
            allowed[g, col:col + size, past_col:past_col + row.done] = True  # its own past
            own = torch.ones(size, size, dtype=torch.bool).tril()  # its own chunk, causally
            allowed[g, col:col + size, past_width + col:past_width + col + size] = own
            places[i] = Place(g, past_col, col)
            past_col += row.done
            col += size
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    ends = [places[i].chunk_start + sizes[i] - 1 for i in range(len(rows))]
    columns = sorted(set(ends))
    past = _packed_past(rows, groups, past_sums, past_width) if past_width else None
    return PackedInputs(ids.to(device), mask.unsqueeze(1).to(device), positions.to(device), past, past_width,
                        chunk_width, places, [keys[g[0]] for g in groups],
                        torch.tensor(columns, device=device), [columns.index(e) for e in ends])


def _packed_past(rows: list[PrefillRow], groups: list[list[int]], past_sums: list[int], width: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, each group's requests' pasts end to end, left-padded with zeros to `width` columns."""
    first = next(r.keys for r in rows if r.done)
    like, layers = first[0], len(first)  # (1, H, p, D): shape, dtype and device to follow

    def group_row(members: list[int], total: int, layer: int, which: str) -> torch.Tensor:
        parts = [getattr(rows[i], which)[layer] for i in members if rows[i].done]
        if width > total:
            parts.insert(0, like.new_zeros(1, like.shape[1], width - total, like.shape[3]))
        return torch.cat(parts, dim=2)

    return [(torch.cat([group_row(g, s, layer, "keys") for g, s in zip(groups, past_sums)]),
             torch.cat([group_row(g, s, layer, "values") for g, s in zip(groups, past_sums)]))
            for layer in range(layers)]


def take_packed(rows: list[PrefillRow], sizes: list[int], inputs: PackedInputs, keys: list[torch.Tensor],
                values: list[torch.Tensor]) -> None:
    """Cut each request's past and new columns out of the forward's cache (G, H, P + T, D) into its own cache."""
    for row, size, place in zip(rows, sizes, inputs.places):
        new_start = inputs.past_width + place.chunk_start

        def own(t: torch.Tensor) -> torch.Tensor:
            g = place.group
            new = t[g:g + 1, :, new_start:new_start + size]
            if not row.done:
                return new.clone()  # a copy: never a view of the batch
            return torch.cat([t[g:g + 1, :, place.past_start:place.past_start + row.done], new], dim=2)

        row.keys = [own(k) for k in keys]
        row.values = [own(v) for v in values]
        row.done += size


def request_logits(logits: torch.Tensor, inputs: PackedInputs) -> torch.Tensor:
    """(G, K, V) logits of the kept columns → (R, V), each request's last new token."""
    groups = torch.tensor([p.group for p in inputs.places], device=logits.device)
    index = torch.tensor(inputs.logit_index, device=logits.device)
    return logits[groups, index]
