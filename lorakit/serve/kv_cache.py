"""The running batch's KV cache: one preallocated buffer per layer, written in place by each decode step.

A transformers DynamicCache grows by torch.cat: every decode step copied the whole cache of every layer
(twice: once to build the cache from the batch's tensors, once to append the new column). Here each layer
keeps one buffer and a step writes one column into it:

    keys[l], values[l]: (R, H, C, D)   R rows, C columns of capacity (R >= B, C > W)
    mask:               (R, C)         1 = real token, 0 = left padding (never attended to)

    live region: rows [0, B), columns [start, end), W = end - start; row i's real entries are its last
    len_i columns, exactly the left-padded layout the engine had before (so outputs are unchanged)

    step:   write the new column at `end` (the model's cache.update), then end += 1
    join:   newcomers are written into rows B.. (left-padded to W, or the region widened on the left)
    leave:  the kept rows move up to fill the gaps; leading columns no row uses are dropped (start moves)

Only when a buffer is full is it reallocated: rows up to twice as many (at most the engine's max_batch),
columns to twice the width needed, so the copies are amortised over many steps.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lorakit.serve.prefill import left_pad


class BatchCache:
    """Keys, values and the attention mask of the running rows, in buffers grown geometrically."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows  # the engine's max_batch: rows are never grown beyond it
        self.keys: list[torch.Tensor] = []  # per layer (R, H, C, D)
        self.values: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # (R, C) long
        self.rows = 0  # B: live rows are [0, rows)
        self.start = 0  # live columns are [start, end)
        self.end = 0
        self.reallocations = 0  # buffers reallocated so far (tests, stats)

    @property
    def width(self) -> int:
        return self.end - self.start

    @property
    def row_capacity(self) -> int:
        return self.mask.shape[0] if self.mask is not None else 0

    @property
    def column_capacity(self) -> int:
        return self.mask.shape[1] if self.mask is not None else 0

    def live_mask(self) -> torch.Tensor:
        """(B, W) view of the live rows' mask."""
        return self.mask[: self.rows, self.start: self.end]

    def join(self, newcomers: list[tuple[list[torch.Tensor], list[torch.Tensor]]]) -> None:
        """Append rows, each given as its own unpadded cache: per layer keys and values (1, H, n, D)."""
        if not newcomers:
            return
        lengths = [keys[0].shape[2] for keys, _ in newcomers]
        width = max([self.width if self.rows else 0] + lengths)
        total = self.rows + len(newcomers)
        if self.mask is None:
            self._reserve_like(*newcomers[0])
        if total > self.row_capacity or self.end - width < 0:
            self._relayout(total, width)
        new_start = self.end - width
        first, last = self.rows, total
        if new_start < self.start and self.rows:  # widened on the left: old rows' new columns are padding
            self.mask[:first, new_start: self.start] = 0
            for buffers in (self.keys, self.values):
                for buffer in buffers:
                    buffer[:first, :, new_start: self.start] = 0  # stale columns may hold anything, even NaN
        self.start = new_start
        for layer in range(len(self.keys)):
            for buffers, index in ((self.keys, 0), (self.values, 1)):
                stacked = torch.cat([left_pad(row[index][layer], width - n)
                                     for row, n in zip(newcomers, lengths)])  # (k, H, W, D)
                buffers[layer][first:last, :, self.start: self.end] = stacked
        columns = torch.arange(width, device=self.mask.device)
        lengths_t = torch.tensor(lengths, device=self.mask.device).unsqueeze(1)  # (k, 1)
        self.mask[first:last, self.start: self.end] = (columns >= width - lengths_t).long()
        self.rows = total

    def keep(self, keep: list[int]) -> None:
        """Keep only rows `keep` (ascending), in that order; frees the buffers when no row is left."""
        if len(keep) == self.rows:
            return
        if not keep:
            self.__init__(self.max_rows)
            return
        moved = next((t for t, i in enumerate(keep) if t != i), None)
        if moved is not None:  # rows after the first gap move up; the right-hand side is copied first
            source = torch.tensor(keep[moved:], device=self.mask.device)
            span = slice(self.start, self.end)
            target = slice(moved, len(keep))
            self.mask[target, span] = self.mask.index_select(0, source)[:, span]
            for buffers in (self.keys, self.values):
                for buffer in buffers:
                    buffer[target, :, span] = buffer.index_select(0, source)[:, :, span]
        self.rows = len(keep)
        used = self.live_mask().sum(0) > 0  # (W,)
        self.start += int(used.long().argmax())  # first column some row still uses

    def decode_cache(self) -> tuple[Cache, torch.Tensor]:
        """The cache for one decode step (it writes each layer's new column in place) and its (B, W + 1) mask."""
        if self.end + 1 > self.column_capacity:
            self._relayout(self.rows, self.width)
        self.mask[: self.rows, self.end] = 1
        layers = [_BufferLayer(self, layer) for layer in range(len(self.keys))]
        return Cache(layers=layers), self.mask[: self.rows, self.start: self.end + 1]

    def advance(self) -> None:
        """The decode step ran: its column is part of the live region."""
        self.end += 1

    def _relayout(self, rows: int, width: int) -> None:
        """New buffers holding `rows` rows and at least `width` + 1 columns, the live region moved to column 0
        (copied, with the old rows). Capacities double at least, so a reallocation is rare."""
        old_rows, old_columns = self.row_capacity, self.column_capacity
        new_rows = old_rows if rows <= old_rows else max(rows, min(self.max_rows, 2 * old_rows))
        new_columns = max(old_columns, 2 * (width + 1))
        old_width, live = self.width, self.rows
        keys = [_fresh(k, new_rows, new_columns) for k in self.keys]
        values = [_fresh(v, new_rows, new_columns) for v in self.values]
        mask = self.mask.new_zeros(new_rows, new_columns)
        if live:
            span, target = slice(self.start, self.end), slice(width - old_width, width)
            for new, old in zip(keys + values, self.keys + self.values):
                new[:live, :, target] = old[:live, :, span]
            mask[:live, target] = self.mask[:live, span]
        self.keys, self.values, self.mask = keys, values, mask
        self.start, self.end = 0, width
        self.reallocations += 1

    def _reserve_like(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Empty buffers with the layer count, heads, head size, dtype and device of one row's cache."""
        self.keys = [k.new_zeros(0, k.shape[1], 0, k.shape[3]) for k in keys]
        self.values = [v.new_zeros(0, v.shape[1], 0, v.shape[3]) for v in values]
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=keys[0].device)


