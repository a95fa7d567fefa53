"""Batched, chunked prefill: several prompts (or pieces of them) in one forward, each row on its own cache.

Row i already holds p_i tokens in its own cache (0 for a newcomer) and adds a chunk of c_i prompt tokens.
With P = max p_i and C = max c_i, the forward's row i is laid out

    cache columns  [ pad (P - p_i) | its past (p_i) ]   input columns  [ pad (C - c_i) | its chunk (c_i) ]

so every row's last column is its last new token (one logit per row is enough). The attention mask marks
the real columns, position ids continue each row's own count (p_i, p_i + 1, ...), and the causal order of
real columns is kept, so row i computes what it would alone, padding aside. Afterwards each row's real
columns are cut back out: between steps a row's cache is unpadded (1, H, p_i + c_i, D).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, T, D) → (B, H, n + T, D) with zeros in front."""
    return torch.nn.functional.pad(t, (0, 0, n, 0)) if n else t


@dataclass
class PrefillRow:
    """A prompt being prefilled: the part done (its own cache) and what remains."""

    prompt: list[int]
    done: int = 0  # prompt tokens already in keys/values
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer (1, H, done, D); empty while done == 0
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return len(self.prompt) - self.done


@dataclass
class PrefillInputs:
    """The padded tensors of one batched prefill forward."""

    input_ids: torch.Tensor  # (B, C)
    attention_mask: torch.Tensor  # (B, P + C)
    position_ids: torch.Tensor  # (B, C)
    past: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer (B, H, P, D) keys/values; None when P == 0
    past_width: int  # P
    chunk_width: int  # C


def plan_chunks(rows: list[PrefillRow], budget: int) -> list[int]:
    """How many prompt tokens each row adds this step: first come first served, `budget` tokens in all.
    Rows past the budget add 0 (they wait); the first row always gets at least one token."""
    sizes, left = [], max(budget, 1)
    for row in rows:
        take = min(row.remaining, left)
        sizes.append(take)
        left -= take
    return sizes


def prefill_inputs(rows: list[PrefillRow], sizes: list[int], device: torch.device) -> PrefillInputs:
    """The forward's inputs for `rows` adding `sizes[i]` tokens each (all sizes > 0)."""
    past_width, chunk_width = max(r.done for r in rows), max(sizes)
    ids, mask, positions = [], [], []
    for row, size in zip(rows, sizes):
        chunk = row.prompt[row.done: row.done + size]
        pad_past, pad_chunk = past_width - row.done, chunk_width - size
        ids.append([0] * pad_chunk + chunk)  # any valid token id: its column is masked
        mask.append([0] * pad_past + [1] * row.done + [0] * pad_chunk + [1] * size)
        positions.append([row.done] * pad_chunk + list(range(row.done, row.done + size)))
    past = None
    if past_width:
        layers = len(next(r.keys for r in rows if r.done))
        past = [(torch.cat([_padded(r.keys, layer, past_width, rows) for r in rows]),
                 torch.cat([_padded(r.values, layer, past_width, rows) for r in rows])) for layer in range(layers)]
    as_tensor = lambda rows_: torch.tensor(rows_, dtype=torch.long, device=device)  # noqa: E731
    return PrefillInputs(as_tensor(ids), as_tensor(mask), as_tensor(positions), past, past_width, chunk_width)


def _padded(tensors: list[torch.Tensor], layer: int, width: int, rows: list[PrefillRow]) -> torch.Tensor:
    """One row's layer cache left-padded to `width` columns (zeros for a row with no past yet)."""
    if tensors:
        return left_pad(tensors[layer], width - tensors[layer].shape[2])
    like = next(r.keys[layer] for r in rows if r.done)  # (1, H, p, D): shape, dtype and device to follow
    return like.new_zeros(1, like.shape[1], width, like.shape[3])


def take_rows(rows: list[PrefillRow], sizes: list[int], inputs: PrefillInputs, keys: list[torch.Tensor],
              values: list[torch.Tensor]) -> None:
    """Cut each row's real columns out of the forward's cache (B, H, P + C, D) into the row's own cache."""
    width_p, width_c = inputs.past_width, inputs.chunk_width
    for i, (row, size) in enumerate(zip(rows, sizes)):
        def own(t: torch.Tensor) -> torch.Tensor:
            past = t[i:i + 1, :, width_p - row.done: width_p]
            new = t[i:i + 1, :, width_p + width_c - size:]
            return torch.cat([past, new], dim=2) if row.done else new.clone()  # a copy: never a view of the batch

        row.keys = [own(k) for k in keys]
        row.values = [own(v) for v in values]
        row.done += size
