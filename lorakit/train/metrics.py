"""Losses and scores: token NLL sums (so batches and processes combine exactly), perplexity,
exact-match generation, classification accuracy and macro-F1, and the CSV/JSON training log."""

from __future__ import annotations

import csv
import inspect
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lorakit.io.atomic import atomic_write_bytes, atomic_write_json
from lorakit.train.collate import collate, left_pad
from lorakit.train.data import IGNORE, Sample


def accepts(model: nn.Module, argument: str) -> bool:
    """Whether the model's forward takes `argument` (e.g. logits_to_keep, use_cache)."""
    inner = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    try:
        return argument in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward can project only some positions to the vocabulary (HF causal LMs)."""
    return accepts(model, "logits_to_keep")


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed loss, number of terms): next-token NLL over labelled tokens, or CE over rows.

    Causal LM: only the columns from the first to the last labelled target are projected to the
    vocabulary when the model allows it (`logits_to_keep` as positions), which skips most of the
    output head's cost when only short answers are labelled; the result is the same.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if labels.dim() == 1:  # classification: (B, C) logits
        logits = model(**inputs).logits
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()
    if accepts(model, "use_cache"):
        # No cache when scoring: it is never read, and with one transformers would not read packed examples'
        # boundaries from position_ids (lorakit.train.packing)
        inputs["use_cache"] = False
    targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
    columns = (targets != IGNORE).any(0).nonzero().flatten()  # positions whose prediction is scored
    if len(columns) and accepts_logits_to_keep(model):
        first, last = int(columns[0]), int(columns[-1])
        keep = torch.arange(first, last + 1, device=labels.device)  # (K,)
        logits = model(**inputs, logits_to_keep=keep).logits  # (B, K, V)
        targets = targets[:, first:last + 1]  # (B, K)
    else:
        logits = model(**inputs).logits[:, :-1]  # (B, T-1, V)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    return nll, int((targets != IGNORE).sum())


def mean_loss(model: nn.Module, samples: Sequence[Sample], pad_id: int, batch_size: int = 16,
              device: torch.device | str = "cpu", autograd: bool = False) -> float:
    """Mean loss per labelled token (or per row for classification) over `samples`.

    autograd=True runs the forwards with autograd on (no graph outlives a batch): lorakit's layers then
    read the adapter's parameters per call instead of adopting them into a slot stack (a no-grad forward
    re-points `param.data` into it). Under FSDP2 the stack's storage is then no longer the all-gather
    buffer later unshards fill, so the layers read stale weights; under DDP a mid-run eval on rank 0 alone
    made the run drift from one process (seen on main: step-4 loss 4.0966 vs 4.0931). Training passes it
    whenever there are several processes.
    """
    total, count = 0.0, 0
    with torch.set_grad_enabled(autograd):
        for start in range(0, len(samples), batch_size):
            batch = {k: v.to(device) for k, v in collate(samples[start:start + batch_size], pad_id).items()}
            nll, n = loss_sum(model, batch)
            total, count = total + nll.item(), count + n
    return total / count if count else math.nan


@torch.no_grad()
def classify(model: nn.Module, samples: Sequence[Sample], pad_id: int, batch_size: int = 32) -> list[int]:
    """Predicted label index of every sample."""
    preds: list[int] = []
    for start in range(0, len(samples), batch_size):
        batch = collate(samples[start:start + batch_size], pad_id)
        batch.pop("labels")
        preds += model(**batch).logits.argmax(-1).tolist()
    return preds


def accuracy_f1(preds: Sequence[int], gold: Sequence[int], n_labels: int) -> tuple[float, float]:
    """(accuracy, macro-F1 over labels present in gold or preds)."""
    acc = sum(p == g for p, g in zip(preds, gold)) / len(gold) if gold else math.nan
    f1s = []
    for c in range(n_labels):
        tp = sum(p == c and g == c for p, g in zip(preds, gold))
        fp = sum(p == c and g != c for p, g in zip(preds, gold))
        fn = sum(p != c and g == c for p, g in zip(preds, gold))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return acc, (sum(f1s) / len(f1s) if f1s else math.nan)


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer: Any, samples: Sequence[Sample], pad_id: int,
                batch_size: int = 16, max_new_tokens: int | None = None) -> float:
    """Fraction of prompt/answer samples whose greedy continuation equals the answer (text, stripped)."""
    scored = [s for s in samples if s.prompt_len > 0]
    if not scored:
        return math.nan
    hits = 0
    for start in range(0, len(scored), batch_size):
        chunk = scored[start:start + batch_size]
        answers = [tokenizer.decode(s.input_ids[s.prompt_len:], skip_special_tokens=True).strip() for s in chunk]
        limit = max_new_tokens or max(len(s.input_ids) - s.prompt_len for s in chunk)
        input_ids, mask = left_pad([s.input_ids[: s.prompt_len] for s in chunk], pad_id)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=limit, do_sample=False,
                             pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
        replies = tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
        hits += sum(r.strip() == a for r, a in zip(replies, answers))
    return hits / len(scored)


LOG_FIELDS = ("step", "epoch", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s", "eval_loss")


class MetricsLog:
    """Rows of training metrics, rewritten atomically as metrics.csv and metrics.json on every flush."""

    def __init__(self, directory: str | Path, rows: Sequence[dict[str, Any]] = ()) -> None:
        self.directory = Path(directory)
        self.rows: list[dict[str, Any]] = [dict(r) for r in rows]

    def add(self, **row: Any) -> None:
        self.rows.append({k: row.get(k) for k in LOG_FIELDS})

    def set_eval(self, step: int, eval_loss: float) -> None:
        for row in reversed(self.rows):
            if row["step"] == step:
                row["eval_loss"] = eval_loss
                return
        self.add(step=step, eval_loss=eval_loss)

    def flush(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in LOG_FIELDS})
        atomic_write_bytes(self.directory / "metrics.csv", buffer.getvalue().encode("utf-8"))
        atomic_write_json(self.directory / "metrics.json", self.rows)