def _fresh(like: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    return like.new_zeros(rows, like.shape[1], columns, like.shape[3])  # (R, H, C, D)


class _BufferLayer(DynamicLayer):
    """One layer of the decode step's cache: `update` writes the new keys/values into the batch's buffer at
    column `end` and returns views of the live region; nothing is concatenated."""

    def __init__(self, owner: BatchCache, layer: int) -> None:
        super().__init__()
        self.owner, self.layer = owner, layer
        rows, span = slice(0, owner.rows), slice(owner.start, owner.end)
        self.keys = owner.keys[layer][rows, :, span]  # (B, H, W, D): its length tells the model W
        self.values = owner.values[layer][rows, :, span]
        self.device = self.keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        owner, new = self.owner, key_states.shape[-2]  # (B, H, 1, D): one column per decode step
        if owner.end + new > owner.column_capacity:
            raise RuntimeError(f"BatchCache: {new} new columns do not fit the buffer ({owner.end} of "
                               f"{owner.column_capacity} used); decode_cache reserves one per step")
        rows, written = slice(0, owner.rows), slice(owner.end, owner.end + new)
        keys, values = owner.keys[self.layer], owner.values[self.layer]
        keys[rows, :, written] = key_states
        values[rows, :, written] = value_states
        self.keys = keys[rows, :, owner.start: owner.end + new]
        self.values = values[rows, :, owner.start: owner.end + new]
        return self.keys, self.values
