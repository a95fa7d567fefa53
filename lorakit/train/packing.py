"""Packing: several causal-LM examples per row, none attending to another.

    row   [ a0 a1 a2 a3 | b0 b1 b2 | c0 c1 | pad pad ]
    pos   [  0  1  2  3 |  0  1  2 |  0  1 |   0   1 ]     position ids restart at every example
    label [  -  a1 a2 a3 |  -  b1 b2 |  -  c1 |   -   - ]  an example's first token is never a target

No attention mask and no cache are passed (lorakit.train.metrics.loss_sum sets use_cache=False):
transformers (5.x) then reads the examples' boundaries from the position ids
(masking_utils.find_packed_sequence_indices) and builds a block-diagonal causal mask for sdpa and eager
attention; flash-attention 2 reads the same position ids as varlen sequences. With a cache (use_cache
left on, the default even in training) it would not, and examples would attend to each other. Padding sits at a
row's end, after every real token, so causality alone keeps it out of them. Each example then sees
exactly the keys it sees alone, and the summed loss equals the unpacked one.

`check_packing` runs two examples packed and alone once before training, so a model that would attend
across examples (one not built on transformers' masking) is refused instead of trained wrongly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lorakit.train.data import IGNORE, Sample
from lorakit.train.errors import TrainConfigError


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most `capacity` tokens: first fit, longest first (deterministic)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"example {i} has {lengths[i]} tokens, more than a packed row's {capacity}")
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack(samples: Sequence[Sample], pad_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """input_ids, position_ids and labels of `samples` packed into rows (no attention_mask: see above)."""
    if not samples:
        raise ValueError("cannot pack an empty batch")
    if any(s.labels is None for s in samples):
        raise ValueError("packing is for causal-LM samples (per-token labels), not classification")
    rows = pack_rows([len(s.input_ids) for s in samples], capacity)
    width = max(sum(len(samples[i].input_ids) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (R, W)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (R, W)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # (R, W)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            s = samples[i]
            n = len(s.input_ids)
            input_ids[r, at:at + n] = torch.tensor(s.input_ids)
            position_ids[r, at:at + n] = torch.arange(n)
            labels[r, at + 1:at + n] = torch.tensor(s.labels[1:])  # the first token has no predecessor here
            at += n
        position_ids[r, at:] = torch.arange(width - at)  # padding: a segment of its own, after every real token
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


@torch.no_grad()
def check_packing(model: nn.Module, first: Sample, second: Sample, pad_id: int, device: torch.device) -> None:
    """Refuse packing when `second`'s logits change by being packed after `first` (attention crossed)."""
    alone = torch.tensor([second.input_ids], device=device)  # (1, n)
    packed = pack([first, second], pad_id, len(first.input_ids) + len(second.input_ids))
    order = pack_rows([len(first.input_ids), len(second.input_ids)], 10 ** 9)[0]
    offset = 0 if order[0] == 1 else len(first.input_ids)  # where `second` starts in the packed row
    was_training = model.training
    model.eval()
    try:
        want = model(input_ids=alone, use_cache=False).logits[0]  # (n, V)
        got = model(input_ids=packed["input_ids"].to(device), position_ids=packed["position_ids"].to(device),
                    use_cache=False).logits[0]  # (W, V)
    finally:
        model.train(was_training)
    tol = 1e-3 if want.dtype == torch.float32 else 3e-2  # 16-bit logits differ by rounding alone
    got, want = got[offset:offset + len(second.input_ids)].float(), want.float()
    scale = float(want.abs().max().clamp_min(1e-6))
    if not torch.allclose(got, want, atol=tol * scale, rtol=tol):
        raise TrainConfigError(f"packing: {type(model).__name__} attends across packed examples (logits of an "
                               f"example change by {float((got - want).abs().max()):.3g} when packed after "
                               "another): it does not read example boundaries from position ids; set "
                               "packing = false")
