"""`train(TrainConfig) -> TrainResult`: one adapter (plus a classifier head) trained with AdamW.

Every step takes the next `batch_size` indices of a seeded, per-epoch shuffled order, so the data a
step sees depends on (seed, step) only: resuming needs no sampler state, and under DDP the global
batch is split over processes as rows [rank::world]. The loss is a sum over labelled tokens divided
by the global count, so 2 processes compute the same gradient as 1 (DDP averages, hence ×world).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import lorakit
from lorakit.io import save_adapter
from lorakit.io.files import parse_safetensors
from lorakit.io.safe_open import read_safetensors_bytes, read_safetensors_header
from lorakit.io.atomic import (atomic_write_json, fsync_dir, is_temp_name, replace_directory, reporting_write_errors,
                               sweep_stale, temp_path, tensors_bytes)
from lorakit.train import checkpoint as ckpt
from lorakit.train.collate import collate
from lorakit.train.config import TrainConfig
from lorakit.train.data import label_names, load_dataset, read_jsonl
from lorakit.train.errors import NonFiniteLossError, RunExistsError, TrainConfigError
from lorakit.train.metrics import MetricsLog, loss_sum, mean_loss
from lorakit.train.plots import plot_losses

RUN_FILE = "run_config.json"  # marks a directory as holding a run
HEAD_FILE = "head.safetensors"  # classifier head, saved beside the adapter files
HEAD_NAMES = ("classifier", "score")  # sequence-classification heads of BERT-like / decoder models
# Settings that may change on resume without changing the result.
_RESUMABLE = {"progress", "keep_checkpoints", "save_every", "log_every", "eval_every", "eval_data"}


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int  # optimiser steps done in total
    losses: list[float] = field(default_factory=list)  # train loss of each step run in this call
    eval_loss: float | None = None  # final eval loss, when eval data was given
    tokens: int = 0  # real tokens processed (all processes)
    seconds: float = 0.0
    truncated: int = 0  # training samples cut to max_length
    skipped: tuple[str, ...] = ()  # bad lines skipped
    resumed_from: str | None = None  # checkpoint this run continued from

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _say(message: str) -> None:
    print(f"lorakit train: {message}", file=sys.stderr, flush=True)


def lr_lambda(config: TrainConfig, total: int):
    """Multiplier of the peak lr at a step: linear warm-up, then constant / linear / cosine decay to 0."""
    warm = config.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if config.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def step_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Global batch of step `step`: positions step·B .. step·B+B-1 of the concatenated epoch orders."""
    out, cache = [], {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch = pos // n
        if epoch not in cache:
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        out.append(cache[epoch][pos % n])
    return out


def _check_output_dir(out: Path, config: TrainConfig, resume: bool) -> Path | None:
    """Refuse a directory holding another run unless resuming; returns the checkpoint to resume from."""
    run_file = out / RUN_FILE
    sweep_stale(out)
    if not out.exists() or not any(not is_temp_name(p.name) for p in out.iterdir()):
        return None  # new, or holding only what a crash during the first run_config.json write left
    if not resume:
        what = "another run" if run_file.exists() else f"files ({sorted(p.name for p in out.iterdir())[:5]})"
        raise RunExistsError(f"output directory {out} already holds {what}; pass resume=True (--resume) to "
                             "continue it, or choose a new directory")
    if not run_file.exists():
        raise RunExistsError(f"cannot resume in {out}: it holds no {RUN_FILE}, so it is not a lorakit run")
    saved = json.loads(run_file.read_text(encoding="utf-8"))
    now = config.to_dict()
    differ = sorted(k for k in set(saved) | set(now) if k not in _RESUMABLE and saved.get(k) != now.get(k))
    if differ:
        raise TrainConfigError(f"cannot resume {out}: settings {differ} differ from the run's "
                               f"({[(k, saved.get(k), now.get(k)) for k in differ][:3]})")
    return ckpt.latest_checkpoint(out / "checkpoints")


def _dist() -> tuple[int, int]:
    """(rank, world); initialises a gloo process group when launched by torchrun with >1 process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def load_model(config: TrainConfig, labels: tuple[str, ...] | None):
    from lorakit.models import load_base

    if labels is not None:
        return load_base(config.base, dtype=config.dtype, task="classification", num_labels=len(labels),
                         id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    return load_base(config.base, dtype=config.dtype, task="causal-lm")


def attach_or_check(model: nn.Module, config: TrainConfig) -> None:
    """Attach the run's adapter, or accept one already attached with exactly the run's settings."""
    name, wanted = config.adapter_name, config.adapter_config()
    if name not in lorakit.adapter_names(model):
        lorakit.attach(model, wanted, name)
        return
    attached = lorakit.adapter_config(model, name)
    if attached != wanted:
        raise TrainConfigError(f"the model already holds adapter {name!r} with {attached}, but the run's "
                               f"settings ({config.method}, {config.adapter}) give {wanted}")


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of the classification head (trained in full and saved with the adapter)."""
    return {n: p for n, p in model.named_parameters() if n.split(".")[0] in HEAD_NAMES}


def train(config: TrainConfig, *, resume: bool = False, model: nn.Module | None = None,
          tokenizer: Any = None) -> TrainResult:
    """Train adapter `config.adapter_name` as `config` says; writes everything under config.output_dir.

    `model`/`tokenizer` may be given to skip loading `config.base` (tests, notebooks, the quickstart and
    the demo). A given model may already carry the adapter, attached with `config.adapter_config()`
    (to inspect or evaluate it before training); otherwise it is attached here. Only that adapter's
    parameters (and a classifier head) are trained, whatever other adapters the model holds.
    """
    rank, world = _dist()
    out = Path(config.output_dir)
    resume_from = _check_output_dir(out, config, resume) if rank == 0 else None
    if world > 1:
        box = [str(resume_from) if resume_from else None]
        dist.broadcast_object_list(box, src=0)
        resume_from = Path(box[0]) if box[0] else None
    if config.batch_size % world:
        raise TrainConfigError(f"batch_size={config.batch_size} must divide evenly over {world} processes")

    records, fmt, _ = read_jsonl(config.data, config.on_bad_line)
    labels = (config.labels or label_names(records)) if fmt == "classification" else None
    torch.manual_seed(config.seed)  # the head and adapter initialisations come from here
    if model is None:
        model, tokenizer = load_model(config, labels)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_length = config.max_length or int(getattr(model.config, "max_position_embeddings", 0) or 512)
    train_set = load_dataset(config.data, tokenizer, max_length=max_length, on_bad_line=config.on_bad_line,
                             labels=labels)
    eval_set = (load_dataset(config.eval_data, tokenizer, max_length=max_length, on_bad_line=config.on_bad_line,
                             labels=labels, expect_format=fmt) if config.eval_data else None)
    if rank == 0:
        for ds in (train_set, eval_set):
            if ds is not None and ds.truncated:
                _say(f"{ds.path}: {ds.truncated} of {len(ds)} samples longer than {max_length} tokens were truncated")
            if ds is not None and ds.skipped:
                _say(f"{ds.path}: skipped {len(ds.skipped)} bad line(s), first: {ds.skipped[0]}")

    name = config.adapter_name
    attach_or_check(model, config)
    head = head_parameters(model) if labels is not None else {}
    for p in head.values():
        p.requires_grad_(True)
    trained = {id(p) for p in lorakit.adapter_parameters(model, name)} | {id(p) for p in head.values()}
    params = {n: p for n, p in model.named_parameters() if id(p) in trained}
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay)
    per_epoch = math.ceil(len(train_set) / config.batch_size)
    total = config.steps or max(1, math.ceil((config.epochs or 1.0) * per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total))

    log = MetricsLog(out)
    start_step, tokens, elapsed0 = 0, 0, 0.0
    if resume_from is not None:
        meta = ckpt.restore(resume_from, params, optimizer, scheduler)
        start_step, tokens, elapsed0 = meta["step"], meta["tokens"], meta["elapsed_s"]
        log = MetricsLog(out, meta["log"])
        if rank == 0:
            _say(f"resuming from {resume_from} at step {start_step}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_FILE, config.to_dict())

    runner: nn.Module = model
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(model)

    def save(step: int) -> Path | None:
        if rank != 0:
            return None
        return ckpt.save_checkpoint(out / "checkpoints", step, {n: p.detach() for n, p in params.items()},
                                    optimizer, scheduler, {"tokens": tokens, "elapsed_s": elapsed0 + time.perf_counter() - t0,
                                                           "log": log.rows, "config": config.to_dict()},
                                    keep=config.keep_checkpoints)

    def evaluate() -> float | None:
        if eval_set is None:
            return None
        model.eval()
        with lorakit.use_adapter(model, name):
            value = mean_loss(model, eval_set.samples, pad_id, batch_size=config.batch_size)
        model.train()
        return value

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start_step, desc=f"train {name}", unit="step",
               disable=not config.progress or rank != 0, dynamic_ncols=True)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    last_saved: Path | None = resume_from
    try:
        for step in range(start_step, total):
            indices = step_indices(step, config.batch_size, len(train_set), config.seed)[rank::world]
            batch = collate([train_set.samples[i] for i in indices], pad_id)
            stats = torch.tensor([0.0, float(batch["attention_mask"].sum())])  # (loss sum, tokens)
            counts = torch.tensor([float((batch["labels"][:, 1:] != -100).sum()) if batch["labels"].dim() == 2
                                   else float(len(indices))])
            if world > 1:
                dist.all_reduce(counts)
            with lorakit.use_adapter(model, name):
                nll, _ = loss_sum(runner, batch)
            loss = nll * world / counts.clamp_min(1)[0]
            stats[0] = nll.detach()
            if world > 1:
                dist.all_reduce(stats)
            step_loss = float(stats[0] / counts.clamp_min(1)[0])
            if not math.isfinite(step_loss):
                kept = last_saved
                if step > start_step and rank == 0 and all(torch.isfinite(p).all() for p in params.values()):
                    kept = save(step)  # the parameters are still those of the last good step
                raise NonFiniteLossError(f"loss became {step_loss} at step {step + 1}; training stopped, last "
                                         f"good checkpoint: {kept}", step + 1, str(kept) if kept else None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            tokens += int(stats[1])
            losses.append(step_loss)
            done = step + 1
            elapsed = elapsed0 + time.perf_counter() - t0
            if done % config.log_every == 0 or done == total:
                log.add(step=done, epoch=round(done * config.batch_size / len(train_set), 4), loss=step_loss, lr=lr,
                        tokens=tokens, tokens_per_s=round(tokens / max(elapsed, 1e-9), 1), elapsed_s=round(elapsed, 3))
            if rank == 0 and config.eval_every and done % config.eval_every == 0 and done != total:
                log.set_eval(done, evaluate())
                log.flush()
            elif rank == 0 and done % (20 * config.log_every) == 0:
                log.flush()  # the CSV/JSON logs can be followed while training runs
            if rank == 0 and (config.save_every and done % config.save_every == 0 and done != total):
                last_saved = save(done)
                log.flush()
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
            bar.update(1)
    finally:
        bar.close()
        model.eval()
    eval_loss = None
    adapter_dir = out / "adapter"
    if rank == 0:
        eval_loss = evaluate()
        model.eval()
        if eval_loss is not None:
            log.set_eval(total, eval_loss)
        save(total)
        write_adapter(model, name, adapter_dir, head, labels)
        log.flush()
        plot_losses(log.rows, out / "loss.png", title=f"{config.method} on {Path(config.data).name}")
    seconds = time.perf_counter() - t0
    result = TrainResult(out, adapter_dir, total, losses, eval_loss, tokens, seconds, train_set.truncated,
                         train_set.skipped, str(resume_from) if resume_from else None)
    if rank == 0:
        atomic_write_json(out / "result.json", {
            "steps": total, "final_loss": losses[-1] if losses else None, "eval_loss": eval_loss, "tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(result.tokens_per_s, 1),
            "truncated": train_set.truncated, "skipped": list(train_set.skipped), "resumed_from": result.resumed_from})
    if world > 1:
        dist.barrier()
    return result


def write_adapter(model: nn.Module, name: str, path: Path, head: dict[str, nn.Parameter],
                  labels: tuple[str, ...] | None) -> Path:
    """The adapter (PEFT / native layout) plus head.safetensors for a classifier, swapped in atomically."""
    tmp = temp_path(path)
    with reporting_write_errors(path):
        try:
            save_adapter(model, name, tmp)
            if head:
                data = tensors_bytes({n: p.detach() for n, p in head.items()},
                                     {"labels": json.dumps(list(labels or ()))})
                with open(tmp / HEAD_FILE, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                fsync_dir(tmp)
            replace_directory(tmp, path)  # the old adapter goes only once the new one has its name
            fsync_dir(path.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_head_labels(file: str | Path) -> tuple[str, ...] | None:
    """Label names stored with a classifier head, or None when there is no head file."""
    if not os.path.lexists(file):
        return None
    header = read_safetensors_header(file)  # guarded: a FIFO or a device here is an error, not a hang
    return tuple(json.loads((header.get("__metadata__") or {}).get("labels", "[]")))


def load_head(model: nn.Module, adapter_dir: str | Path) -> tuple[str, ...] | None:
    """Load head.safetensors (if present) into the model; returns the label names it was trained with."""
    file = Path(adapter_dir) / HEAD_FILE
    if not os.path.lexists(file):
        return None
    tensors, metadata = parse_safetensors(read_safetensors_bytes(file), file)
    labels = tuple(json.loads(metadata.get("labels", "[]")))
    own = dict(model.named_parameters())
    from lorakit.train.errors import LabelMismatchError

    for key, value in tensors.items():
        if key not in own or own[key].shape != value.shape:
            raise LabelMismatchError(f"{file}: head tensor {key} {tuple(value.shape)} does not fit the model "
                                     f"({tuple(own[key].shape) if key in own else 'absent'})")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    return labels
