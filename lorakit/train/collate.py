"""Padding samples into a batch, with attention masks.

Right padding for training and scoring: real tokens keep positions 0..n-1, so padding changes nothing
a row computes under a causal (or bidirectional, masked) model. Generation pads on the left instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorakit.train.data import IGNORE, Sample


def collate(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels (per-token labels, or one label per row) for `samples`."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(s.input_ids) for s in samples)
    rows = len(samples)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)  # (B, T)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    classify = samples[0].label is not None
    if classify:
        batch["labels"] = torch.tensor([s.label for s in samples], dtype=torch.long)  # (B,)
        if samples[0].token_type_ids is not None:
            batch["token_type_ids"] = torch.zeros((rows, width), dtype=torch.long)  # (B, T)
    else:
        batch["labels"] = torch.full((rows, width), IGNORE, dtype=torch.long)  # (B, T)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[row, :n] = torch.tensor(s.input_ids)
        attention_mask[row, :n] = 1
        if classify:
            if s.token_type_ids is not None:
                batch["token_type_ids"][row, :n] = torch.tensor(s.token_type_ids)
        else:
            batch["labels"][row, :n] = torch.tensor(s.labels)
    return batch


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with prompts right-aligned, for batched generation."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        attention_mask[row, width - len(p):] = 1
    return input_ids, attention_mask
