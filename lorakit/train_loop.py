"""A minimal training loop for one adapter: AdamW on its parameters, loss on the answer tokens only.

Quickstart-grade on purpose (the full trainer lives elsewhere): fixed seed, fixed batch size, linear
warm-up then constant learning rate, gradient clipping, a tqdm bar with loss and tokens/s.

Batches are left-padded, so every row's answer ends at the last position:

    row 0:  <pad> <pad> p p p p p | a a a <eos>
    row 1:  p p p p p p p p p p p | a <eos> ...      ← answers right-aligned, loss masked to them
    position_ids count real tokens only, so padding changes nothing a row computes.

That alignment lets the model project only the last K+1 hidden states to the vocabulary
(`logits_to_keep`), which skips most of the lm_head's cost for short answers.
"""

from __future__ import annotations

import inspect
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

import lorakit

IGNORE = -100  # label of every position the loss skips (prompt and padding)


@dataclass(frozen=True)
class Example:
    """One training or scoring example as token ids: the prompt, then the answer the loss is taken on."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # answer tokens, usually ending with the end-of-turn token


@dataclass(frozen=True)
class TrainConfig:
    """Settings of `train`; the defaults suit LoRA-XS on a ~100M-parameter model."""

    steps: int = 60  # optimiser steps
    batch_size: int = 16  # examples per step
    lr: float = 1e-3  # peak AdamW learning rate
    warmup_steps: int = 5  # linear warm-up from lr/warmup_steps to lr
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # clip the adapter's gradient norm to this (0 disables clipping)
    seed: int = 0  # seeds torch and the example order

    def __post_init__(self) -> None:
        for field in ("steps", "batch_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{field} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.warmup_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ValueError(f"warmup_steps, max_grad_norm and weight_decay must be >= 0, got {self.warmup_steps!r}, "
                             f"{self.max_grad_norm!r}, {self.weight_decay!r}")


@dataclass
class TrainResult:
    losses: list[float]  # mean answer-token loss of each step
    seconds: float  # wall time of the loop
    tokens: int  # real (non-pad) tokens processed

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad examples into input_ids, attention_mask, position_ids and labels (answer tokens only)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    seqs = [list(e.prompt_ids) + list(e.answer_ids) for e in examples]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)  # (B, T)
    for row, (seq, ex) in enumerate(zip(seqs, examples)):
        start = width - len(seq)
        input_ids[row, start:] = torch.tensor(seq)
        attention_mask[row, start:] = 1
        labels[row, width - len(ex.answer_ids):] = torch.tensor(ex.answer_ids)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # (B, T)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "labels": labels}


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of the answer tokens' negative log-likelihoods, number of answer tokens) for one batch."""
    labels = batch["labels"]
    answer_width = int((labels != IGNORE).sum(-1).max())  # K: the longest answer
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if _accepts_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=answer_width + 1).logits  # (B, K+1, V)
    else:
        logits = model(**inputs).logits[:, -(answer_width + 1):]  # (B, K+1, V)
    targets = labels[:, -answer_width:]  # (B, K): predicted from positions -K-1 .. -2
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    return nll, int((targets != IGNORE).sum())


def _batches(n_examples: int, batch_size: int, steps: int, rng: random.Random):
    """Indices of each step's batch: reshuffled epochs, so every example is seen before any repeats."""
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            epoch = list(range(n_examples))
            rng.shuffle(epoch)
            order.extend(epoch)
        yield order[:batch_size]
        order = order[batch_size:]


def train(model: nn.Module, name: str, examples: Sequence[Example], config: TrainConfig, *, pad_id: int,
          progress: bool = True) -> TrainResult:
    """Train adapter `name` of `model` on `examples` and return the loss of every step.

    Only `lorakit.adapter_parameters(model, name)` are optimised; the model's train/eval mode is
    restored afterwards.
    """
    if not examples:
        raise ValueError("no training examples")
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    params = lorakit.adapter_parameters(model, name)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(config.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    was_training = model.training
    model.train()
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=config.steps, desc=f"training {name}", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        with lorakit.use_adapter(model, name):
            for indices in _batches(len(examples), config.batch_size, config.steps, rng):
                batch = collate([examples[i] for i in indices], pad_id)
                nll, count = answer_loss(model, batch)
                loss = nll / max(count, 1)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"training loss became {loss.item()} at step {len(losses) + 1}; "
                                             f"lower the learning rate (lr={config.lr})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                tokens += int(batch["attention_mask"].sum())
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / elapsed:.0f}")
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    return TrainResult(losses=losses, seconds=time.perf_counter() - start, tokens=tokens)


__all__ = ["Example", "TrainConfig", "TrainResult", "answer_loss", "collate", "train"]
